"""The GPU-resident MTCNN (engines/mtcnn_torch.py) finds the numpy cascade's faces: on the CPU device here,
exactly (boxes within 1 px; in practice 1e-4 px), and on CUDA within fp16's reach (on the GPU machine)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engines import create_engine
from engines.mtcnn import Mtcnn
from tests.images import ASTRONAUT, CAMERA, DATA, NO_FACE, collage, read

if os.environ.get("CI") == "true":  # the test extra installs torch: in CI a failed install fails, it does not skip
    import torch
else:
    torch = pytest.importorskip("torch", reason="the GPU-resident cascade needs torch: pip install '.[torch]'")

from engines.mtcnn_torch import TorchMtcnn, _power_chunks  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
PHOTOS = {
    "astronaut": lambda: read(ASTRONAUT),
    "camera": lambda: read(CAMERA),
    "no_face": lambda: read(NO_FACE),
    "cmyk": lambda: read(DATA / "astronaut_cmyk.jpg"),
    "collage": collage,
}


def _nets(backend: str, device: str, **options: object) -> list:
    return [create_engine(backend, MODELS / f"mtcnn_{n}.onnx", device, **options) for n in ("pnet", "rnet", "onet")]


@pytest.fixture(scope="module")
def reference() -> Mtcnn:
    return Mtcnn(*_nets("onnxruntime", "cpu"))


@pytest.fixture(scope="module")
def on_cpu() -> TorchMtcnn:
    detector = TorchMtcnn(*_nets("torch", "cpu"))
    detector.warm_up()
    return detector


def _same_faces(got, expected, atol: float) -> None:
    assert len(got) == len(expected)
    if len(expected):
        order_got, order_expected = np.argsort(got.xyxy[:, 0]), np.argsort(expected.xyxy[:, 0])
        np.testing.assert_allclose(got.xyxy[order_got], expected.xyxy[order_expected], atol=atol)
        np.testing.assert_allclose(got.landmarks[order_got], expected.landmarks[order_expected], atol=atol)
        np.testing.assert_allclose(got.confidence[order_got], expected.confidence[order_expected], atol=1e-3)


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_the_torch_cascade_on_cpu_finds_the_numpy_cascades_faces(photo: str, reference: Mtcnn,
                                                                 on_cpu: TorchMtcnn) -> None:
    image = PHOTOS[photo]()
    expected = reference.detect(image)
    assert len(expected) == {"astronaut": 1, "camera": 1, "no_face": 0, "cmyk": 1, "collage": 3}[photo]
    _same_faces(on_cpu.detect(image), expected, atol=1.0)


def test_a_batch_of_mixed_sizes_gives_each_frame_its_own_faces(reference: Mtcnn, on_cpu: TorchMtcnn) -> None:
    """Same-size frames share each P-Net run; different sizes go their own way; R-Net and O-Net take every
    frame's candidates together. Each frame still gets exactly its faces."""
    frames = [PHOTOS[p]() for p in ("astronaut", "collage", "no_face", "camera", "astronaut")]
    for got, frame in zip(on_cpu.detect_batch(frames), frames):
        _same_faces(got, reference.detect(frame), atol=1.0)


def test_the_detector_config_picks_the_torch_cascade_where_asked() -> None:
    from deployments.models import build_detector
    from serve_app.config import DetectorConfig

    numpy_default = build_detector(DetectorConfig(engine={"backend": "torch"}), "cpu")  # auto: torch on CUDA only
    assert type(numpy_default) is Mtcnn
    forced = build_detector(DetectorConfig(engine={"backend": "torch"}, mtcnn={"implementation": "torch"}), "cpu")
    assert type(forced) is TorchMtcnn
    with pytest.raises(ValueError, match="implementation: torch runs the cascade on the torch backend"):
        DetectorConfig(mtcnn={"implementation": "torch"})  # onnxruntime nets


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
@pytest.mark.parametrize("fp16", [False, True])
def test_the_cascade_on_cuda_finds_the_numpy_cascades_faces(fp16: bool, reference: Mtcnn) -> None:
    """On the GPU the nets compute in TF32 (fp32 convolutions) or fp16, so scores move in the third digit:
    the same faces, boxes within a few pixels (the measured deviation is printed)."""
    detector = TorchMtcnn(*_nets("torch", "cuda", fp16=fp16))
    detector.warm_up()
    assert all(e.captured for e in (detector.rnet, detector.onet))  # every R-Net and O-Net bucket replays
    for photo in sorted(PHOTOS):
        image = PHOTOS[photo]()
        expected = reference.detect(image)
        for attempt in range(3):  # eager, then captured on the second sight, then replayed
            got = detector.detect(image)
            _same_faces(got, expected, atol=4.0)
            if len(got):
                print(f"{photo} fp16={fp16} attempt {attempt}: max box deviation "
                      f"{np.abs(np.sort(got.xyxy, 0) - np.sort(expected.xyxy, 0)).max():.2f} px")
    assert detector._pnet_graphs and all(not isinstance(g, str) for g in detector._pnet_graphs.values())


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU here (run on the GPU machine: see docs/benchmarks.md)")
def test_a_replayed_pnet_stage_gives_what_eager_gives() -> None:
    """One graph per frame size and chunk of frames: a batch of three same-size frames is a chunk of two and one
    of one, each replayed, and each frame gets its own maps."""
    detector = TorchMtcnn(*_nets("torch", "cuda"))
    image = collage()
    frames = detector._upload([image, image[:, ::-1].copy(), image[::-1].copy()])
    pyramid = detector._pyramid(*image.shape[:2])
    batch = frames[0][1]
    with torch.inference_mode(), torch.cuda.stream(detector._stream):
        eager = [t.clone() for t in detector._pnet_maps(batch, pyramid)]
        detector._pnet_maps_of(batch, pyramid)  # first sight of (size, 2) and (size, 1): eager
        replayed = [t.clone() for t in detector._pnet_maps_of(batch, pyramid)]  # captured, replayed
        single = [t.clone() for t in detector._pnet_maps_of(batch[2:3], pyramid)]
    height, width = image.shape[:2]
    assert set(detector._pnet_graphs) == {(height, width, 2), (height, width, 1)}
    assert not any(isinstance(g, str) for g in detector._pnet_graphs.values())
    for a, b, c in zip(eager, replayed, single):
        # eager ran the batch of three, the graphs two frames and one: cuDNN picks other (TF32) kernels per
        # batch size, which moves probabilities by up to ~6e-4 (seen on the H200); replays of one graph agree
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(b[2:3], c, atol=0, rtol=0)


def test_frames_go_through_pnet_in_chunks_of_powers_of_two() -> None:
    assert _power_chunks(1, 16) == [1] and _power_chunks(13, 16) == [8, 4, 1]
    assert _power_chunks(40, 16) == [16, 16, 8] and _power_chunks(0, 16) == []
    for count in range(1, 70):
        chunks = _power_chunks(count, 16)
        assert sum(chunks) == count and all(c & (c - 1) == 0 and c <= 16 for c in chunks)
        assert chunks == sorted(chunks, reverse=True) and len(set(chunks) - {16}) == len(chunks) - chunks.count(16)


def test_the_pnet_stage_it_captures_makes_no_tensor_from_host_data(on_cpu: TorchMtcnn) -> None:
    """The pyramid and P-Net, which become one CUDA graph per frame size, only compute on tensors already on
    the device (their resize weights are made once per size, outside)."""
    from tests.test_torch_backend import _TensorFactorySpy

    image = read(ASTRONAUT)
    (_, rgb), = on_cpu._upload([image])
    pyramid = on_cpu._pyramid(*image.shape[:2])
    spy = _TensorFactorySpy()
    with spy.mode, torch.inference_mode():
        on_cpu._pnet_maps(rgb, pyramid)
    assert spy.calls and "aten.lift_fresh.default" not in spy.calls
