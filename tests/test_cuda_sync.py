"""engine.cuda_sync: how the host waits for the GPU (engines/cuda_sync.py). Where CUDA is, the primary context's
scheduling flag reads back as the engine set it; elsewhere nothing is touched and the config still validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import EngineConfig
from engines import cuda_sync

MODELS = Path(__file__).resolve().parents[1] / "models"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_the_config_takes_the_four_modes_and_blocks_by_default() -> None:
    assert EngineConfig().cuda_sync == "block"
    for mode in ("auto", "spin", "yield", "block"):
        assert EngineConfig(cuda_sync=mode).cuda_sync == mode
    with pytest.raises(ValidationError, match="cuda_sync"):
        EngineConfig(cuda_sync="busy")


def test_an_unknown_mode_is_refused_before_the_driver_is_touched() -> None:
    with pytest.raises(ValueError, match="unknown CUDA sync mode 'busy'"):
        cuda_sync.set_sync("busy")  # type: ignore[arg-type]


@pytest.mark.skipif(_cuda(), reason="checks the machines without an NVIDIA driver")
def test_without_a_driver_nothing_is_set() -> None:
    assert cuda_sync.current() is None and cuda_sync.set_sync("block") is None


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch sees none)")
def test_a_cuda_engine_sets_how_this_process_waits() -> None:
    from engines.torch_engine import TorchEngine

    spinning = TorchEngine(MODELS / "gender.onnx", "cuda", cuda_sync="spin")
    assert spinning.cuda_sync == "spin" and cuda_sync.current(0) == "spin"
    blocking = TorchEngine(MODELS / "gender.onnx", "cuda", cuda_sync="block")  # the context is active by now
    assert blocking.cuda_sync == "block" and cuda_sync.current(0) == "block"
