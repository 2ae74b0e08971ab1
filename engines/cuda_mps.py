"""Whether a CUDA MPS control daemon serves this machine: the replicas of one card share it at once through MPS,
and take turns without it.

Processes on one GPU each hold a CUDA context, and without MPS the card runs one context's kernels at a time (time
slices): four ingress replicas served 770 one-face requests/s on an H100, and 900 with the daemon up (0.95x the
card's kernel-time ceiling; docs/benchmarks.md, run 11). A CUDA client finds the daemon through the control pipe in
`CUDA_MPS_PIPE_DIRECTORY` (default /tmp/nvidia-mps), so that is what is looked for; nothing here starts, stops or
talks to the daemon.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def control_pipe(environ: Mapping[str, str] | None = None) -> Path | None:
    """The MPS control daemon's pipe that a CUDA client of this process's environment would connect to, or None
    where there is none (no daemon started, or started for another pipe directory)."""
    directory = (environ if environ is not None else os.environ).get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY
    pipe = Path(directory) / "control"
    try:
        return pipe if stat.S_ISFIFO(pipe.stat().st_mode) else None
    except OSError:
        return None
