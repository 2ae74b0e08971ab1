"""Where stages launch and wait: with engines that enqueue (CUDA graphs, TensorRT), the classifiers of one
fan-out are all launched on the event loop before any is waited for, and the waits block no loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.batcher import GreedyBatcher
from deployments.execution import ComputeExecutor, resolve_mode
from engines import Pending, RunTiming


class DeviceRun(Pending[list[str]]):
    """What an asynchronous engine hands back: enqueued work that the device finishes later. Here the device
    finishes only once every classifier of the fan-out has been launched (a barrier the waits meet at), as
    three streams of one GPU overlap only when all three are enqueued."""

    def __init__(self, items: list[str], device: threading.Barrier) -> None:
        self._items, self._device = items, device
        self._done = threading.Event()
        self.waited_on: int | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> list[str]:
        self.waited_on = threading.get_ident()
        if not self._done.is_set():
            self._device.wait(timeout=2)  # BrokenBarrierError if the others were never launched
            self._done.set()
        return [item.upper() for item in self._items]

    @property
    def timing(self) -> RunTiming | None:
        return RunTiming(0.0, 0.0) if self._done.is_set() else None


def _fan_out(mode: str) -> tuple[list[int], list[DeviceRun], int]:
    """Three stages of one process (shared=True) with asynchronous engines, called at once as the graph does."""
    device = threading.Barrier(3)
    launched_on: list[int] = []
    runs: list[DeviceRun] = []

    def launch(items: list[str]) -> DeviceRun:
        launched_on.append(threading.get_ident())
        run = DeviceRun(items, device)
        runs.append(run)
        return run

    async def scenario() -> int:
        batchers = [GreedyBatcher(launch, ComputeExecutor(mode, True, f"c{i}", asynchronous=True), 8)
                    for i in range(3)]
        answers = await asyncio.wait_for(asyncio.gather(*(b.submit(f"crop{i}") for i, b in enumerate(batchers))), 10)
        assert [a.result for a in answers] == ["CROP0", "CROP1", "CROP2"]
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    return launched_on, runs, loop_thread


def test_auto_launches_every_classifier_on_the_loop_before_waiting_on_any() -> None:
    assert resolve_mode("auto", shared=True, asynchronous=True) == "async"
    launched_on, runs, loop_thread = _fan_out("auto")
    assert launched_on == [loop_thread] * 3  # no compute thread: launched from the event loop
    assert all(run.waited_on != loop_thread for run in runs)  # the waits blocked waiter threads, not the loop


def test_waiting_inline_would_serialise_the_fan_out() -> None:
    """The counter-case that shows the test above can fail: a stage that waits where it launches (inline)
    blocks the loop in its first wait, so the other classifiers are never launched."""
    with pytest.raises(threading.BrokenBarrierError):
        _fan_out("inline")


def test_auto_keeps_inline_and_thread_for_engines_that_compute_when_called() -> None:
    assert resolve_mode("auto", shared=False, asynchronous=False) == "inline"
    assert resolve_mode("auto", shared=True, asynchronous=False) == "thread"
    with pytest.raises(ValueError, match="unknown execution mode"):
        resolve_mode("fast", shared=False, asynchronous=False)
    launched_on, _, loop_thread = _fan_out("thread")  # threads: each launches and waits on its own thread
    assert loop_thread not in launched_on
