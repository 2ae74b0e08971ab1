"""ONNX -> torch through onnx2torch, made fit for CUDA-graph capture.

onnx2torch converts some operators into modules that read a tensor's values on the host while the model
runs: Pad-11+ (`pads.tolist()`), Reshape (`torch.Size(shape)`), Slice and ConstantOfShape on computed
inputs. On CUDA each such read is a device-to-host copy and a stream synchronisation inside the forward
(emotion.onnx, exported through torch.onnx, computed its four Pads' pads at run time: some twenty per call),
and a forward that synchronises cannot be captured as a CUDA graph. So before converting:

1. every node whose inputs are all constants is evaluated once (ONNX's reference runtime) and replaced by
   an initializer holding its output: the pad arithmetic of such exports disappears;
2. Pad (versions 11, 13 and 18) whose pads and constant value are initializers becomes onnx2torch's static
   Pad (Python ints, no tensor read); a Pad with computed pads keeps the dynamic module.

`host_reads` lists the modules of a converted model that still read tensors on the host; the tests run the
shipped models on torch's meta device, where any such read fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Operators never folded: their value changes between runs, or depends on the graph's inputs in ways the
# "all inputs constant" test cannot see.
_NOT_FOLDED = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "If", "Loop", "Scan", "SequenceEmpty"})
_MAX_FOLDED_ELEMENTS = 1 << 20  # a folded tensor is stored in the model: keep big generated tensors as nodes
# onnx2torch modules whose forward reads tensor values on the host (a sync on CUDA; no graph capture)
_HOST_READING = ("OnnxPadDynamic", "OnnxReshape", "OnnxSlice", "OnnxConstantOfShape", "OnnxExpand", "OnnxTile",
                 "OnnxRange", "OnnxResize", "OnnxNonMaxSuppression", "OnnxTopK", "OnnxReduceSumDynamicAxes",
                 "OnnxUnsqueezeDynamicAxes", "OnnxSqueezeDynamicAxes", "OnnxCumSum", "OnnxScatterND")


def fold_constants(model: Any) -> int:
    """Replace every node computed from constants only (initializers, Constant nodes, other folded nodes) by
    initializers holding its outputs, in place; returns how many nodes were folded. Nodes that give a graph
    output stay."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    opsets = list(model.opset_import)
    kept, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDED
            and all(name in constants for name in inputs)
            and not any(name in outputs for name in node.output)
            and not any(a.type == a.GRAPH for a in node.attribute)
        )
        values = _evaluate(node, constants, opsets, helper, numpy_helper, ReferenceEvaluator) if foldable else None
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            constants[name] = value
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return folded


def _evaluate(node: Any, constants: dict[str, np.ndarray], opsets: list[Any], helper: Any, numpy_helper: Any,
              evaluator: Any) -> list[np.ndarray] | None:
    """The node's outputs computed from its constant inputs, or None where the reference runtime cannot
    (an operator it lacks) or the result is too large to store."""
    inputs = [name for name in node.input if name]
    graph = helper.make_graph(
        [node], "fold",
        [],
        [helper.make_tensor_value_info(name, 0, None) for name in node.output],
        [numpy_helper.from_array(np.asarray(constants[name]), name) for name in inputs],
    )
    try:
        values = evaluator(helper.make_model(graph, opset_imports=opsets)).run(None, {})
    except Exception:  # the reference runtime raises many types; an unfoldable node just stays a node
        return None
    if any(np.asarray(v).size > _MAX_FOLDED_ELEMENTS for v in values):
        return None
    return [np.asarray(v) for v in values]


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def register_converters() -> None:
    """Pad-11/13/18 with constant pads as onnx2torch's static Pad (Pad-18 is missing from onnx2torch 1.5.15);
    a Pad whose pads are computed keeps the dynamic module. Idempotent."""
    from onnx import defs
    from onnx2torch.node_converters.pad import OnnxPadDynamic, OnnxPadStatic, _onnx_to_torch_mode
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

    def convert_pad(node: Any, graph: Any) -> Any:
        mode = node.attributes.get("mode", "constant")
        names = list(node.input_values)
        pads_name = names[1] if len(names) > 1 else ""
        value_name = names[2] if len(names) > 2 else ""
        axes_name = names[3] if len(names) > 3 else ""
        static = pads_name in graph.initializers and (not value_name or value_name in graph.initializers) \
            and not axes_name
        if not static:
            return OperationConverterResult(
                torch_module=OnnxPadDynamic(mode=_onnx_to_torch_mode(mode)),
                onnx_mapping=OnnxMapping(inputs=node.input_values, outputs=node.output_values),
            )
        pads = [int(v) for v in graph.initializers[pads_name].to_torch().tolist()]
        value = float(graph.initializers[value_name].to_torch().reshape(-1)[0]) if value_name else 0.0
        module = OnnxPadStatic.create_from_onnx_params(onnx_pads=pads, onnx_mode=mode, constant_value=value)
        mapping = onnx_mapping_from_node(node=node)
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=mapping.inputs[:1], outputs=mapping.outputs))

    for version in (11, 13, 18):
        description = OperationDescription(defs.ONNX_DOMAIN, "Pad", version)
        if _CONVERTER_REGISTRY.get(description) is not convert_pad:
            _CONVERTER_REGISTRY.pop(description, None)
            add_converter(operation_type="Pad", version=version)(convert_pad)


def host_reads(module: Any) -> list[str]:
    """The submodules of a converted model that read tensor values on the host while it runs."""
    return sorted({type(m).__name__ for m in module.modules() if type(m).__name__ in _HOST_READING})


def convert(model: Any) -> Any:
    """`model` (an onnx ModelProto, changed in place by constant folding) as a torch.nn.Module."""
    from onnx2torch import convert as onnx2torch_convert

    register_converters()
    fold_constants(model)
    return onnx2torch_convert(model)
