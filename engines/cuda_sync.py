"""How a host thread waits for the GPU: the scheduling flag of the device's primary context (CUDA driver API).

CUDA's default (`cudaDeviceScheduleAuto`) spins when the process has fewer contexts than the machine has cores,
which is always so here: every `synchronize`, `.cpu()`, `nonzero` and NVDEC hand-off then holds a core at 100 %
for as long as the GPU works, and a host serving many cameras pays the GPU's time twice. `block`
(`CU_CTX_SCHED_BLOCKING_SYNC`) puts the waiting thread to sleep until the GPU signals it, at the cost of a wake-up
(tens of microseconds) per wait. The flag is the process's (the primary context is shared by torch, CuPy and
PyNvVideoCodec's frames): each engine loaded on CUDA sets it (`engine.cuda_sync`; stages sharing a process share
it, the last loaded wins). Since CUDA 11 it may be set while the context is active; it is read back, and a driver
that keeps the old one is logged, not fatal.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Literal

logger = logging.getLogger(__name__)

CudaSync = Literal["auto", "spin", "yield", "block"]
_FLAGS: dict[str, int] = {"auto": 0x00, "spin": 0x01, "yield": 0x02, "block": 0x04}  # CU_CTX_SCHED_*
_MASK = 0x07


def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver on this machine
        return None


def _primary_flags(cuda: ctypes.CDLL, device: ctypes.c_int) -> int | None:
    flags, active = ctypes.c_uint(), ctypes.c_int()
    if cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) != 0:
        return None
    return flags.value


def _device(cuda: ctypes.CDLL, index: int) -> ctypes.c_int | None:
    device = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    return device


def current(index: int = 0) -> CudaSync | None:
    """The scheduling flag of CUDA device `index`'s primary context; None without a driver or such a device."""
    cuda = _driver()
    device = _device(cuda, index) if cuda is not None else None
    flags = _primary_flags(cuda, device) if cuda is not None and device is not None else None
    if flags is None:
        return None
    return next((name for name, bits in _FLAGS.items() if bits == flags & _MASK), "auto")  # type: ignore[return-value]


def set_sync(mode: CudaSync, index: int = 0) -> CudaSync | None:
    """Make host threads of this process wait for CUDA device `index` as `mode` says; the mode in effect after
    (None: no driver or no such device, nothing done)."""
    if mode not in _FLAGS:
        raise ValueError(f"unknown CUDA sync mode {mode!r}; one of {', '.join(_FLAGS)}")
    cuda = _driver()
    device = _device(cuda, index) if cuda is not None else None
    if cuda is None or device is None:
        return None
    flags = _primary_flags(cuda, device)
    if flags is None:
        return None
    wanted = (flags & ~_MASK) | _FLAGS[mode]
    if wanted != flags:
        setter = getattr(cuda, "cuDevicePrimaryCtxSetFlags_v2", None) or cuda.cuDevicePrimaryCtxSetFlags
        status = setter(device, ctypes.c_uint(wanted))
        if status != 0:
            logger.warning("CUDA kept its sync mode %s: cuDevicePrimaryCtxSetFlags(%s) returned %d",
                           current(index), mode, status)
    now = current(index)
    if now != mode:
        logger.warning("CUDA device %d waits by %s, not %s as engine.cuda_sync asks", index, now, mode)
    return now
