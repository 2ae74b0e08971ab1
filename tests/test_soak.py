"""A short, bounded soak (the long one is `python -m bench.soak`, figures in docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.soak import SoakResult, sample_bodies, soak

# RSS a replica may gain from the middle third of the soak to the last (median of 10 samples against median of
# 10, 80 requests apart): caches settle in the warm-up and the first third; a leak of 250 KB per request, or a
# frame kept per request, shows here.
FLAT_MIB = 20.0
# ...except the detector's: MTCNN's R-Net and O-Net see a new batch size with every frame, and ONNX Runtime's
# arena grows in 32 MiB steps to the largest batch met so far, which a 240-request soak may still be reaching in
# its last third (measured: +40, +20, +32 MiB steps at requests 80-150 in one run, then flat for 1600 requests
# in another; +81 MiB in one CI run's last third). A frame kept per request (0.8-2.3 MB here) still shows: 80
# requests are 60 MiB or more. Where the detector grew more than this, a second soak tells the two apart: the arena
# stops at the largest batch, so it settles; a leak grows again.
DETECTOR_FLAT_MIB = 40.0


def _soak(demo_app: str) -> SoakResult:
    return asyncio.run(soak(f"{demo_app}/v1/infer", sample_bodies(), requests=240, concurrency=16,
                            time_limit_s=120, app="faces"))


def test_short_soak_has_no_server_errors_loses_nothing_and_memory_stays_flat(demo_app: str) -> None:
    result = _soak(demo_app)
    assert result.requests == 240
    assert result.lost == 0
    assert result.server_errors == 0
    assert set(result.statuses) == {200}
    assert result.partial == 0  # no classifier timed out under load
    sampled = sorted(k.split("[")[0] for k in result.rss_start)  # this app's replicas only, each once
    assert sampled == ["faces:age", "faces:detector", "faces:emotion", "faces:gender", "faces:ingress",
                       "faces:streams"], sampled
    growth = result.settled_growth()
    print(f"RSS after warm-up {result.rss_start}; growth, middle to last third (MiB) {growth}")
    assert set(growth) == set(result.rss_start)
    bounds = {k: DETECTOR_FLAT_MIB if k.startswith("faces:detector[") else FLAT_MIB for k in growth}
    assert all(growth[k] <= bounds[k] for k in growth if not k.startswith("faces:detector[")), \
        f"RSS growth, middle to last third (MiB): {growth}"
    detector = next(k for k in growth if k.startswith("faces:detector["))
    if growth[detector] > DETECTOR_FLAT_MIB:  # the arena's late steps, or a leak: a second soak, same replica
        again = _soak(demo_app)
        assert again.server_errors == 0 and again.lost == 0
        regrown = again.settled_growth()
        assert detector in regrown, f"the detector was replaced during the second soak: {regrown}"
        print(f"the detector grew {growth[detector]} MiB; in a second soak {regrown.get(detector)}")
        assert regrown[detector] <= DETECTOR_FLAT_MIB, f"the detector grew again (MiB): {growth}, then {regrown}"
