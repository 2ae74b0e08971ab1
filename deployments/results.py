"""What a model stage answers, and where the time of a call went: plain types, no Ray, shared by the stages, the
deployments around them and the ingress that calls them."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from engines import Classifications, Detections
from engines.base import RunTiming

NODE = platform.node()


@dataclass(frozen=True)
class StageTiming:
    """Where one call's time went inside the stage (milliseconds), and when its batch ran (seconds on
    time.perf_counter()'s clock of `node`: CLOCK_MONOTONIC, one clock for every process of a Linux host)."""

    handler_ms: float  # arrival in the stage to its answer
    queue_ms: float  # waiting for the engine (a batch in progress)
    compute_ms: float  # model compute of the batch this call rode in (launch to result)
    batch_size: int  # items (frames or crops) in that batch
    launch_ms: float | None = None  # host time spent handing the batch to the engine (copy in, enqueue)
    gpu_start_at: float | None = None  # the batch's work on the GPU, from CUDA events (None: no device timeline)
    gpu_end_at: float | None = None
    node: str = NODE

    @classmethod
    def of(cls, handler_ms: float, queue_ms: float, compute_ms: float, batch_size: int,
           runs: RunTiming | None) -> StageTiming:
        """The call's times (ms, rounded to microseconds) and, from the engine's timing of its run(s), the launch
        time and the GPU window."""
        return cls(round(handler_ms, 3), round(queue_ms, 3), round(compute_ms, 3), batch_size,
                   None if runs is None else round((runs.enqueued_at - runs.launched_at) * 1e3, 3),
                   None if runs is None else runs.gpu_start_at, None if runs is None else runs.gpu_end_at)


@dataclass(frozen=True)
class DetectorResult:
    detections: Detections
    timing: StageTiming
    refused: tuple[int, str, str] | None = None  # (status, code, message): bytes the detector would not decode


@dataclass(frozen=True)
class ClassifierResult:
    classifications: Classifications
    timing: StageTiming
    attempts: int = 1  # calls it took: 2 when the caller retried after losing a replica


@dataclass(frozen=True)
class StageFailure:
    """One stage's failure inside a call that served several (the shared `classifiers` deployment)."""

    type: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> StageFailure:
        return cls(type(exc).__name__, str(exc))


class StageFailed(RuntimeError):
    """Raised at the caller for a `StageFailure`; `kind` names the exception type raised in the stage."""

    def __init__(self, failure: StageFailure) -> None:
        super().__init__(failure.message)
        self.kind = failure.type
