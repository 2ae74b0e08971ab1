"""A short, bounded soak (the long one is `python -m bench.soak`, figures in docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.soak import sample_bodies, soak

# RSS a replica may still gain over the second half of the soak (MiB): allocator arenas and caches settle in the
# first half; a leak of a few hundred KB per request, or a frame kept per request, shows here.
FLAT_MIB = 25.0


def test_short_soak_has_no_server_errors_loses_nothing_and_memory_stays_flat(demo_app: str) -> None:
    result = asyncio.run(soak(f"{demo_app}/v1/infer", sample_bodies(), requests=240, concurrency=16,
                              time_limit_s=120, app="faces"))
    assert result.requests == 240
    assert result.lost == 0
    assert result.server_errors == 0
    assert set(result.statuses) == {200}
    assert result.partial == 0  # no classifier timed out under load
    sampled = sorted(k.split("[")[0] for k in result.rss_start)  # this app's replicas only, each once
    assert sampled == ["faces:age", "faces:detector", "faces:emotion", "faces:gender", "faces:ingress",
                       "faces:streams"], sampled
    growth = result.growth(result.rss_middle)
    assert set(growth) == set(result.rss_start)
    assert all(g <= FLAT_MIB for g in growth.values()), f"RSS growth over the second half (MiB): {growth}"
