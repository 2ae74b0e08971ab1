"""Torch backend: the same ONNX file converted with onnx2torch, on CUDA (optionally fp16) or CPU.

This is the GPU path where TensorRT is not installed (our GPU machine has torch but neither
TensorRT nor onnxruntime-gpu), so GPU numbers come from the project's own code path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Engine, EngineError, TensorSpec

logger = logging.getLogger(__name__)

_ONNX_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64}


def _register_missing_converters() -> None:
    """onnx2torch 1.5.15 lacks Pad-18 (opset 18 models such as age.onnx); without the optional
    `axes` input it is the same operator as Pad-13, so reuse that converter."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

    pad18 = OperationDescription(defs.ONNX_DOMAIN, "Pad", 18)
    if pad18 not in _CONVERTER_REGISTRY:
        add_converter(operation_type="Pad", version=18)(_CONVERTER_REGISTRY[OperationDescription(defs.ONNX_DOMAIN, "Pad", 13)])


def _fold_constant_aliases(model: Any) -> None:
    """Turn Constant nodes, and Identity nodes over initializers, into initializers.

    torch.onnx's exporter de-duplicates equal weights behind Identity nodes (e.g. the zero biases
    of freshly folded convs), and onnx2torch only reads conv weights and biases from initializers.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        source = None
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            source = numpy_helper.to_array(initializers[node.input[0]])
        elif node.op_type == "Constant" and node.output[0] not in outputs:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                source = numpy_helper.to_array(value.t)
        if source is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(source, node.output[0])
        graph.initializer.append(tensor)
        initializers[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(kept)


def _spec(value_info: Any) -> TensorSpec:
    tensor = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    if tensor.elem_type not in _ONNX_TYPES:
        raise EngineError(f"tensor {value_info.name!r} has unsupported ONNX type {tensor.elem_type}")
    return TensorSpec(value_info.name, dims, np.dtype(_ONNX_TYPES[tensor.elem_type]))


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path: Path, device: str = "auto", fp16: bool = False, intra_op_threads: int = 1) -> None:
        try:
            import onnx
            import torch
            from onnx2torch import convert
        except ImportError as exc:
            raise EngineError(f"the torch backend needs torch and onnx2torch ({exc.name} is missing): pip install '.[torch]'") from exc
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for the torch backend, but torch sees no CUDA GPU")
        self.device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # torch's CPU thread pool is per process and defaults to every core: hold it to the replica's share
            # (stages that share a process, as in layout "ingress", share one pool; the last setting wins)
            torch.set_num_threads(intra_op_threads)
        _register_missing_converters()
        try:
            model = onnx.load(str(path))
            _fold_constant_aliases(model)
            module = convert(model)
        except Exception as exc:  # onnx2torch raises NotImplementedError and friends
            raise EngineError(f"onnx2torch cannot convert {Path(path).name}: {exc}") from exc
        initializers = {i.name for i in model.graph.initializer}
        self._inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
        self._outputs = [_spec(v) for v in model.graph.output]
        # fp16 through autocast, not .half(): ops that need fp32 (softmax, reductions, the casts some
        # exports contain) stay in fp32, and inputs and weights keep their types
        self._fp16 = fp16 and self.device == "cuda"
        self._module = module.eval().to(self.device)
        self._torch = torch
        # Each engine queues its work on its own stream, so engines that share a process (layouts colocated
        # and ingress) overlap on the GPU instead of serialising on the default stream.
        self._stream = torch.cuda.Stream() if self.device == "cuda" else None
        logger.info("loaded %s through onnx2torch on %s%s", Path(path).name, self.device, " fp16" if self._fp16 else "")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        autocast = torch.autocast("cuda", dtype=torch.float16) if self._fp16 else nullcontext()
        with torch.inference_mode(), (torch.cuda.stream(self._stream) if self._stream else nullcontext()), autocast:
            tensors = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(self.device, non_blocking=True)
                       for spec in self._inputs]
            out = self._module(*tensors)
            out = out if isinstance(out, (list, tuple)) else (out,)
            if len(out) != len(self._outputs):
                raise EngineError(
                    f"the converted model returned {len(out)} outputs, the ONNX graph declares "
                    f"{len(self._outputs)} ({[s.name for s in self._outputs]})"
                )
            # .cpu() waits for this stream's work only, then copies
            return {
                spec.name: (o.float() if o.is_floating_point() else o).cpu().numpy()
                for spec, o in zip(self._outputs, out)
            }
