"""Where CpuWork runs a call: the event loop's thread, or another, for each mode and image size."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.budget import LARGE_PIXELS
from serve_app.offload import CpuWork


def _ran_on_the_loop(work: CpuWork, pixels: int | None) -> bool:
    async def main() -> bool:
        loop_thread = threading.get_ident()
        if pixels is None:
            ran_on = await work.run(threading.get_ident)
        else:
            ran_on = await work.run_large(pixels, threading.get_ident)
        return ran_on == loop_thread

    try:
        return asyncio.run(main())
    finally:
        work.close()


@pytest.mark.parametrize(("where", "pixels", "on_loop"), [
    ("loop", None, True),
    ("loop", LARGE_PIXELS, True),  # at the bound: still small
    ("loop", LARGE_PIXELS + 1, False),  # a large image leaves the loop whatever the mode
    ("threads", None, False),
    ("threads", 640 * 480, False),
])
def test_cpu_work_runs_where_its_mode_and_the_image_size_say(where: str, pixels: int | None, on_loop: bool) -> None:
    assert _ran_on_the_loop(CpuWork(where), pixels) is on_loop


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'loop' or 'threads'"):
        CpuWork("auto")
