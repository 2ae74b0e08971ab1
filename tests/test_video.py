"""Video over HTTP: tracking, the per-track classifier cache, limits, and the annotated video, on a real app."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import demo_args, deployed, small, without_streams
from tests.images import ASTRONAUT
from tests.videos import growing_face, two_faces, write

MP4 = {"Content-Type": "video/mp4"}


@pytest.fixture(scope="module")
def video_app(serve_url: str) -> Iterator[str]:
    """The face demo; gender re-classifies every 10 frames; videos up to 10 s, 4 MiB and 800x300 frames."""
    args = small(demo_args())
    next(c for c in args["classifiers"] if c["name"] == "gender")["reinfer_interval"] = 10
    args["ingress"]["video"] = {"max_duration_s": 10, "max_bytes": 4 * 1024 * 1024, "max_frame_pixels": 800 * 300}
    with deployed(serve_url, "video", without_streams(args)) as url:
        yield url


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def photo(video_app: str) -> dict[str, Any]:
    """What the still photo gets."""
    answer = httpx.post(f"{video_app}/v1/infer", content=ASTRONAUT.read_bytes(), headers={"Content-Type": "image/png"},
                        timeout=60).json()
    return answer["objects"][0]["attributes"]


def _lines(app: str, path: Path, **params: Any) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{app}/v1/video", content=path.read_bytes(), headers=MP4, params=params,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in response.iter_lines() if line]


@pytest.fixture(scope="module")
def two_face_lines(video_app: str, videos: Path) -> list[dict[str, Any]]:
    return _lines(video_app, two_faces(videos / "two.mp4"))


def test_each_face_keeps_one_track_with_the_photos_attributes(two_face_lines: list, photo: dict) -> None:
    *frames, last = two_face_lines
    assert [f["frame"] for f in frames] == list(range(100))
    assert frames[10]["time_ms"] == 400.0  # 25 fps
    tracks_by_side: dict[str, set[int]] = defaultdict(set)
    for f in frames:
        for obj in f["objects"]:
            if obj["track_id"] is not None:
                tracks_by_side["moving" if obj["box"][0] < 500 else "still"].add(obj["track_id"])
    assert len(tracks_by_side["moving"]) == 1 and len(tracks_by_side["still"]) == 1, dict(tracks_by_side)
    assert len(frames[39]["objects"]) == 1 and len(frames[42]["objects"]) == 2  # the second face enters at 40
    for f in frames[45:]:
        for obj in f["objects"]:
            attributes = obj["attributes"]
            assert attributes["gender"]["label"] == photo["gender"]["label"] == "female"
            assert attributes["emotion"]["label"] == photo["emotion"]["label"]
            assert abs(attributes["age"]["value"] - photo["age"]["value"]) < 5
            assert all(a["frame"] <= f["frame"] for a in attributes.values())
    summary = last["summary"]
    assert summary["frames"] == 100 and summary["tracks"] == 2
    object_frames = summary["objects_seen"]
    assert object_frames >= 155
    for name, calls in summary["classifier_calls"].items():
        assert calls <= object_frames / 4, (name, calls, object_frames)  # the cache, not every object every frame


def test_interval_reclassifies_every_n_frames_and_growth_reclassifies_a_growing_face(
    two_face_lines: list, video_app: str, videos: Path
) -> None:
    moving = [next(o for o in f["objects"] if o["box"][0] < 500) for f in two_face_lines[:-1]]
    gender_frames = sorted({o["attributes"]["gender"]["frame"] for o in moving if "gender" in o["attributes"]})
    assert np.all(np.diff(gender_frames) == 10), gender_frames  # reinfer_interval: 10
    age_frames = sorted({o["attributes"]["age"]["frame"] for o in moving if "age" in o["attributes"]})
    assert len(age_frames) == 1  # the moving face keeps its size: classified once

    *frames, last = _lines(video_app, growing_face(videos / "grow.mp4"))
    area = {f["frame"]: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) for f in frames for o in f["objects"]}
    computed = sorted({o["attributes"]["age"]["frame"] for f in frames for o in f["objects"] if "age" in o["attributes"]})
    assert 4 <= len(computed) <= 12, computed  # area x5.4 over the video, re-classified at each 20 % of growth
    for before, after in zip(computed, computed[1:]):  # (areas from boxes rounded to 0.1 px: 1 % of slack)
        assert area[after] >= 1.2 * area[before] * 0.99
        assert area[after - 1] < 1.2 * area[before] * 1.01  # and not later than that
    assert last["summary"]["classifier_calls"]["age"] == len(computed)


def test_every_nth_frame_and_the_annotated_video(video_app: str, videos: Path) -> None:
    path = videos / "two.mp4"
    *frames, last = _lines(video_app, path, every=5)
    assert [f["frame"] for f in frames] == list(range(0, 100, 5)) and last["summary"]["frames"] == 20
    drawn = httpx.post(f"{video_app}/v1/video/annotate", content=path.read_bytes(), headers=MP4,
                       params={"every": 5}, timeout=120)
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "video/mp4"
    out = videos / "drawn.mp4"
    out.write_bytes(drawn.content)
    capture = cv2.VideoCapture(str(out))
    count, first = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        first = frame if first is None else first
        count += 1
    assert count == 20 and first.shape == (300, 800, 3)
    assert (np.abs(first.astype(int) - [0, 255, 0]).sum(axis=2) < 60).sum() > 200  # green boxes were drawn


def test_bad_videos_get_clear_errors(video_app: str, videos: Path) -> None:
    post = lambda body, headers=MP4: httpx.post(f"{video_app}/v1/video", content=body, headers=headers, timeout=60)  # noqa: E731
    data = two_faces(videos / "two.mp4").read_bytes()
    assert post(data, {"Content-Type": "text/plain"}).json()["error"]["code"] == "unsupported_media_type"
    assert post(b"").json()["error"]["code"] == "empty_body"
    garbage = post(b"\0\1\2 not a video" * 100)
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "undecodable_video"
    cut = post(data[: len(data) // 2])  # an MP4 cut in half loses its index: refused before any frame
    assert cut.status_code == 400 and cut.json()["error"]["code"] == "undecodable_video"
    noise = [np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8) for i in range(300)]  # 12 s
    long = post(write(videos / "long.mp4", noise).read_bytes())
    assert long.status_code == 413 and long.json()["error"] == {
        "code": "video_too_long", "message": "the video lasts 12.0 s; the limit is 10 s"}
    wide = post(write(videos / "wide.mp4", [np.zeros((300, 808, 3), np.uint8)] * 5).read_bytes())
    assert wide.status_code == 413 and wide.json()["error"] == {
        "code": "video_too_large", "message": "frames of 808x300 exceed the limit of 240000 pixels"}
    big = post(b"\0" * (5 * 1024 * 1024))
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"


def test_a_video_that_breaks_off_ends_with_an_error_line(video_app: str, videos: Path) -> None:
    data = two_faces(videos / "two.avi", fourcc="MJPG").read_bytes()  # AVI keeps its index up front
    lines = _lines(video_app, _write_bytes(videos / "cut.avi", data[: len(data) // 2]))
    frames = [line for line in lines if "frame" in line and "objects" in line]
    error = next(line["error"] for line in lines if "error" in line)
    assert 20 < len(frames) < 100 and error["code"] == "truncated_video"
    assert error["message"] == f"the video breaks off after frame {len(frames)} of the 100 it declares"
    assert "summary" in lines[-1]


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_video_that_declares_no_usable_frame_count_is_cut_at_its_duration(video_app: str, videos: Path) -> None:
    """A raw MJPEG stream (FFmpeg reports a frame count of -9e18): the 10 s limit holds on the frames read, at
    its 25 fps, and the answer says why it stopped."""
    frame = cv2.resize(cv2.imread(str(ASTRONAUT)), (120, 120))
    raw = videos / "raw.mjpeg"
    raw.write_bytes(cv2.imencode(".jpg", frame)[1].tobytes() * 300)
    lines = _lines(video_app, raw)
    frames = [line for line in lines if "frame" in line and "objects" in line]
    assert len(frames) == 250
    assert lines[-2]["error"]["code"] == "video_too_long" and "summary" in lines[-1]
    with httpx.Client(timeout=120) as client:
        annotated = client.post(f"{video_app}/v1/video/annotate", content=raw.read_bytes(), headers=MP4)
    assert annotated.status_code == 413 and annotated.json()["error"]["code"] == "video_too_long"


def test_an_uploaded_videos_temporary_file_goes_with_it_even_unclosed(tmp_path: Path) -> None:
    import gc
    import os

    from serve_app.config import VideoConfig
    from serve_app.video import VideoFile

    video = VideoFile(two_faces(tmp_path / "v.mp4", frames=10).read_bytes(), VideoConfig())
    path = video._path
    assert os.path.exists(path)
    del video  # a response that never started: nothing called close()
    gc.collect()
    assert not os.path.exists(path)
