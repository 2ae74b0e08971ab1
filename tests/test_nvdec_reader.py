"""Live streams decoded on NVDEC (serve_app/nvdec_reader.py). Without an NVIDIA driver the decoder is the stand-in
of tests/nvdec_standin.py, which holds the reader to PyNvVideoCodec's rules (Annex B packets, RGB out, surfaces
valid until the next Decode); the demuxing, the packets, the scaling, rotation and counts are the reader's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.streams import make_clip
from serve_app.config import StreamsConfig
from serve_app.egress import FILE_OPTIONS
from serve_app.nvdec_reader import NvdecFileReader, NvdecReader, nvdec_unavailable, reader_class
from serve_app.stream_reader import Opened, StreamReader
from serve_app.streams import StreamRegistry
from tests import nvdec_standin
from tests.videos import turned_display


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av", reason="the stand-in decodes with PyAV (the GPU machine's trimmed environment lacks it)")
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", nvdec_standin.module())


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # module-scoped fixtures are set up before the function-scoped `standin`: skip here too, rather than error
    pytest.importorskip("av", reason="the clip is encoded with PyAV (the GPU machine's trimmed environment lacks it)")
    return make_clip(tmp_path_factory.mktemp("nvdec") / "clip.mp4", 640, 360, 2.0)


def _read(kind: type[StreamReader], path: Path, max_side: int = 320,
          device: str | None = None) -> tuple[StreamReader, Opened]:
    opened: list[object] = []
    reader = kind(str(path), dict(FILE_OPTIONS), path.name, open_timeout_s=10, read_timeout_s=10,
                  max_frame_pixels=3840 * 2160, max_side=max_side, pace=False, on_opened=opened.append, device=device)
    assert reader.ended.wait(60), "the reader did not finish the clip"
    assert reader.error is None, reader.error
    assert isinstance(opened[0], Opened), opened
    return reader, opened[0]


def test_an_h264_file_decodes_on_nvdec_frame_for_frame_like_ffmpeg(standin: None, clip: Path) -> None:
    nvdec, opened = _read(NvdecReader, clip)
    ffmpeg, _ = _read(StreamReader, clip)
    assert nvdec.decoder == "nvdec" and ffmpeg.decoder == "ffmpeg"
    assert nvdec.frames == ffmpeg.frames == 60 and nvdec.decode_errors == 0
    assert nvdec.size == ffmpeg.size == (640, 360) and (opened.width, opened.height) == (640, 360)
    ours, theirs = nvdec.take(), ffmpeg.take()
    assert ours is not None and theirs is not None
    assert ours.image.shape == theirs.image.shape == (180, 320, 3) and ours.scale == theirs.scale == (0.5, 0.5)
    # the same last frame, scaled on the device (area) against FFmpeg's area scaler: a few levels apart at most;
    # a surface taken after the decoder reused it (white) or RGB taken for BGR would be far off
    assert np.abs(ours.image.astype(int) - theirs.image.astype(int)).mean() < 3


def test_a_phone_video_decoded_on_nvdec_is_turned_upright_as_ffmpeg_turns_it(standin: None, clip: Path,
                                                                          tmp_path: Path) -> None:
    phone = turned_display(clip, tmp_path / "phone.mp4")
    nvdec, _ = _read(NvdecReader, phone)
    ffmpeg, _ = _read(StreamReader, phone)
    assert nvdec.size == ffmpeg.size == (360, 640)  # the displayed size
    ours, theirs = nvdec.take(), ffmpeg.take()
    assert ours is not None and theirs is not None and ours.image.shape == theirs.image.shape == (320, 180, 3)
    assert np.abs(ours.image.astype(int) - theirs.image.astype(int)).mean() < 3


@pytest.mark.parametrize("kind", [NvdecReader, StreamReader])
def test_frames_kept_on_the_models_device_are_the_host_frames_there_turned_upright_too(
        standin: None, clip: Path, tmp_path: Path, kind: type[StreamReader]) -> None:
    """A stream worker whose models take frames on their device gets each frame there (a torch tensor: NVDEC's
    without a trip to the host, FFmpeg's copied once), the same pixels as the host frame, a phone video's turned."""
    phone = turned_display(clip, tmp_path / "phone.mp4")
    for path in (clip, phone):
        kept, _ = _read(kind, path, device="cpu")
        host, _ = _read(kind, path)
        ours, theirs = kept.take(), host.take()
        assert ours is not None and theirs is not None and not isinstance(ours.image, np.ndarray)
        assert str(ours.image.device) == "cpu" and ours.image.is_contiguous()
        assert np.array_equal(ours.image.numpy(), theirs.image) and ours.scale == theirs.scale


def test_codecs_nvdec_does_not_take_are_decoded_by_ffmpeg(standin: None, tmp_path: Path) -> None:
    from tests.videos import two_faces

    mpeg4 = two_faces(tmp_path / "mpeg4.mp4", frames=30, enters_at=5)  # MPEG-4 part 2
    reader, _ = _read(NvdecReader, mpeg4)
    assert reader.decoder == "ffmpeg" and reader.frames == 30


def test_the_reader_is_chosen_by_the_setting_and_what_the_replica_has(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reader_class("ffmpeg", None, True) is StreamReader
    assert reader_class("auto", "no GPU here", False) is StreamReader
    if importlib.util.find_spec("av") is not None:  # the GPU machine's trimmed environment has no PyAV
        assert reader_class("auto", None, False) is NvdecReader  # PyAV demuxes, with the guard; NVDEC decodes
    monkeypatch.setitem(sys.modules, "av", None)  # where PyAV is missing: NVDEC's own demuxer, for files only
    assert reader_class("auto", None, True) is NvdecFileReader
    assert reader_class("auto", None, False) is StreamReader
    assert nvdec_unavailable(0.0) == "the streams deployment holds no GPU (ingress.streams.deployment.num_gpus is 0)"
    assert StreamRegistry(StreamsConfig(), lambda fps: None).decoder == "ffmpeg"


def test_asking_for_nvdec_where_it_cannot_run_fails_the_start_saying_why() -> None:
    config = StreamsConfig(decoder="nvdec")  # the streams deployment holds no GPU by default
    with pytest.raises(ValueError, match="ingress.streams.decoder is nvdec, but the streams deployment holds no GPU"):
        StreamRegistry(config, lambda fps: None)


def _real_nvdec() -> str | None:
    """Why the real PyNvVideoCodec cannot run here, or None."""
    return nvdec_unavailable(1.0)


CLIP = Path(__file__).parent / "data" / "faces_h264.mp4"  # H.264, 320x240, 30 fps, 60 frames (make_clip)


@pytest.mark.skipif(_real_nvdec() is not None, reason=f"no NVDEC here ({_real_nvdec()}); runs on the GPU machine")
def test_the_real_nvdec_decodes_a_file_frame_for_frame_like_opencv() -> None:
    """On a GPU: PyNvVideoCodec itself, demuxing the file (the reader for machines without PyAV), against OpenCV's
    FFmpeg decode of the same clip."""
    import cv2

    from serve_app.nvdec_reader import NvdecFileReader

    reader, opened = _read(NvdecFileReader, CLIP, max_side=0)
    assert reader.decoder == "nvdec" and reader.frames == 60 and (opened.width, opened.height) == (320, 240)
    capture = cv2.VideoCapture(str(CLIP))
    last = None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        last = frame
    ours = reader.take()
    assert ours is not None and last is not None and ours.image.shape == last.shape
    assert np.abs(ours.image.astype(int) - last.astype(int)).mean() < 3  # BGR, the same picture
    # kept on the device (a stream worker's models there): the same frame, never through the host
    on_device, _ = _read(NvdecFileReader, CLIP, max_side=0, device="cuda")
    kept = on_device.take()
    assert kept is not None and kept.image.is_cuda and np.array_equal(kept.image.cpu().numpy(), ours.image)


def test_a_file_demuxed_by_pynvvideocodec_itself_streams_like_ffmpeg(standin: None, clip: Path) -> None:
    """The reader for machines without PyAV (the GPU machine's trimmed environment): the library's own demuxer."""
    from serve_app.nvdec_reader import NvdecFileReader

    nvdec, opened = _read(NvdecFileReader, clip)
    ffmpeg, _ = _read(StreamReader, clip)
    assert nvdec.frames == ffmpeg.frames == 60 and (opened.width, opened.height, opened.fps) == (640, 360, 30.0)
    ours, theirs = nvdec.take(), ffmpeg.take()
    assert ours is not None and theirs is not None and ours.image.shape == theirs.image.shape
    assert np.abs(ours.image.astype(int) - theirs.image.astype(int)).mean() < 3


def _video_frames(kind: type, data: bytes, every: int) -> tuple[list[int], list[np.ndarray], int]:
    from serve_app.config import VideoConfig

    with kind(data, VideoConfig()) as video:
        indices, images = [], []
        for index, image in video.frames(every):
            indices.append(index)
            images.append(image)
        return indices, images, video.frames_read


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("turned", [False, True], ids=["upright", "phone"])
def test_an_uploaded_video_decodes_on_nvdec_as_opencv_decodes_it(standin: None, clip: Path, tmp_path: Path,
                                                                 every: int, turned: bool) -> None:
    from serve_app.video import NvdecVideoFile, VideoFile

    data = (turned_display(clip, tmp_path / "phone.mp4") if turned else clip).read_bytes()
    ours, theirs = _video_frames(NvdecVideoFile, data, every), _video_frames(VideoFile, data, every)
    assert ours[0] == theirs[0] == list(range(0, 60, every)) and ours[2] == theirs[2] == 60
    for mine, cv in zip(ours[1], theirs[1]):
        assert mine.shape == cv.shape == ((640, 360, 3) if turned else (360, 640, 3))
        assert np.abs(mine.astype(int) - cv.astype(int)).mean() < 3


def test_videos_nvdec_does_not_take_are_read_by_opencv(standin: None, tmp_path: Path) -> None:
    from serve_app.video import NvdecVideoFile
    from tests.videos import two_faces

    data = two_faces(tmp_path / "mpeg4.mp4", frames=20, enters_at=5).read_bytes()  # MPEG-4 part 2
    indices, _, read = _video_frames(NvdecVideoFile, data, 1)
    assert indices == list(range(20)) and read == 20


def test_videos_go_to_nvdec_only_where_the_ingress_keeps_frames_on_a_cuda_device() -> None:
    from serve_app.config import PipelineConfig
    from serve_app.ingress import videos_on_nvdec
    from tests.conftest import demo_args

    args = demo_args()
    assert videos_on_nvdec(PipelineConfig.model_validate(args), None) is False
    args["ingress"]["video"] = {"decoder": "nvdec"}
    with pytest.raises(ValueError, match="ingress.video.decoder is nvdec, but the ingress keeps no frames on a CUDA"):
        videos_on_nvdec(PipelineConfig.model_validate(args), None)


def test_a_file_nvdec_cannot_decode_is_refused_at_once_not_left_waiting(standin: None, clip: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The library refusing to make a decoder for the file answers the start with the reason (the start waits for
    that answer: without one it would hang until the client gave up)."""
    from serve_app.decoding import InputError
    from serve_app.nvdec_reader import NvdecFileReader

    def refuse(**_: object) -> None:
        raise RuntimeError("CreateDecoder: this profile is not supported by the card")

    monkeypatch.setattr(sys.modules["PyNvVideoCodec"], "CreateDecoder", refuse)
    answers: list[object] = []
    reader = NvdecFileReader(str(clip), dict(FILE_OPTIONS), clip.name, open_timeout_s=10, read_timeout_s=10,
                             max_frame_pixels=3840 * 2160, max_side=320, pace=False, on_opened=answers.append)
    assert reader.ended.wait(30)
    assert len(answers) == 1 and isinstance(answers[0], InputError) and answers[0].status == 422, answers
    assert "cannot open clip.mp4 for NVDEC: CreateDecoder: this profile is not supported" in answers[0].message


def test_a_stream_nvdec_cannot_decode_falls_back_to_ffmpeg(standin: None, clip: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise RuntimeError("CreateDecoder: this profile is not supported by the card")

    monkeypatch.setattr(sys.modules["PyNvVideoCodec"], "CreateDecoder", refuse)
    reader, _ = _read(NvdecReader, clip)
    assert reader.decoder == "ffmpeg" and reader.frames == 60


def test_a_video_nvdec_cannot_decode_is_read_by_opencv(standin: None, clip: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.video import NvdecVideoFile

    def refuse(**_: object) -> None:
        raise RuntimeError("CreateDecoder: this profile is not supported by the card")

    monkeypatch.setattr(sys.modules["PyNvVideoCodec"], "CreateDecoder", refuse)
    indices, images, read = _video_frames(NvdecVideoFile, clip.read_bytes(), 2)
    assert indices == list(range(0, 60, 2)) and read == 60 and images[0].shape == (360, 640, 3)


def test_an_uploaded_videos_frames_stay_on_the_device_the_models_take_them_on(standin: None, clip: Path) -> None:
    """Where the models take frames on a device, NVDEC's frames stay there (a torch tensor on it; the CPU device
    here, the same code as CUDA): the host path's frames, not copied to the host and back."""
    import torch

    from serve_app.video import NvdecVideoFile, VideoFile

    def on(device: str):
        return lambda data, limits: NvdecVideoFile(data, limits, device=device)

    data = clip.read_bytes()
    ours, theirs = _video_frames(on("cpu"), data, 2), _video_frames(VideoFile, data, 2)
    assert ours[0] == theirs[0] == list(range(0, 60, 2))
    for mine, cv in zip(ours[1], theirs[1]):
        assert isinstance(mine, torch.Tensor) and mine.device.type == "cpu" and tuple(mine.shape) == cv.shape
        assert np.abs(mine.numpy().astype(int) - cv.astype(int)).mean() < 3


def test_a_video_on_nvdec_with_frames_on_the_device_gives_the_host_paths_records(
        standin: None, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream worker's /v1/video (serve_app/stream_host.py) with NVDEC and the torch models on the CPU device
    taking frames there, against the same worker keeping frames on the host (OpenCV): the same faces each frame,
    boxes within two pixels. The frames the session got were the device's."""
    pytest.importorskip("onnx2torch")
    import asyncio

    import serve_app.nvdec_reader
    from serve_app import video as video_module
    from serve_app.config import PipelineConfig
    from serve_app.stream_host import StreamHost
    from serve_app.wiring import in_process
    from tests.conftest import demo_args, on_the_cpu_device

    kinds: set[str] = set()
    frames = video_module.NvdecVideoFile.frames

    def spied(self: video_module.NvdecVideoFile, every: int = 1):  # type: ignore[no-untyped-def]
        for index, frame in frames(self, every):
            kinds.add(type(frame).__name__)
            yield index, frame

    monkeypatch.setattr(video_module.NvdecVideoFile, "frames", spied)

    def records(on_device: bool) -> list[dict]:
        args = on_the_cpu_device(demo_args(), on_device)
        config = PipelineConfig.model_validate(args)
        # NVDEC for videos only where frames stay on the device (on CUDA in the service; the CPU device here)
        monkeypatch.setattr(serve_app.nvdec_reader, "videos_on_nvdec", lambda config, decoder: decoder is not None)
        host = StreamHost(config, lambda: in_process(config, {}), 0.0)

        async def run() -> list[dict]:
            try:
                return [r async for r in host.video(clip.read_bytes(), 3)]
            finally:
                await host.close()

        return asyncio.run(run())

    on_device, on_host = records(True), records(False)
    assert kinds == {"Tensor"}  # only the device run decoded on NVDEC, and its frames were tensors
    ours = [r for r in on_device if "objects" in r]
    theirs = [r for r in on_host if "objects" in r]
    assert len(ours) == len(theirs) == 20 and sum(len(r["objects"]) for r in ours) >= 20
    for mine, cv in zip(ours, theirs):
        assert len(mine["objects"]) == len(cv["objects"])
        for a, b in zip(sorted(o["box"] for o in mine["objects"]), sorted(o["box"] for o in cv["objects"])):
            assert np.abs(np.subtract(a, b)).max() <= 2.0, (a, b)
