"""The frames of live streams batched before the detector, as DeepStream's nvstreammux batches its sources.

Each stream's loop asks for one frame's detections at a time; here those requests wait (`Muxer`) until the batch
holds a frame of every running stream, or its first frame has waited `batched_push_timeout_ms`, and go to the
detector in one call (`detect_many`: a handle call, or the detector held in the same process), which hands them to
the engine's batcher together. Without it the
streams' frames met at the detector only when their calls happened to overlap, one handle call each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import numpy as np

from deployments.batcher import Muxer
from deployments.results import DetectorResult
from serve_app.config import MuxerConfig


class MuxedDetector:
    """A `DetectorClient` for the streams' graph: `detect` through the muxer. `detect_many`: a batch of frames to
    the detector (a handle call, or the detector held in this process)."""

    def __init__(self, detect_many: Callable[[list[Any]], Awaitable[Sequence[DetectorResult]]], config: MuxerConfig,
                 running: Callable[[], int]) -> None:
        self._muxer: Muxer[np.ndarray | bytes, DetectorResult] = Muxer(
            detect_many, config.batch_size, config.batched_push_timeout_ms / 1e3, running, config.batches_in_flight)

    async def detect(self, image: np.ndarray | bytes, source: Hashable | None = None) -> DetectorResult:
        """`source`: the stream the frame is of; a batch is full with a frame of every running stream, however
        many frames one stream has in it (detected ahead)."""
        return await self._muxer.submit(image, source)

    def stats(self) -> dict[str, Any]:
        """Batches sent, frames in them, the largest; per batch, how long it filled while it could have gone (the
        detector waiting for frames, with one batch in flight) and how long the detector took."""
        m = self._muxer
        mean = (lambda total: round(total * 1e3 / m.batches, 2)) if m.batches else (lambda total: None)
        return {"batches": m.batches, "frames": m.items, "largest_batch": m.largest,
                "mean_batch": round(m.items / m.batches, 2) if m.batches else None,
                "mean_wait_ms": mean(m.waited_s), "mean_run_ms": mean(m.ran_s), "in_flight": m.in_flight}
