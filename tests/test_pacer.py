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


@pytest.mark.parametrize("jump", [3600.0, -3600.0], ids=["ahead", "back"])
def test_a_timestamp_that_jumps_restarts_the_clock_instead_of_holding_or_racing_the_reader(jump: float) -> None:
    """A file whose timestamps jump an hour ahead held its reader for the hour (unstoppable: a plain sleep); one
    that jumps back was read unpaced until its timestamps caught up. Either way the clock restarts there."""
    clock = Clock()
    pacer = Pacer(clock, clock.sleep)
    for at in (0.0, 0.04, 0.08):
        pacer.wait(at)
    pacer.wait(0.08 + jump)
    assert clock.slept[-1] != pytest.approx(jump) and max(clock.slept) < 1.0  # went at once
    went = len(clock.slept)
    pacer.wait(0.12 + jump)
    pacer.wait(0.16 + jump)
    assert clock.slept[went:] == pytest.approx([0.04, 0.04])  # paced again, from the frame after the jump



def test_a_file_whose_timestamps_jump_an_hour_plays_on_instead_of_stalling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real file (two seconds of frames, an hour's jump in their timestamps half-way) read by a stream's reader
    at its own rate: every frame is read and the reader ends, where it used to sleep through the hour."""
    import fractions

    av = pytest.importorskip("av", reason="the clip is encoded with PyAV")
    import numpy as np

    from serve_app.egress import FILE_OPTIONS
    from serve_app.stream_reader import StreamReader

    path = tmp_path / "jump.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"preset": "ultrafast", "bf": "0"}
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((120, 160, 3), i * 4, np.uint8), format="rgb24")
            frame.pts, frame.time_base = (i if i < 30 else i + 30 * 3600), fractions.Fraction(1, 30)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    opened: list[object] = []
    reader = StreamReader(str(path), dict(FILE_OPTIONS), path.name, open_timeout_s=10, read_timeout_s=10,
                          max_frame_pixels=1920 * 1080, max_side=0, pace=True, on_opened=opened.append)
    try:
        assert reader.ended.wait(60), f"the reader is still waiting after {reader.frames} frames"
        assert reader.frames == 60 and reader.error is None
    finally:
        reader.stop()
