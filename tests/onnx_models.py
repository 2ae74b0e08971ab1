"""Small ONNX models the tests build themselves with onnx.helper, with outputs known in advance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def constant_yolo(path: Path, output: np.ndarray, size: int = 64, only_when_bright: bool = False) -> Path:
    """A "detector" taking [1, 3, size, size] whose output is always `output` (any YOLO layout).

    only_when_bright: the output is scaled by 10 x the input's mean instead, so a black frame yields
    nothing while a real photo yields (roughly) `output` times a few.
    """
    const = numpy_helper.from_array(output.astype(np.float32), "raw")
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0)]  # ties the output to the input
    if only_when_bright:
        nodes += [helper.make_node("Mul", ["mean", "gain"], ["factor"]), helper.make_node("Mul", ["raw", "factor"], ["output0"])]
    else:
        nodes += [helper.make_node("Mul", ["mean", "zero"], ["nothing"]), helper.make_node("Add", ["raw", "nothing"], ["output0"])]
    graph = helper.make_graph(
        nodes,
        "constant_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))],
        [const, numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(np.array(10.0, np.float32), "gain")],
    )
    return _save(graph, path)


def mean_colour_classifier(path: Path, size: int = 8, sharpness: float = 0.1, batch: int | str = "N",
                           flatten: bool = False) -> Path:
    """A real (if tiny) colour classifier: softmax over the mean of each RGB channel of [N, 3, size, size].

    batch: a fixed batch size makes a static-batch export (as ultralytics' default is); flatten: the
    output is [N * 3] instead of [N, 3] (an output whose axis 0 is not the batch)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "k"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["soft" if flatten else "probabilities"], axis=1),
            *([helper.make_node("Reshape", ["soft", "flat"], ["probabilities"])] if flatten else []),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["flat"] if flatten else [batch, 3])],
        [
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            numpy_helper.from_array(np.array(sharpness, np.float32), "k"),
            *([numpy_helper.from_array(np.array([-1], np.int64), "flat")] if flatten else []),
        ],
    )
    return _save(graph, path, opset=18)


def broken_classifier(path: Path, size: int = 32) -> Path:
    """A valid model taking [N, 3, size, size] that fails at run time (reshapes 3*size*size*N values to 7x11)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["probabilities"])],
        "broken",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [7, 11])],
        [numpy_helper.from_array(np.array([7, 11], np.int64), "shape")],
    )
    return _save(graph, path)


def v8_rows(boxes: list[tuple[float, float, float, float, int, float]], num_classes: int) -> np.ndarray:
    """Ultralytics v8 output [1, 4 + C, N] from (cx, cy, w, h, class, score) rows."""
    out = np.zeros((1, 4 + num_classes, len(boxes)), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = score
    return out


def fails_on_bright_classifier(path: Path, size: int = 32) -> Path:
    """[N, 3, size, size] -> [N, 2] probabilities, but fails at run time whenever any input value is
    positive (any real photo after mean subtraction); a black health-probe crop passes."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "hw"], ["mean"], keepdims=0),
            helper.make_node("Slice", ["mean", "start", "stop", "axis1"], ["two"]),
            helper.make_node("Softmax", ["two"], ["soft"], axis=1),
            helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
            helper.make_node("Greater", ["peak", "zero"], ["bright"]),
            helper.make_node("Cast", ["bright"], ["extra"], to=TensorProto.INT64),
            helper.make_node("Add", ["two_cols", "extra"], ["cols"]),
            helper.make_node("Unsqueeze", ["cols", "axis0"], ["cols1"]),
            helper.make_node("Concat", ["minus_one", "cols1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["soft", "shape"], ["probabilities"]),
        ],
        "fails_on_bright",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([2], np.int64), "stop"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(2, np.int64), "two_cols"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ],
    )
    return _save(graph, path, opset=18)


def doubler(path: Path) -> Path:
    """[N, 3, H, W] -> 2x the input, every axis dynamic: an output whose non-batch axes follow the input's
    height and width (as a fully convolutional detector's do)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    return _save(graph, path)


def nonzero_positions(path: Path) -> Path:
    """[N, 4] -> the positions of its non-zero values, [2, K]: an output whose size depends on the data."""
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["positions"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("positions", TensorProto.INT64, [2, "K"])],
    )
    return _save(graph, path)


def slow_classifier(path: Path, size: int = 32, iterations: int = 250, width: int = 384) -> Path:
    """[N, 3, size, size] -> [N, 2] softmax over the mean of the first two channels, after a fixed amount of
    work per call (a Loop of `iterations` width x width MatMuls tied to the input, so nothing is folded away
    at load): a classifier whose calls stay in flight long enough to be caught by a fault."""
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "weights"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [width, width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [width, width])],
    )
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "hw"], ["mean"], keepdims=0),  # [N, 3]
            helper.make_node("ReduceMean", ["mean"], ["scalar"], keepdims=0),
            helper.make_node("Mul", ["scalar", "zero"], ["nothing"]),
            helper.make_node("Add", ["seed", "nothing"], ["start"]),  # the loop depends on the input
            helper.make_node("Loop", ["trips", "true", "start"], ["end"], body=loop_body),
            helper.make_node("ReduceMean", ["end"], ["spun"], keepdims=0),
            helper.make_node("Mul", ["spun", "zero"], ["tiny"]),
            helper.make_node("Slice", ["mean", "start0", "stop2", "axis1"], ["two"]),
            helper.make_node("Add", ["two", "tiny"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(rng.normal(0, 0.05, (width, width)).astype(np.float32), "seed"),
            numpy_helper.from_array(rng.normal(0, 0.05, (width, width)).astype(np.float32), "weights"),
            numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.array([0], np.int64), "start0"),
            numpy_helper.from_array(np.array([2], np.int64), "stop2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    return _save(graph, path, opset=18)
