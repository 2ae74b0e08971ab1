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
