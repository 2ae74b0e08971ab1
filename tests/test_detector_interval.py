"""`detector.interval` (DeepStream nvinfer's `interval`) on a real app: the detector runs on one processed frame in
interval + 1 of a video or live stream; the frames between carry each tracked face on, with its attributes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import demo_args, deployed, small
from tests.videos import two_faces

INTERVAL = 2


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("interval-media")
    two_faces(folder / "two.mp4", frames=250, enters_at=20)  # 10 s at 25 fps
    return folder


@pytest.fixture(scope="module")
def app(serve_url: str, media: Path) -> Iterator[str]:
    args = small(demo_args())
    args["detector"]["interval"] = INTERVAL
    args["ingress"]["streams"] = {"media_dir": str(media), "max_streams": 1}
    with deployed(serve_url, "interval", args) as url:
        yield url


def _moving(record: dict[str, Any]) -> dict[str, Any]:
    """The face that moves (the left one: it starts at x=10 and moves 2 px a frame)."""
    return min(record["objects"], key=lambda o: o["box"][0])


def test_a_video_is_detected_on_one_frame_in_three_and_carried_between(app: str, tmp_path: Path) -> None:
    clip = two_faces(tmp_path / "two.mp4", frames=45, enters_at=20)
    with httpx.stream("POST", f"{app}/v1/video", content=clip.read_bytes(), headers={"Content-Type": "video/mp4"},
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        *frames, last = [json.loads(line) for line in response.iter_lines() if line]
    assert [f["frame"] for f in frames] == list(range(45))
    assert [f["detected"] for f in frames] == [i % (INTERVAL + 1) == 0 for i in range(45)]
    assert last["summary"]["frames"] == 45 and last["summary"]["detected_frames"] == 15
    for i in range(31, 43):  # both faces tracked and classified by now; frames 43, 44 have no later detection
        record = frames[i]
        assert len(record["objects"]) == 2, (i, record)
        for face in record["objects"]:
            assert face["track_id"] is not None and set(face["attributes"]) == {"age", "gender", "emotion"}
        if record["detected"]:
            continue
        # a carried box lies where the detections before and after it put the face (it moves at a constant speed)
        before, after = frames[i - i % 3], frames[i - i % 3 + 3]
        share = (i % 3) / 3
        expected = (1 - share) * np.array(_moving(before)["box"]) + share * np.array(_moving(after)["box"])
        assert np.allclose(_moving(record)["box"], expected, atol=3.0), (i, _moving(record)["box"], expected)
        assert _moving(record)["track_id"] == _moving(before)["track_id"]


def test_a_live_stream_runs_the_detector_on_one_processed_frame_in_three(app: str) -> None:
    with httpx.Client(base_url=app, timeout=60) as client:
        started = client.post("/v1/streams", json={"source": "two.mp4"})
        assert started.status_code == 201, started.text
        stream_id = started.json()["id"]
        records = []
        try:
            with client.stream("GET", f"/v1/streams/{stream_id}/events", timeout=120) as response:
                for line in response.iter_lines():
                    record = json.loads(line)
                    assert "error" not in record and "summary" not in record, record
                    records.append(record)
                    if len(records) == 12:
                        break
        finally:
            client.delete(f"/v1/streams/{stream_id}")
    # frames are dropped while one is processed, but of the processed ones every third goes to the detector
    assert [r["detected"] for r in records] == [i % (INTERVAL + 1) == 0 for i in range(12)]
    assert [r["frame"] for r in records] == sorted(r["frame"] for r in records)
    carried = [o for r in records[6:] if not r["detected"] for o in r["objects"]]
    assert carried and all(o["track_id"] is not None for o in carried)


def test_carried_boxes_move_at_their_last_velocity_and_leave_with_the_frame() -> None:
    from engines import Detections
    from engines.tracking import CarriedBoxes

    def seen(boxes: list[list[float]]) -> Detections:
        n = len(boxes)
        landmarks = np.array(boxes, np.float32)[:, None, :2].repeat(5, 1)  # every landmark at the box's corner
        return Detections(np.array(boxes, np.float32), np.full(n, 0.9, np.float32), np.zeros(n, np.int32),
                          ("face",), landmarks)

    carried = CarriedBoxes()
    carried.observe(0, seen([[10, 10, 30, 30], [100, 0, 120, 20], [50, 50, 60, 60]]), np.array([1, 2, -1]))
    still, ids = carried.at(2, 200, 100)  # seen once: where it was; the untracked one is not carried
    assert ids.tolist() == [1, 2] and np.allclose(still.xyxy, [[10, 10, 30, 30], [100, 0, 120, 20]])
    carried.observe(3, seen([[16, 10, 36, 30], [150, 0, 170, 20]]), np.array([1, 2]))  # 2 and 50/3 px a frame
    moved, ids = carried.at(5, 200, 100)
    assert ids.tolist() == [1, 2]
    assert np.allclose(moved.xyxy[0], [20, 10, 40, 30]) and np.allclose(moved.landmarks[0], [[20, 10]] * 5)
    assert np.allclose(moved.xyxy[1], [150 + 100 / 3, 0, 200, 20], atol=1e-4)  # clipped to the frame's width
    gone, ids = carried.at(8, 200, 100)  # track 2 has left the frame
    assert ids.tolist() == [1] and np.allclose(gone.xyxy[0], [26, 10, 46, 30])
    assert len(CarriedBoxes().at(1, 10, 10)[0]) == 0
