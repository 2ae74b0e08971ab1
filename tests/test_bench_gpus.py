"""The benchmark's several-GPU support, whatever can run without a GPU: nvidia-smi's documented CSV parsed,
replicas placed per card, the one-set-per-card check, the replica multiplier and the side-by-side ratios.
The two-GPU run itself needs two cards (`bash bench/gpu_run.sh` with GPUS="1 2"; docs/benchmarks.md)."""

from __future__ import annotations

import os
import time

import pytest

from bench.gpus import (
    UtilisationSampler,
    one_set_per_card,
    parse_compute_apps,
    parse_gpus,
    placement_by_card,
    visible_devices,
)
from bench.run import gpu_deployments, several_gpus, variant_key
from bench.workloads import face_args, tune
from serve_app.config import PipelineConfig

# what `nvidia-smi --query-gpu=index,uuid,utilization.gpu --format=csv,noheader,nounits` prints on two cards
GPUS = "0, GPU-5f1c2a3b-0000-1111-2222-333344445555, 71\n1, GPU-9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff, [N/A]\n"
UUID0, UUID1 = "GPU-5f1c2a3b-0000-1111-2222-333344445555", "GPU-9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff"


def test_nvidia_smis_gpu_rows_give_each_cards_index_and_utilisation() -> None:
    assert parse_gpus(GPUS) == {UUID0: (0, 71.0), UUID1: (1, None)}
    with pytest.raises(ValueError, match="index, uuid, utilization.gpu"):
        parse_gpus("0, 71\n")  # a query without the uuid column is refused, not misread


def test_replicas_are_counted_on_the_card_that_holds_their_context() -> None:
    apps = parse_compute_apps(f"101, {UUID0}\n102, {UUID0}\n201, {UUID1}\n202, {UUID1}\n999, {UUID1}\n")
    titles = {101: "faces:detector", 102: "faces:age", 201: "faces:detector", 202: "faces:age"}  # 999: not a replica
    cards = placement_by_card(parse_gpus(GPUS), apps, titles)
    assert cards == {0: {"age": 1, "detector": 1}, 1: {"age": 1, "detector": 1}}
    assert one_set_per_card(cards, ["detector", "age"])
    lopsided = placement_by_card(parse_gpus(GPUS), [(101, UUID0), (201, UUID0), (102, UUID1), (202, UUID1)], titles)
    assert lopsided == {0: {"detector": 2}, 1: {"age": 2}}
    assert not one_set_per_card(lopsided, ["detector", "age"])
    assert not one_set_per_card({0: {"detector": 1}, 1: {}}, ["detector"])  # an empty card (or unseen pids)
    assert not one_set_per_card({}, ["detector"])


def test_a_run_on_n_cards_sees_the_first_n() -> None:
    assert visible_devices(1) == "0" and visible_devices(2) == "0,1"
    with pytest.raises(ValueError):
        visible_devices(0)


def test_the_replica_multiplier_doubles_every_model_deployment_and_the_plan_asks_for_two_cards() -> None:
    args = tune(face_args(), device="cuda", backend="torch", fp16=True, replicas=2)
    config = PipelineConfig.model_validate(args)
    deployments = [config.ingress.deployment, config.detector.deployment, *(c.deployment for c in config.classifiers)]
    assert [d.num_replicas for d in deployments] == [2, 2, 2, 2, 2]
    assert config.ingress.streams.deployment.num_replicas == 1  # the streams deployment stays one
    from serve_app.placement import check_fits, place

    places = [place("detector", config.detector.deployment, config.detector.engine, 2.0),
              *(place(c.name, c.deployment, c.engine, 2.0) for c in config.classifiers)]
    assert sum(p.num_gpus * p.replicas for p in places) == pytest.approx(2.0)  # one set of models per card
    check_fits(places, [{"CPU": 16.0, "GPU": 2.0}])
    with pytest.raises(ValueError):
        tune(face_args(), device="cuda", backend="torch", fp16=True, replicas=0)


def test_the_deployments_that_hold_models_follow_the_layout() -> None:
    args = face_args()
    assert gpu_deployments({**args, "layout": "separate"}) == ["detector", "age", "gender", "emotion"]
    assert gpu_deployments({**args, "layout": "colocated"}) == ["detector", "classifiers"]
    assert gpu_deployments({**args, "layout": "ingress"}) == ["ingress"]


def test_two_cards_are_reported_against_one_side_by_side() -> None:
    one = {"c1_parallel": {"p50_ms": 50.0}, "c16_parallel": {"rps": 20.0}, "c32_parallel": {"rps": 21.0}}
    two = {"c1_parallel": {"p50_ms": 52.0}, "c16_parallel": {"rps": 37.0, "gpu_utilisation": {
        "0": {"mean_pct": 66.0, "max_pct": 90.0, "samples": 20}, "1": {"mean_pct": 61.5, "max_pct": 88.0, "samples": 20}}},
        "c32_parallel": {"rps": 40.0}, "one_set_per_card": True, "replicas_by_card": {"0": {"ingress": 1}}}
    (row,) = several_gpus({"ingress+haproxy": one, variant_key("ingress+haproxy", 2): two})
    assert row["variant"] == "ingress+haproxy@2gpu"
    assert (row["c16_rps_ratio"], row["c32_rps_ratio"], row["c1_p50_ratio"]) == (1.85, 1.905, 1.04)
    assert row["c16_gpu_mean_pct"] == {"0": 66.0, "1": 61.5} and row["one_set_per_card"] is True
    assert several_gpus({"ingress+haproxy@2gpu": two}) == []  # nothing to compare against: no row
    assert variant_key("separate", 1) == "separate"


def test_the_sampler_stops_by_itself_where_nvidia_smi_is_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    sampler = UtilisationSampler(every_s=0.01).start()
    assert sampler.stop() == {}


def test_the_sampler_reads_one_looping_nvidia_smi_and_ends_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One nvidia-smi for the whole window (its `-lms` loop, rows as its CSV query prints them; a card that cannot
    say prints [N/A]), ended by stop(); its pid is known, so a benchmark can leave its CPU out."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in *"-lms 20"*) ;; *) exit 3 ;; esac\n'  # the loop mode, at the interval asked for
                    "while true; do printf '0, GPU-8d1c, 37\\n1, GPU-77aa, [N/A]\\n'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sampler = UtilisationSampler(every_s=0.02).start()
    assert sampler.pid is not None
    for _ in range(500):  # until two samples came (bounded: 5 s)
        if len(sampler.samples.get(0, [])) >= 2:
            break
        time.sleep(0.01)
    result = sampler.stop()
    assert result["0"]["mean_pct"] == 37.0 and result["0"]["samples"] >= 2 and "1" not in result
    with pytest.raises(ProcessLookupError):
        os.kill(sampler.pid, 0)  # ended and reaped



def test_each_variants_best_saturated_level_is_set_against_the_runs_ceiling() -> None:
    from bench.run import _against_ceiling

    workload = {"variants": {"ingress+haproxy+x2": {
        "c1_parallel": {"rps": 40.0, "server_cpu_ms_per_request": 30.0},
        "c64_parallel": {"rps": 300.0, "server_cpu_ms_per_request": 9.5},
        "c128_parallel": {"rps": 250.0, "server_cpu_ms_per_request": 12.0},
        "breakdown_p50_ms": {"total_ms": 10.0}}}}
    ceiling = {"objects_per_image": 8.0, "kernel_ms_per_image": 3.333, "ceiling_images_per_s": 300.0}
    lines = _against_ceiling(workload, ceiling)
    assert "| ingress+haproxy+x2 | c64_parallel | 300.0 | 1.0 | 9.5 |" in lines
    assert any("target <= 6.0 ms" in line for line in lines)  # eight faces: issue 24's host CPU target
    assert _against_ceiling(workload, {"objects_per_image": 1.0}) == []  # a CPU ceiling has no kernel time


def test_each_sizes_largest_sustained_stream_count_is_set_against_the_runs_ceiling() -> None:
    from bench.streams import against_ceiling

    runs = [{"size": "720p", "interval": 0, "streams": n, "workers": w, "aggregate_fps": 30.0 * n + w}
            for n in (4, 8) for w in (0, 4)]
    result = {"ceiling": {"batch": 16, "images": {"720p": {"ceiling_images_per_s": 600.0}}},
              "largest_sustained": {"720p interval 0 muxer 16 workers 0": 4, "720p interval 0 muxer 16 workers 4": 8,
                                    "1080p interval 0 muxer 16 workers 0": 4}, "runs": runs}
    lines = against_ceiling(result)
    assert "| 0 | 720p | 0 | 600.0 | 20.0 | 4 | 0.20 | 120.0 |" in lines
    assert "| 4 | 720p | 0 | 600.0 | 20.0 | 8 | 0.40 | 244.0 |" in lines
    assert not any("1080p" in line for line in lines)  # no ceiling for that size: no row
    assert against_ceiling(result | {"ceiling": {"batch": 16, "images": {"720p": {"wall_ms_per_image": 3.0}}}}) == []


def test_a_kernel_trace_counts_overlapping_work_once_in_busy_and_finds_the_gaps() -> None:
    """bench/kernel_trace.py over chrome-trace events as torch.profiler writes them (ts, dur in microseconds)."""
    from bench.kernel_trace import summarize

    events = [  # the detector's stream 0-4 ms and 6-10 ms; a classifier's 3-5 ms (overlaps 3-4); a copy at 9.5 ms
        {"cat": "kernel", "name": "pnet", "ts": 0, "dur": 4000, "args": {"stream": 13}},
        {"cat": "kernel", "name": "gemm", "ts": 3000, "dur": 2000, "args": {"stream": 21}},
        {"cat": "kernel", "name": "onet", "ts": 6000, "dur": 4000, "args": {"stream": 13}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 9500, "dur": 100, "args": {"stream": 7}},
    ]
    s = summarize(events, frames=2)
    assert s["busy"] == pytest.approx(9 / 10)  # 0-5 and 6-10 busy, one gap of 1 ms
    assert s["work_over_span"] == pytest.approx(10.1 / 10)
    assert s["idle_gaps_over_0_5ms"] == {"count": 1, "ms": 1.0, "largest_ms": [1.0]}
    assert s["streams"]["13"]["ms_per_frame"] == pytest.approx(4.0)
    assert list(s["streams"]) == ["13", "21", "7"]
    assert s["device_ms_per_frame"] == pytest.approx(5.05)
    assert summarize([], frames=3) == {"events": 0}


def test_the_ceiling_is_each_images_faster_cascade() -> None:
    from bench.run import fastest_ceiling

    # bench.ceiling's rows as run 13 measured them on an H100 (images/s from the kernel time per image)
    fixed = {"images": {"face": {"kernel_ms_per_image": 1.065, "ceiling_images_per_s": 939.0},
                        "face-many": {"kernel_ms_per_image": 5.493, "ceiling_images_per_s": 182.1}}}
    following = {"images": {"face": {"kernel_ms_per_image": 0.705, "ceiling_images_per_s": 1418.4},
                            "face-many": {"kernel_ms_per_image": 2.865, "ceiling_images_per_s": 349.1}}}
    best = fastest_ceiling({"fixed_shapes": fixed, "data_following": following})
    assert {k: (v["cascade"], v["ceiling_images_per_s"]) for k, v in best["images"].items()} == \
        {"face": ("data_following", 1418.4), "face-many": ("data_following", 349.1)}
    one_failed = fastest_ceiling({"fixed_shapes": fixed, "data_following": None})
    assert one_failed["images"]["face"]["cascade"] == "fixed_shapes"
    assert fastest_ceiling({"fixed_shapes": None, "data_following": None}) is None
    on_cpu = {"images": {"face": {"kernel_ms_per_image": None, "ceiling_images_per_s": None}}}  # wall time only
    assert fastest_ceiling({"fixed_shapes": on_cpu, "data_following": on_cpu})["images"]["face"]["cascade"] \
        == "fixed_shapes"
