"""A short, bounded soak (the long one is `python -m bench.soak`, figures in docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.soak import sample_bodies, soak


def test_short_soak_has_no_server_errors_and_loses_nothing(demo_app: str) -> None:
    result = asyncio.run(soak(f"{demo_app}/v1/infer", sample_bodies(), requests=240, concurrency=16, time_limit_s=120))
    assert result.requests == 240
    assert result.lost == 0
    assert result.server_errors == 0
    assert set(result.statuses) == {200}
    assert result.partial == 0  # no classifier timed out under load
    assert len(result.rss_start) >= 5  # every replica's memory was sampled
