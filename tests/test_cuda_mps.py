"""engines/cuda_mps.py: the MPS control daemon is found where a CUDA client would look for it, its pipe directory's
control FIFO, and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

from engines.cuda_mps import control_pipe


def test_the_daemons_control_pipe_is_found_in_the_clients_pipe_directory(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "control")
    assert control_pipe({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == tmp_path / "control"


def test_no_pipe_a_plain_file_or_another_directory_is_no_daemon(tmp_path: Path) -> None:
    assert control_pipe({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None  # nothing there
    (tmp_path / "control").write_text("")  # a file of that name is not the daemon's FIFO
    assert control_pipe({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None
    other = tmp_path / "other"
    other.mkdir()
    os.mkfifo(other / "control")
    assert control_pipe({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None  # the daemon of another directory
