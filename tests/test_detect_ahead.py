"""A live stream's next frame is detected while its current one is tracked and classified
(`ingress.streams.detect_ahead`), so that one stream's frames do not wait for each other's whole pipeline:
without it a stream's rate is one over the sum of detect, track and classify, whatever the GPU has left."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.config import StreamsConfig
from serve_app.streams import StreamRegistry
from tests.videos import two_faces

FRAMES = 25


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ahead-media")
    two_faces(folder / "short.mp4", frames=FRAMES, enters_at=5)  # 1 s at 25 fps
    return folder


class Pipelined:
    """A session that records, as each frame is begun, how many frames are begun and not yet completed, and
    (`wait_for_next`) holds each completion until a later frame has been begun or the source has ended (at most
    30 s)."""

    def __init__(self, wait_for_next: bool) -> None:
        self.track_count = 0
        self.wait_for_next = wait_for_next
        self.begun: list[int] = []
        self.completed: list[int] = []
        self.in_flight: list[int] = []  # begun and not completed, as each frame is begun
        self.overlapped: list[bool] = []  # a later frame was begun while this one was being completed
        self._changed = asyncio.Event()
        self.source_ended: Callable[[], bool] = lambda: False

    def begin(self, image: np.ndarray, source: str) -> int:
        self.begun.append(len(self.begun))
        self.in_flight.append(len(self.begun) - len(self.completed))
        self._changed.set()
        return self.begun[-1]

    async def complete(self, index: int, image: np.ndarray, begun: int) -> dict[str, Any]:
        if self.wait_for_next:
            try:
                await asyncio.wait_for(self._later_than(begun), 30)
            except TimeoutError:
                pass
        self.overlapped.append(len(self.begun) > begun + 1)
        self.completed.append(begun)
        return {"frame": index, "objects": []}

    async def _later_than(self, begun: int) -> None:
        while len(self.begun) <= begun + 1 and not self.source_ended():
            self._changed.clear()
            with contextlib.suppress(TimeoutError):  # the reader's end is a thread's event: looked at every 50 ms
                await asyncio.wait_for(self._changed.wait(), 0.05)

    def summary(self) -> dict[str, Any]:
        return {"summary": {"frames": len(self.completed)}}


def _play(media: Path, session: Pipelined, detect_ahead: int) -> dict[str, Any]:
    registry = StreamRegistry(StreamsConfig(media_dir=media, detect_ahead=detect_ahead), lambda fps: session)

    async def play() -> dict[str, Any]:
        stream = await registry.start("short.mp4")
        session.source_ended = stream.reader.ended.is_set
        await asyncio.wait([stream.task], timeout=120)
        final = registry.describe(stream.id)
        await registry.close()
        return final

    return asyncio.run(play())


def test_the_next_frame_is_detected_while_the_one_before_is_classified(media: Path) -> None:
    session = Pipelined(wait_for_next=True)
    final = _play(media, session, detect_ahead=1)
    assert final["state"] == "ended" and final["frames_processed"] == len(session.completed)
    assert session.completed == sorted(session.completed)  # published in the order they were begun
    # each completion (but the last few, when the clip ended) saw the next frame's detection already begun
    assert sum(session.overlapped) >= len(session.completed) - 2 >= FRAMES // 2
    assert max(session.in_flight) == 2  # no more than detect_ahead + 1 frames begun and not published


def test_detect_ahead_zero_takes_one_frame_at_a_time(media: Path) -> None:
    session = Pipelined(wait_for_next=False)
    final = _play(media, session, detect_ahead=0)
    assert final["state"] == "ended" and final["frames_processed"] == len(session.completed) > 0
    assert set(session.in_flight) == {1} and not any(session.overlapped)
