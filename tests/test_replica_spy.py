"""bench.replica_spy's reading of py-spy's raw output: collapsed stacks as py-spy writes them with `--threads`
(`thread (TID): NAME;func (path:line);... COUNT`, one line per distinct stack), turned into CPU per request."""

from __future__ import annotations

import pytest

from bench.replica_spy import summarise

RAW = """\
thread (101): Thread-1 (_run_user_code_event_loop);Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);_run_user_code_event_loop (ray/serve/_private/replica.py:1500);infer (serve_app/routes/images.py:221);merge (serve_app/graph.py:120) 30
thread (101): Thread-1 (_run_user_code_event_loop);Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);_run_user_code_event_loop (ray/serve/_private/replica.py:1500) 10
thread (102): detector-thread_0;Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83);detect_batch (engines/mtcnn_torch.py:148);_follow (engines/mtcnn_torch.py:262) 50
thread (103): detector-thread_1;Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83);detect_batch (engines/mtcnn_torch.py:150) 10
thread (104): MainThread 5
"""


def test_each_threads_cpu_per_request_and_what_holds_it() -> None:
    result = summarise(RAW, requests=10, rate_hz=100)  # one sample: 10 ms of a thread's CPU
    assert result["cpu_ms_per_request"] == 105.0  # 105 samples x 10 ms / 10 requests
    threads = result["threads"]
    assert list(threads) == ["detector-thread", "Thread-1 (_run_user_code_event_loop)", "MainThread"]
    assert threads["detector-thread"]["cpu_ms_per_request"] == 60.0  # the pool's two threads, one name
    # the thread's wrappers (on every sample) are left out; functions by name and file, whatever the line
    assert threads["detector-thread"]["functions_ms_per_request"] == {"_follow (mtcnn_torch.py)": 50.0}
    assert threads["detector-thread"]["self_ms_per_request"] == {"_follow (mtcnn_torch.py)": 50.0,
                                                                "detect_batch (mtcnn_torch.py)": 10.0}
    loop = threads["Thread-1 (_run_user_code_event_loop)"]
    assert loop["functions_ms_per_request"] == {"infer (images.py)": 30.0, "merge (graph.py)": 30.0}
    assert loop["self_ms_per_request"] == {"merge (graph.py)": 30.0, "_run_user_code_event_loop (replica.py)": 10.0}
    assert threads["MainThread"]["self_ms_per_request"] == {"(native)": 5.0}  # a thread with no Python frame


def test_lines_that_are_not_stacks_are_skipped_and_bad_counts_refused() -> None:
    assert summarise("py-spy> Sampling process\n\n", requests=1, rate_hz=100)["threads"] == {}
    with pytest.raises(ValueError):
        summarise(RAW, requests=0, rate_hz=100)
