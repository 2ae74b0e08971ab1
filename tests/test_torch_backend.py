"""The torch backend (onnx2torch) gives the same answers as ONNX Runtime on every shipped model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engines import EngineError, create_engine
from engines.mtcnn import Mtcnn
from tests.images import collage

if os.environ.get("CI") == "true":  # the test extra installs them: in CI, a failed install fails, it does not skip
    import onnx2torch  # noqa: F401
    import torch  # noqa: F401
else:
    pytest.importorskip("onnx2torch", reason="the torch backend needs torch and onnx2torch: pip install '.[torch]'")

MODELS = Path(__file__).resolve().parent.parent / "models"
SHAPES = {
    "age": (5, 3, 64, 64),
    "gender": (5, 3, 32, 32),
    "emotion": (5, 1, 64, 64),
    "mtcnn_pnet": (1, 3, 75, 101),
    "mtcnn_rnet": (7, 3, 24, 24),
    "mtcnn_onet": (7, 3, 48, 48),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_torch_matches_onnxruntime_on_cpu(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    reference, candidate = create_engine("onnxruntime", path, "cpu"), create_engine("torch", path, "cpu")
    assert (candidate.backend, candidate.device) == ("torch", "cpu")
    assert [t.name for t in candidate.inputs] == [t.name for t in reference.inputs]
    assert [t.name for t in candidate.outputs] == [t.name for t in reference.outputs]
    x = np.random.default_rng(0).normal(0, 1, SHAPES[name]).astype(np.float32)
    expected, got = reference.run_single(x), candidate.run_single(x)
    for output in expected:
        assert got[output].shape == expected[output].shape
        np.testing.assert_allclose(got[output], expected[output], atol=1e-4, rtol=1e-3)


def test_torch_mtcnn_finds_the_same_faces() -> None:
    def detector(backend: str) -> Mtcnn:
        return Mtcnn(*(create_engine(backend, MODELS / f"mtcnn_{n}.onnx", "cpu") for n in ("pnet", "rnet", "onet")))

    image = collage()
    ort_faces, torch_faces = detector("onnxruntime").detect(image), detector("torch").detect(image)
    assert len(torch_faces) == len(ort_faces) == 3
    np.testing.assert_allclose(torch_faces.xyxy, ort_faces.xyxy, atol=0.5)


def test_fp16_changes_nothing_on_cpu_and_cuda_is_refused_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 applies there (test_torch_on_cuda_matches_onnxruntime)")
    x = np.random.default_rng(3).normal(0, 1, SHAPES["gender"]).astype(np.float32)
    full = create_engine("torch", MODELS / "gender.onnx", "cpu").run_single(x)["probabilities"]
    half = create_engine("torch", MODELS / "gender.onnx", "auto", fp16=True).run_single(x)["probabilities"]
    assert half.dtype == np.float32
    np.testing.assert_array_equal(half, full)  # bit for bit: no half precision anywhere on CPU
    with pytest.raises(EngineError, match="torch sees no CUDA GPU"):
        create_engine("torch", MODELS / "gender.onnx", "cuda")


def test_intra_op_threads_bounds_torch_on_cpu() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        create_engine("torch", MODELS / "gender.onnx", "cpu", intra_op_threads=1)
        assert torch.get_num_threads() == 1
        create_engine("torch", MODELS / "gender.onnx", "cpu", intra_op_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_output_count_mismatch_is_an_error_not_a_silent_drop() -> None:
    import torch

    engine = create_engine("torch", MODELS / "mtcnn_pnet.onnx", "cpu")  # two outputs
    convert = engine._module
    engine._module = lambda *x: convert(*x)[:1]  # a conversion that lost an output
    with pytest.raises(EngineError, match=r"returned 1 outputs, the ONNX graph declares 2"):
        engine.run_single(np.zeros(SHAPES["mtcnn_pnet"], np.float32))
    assert isinstance(convert(torch.zeros(SHAPES["mtcnn_pnet"])), (list, tuple))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("fp16", [False, True])
def test_torch_on_cuda_matches_onnxruntime(name: str, fp16: bool) -> None:
    path = MODELS / f"{name}.onnx"
    reference = create_engine("onnxruntime", path, "cpu")
    candidate = create_engine("torch", path, "cuda", fp16=fp16)
    assert candidate.device == "cuda"
    x = np.random.default_rng(1).normal(0, 1, SHAPES[name]).astype(np.float32)
    expected, got = reference.run_single(x), candidate.run_single(x)
    # fp32 on CUDA runs convolutions in TF32 (torch's default), about 1e-3 relative per layer
    tolerance = 3e-2 if fp16 else 1e-2
    for output in expected:
        np.testing.assert_allclose(got[output], expected[output], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shipped_model_runs_without_reading_tensors_on_the_host(name: str) -> None:
    """What CUDA-graph capture needs: no op of the converted model reads a tensor's values on the host (a
    device-to-host sync on CUDA). On torch's meta device tensors have no values, so any such read fails; the
    emotion export computed its pads at run time and failed this before its constants were folded."""
    import torch

    from engines.onnx_to_torch import host_reads

    engine = create_engine("torch", MODELS / f"{name}.onnx", "cpu")
    assert host_reads(engine._module) == []
    meta = engine._module.to("meta")
    with torch.inference_mode():
        out = meta(torch.empty(SHAPES[name], device="meta"))
    assert all(o.device.type == "meta" for o in (out if isinstance(out, (list, tuple)) else (out,)))


def test_constant_folding_removes_the_pad_arithmetic_of_the_emotion_export() -> None:
    import onnx

    from engines.onnx_to_torch import fold_constants

    model = onnx.load(str(MODELS / "emotion.onnx"))
    before = {n.op_type for n in model.graph.node}
    assert {"ConstantOfShape", "Reshape", "Slice"} <= before
    assert fold_constants(model) > 0
    after = {n.op_type for n in model.graph.node}
    assert not after & {"Constant", "ConstantOfShape", "Reshape", "Slice", "Concat", "Cast", "Transpose"}
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    initializers = {i.name for i in model.graph.initializer}
    assert len(pads) == 4 and all(p.input[1] in initializers for p in pads)


@pytest.mark.parametrize("name, color", [("age", "RGB"), ("emotion", "GRAY")])
def test_normalising_inside_the_engine_gives_the_same_answer(name: str, color: str) -> None:
    """A classifier whose engine takes uint8 crops and normalises them in its forward (as on CUDA) answers as
    the one normalised on the host."""
    from engines.classifier import ClassifierModel, OutputSpec
    from engines.preprocess import Normalization

    norm = Normalization(color, 0.0078125, (127.5,) if color == "GRAY" else (122.8, 117.0, 104.3))
    output = OutputSpec("vector")
    host = ClassifierModel(create_engine("torch", MODELS / f"{name}.onnx", "cpu"), norm, output, 8)
    fused = ClassifierModel(create_engine("torch", MODELS / f"{name}.onnx", "cpu"), norm, output, 8,
                            pad_batches=True, fuse_normalization=True)
    assert (host.fused, fused.fused) == (False, True)
    fused.warm_up(64, 64)
    crops = np.random.default_rng(5).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)  # two chunks of 8
    np.testing.assert_allclose(fused.predict(crops).vector, host.predict(crops).vector, atol=1e-5)


def test_a_synchronous_engine_launches_a_finished_run_with_its_timing() -> None:
    engine = create_engine("torch", MODELS / "gender.onnx", "cpu")
    assert not engine.asynchronous
    x = np.random.default_rng(2).normal(0, 1, SHAPES["gender"]).astype(np.float32)
    pending = engine.launch({engine.inputs[0].name: x})
    assert pending.done() and pending.timing.enqueued_at >= pending.timing.launched_at
    assert pending.timing.gpu_start_at is None  # no device timeline on the CPU
    np.testing.assert_array_equal(pending.wait()["probabilities"], engine.run_single(x)["probabilities"])


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shipped_model_captures_and_its_replays_equal_eager(name: str) -> None:
    """cuda_graphs: true fails the load of a model that will not capture, so every shipped model captures.
    Each prepared bucket replays; other shapes run eager; both agree with eager within fp16's tolerance."""
    from engines.batching import bucket_samples

    path = MODELS / f"{name}.onnx"
    eager = create_engine("torch", path, "cuda", fp16=True, cuda_graphs=False)
    graphed = create_engine("torch", path, "cuda", fp16=True, cuda_graphs=True)
    assert (eager.asynchronous, graphed.asynchronous) == (False, True)
    shape = SHAPES[name]
    input_name = graphed.inputs[0].name
    graphed.prepare(bucket_samples(input_name, shape[1:], np.dtype(np.float32), 8))
    assert sorted(k[0][0][0] for k in graphed.captured) == [1, 2, 4, 8] and not eager.captured
    rng = np.random.default_rng(4)
    for batch in (1, 4, 8, 3):  # 3 is no bucket: eager
        x = rng.normal(0, 1, (batch, *shape[1:])).astype(np.float32)
        pending = graphed.launch({input_name: x})
        assert isinstance(pending.done(), bool)
        got, expected = pending.wait(), eager.run({input_name: x})
        for output in expected:
            np.testing.assert_allclose(got[output], expected[output], atol=3e-2, rtol=3e-2)
        if batch != 3:
            assert pending.timing.gpu_end_at >= pending.timing.gpu_start_at >= pending.timing.launched_at - 1e-3
    graphed.close()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
def test_three_engines_launched_before_any_wait_give_their_own_answers() -> None:
    """The fan-out's shape in one process: three graphs launched on three streams, then waited for; each
    answer is its own model's (no buffer shared, no stream crossed)."""
    from engines.batching import bucket_samples

    engines = {n: create_engine("torch", MODELS / f"{n}.onnx", "cuda", fp16=True) for n in ("age", "gender", "emotion")}
    inputs = {}
    for name, engine in engines.items():
        engine.prepare(bucket_samples(engine.inputs[0].name, SHAPES[name][1:], np.dtype(np.float32), 8))
        inputs[name] = np.random.default_rng(len(name)).normal(0, 1, (8, *SHAPES[name][1:])).astype(np.float32)
    expected = {n: e.run({e.inputs[0].name: inputs[n]}) for n, e in engines.items()}
    for _ in range(20):
        pending = {n: e.launch({e.inputs[0].name: inputs[n]}) for n, e in engines.items()}
        for name, run in pending.items():
            for output, value in run.wait().items():
                np.testing.assert_array_equal(value, expected[name][output])


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
def test_after_a_failed_capture_the_engine_captures_its_next_shape_and_every_graph_replays_right() -> None:
    """A capture invalidated mid-way (here by a device-wide synchronize inside it, which CUDA refuses while a
    stream captures) can leave its memory pool recording: torch 2.11 then refused every later capture into that
    pool (two H100 runs lost every graph of their detector so). The engine's next capture must go into a new pool
    and succeed, and the graphs before and after the failure must replay what eager gives."""
    import torch

    path, shape = MODELS / "gender.onnx", SHAPES["gender"]
    eager = create_engine("torch", path, "cuda", fp16=True, cuda_graphs=False)
    engine = create_engine("torch", path, "cuda", fp16=True, cuda_graphs="auto")
    name = engine.inputs[0].name

    def prepare(batch: int) -> None:
        engine.prepare([{name: np.zeros((batch, *shape[1:]), np.float32)}])

    prepare(1)
    real = engine._forward

    def invalidating(tensors: list) -> list:
        out = real(tensors)
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        return out

    engine._forward = invalidating
    prepare(2)  # fails: eager for that shape, with a warning
    engine._forward = real
    prepare(4)
    assert sorted(k[0][0][0] for k in engine.captured) == [1, 4]
    rng = np.random.default_rng(5)
    for batch in (1, 2, 4):
        x = rng.normal(0, 1, (batch, *shape[1:])).astype(np.float32)
        got, expected = engine.launch({name: x}).wait(), eager.run({name: x})
        for output in expected:
            np.testing.assert_allclose(got[output], expected[output], atol=3e-2, rtol=3e-2)
    engine.close()


class _TensorFactorySpy:
    """Records every aten op run inside it: a tensor made from Python data (aten.lift_fresh) inside a forward is
    a host-to-device copy on CUDA, which a CUDA-graph capture refuses."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                calls.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def test_the_fused_forward_makes_no_tensor_from_host_data() -> None:
    import torch

    from engines.classifier import ClassifierModel, OutputSpec
    from engines.preprocess import Normalization

    engine = create_engine("torch", MODELS / "gender.onnx", "cpu")
    ClassifierModel(engine, Normalization("RGB", 1 / 256, (122.8, 117.0, 104.3), (0.5, 0.5, 0.5)), OutputSpec("vector"),
                    8, fuse_normalization=True)
    spy = _TensorFactorySpy()
    with spy.mode, torch.inference_mode():
        engine._forward([torch.zeros((2, 32, 32, 3), dtype=torch.uint8)])
    assert spy.calls and "aten.lift_fresh.default" not in spy.calls


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_to_host_gives_the_values_once_the_streams_work_is_done(device: str) -> None:
    """engines/torch_engine.py's `to_host` (the detector's read of its faces): on CUDA the value of work queued on a
    side stream just before, read through page-locked memory and an event, equal to `.cpu()`'s."""
    import torch

    from engines.torch_engine import to_host

    if device == "cuda" and not _cuda():
        pytest.skip("no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
    stream = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else torch.inference_mode():
        a = torch.arange(64 * 64, dtype=torch.float32, device=device).reshape(64, 64) / 4096
        for _ in range(50):  # queued work the read must wait for
            a = a @ a.T / 64 + 1
        read = to_host(a[:3, :17])
        assert isinstance(read, np.ndarray) and read.dtype == np.float32 and read.shape == (3, 17)
        assert np.array_equal(read, a[:3, :17].cpu().numpy())
