"""TensorRT backend. TensorRT cannot be installed on our machines: the test that needs a real engine skips
with that reason. Everything else runs: the plan logic on its own, and the engine and the build command
against tests/tensorrt_standin.py, which enforces TensorRT 10's and pycuda's documented rules."""

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
except ModuleNotFoundError as missing:  # absent: skip; installed but broken: the import error fails the run
    if missing.name not in ("tensorrt", "pycuda", "pycuda.driver"):
        raise
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
    assert p.buffer_nbytes({"output0": (32, 81)}) == {"images": 32 * 3 * 64 * 64 * 2, "output0": 32 * 81 * 4}


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
    assert p.check_feeds({"images": np.zeros((40, 3, 32, 32), np.float32)}) == 40  # the batch is split, not refused


def test_batches_over_the_profile_are_split() -> None:
    p = plan()
    assert p.batch_slices(16) == [slice(0, 16)]
    assert p.batch_slices(40) == [slice(0, 16), slice(16, 32), slice(32, 40)]


def test_an_output_still_unknown_at_the_profile_maximum_cannot_be_sized() -> None:
    p = BindingPlan(plan().inputs, (TensorBinding("boxes", False, np.dtype(np.float32), (-1, -1, 4)),))
    assert p.buffer_nbytes({"boxes": (16, 100, 4)})["boxes"] == 16 * 100 * 4 * 4
    with pytest.raises(EngineError, match="'boxes' has shape \\[16, -1, 4\\].*data-dependent"):
        p.buffer_nbytes({"boxes": (16, -1, 4)})


def test_profile_shapes_for_the_build_command() -> None:
    assert profile_for((-1, 3, 64, 64), 1, 8, 32) == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert profile_for((1, 3, 640, 640), 1, 8, 32) == ((1, 3, 640, 640),) * 3  # static batch: fixed, as trtexec
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        profile_for((-1, 3, 64, 64), 8, 4, 32)
    with pytest.raises(ValueError, match="only the batch axis may be dynamic"):
        profile_for((-1, 3, -1, -1), 1, 1, 1)


def test_config_refuses_mtcnn_on_tensorrt() -> None:
    from pydantic import ValidationError

    from serve_app.config import DetectorConfig

    with pytest.raises(ValidationError, match="kind mtcnn cannot use backend tensorrt: its P-Net"):
        DetectorConfig(kind="mtcnn", engine={"backend": "tensorrt"})


# ------------------------------------------------------------- against the stand-in (tests/tensorrt_standin.py)


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    from tests import tensorrt_standin

    return tensorrt_standin.install(monkeypatch)


def _engine(standin: SimpleNamespace, onnx: Path, tmp_path: Path, **build: object):  # -> TensorRTEngine
    from engines.tensorrt_build import build_engine
    from engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(build_engine(onnx, tmp_path / f"{onnx.stem}.engine", **build))


def _executed_batches(engine) -> list[int]:
    return [shapes[engine.plan.inputs[0].name][0] for shapes in engine._context.executions]


def test_a_batch_over_the_profile_is_split_into_runs_it_takes(standin: SimpleNamespace, tmp_path: Path) -> None:
    engine = _engine(standin, MODELS / "gender.onnx", tmp_path, max_batch=16)
    reference = create_engine("onnxruntime", MODELS / "gender.onnx", "cpu")
    x = np.random.default_rng(0).normal(0, 1, (40, 3, 32, 32)).astype(np.float32)
    got = engine.run_single(x)["probabilities"]
    np.testing.assert_allclose(got, reference.run_single(x)["probabilities"], atol=1e-5)
    assert _executed_batches(engine)[-3:] == [16, 16, 8]
    with pytest.raises(EngineError, match=r"takes \[-1, 3, 32, 32\], got \[2, 3, 64, 64\]"):
        engine.run_single(np.zeros((2, 3, 64, 64), np.float32))  # non-batch axes are still checked


def test_padding_and_chunks_stay_within_the_profile(standin: SimpleNamespace, tmp_path: Path) -> None:
    from engines.classifier import ClassifierModel, OutputSpec
    from engines.preprocess import Normalization

    engine = _engine(standin, MODELS / "gender.onnx", tmp_path, max_batch=32)
    model = ClassifierModel(engine, Normalization("RGB"), OutputSpec("softmax", ("f", "m")), 64, pad_batches=True)
    model.warm_up(32, 32)
    result = model.predict(np.zeros((40, 32, 32, 3), np.uint8))
    assert len(result) == 40 and model.max_batch_size == 32
    assert max(_executed_batches(engine)) == 32 and set(_executed_batches(engine)) == {1, 2, 4, 8, 16, 32}


def test_a_static_batch_export_builds_and_runs_one_engine_batch_at_a_time(standin: SimpleNamespace, tmp_path: Path) -> None:
    from tests.onnx_models import mean_colour_classifier

    onnx = mean_colour_classifier(tmp_path / "static.onnx", batch=1)  # like ultralytics' [1, 3, 640, 640]
    engine = _engine(standin, onnx, tmp_path)  # default profile 1/8/32 must not be forced on a fixed batch
    reference = create_engine("onnxruntime", onnx, "cpu")
    x = np.random.default_rng(1).uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    expected = np.concatenate([reference.run_single(x[i : i + 1])["probabilities"] for i in range(3)])
    np.testing.assert_allclose(engine.run_single(x)["probabilities"], expected, atol=1e-6)
    assert engine.max_batch == 1 and _executed_batches(engine) == [1, 1, 1]


def test_an_output_not_batch_first_is_sized_from_the_context(standin: SimpleNamespace, tmp_path: Path) -> None:
    from tests.onnx_models import mean_colour_classifier

    onnx = mean_colour_classifier(tmp_path / "flat.onnx", flatten=True)  # [N, 3] flattened to [3N]
    engine = _engine(standin, onnx, tmp_path, max_batch=4)
    reference = create_engine("onnxruntime", onnx, "cpu")
    x = np.random.default_rng(2).uniform(0, 1, (6, 3, 8, 8)).astype(np.float32)
    for batch in (x[:4], x):  # the profile's maximum (sized for [4] if axis 0 were the batch: [12] overruns), then split
        expected = reference.run_single(batch)["probabilities"]
        np.testing.assert_allclose(engine.run_single(batch)["probabilities"], expected, atol=1e-6)


def test_outputs_with_dynamic_spatial_axes_load_when_built_with_shape(standin: SimpleNamespace, tmp_path: Path) -> None:
    from tests.onnx_models import doubler

    engine = _engine(standin, doubler(tmp_path / "doubler.onnx"), tmp_path, max_batch=2,
                     input_shapes={"x": (-1, 3, 16, 16)})
    assert engine.plan.outputs[0].shape == (-1, 3, -1, -1)  # what TensorRT reports for such an engine
    x = np.ones((3, 3, 16, 16), np.float32)
    np.testing.assert_array_equal(engine.run_single(x)["y"], 2 * x)


def test_a_data_dependent_output_is_refused_at_load(standin: SimpleNamespace, tmp_path: Path) -> None:
    from tests.onnx_models import nonzero_positions

    with pytest.raises(EngineError, match="output 'positions' .* data-dependent outputs are not supported"):
        _engine(standin, nonzero_positions(tmp_path / "nonzero.onnx"), tmp_path)


def test_one_logger_per_process_and_the_context_is_released(standin: SimpleNamespace, tmp_path: Path) -> None:
    first = _engine(standin, MODELS / "gender.onnx", tmp_path)
    second = _engine(standin, MODELS / "emotion.onnx", tmp_path)
    assert len(standin.trt.loggers) == 1  # two builds, two runtimes: one logger
    assert standin.state.retained == 2
    first.close()
    second.close()
    assert standin.state.retained == 0 and standin.state.allocations == {} and standin.state.stack == []


def test_a_broken_tensorrt_install_is_an_error_not_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.abc
    import sys

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
            if name == "tensorrt":
                raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
            return None

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    monkeypatch.setitem(sys.modules, "pycuda", SimpleNamespace(driver=SimpleNamespace()))
    monkeypatch.setitem(sys.modules, "pycuda.driver", SimpleNamespace())
    with pytest.raises(ImportError, match="libnvinfer"):
        create_engine("tensorrt", MODELS / "gender.onnx", "cuda")


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


def test_a_classifier_configured_for_tensorrt_loads_and_answers_through_it(standin: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    """The config's backend reaches the engine: a classifier whose engine.backend is tensorrt builds a TensorRT
    engine (the stand-in) and answers as ONNX Runtime does on the same model."""
    from deployments.config import ClassifierConfig
    from deployments.models import build_classifier
    from engines.tensorrt_build import build_engine
    from tests.conftest import demo_args

    engine_path = build_engine(MODELS / "gender.onnx", tmp_path / "gender.engine", max_batch=8)
    section = next(c for c in demo_args()["classifiers"] if c["name"] == "gender")
    trt_model = build_classifier(ClassifierConfig.model_validate(
        {**section, "model": str(engine_path), "engine": {"backend": "tensorrt", "device": "cuda"}}), "cuda")
    ort_model = build_classifier(ClassifierConfig.model_validate(section), "cpu")
    assert trt_model.engine.backend == "tensorrt" and ort_model.engine.backend == "onnxruntime"
    crops = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(trt_model.predict(crops).score, ort_model.predict(crops).score, atol=1e-5)
    trt_model.close()


def test_runs_are_asynchronous_and_a_second_launch_never_overwrites_the_first(standin: SimpleNamespace,
                                                                             tmp_path: Path) -> None:
    """The stand-in's stream runs queued copies and inferences only when synchronised, reading host buffers as
    they are then: a launch that returned is not done, and launching again before waiting would make the first
    run read the second's input from the shared page-locked buffer. Each answer must be its own."""
    engine = _engine(standin, MODELS / "gender.onnx", tmp_path, max_batch=8)
    reference = create_engine("onnxruntime", MODELS / "gender.onnx", "cpu")
    name = engine.inputs[0].name
    rng = np.random.default_rng(1)
    a, b = (rng.normal(0, 1, (4, 3, 32, 32)).astype(np.float32) for _ in range(2))
    first = engine.launch({name: a})
    assert engine.asynchronous and not first.done()  # enqueued, not computed
    second = engine.launch({name: b})  # must wait for the first before reusing its buffers
    for run, x in ((second, b), (first, a)):
        np.testing.assert_allclose(run.wait()["probabilities"], reference.run_single(x)["probabilities"], atol=1e-5)
    engine.close()


def test_waiting_for_a_run_sleeps_instead_of_holding_a_core(standin: SimpleNamespace, tmp_path: Path) -> None:
    """A run's wait is on an event made with BLOCKING_SYNC: without it cuEventSynchronize busy-waits for as long
    as the device works (on an H100 the torch detector's wait on such an event cost 0.9 ms of host CPU an image,
    docs/benchmarks.md run 11)."""
    engine = _engine(standin, MODELS / "gender.onnx", tmp_path, max_batch=8)
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    run = engine.launch({engine.inputs[0].name: x})
    assert not run.done()
    run.wait()
    assert standin.state.busy_waits == 0
    engine.close()


def test_a_run_launched_on_one_thread_is_waited_for_on_another(standin: SimpleNamespace, tmp_path: Path) -> None:
    """As the stages' async execution does (launch on the event loop, wait on a waiter thread): CUDA's context
    stack is per thread, so the waiting thread needs the engine's context pushed there."""
    from concurrent.futures import ThreadPoolExecutor

    engine = _engine(standin, MODELS / "gender.onnx", tmp_path, max_batch=8)
    x = np.random.default_rng(2).normal(0, 1, (3, 3, 32, 32)).astype(np.float32)
    run = engine.launch({engine.inputs[0].name: x})
    with ThreadPoolExecutor(1) as waiter:
        outputs = waiter.submit(run.wait).result()
    reference = create_engine("onnxruntime", MODELS / "gender.onnx", "cpu")
    np.testing.assert_allclose(outputs["probabilities"], reference.run_single(x)["probabilities"], atol=1e-5)
    engine.close()


def test_a_workspace_too_small_for_the_network_fails_the_build(standin: SimpleNamespace, tmp_path: Path) -> None:
    from engines.tensorrt_build import build_engine

    with pytest.raises(RuntimeError, match="failed to build an engine"):
        build_engine(MODELS / "age.onnx", tmp_path / "age.engine", workspace_mib=0)


def test_an_engine_that_fails_to_load_releases_its_context_cleanly(standin: SimpleNamespace, tmp_path: Path) -> None:
    """Whatever the load made in the context (engine, execution context, buffers) goes before the context is
    detached, or the stand-in refuses the detach as CUDA would leave them dangling."""
    from engines.tensorrt_build import build_engine
    from engines.tensorrt_engine import TensorRTEngine
    from tests.onnx_models import nonzero_positions

    path = build_engine(nonzero_positions(tmp_path / "nonzero.onnx"), tmp_path / "nonzero.engine")
    with pytest.raises(EngineError, match="data-dependent"):
        TensorRTEngine(path)
    assert standin.state.retained == 0 and standin.state.allocations == {}
