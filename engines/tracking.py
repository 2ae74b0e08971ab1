"""Multi-object tracking: a stable id per object across the frames of one video or stream.

The tracker is supervision's ByteTrack (supervision 0.23.0, the last release whose core depends on
opencv-python-headless, as this project does: later ones require the GUI build of OpenCV, which would
replace ours). ByteTrack matches high- and low-confidence boxes to Kalman-predicted tracks by IoU,
which suits detectors such as YOLO and MTCNN that already give good boxes; it needs no appearance model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.detections import Detections


def tracker_unavailable() -> str | None:
    """Why no tracker can be made in this process (its library is missing), or None. It imports the library, so
    a replica that calls it at start does not pay for the import at its first tracked frame."""
    try:
        import supervision  # noqa: F401
    except ImportError as exc:
        return f"the tracker needs supervision==0.23.0, which this environment lacks ({exc})"
    return None


@dataclass(frozen=True)
class TrackerParams:
    activation_threshold: float = 0.25  # detections above it start tracks
    lost_track_buffer: int = 30  # frames a lost track is kept for re-identification
    matching_threshold: float = 0.8  # IoU-cost threshold of the association
    frame_rate: float = 30.0


class Tracker:
    """ByteTrack over `Detections`: `update` gives each row its track id, or -1 while a new object is not
    confirmed yet (ByteTrack confirms an object that appears after the first frame on its second frame).
    Ids count from 1 in each tracker (supervision numbers tracks across all trackers of a process)."""

    def __init__(self, params: TrackerParams = TrackerParams()) -> None:
        import supervision as sv

        self._sv = sv
        self._ids: dict[int, int] = {}  # supervision's id -> this tracker's
        self._tracker = sv.ByteTrack(
            track_activation_threshold=params.activation_threshold,
            lost_track_buffer=params.lost_track_buffer,
            minimum_matching_threshold=params.matching_threshold,
            frame_rate=max(1, int(round(params.frame_rate))),
        )

    def update(self, detections: Detections) -> np.ndarray:
        """(N,) int64 track ids for this frame's detections, in their order."""
        ids = np.full(len(detections), -1, np.int64)
        frame = self._sv.Detections(
            xyxy=detections.xyxy.astype(np.float32).reshape(-1, 4),
            confidence=detections.confidence.astype(np.float32),
            class_id=detections.class_id.astype(int),
            data={"row": np.arange(len(detections))},
        )
        tracked = self._tracker.update_with_detections(frame)
        if len(tracked):
            for row, external in zip(tracked.data["row"].tolist(), tracked.tracker_id.tolist()):
                ids[row] = self._ids.setdefault(int(external), len(self._ids) + 1)
        return ids


class CarriedBoxes:
    """The tracked objects on the frames the detector skips (DeepStream nvinfer's `interval`): each track seen on
    the last detected frame, its box moved on at the velocity it had between its last two detections (constant
    velocity; a track seen once stays where it was), clipped to the frame; its score, class and landmarks (moved
    with the box) are those of its last detection. Only tracked objects (id >= 0) are carried."""

    def __init__(self) -> None:
        self._seen: Detections | None = None  # the tracked objects of the last detected frame
        self._ids = np.zeros(0, np.int64)
        self._index = 0
        self._velocity = np.zeros((0, 4), np.float32)  # pixels per frame, per carried track

    def observe(self, index: int, detections: Detections, track_ids: np.ndarray) -> None:
        """A detected frame: its objects and their track ids (from `Tracker.update`)."""
        before = self._index
        previous = {} if self._seen is None else dict(zip(self._ids.tolist(), self._seen.xyxy))
        rows = np.flatnonzero(track_ids >= 0)
        self._seen, self._ids, self._index = detections[rows], track_ids[rows].astype(np.int64), index
        self._velocity = np.zeros((len(rows), 4), np.float32)
        for k, (track, box) in enumerate(zip(self._ids.tolist(), self._seen.xyxy)):
            if track in previous and index > before:
                self._velocity[k] = (box - previous[track]) / (index - before)

    def at(self, index: int, width: int, height: int) -> tuple[Detections, np.ndarray]:
        """The carried objects on frame `index` (after the last observed one) of a `width` x `height` frame, and
        their track ids."""
        if self._seen is None:
            return Detections.empty(), np.zeros(0, np.int64)
        shift = self._velocity * float(index - self._index)
        xyxy = self._seen.xyxy + shift
        landmarks = self._seen.landmarks
        if landmarks is not None:
            centre = ((shift[:, 0] + shift[:, 2]) / 2, (shift[:, 1] + shift[:, 3]) / 2)
            landmarks = landmarks + np.stack(centre, 1)[:, None, :]
        moved = Detections(xyxy.astype(np.float32), self._seen.confidence, self._seen.class_id,
                           self._seen.class_names, None if landmarks is None else landmarks.astype(np.float32))
        inside = (moved.xyxy[:, 2] > 0) & (moved.xyxy[:, 3] > 0) & (moved.xyxy[:, 0] < width) & \
            (moved.xyxy[:, 1] < height)  # a track carried out of the frame is dropped until detected again
        return moved[inside].clip(width, height), self._ids[inside]
