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
