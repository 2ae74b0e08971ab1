"""TensorRT backend. TensorRT cannot be installed on our machines, so tests that need a real engine skip
with that reason; the logic around it (binding plans, profiles, shape checks, buffer sizing, config) runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engines import EngineError, create_engine
from engines.tensorrt_plan import BindingPlan, TensorBinding, profile_for

MODELS = Path(__file__).resolve().parent.parent / "models"

try:
    import pycuda.driver  # noqa: F401
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False
needs_tensorrt = pytest.mark.skipif(
    not HAVE_TENSORRT, reason="tensorrt and pycuda are not installed (not installable on this machine; pip install '.[tensorrt]' where CUDA is)"
)


def plan() -> BindingPlan:
    image = TensorBinding(
        "images", True, np.dtype(np.float32), (-1, 3, 32, 32), ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))
    )
    probs = TensorBinding("probabilities", False, np.dtype(np.float32), (-1, 2))
    return BindingPlan((image,), (probs,))


class FakeCudaEngine:
    """The slice of TensorRT 10's ICudaEngine that BindingPlan.from_engine reads (tensor-name API)."""

    def __init__(self, tensors: dict[str, tuple[str, str, tuple[int, ...]]], profiles: dict[str, tuple]) -> None:
        self._tensors, self._profiles = tensors, profiles
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self._tensors)[i]

    def get_tensor_mode(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self._tensors[name][0])

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=self._tensors[name][1])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        return self._profiles[name]


def test_plan_is_read_by_tensor_name() -> None:
    engine = FakeCudaEngine(
        {"images": ("INPUT", "HALF", (-1, 3, 64, 64)), "output0": ("OUTPUT", "FLOAT", (-1, 81))},
        {"images": ((1, 3, 64, 64), (4, 3, 64, 64), (32, 3, 64, 64))},
    )
    p = BindingPlan.from_engine(engine)
    assert [b.name for b in p.inputs] == ["images"] and [b.name for b in p.outputs] == ["output0"]
    assert p.inputs[0].dtype == np.float16 and p.max_batch == 32
    assert p.buffer_nbytes() == {"images": 32 * 3 * 64 * 64 * 2, "output0": 32 * 81 * 4}


def test_unsupported_tensor_type_is_refused() -> None:
    engine = FakeCudaEngine({"x": ("INPUT", "FP8", (1, 3))}, {})
    with pytest.raises(EngineError, match="tensor 'x' has unsupported TensorRT type FP8"):
        BindingPlan.from_engine(engine)


def test_feeds_are_checked_against_names_shapes_and_profile() -> None:
    p = plan()
    assert p.check_feeds({"images": np.zeros((4, 3, 32, 32), np.float32)}) == 4
    with pytest.raises(EngineError, match=r"engine inputs are \['images'\], got \['image'\]"):
        p.check_feeds({"image": np.zeros((4, 3, 32, 32))})
    with pytest.raises(EngineError, match=r"takes \[-1, 3, 32, 32\], got \[4, 3, 64, 64\] \(axis 2\)"):
        p.check_feeds({"images": np.zeros((4, 3, 64, 64))})
    with pytest.raises(EngineError, match="outside the engine's optimization profile"):
        p.inputs[0].check((17, 3, 32, 32))


def test_batches_over_the_profile_are_split() -> None:
    p = plan()
    assert p.batch_slices(16) == [slice(0, 16)]
    assert p.batch_slices(40) == [slice(0, 16), slice(16, 32), slice(32, 40)]


def test_dynamic_output_dims_other_than_batch_cannot_be_sized() -> None:
    p = BindingPlan(plan().inputs, (TensorBinding("boxes", False, np.dtype(np.float32), (-1, -1, 4)),))
    with pytest.raises(EngineError, match="dynamic non-batch dimensions"):
        p.buffer_nbytes()


def test_profile_shapes_for_the_build_command() -> None:
    assert profile_for((-1, 3, 64, 64), 1, 8, 32) == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        profile_for((-1, 3, 64, 64), 8, 4, 32)
    with pytest.raises(ValueError, match="only the batch axis may be dynamic"):
        profile_for((-1, 3, -1, -1), 1, 1, 1)


def test_config_accepts_the_tensorrt_backend() -> None:
    from serve_app.config import EngineConfig

    assert EngineConfig(backend="tensorrt", device="cuda").backend == "tensorrt"


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_backend_says_how_to_get_it() -> None:
    with pytest.raises(EngineError, match=r"needs the 'tensorrt' and 'pycuda' packages .* pip install '\.\[tensorrt\]'"):
        create_engine("tensorrt", MODELS / "gender.onnx", "cuda")


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_build_command_exits_2_without_tensorrt(tmp_path: Path) -> None:
    from engines.tensorrt_build import main

    assert main([str(MODELS / "gender.onnx"), str(tmp_path / "g.engine")]) == 2


@needs_tensorrt
def test_engine_built_from_onnx_matches_onnxruntime(tmp_path: Path) -> None:
    from engines.tensorrt_build import build_engine

    engine_path = build_engine(MODELS / "gender.onnx", tmp_path / "gender.engine", max_batch=16)
    trt_engine = create_engine("tensorrt", engine_path, "cuda")
    reference = create_engine("onnxruntime", MODELS / "gender.onnx", "cpu")
    x = np.random.default_rng(0).normal(0, 1, (40, 3, 32, 32)).astype(np.float32)  # 40 > max batch: split
    np.testing.assert_allclose(trt_engine.run_single(x)["probabilities"], reference.run_single(x)["probabilities"], atol=1e-3)
