"""A file source plays at its own rate from its first frame (serve_app/stream_reader.py `Pacer`), on a clock the
test moves: no real time passes, nothing here depends on the machine's speed."""

from __future__ import annotations

import pytest

from serve_app.stream_reader import Pacer


class Clock:
    """A clock that moves only when the test or the pacer's sleep moves it; the sleeps asked for are kept."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_slow_first_frame_does_not_make_the_frames_after_it_arrive_at_once() -> None:
    """The first decode took a second (a decoder made, first captures): the frames after it still come a frame
    time apart. A clock started at the open let a second of frames through at once, and the stream's pipeline,
    which takes only the newest frame, dropped all but one of them."""
    clock = Clock()
    pacer = Pacer(clock, clock.sleep)
    clock.now += 1.0  # the open, then the first decode
    times = [i / 30 for i in range(5)]
    for at in times:
        pacer.wait(at)
    assert clock.slept[1:] == pytest.approx([1 / 30] * 3)
    assert clock.slept[0] == pytest.approx(1 / 30)
    assert len(clock.slept) == 4  # the first frame goes at once


def test_a_stall_is_caught_up_and_the_source_keeps_its_own_rate() -> None:
    clock = Clock()
    pacer = Pacer(clock, clock.sleep)
    pacer.wait(0.0)
    pacer.wait(0.1)
    assert clock.slept == pytest.approx([0.1])
    clock.now += 0.5  # the reader stalled: frames 0.2 .. 0.6 are due already
    for at in (0.2, 0.3, 0.4, 0.5, 0.6):
        pacer.wait(at)
    assert clock.slept[1:] == pytest.approx([0.0] * 5)
    pacer.wait(0.8)  # back on the source's own schedule from its first frame
    assert clock.slept[-1] == pytest.approx(0.2)


def test_a_source_whose_timestamps_start_late_plays_from_its_first_frame() -> None:
    clock = Clock()
    pacer = Pacer(clock, clock.sleep)
    pacer.wait(3600.0)  # an RTSP recording's first timestamp is an hour in
    pacer.wait(3600.04)
    assert clock.slept == pytest.approx([0.04])
