"""The greedy batcher: an idle engine runs a call at once; calls that arrive during a batch go together."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from deployments.batcher import GreedyBatcher
from deployments.execution import ComputeExecutor
from engines import Completed, completed


class Recorder:
    """A batch function on a worker thread that can be held mid-batch, recording every batch it ran."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.hold = False

    def __call__(self, items: list[str]) -> Completed[list[str]]:
        return completed(self.compute, items)

    def compute(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        if self.hold:
            self.release.wait(10)
            self.hold = False
        if "bad" in items:
            raise ValueError("a bad item")
        return [item.upper() for item in items]


async def _until(event: threading.Event) -> None:
    await asyncio.get_running_loop().run_in_executor(None, event.wait, 10)


async def _busy(first: str, **batcher_options: object) -> tuple[Recorder, GreedyBatcher, asyncio.Future]:
    """A batcher whose engine is held in the middle of computing `first`, so that new calls queue."""
    recorder = Recorder()
    recorder.hold = True
    batcher = GreedyBatcher(recorder, ComputeExecutor("thread", False, "t"), **batcher_options)
    running = asyncio.ensure_future(batcher.submit(first))
    await _until(recorder.started)
    return recorder, batcher, running


def test_a_call_on_an_idle_engine_runs_at_once_without_waiting_for_company() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = GreedyBatcher(recorder, ComputeExecutor("inline", False, "t"), max_batch_size=8)
        call = asyncio.ensure_future(batcher.submit("a"))
        for _ in range(3):  # a few loop iterations, no timer: a batcher that waits for company is not done yet
            await asyncio.sleep(0)
        assert call.done()
        answer = call.result()
        assert (answer.result, answer.batch_size) == ("A", 1)
        assert recorder.batches == [["a"]]

    asyncio.run(scenario())


def test_calls_that_arrive_while_a_batch_computes_go_together_in_the_next() -> None:
    async def scenario() -> None:
        recorder, batcher, first = await _busy("a", max_batch_size=8)  # "a" is computing
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in ("b", "c", "d")]
        await asyncio.sleep(0)
        recorder.release.set()
        answers = await asyncio.gather(first, *rest)
        assert [a.result for a in answers] == ["A", "B", "C", "D"]
        assert recorder.batches == [["a"], ["b", "c", "d"]]
        assert [a.batch_size for a in answers] == [1, 3, 3, 3]
        assert answers[1].queue_ms > 0  # they waited for the first batch, and the trace says so

    asyncio.run(scenario())


def test_batches_are_sized_in_items_and_never_exceed_the_limit() -> None:
    async def scenario() -> None:
        recorder, batcher, first = await _busy("x", max_batch_size=5, size_of=len)
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in ("aa", "bbb", "cc", "dddddd")]
        await asyncio.sleep(0)
        recorder.release.set()
        answers = await asyncio.gather(first, *rest)
        # 2 + 3 fills 5; "cc" starts the next; a 6-item call exceeds the limit and goes alone
        assert recorder.batches == [["x"], ["aa", "bbb"], ["cc"], ["dddddd"]]
        assert [a.batch_size for a in answers] == [1, 5, 5, 2, 6]

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_callers_only_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        recorder, batcher, first = await _busy("a", max_batch_size=2)
        doomed = [asyncio.ensure_future(batcher.submit(x)) for x in ("bad", "b")]
        fine = asyncio.ensure_future(batcher.submit("c"))
        await asyncio.sleep(0)
        recorder.release.set()
        assert (await first).result == "A"
        for call in doomed:
            with pytest.raises(ValueError, match="a bad item"):
                await call
        assert (await fine).result == "C"
        assert (await batcher.submit("d")).result == "D"

    asyncio.run(scenario())


def test_a_caller_that_gave_up_is_dropped_from_the_next_batch() -> None:
    async def scenario() -> None:
        recorder, batcher, first = await _busy("a", max_batch_size=8)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        recorder.release.set()
        await first
        assert (await kept).result == "KEPT"
        assert recorder.batches == [["a"], ["kept"]]

    asyncio.run(scenario())


def _muxer_run(full: int, timeout_s: float, arrivals: list[float],
               sources: list[str] | None = None) -> tuple[list[list[int]], list[int]]:
    """Items submitted at `arrivals` (seconds after the start), of `sources` (None: each its own); the batches the
    muxer sent and each item's result."""
    from deployments.batcher import Muxer

    batches: list[list[int]] = []

    async def run_batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    async def main() -> list[int]:
        muxer = Muxer(run_batch, max_batch_size=4, push_timeout_s=timeout_s, full=lambda: full)

        async def one(i: int, at: float) -> int:
            await asyncio.sleep(at)
            return await muxer.submit(i, sources[i] if sources else None)

        return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals))))

    return batches, asyncio.run(main())


def test_the_muxer_waits_for_a_frame_of_every_stream() -> None:
    """Three streams, their frames arriving 0.05 s apart, a push timeout far longer: one batch of all three."""
    batches, results = _muxer_run(full=3, timeout_s=30.0, arrivals=[0.0, 0.05, 0.1])
    assert batches == [[0, 1, 2]] and results == [0, 10, 20]


def test_two_frames_of_one_stream_do_not_fill_a_batch_that_waits_for_another_stream() -> None:
    """Detection ahead: stream a's next frame comes before stream b's first; the batch of two streams waits for
    b, then goes with all three frames."""
    batches, results = _muxer_run(full=2, timeout_s=30.0, arrivals=[0.0, 0.02, 0.1], sources=["a", "a", "b"])
    assert batches == [[0, 1, 2]] and results == [0, 10, 20]


def test_the_muxer_sends_what_it_has_when_the_push_timeout_passes() -> None:
    """A third stream that sends nothing: after the timeout the batch goes with the two frames it has."""
    batches, results = _muxer_run(full=3, timeout_s=0.05, arrivals=[0.0, 0.0])
    assert batches == [[0, 1]] and results == [0, 10]


def test_a_full_muxer_batch_goes_at_once_and_holds_no_more_than_its_size() -> None:
    batches, _ = _muxer_run(full=99, timeout_s=30.0, arrivals=[0.0] * 6 + [0.5, 0.5])
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]  # full at four; the last two wait for the late pair


def test_a_failing_muxer_batch_fails_its_items_and_the_next_batch_runs() -> None:
    from deployments.batcher import Muxer

    async def main() -> tuple[BaseException | int, ...]:
        calls = 0

        async def run_batch(items: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("the detector failed")
            return items

        muxer = Muxer(run_batch, max_batch_size=4, push_timeout_s=0.0)
        first = await asyncio.gather(muxer.submit(1), muxer.submit(2), return_exceptions=True)
        return (*first, await muxer.submit(3))

    first, second, third = asyncio.run(main())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError) and third == 3


async def _turns_until(condition: Callable[[], bool], turns: int = 10_000) -> None:
    """Let the event loop turn until `condition()` holds (no time passes: only other tasks run); a bounded number
    of turns, so a condition that never comes fails the test instead of hanging it."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached in {turns} turns of the event loop")


def test_the_muxer_splits_each_batch_cycle_into_waiting_to_fill_and_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock the test moves (no real time in it): stream a's frame waits 30 ms for stream b's, then the
    detector takes 20 ms; the stats say so (GET /v1/pipeline's muxer: frames short, or the detector)."""
    from deployments import batcher
    from serve_app.config import MuxerConfig
    from serve_app.stream_muxer import MuxedDetector

    now = [50.0]
    monkeypatch.setattr(batcher.time, "perf_counter", lambda: now[0])

    async def detect_many(frames: list[str]) -> list[str]:
        now[0] += 0.020
        return frames

    async def main() -> dict[str, object]:
        muxed = MuxedDetector(detect_many, MuxerConfig(batch_size=4, batched_push_timeout_ms=10_000,
                                                       batches_in_flight=1), lambda: 2)
        first = asyncio.ensure_future(muxed.detect("a0", "a"))
        await _turns_until(muxed._muxer._slots.locked)  # a's frame is queued, the batch filling
        now[0] += 0.030
        assert await asyncio.gather(first, muxed.detect("b0", "b")) == ["a0", "b0"]
        return muxed.stats()

    stats = asyncio.run(main())
    assert stats["batches"] == 1 and stats["mean_wait_ms"] == pytest.approx(30.0)
    assert stats["mean_run_ms"] == pytest.approx(20.0) and stats["in_flight"] == 1


@pytest.mark.parametrize("in_flight", [1, 2])
def test_with_two_batches_in_flight_the_next_goes_while_the_last_is_out(in_flight: int) -> None:
    """The detector held on its first batch: with two in flight the second batch is already sent (the detector
    starts it the moment it is free); with one it waits for the first to come back. Either way each frame gets
    its own result."""
    from deployments.batcher import Muxer

    async def main() -> tuple[list[list[str]], list[str]]:
        sent: list[list[str]] = []
        release = asyncio.Event()

        async def run_batch(items: list[str]) -> list[str]:
            sent.append(list(items))
            await release.wait()
            return [i.upper() for i in items]

        muxer = Muxer(run_batch, max_batch_size=4, push_timeout_s=30.0, full=lambda: 1, in_flight=in_flight)
        first = asyncio.ensure_future(muxer.submit("a0", "a"))
        await _turns_until(lambda: bool(sent))
        second = asyncio.ensure_future(muxer.submit("a1", "a"))
        for _ in range(50):  # the loop turns enough times for the second batch to be sent, if it may be
            await asyncio.sleep(0)
        out_while_held = [list(b) for b in sent]
        release.set()
        return out_while_held, list(await asyncio.gather(first, second))

    out_while_held, results = asyncio.run(main())
    assert out_while_held == ([["a0"]] if in_flight == 1 else [["a0"], ["a1"]])
    assert results == ["A0", "A1"]
