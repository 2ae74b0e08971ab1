"""The GPU-bound ceiling: what the card's own kernel time allows per image, for the whole pipeline, in one process.

    python -m bench.ceiling --device cuda --fp16 --batch 16 --out bench/out/gpu/ceiling.json
    python -m bench.ceiling --device cuda --fp16 --batch 16 --clips 720p.mp4 1080p.mp4   # streams' frames

For each image (one face, eight faces), batches of `--batch` copies go through the GPU-resident path in one
process, as the service's `ingress` layout does it but with nothing else around: nvJPEG decode of the batch,
the torch MTCNN on the device frames, every classifier's crops cut on the device (one cut per crop geometry,
all frames' objects together) and classified in one batch each. torch.profiler sums the CUDA kernel time of the
whole pass; divided by the images, it is the kernel time per image, and 1000 / it the images per second the card
allows (the issue's ceiling). The wall time of the same batched pass, per image, is printed beside it (what one
process reaches, host work included), and the detector's own kernel time. On a machine without CUDA it runs
on the CPU (wall time only) so that it can be checked there.

With `--clips`, a stream's frames instead (bench/streams.py's ceiling): `--batch` frames spread over each video,
copied to the device from pinned memory, scaled to the detector's working size there, then detect, crop and
classify as above. NVDEC decodes on its own engine beside the SMs, so decode adds no kernel time; how fast it
decodes is bench/nvdec.py's figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import proc_cpu
from bench.run import images, key_of, workload_args


def _pass(frames_of: Callable[[], list[Any]], detector: Any, classifiers: dict[str, Any], routes: list[Any],
          max_side: int, crops: str) -> int:
    """One batch through decode (`frames_of`), detect, crop and classify; the objects found. `crops`: "batched"
    cuts each crop geometry once for every frame's objects, every geometry in one pass, as the device pass does
    (serve_app/graph.py `cut_each_spec_once_many`); "per-frame" cuts each classifier's crops frame by frame."""
    from engines.batching import concatenate
    from engines.device_image import fit_side_tensor
    from engines.preprocess import cut_crops

    frames = frames_of()
    fitted = [fit_side_tensor(f, max_side) for f in frames]
    found = detector.detect_batch([f for f, _ in fitted])
    found = [d.scaled((1 / s[0], 1 / s[1])) for d, (_, s) in zip(found, fitted)]
    objects = sum(len(d) for d in found)
    selected = {route.name: [d.select(route.labels, route.min_width, route.min_height) for d in found]
                for route in routes}
    if crops == "batched":  # as the device pass cuts them: each geometry once for every frame, all in one pass
        from serve_app.graph import cut_each_spec_once_many

        wanted = [[(route, selected[route.name][i]) for route in routes] for i in range(len(frames))]
        cuts = cut_each_spec_once_many(frames, [d.xyxy for d in found], wanted)
        per_frame = {route.name: [cut[k] for cut in cuts] for k, route in enumerate(routes)}
    else:  # each classifier's crops frame by frame
        per_frame = {route.name: [cut_crops(frame, d.xyxy[rows], route.crop)
                                  for frame, d, rows in zip(frames, found, selected[route.name])] for route in routes}
    batches = {name: concatenate([p for p in parts if len(p)]) for name, parts in per_frame.items()
               if any(len(p) for p in parts)}  # one batch per classifier
    runs = [classifiers[name].launch(batch) for name, batch in batches.items() if len(batch)]
    for run in runs:
        run.wait()
    return objects


def clip_frames(path: Path, count: int) -> list[np.ndarray]:
    """`count` frames spread evenly over a video (OpenCV on the host, BGR): a stream's frames, faces in motion."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = set(np.linspace(0, max(total - 1, 0), count).astype(int).tolist())
    frames: list[np.ndarray] = []
    for index in range(total):
        ok, frame = capture.read()
        if not ok:
            break
        if index in wanted:
            frames.append(frame)
    capture.release()
    if not frames:
        raise SystemExit(f"{path}: no frame decodes")
    return (frames * count)[:count]


def _uploads(frames: list[np.ndarray], device: str) -> Callable[[], list[Any]]:
    """A stream's decode, as the card sees it: decoded frames (host, pinned) copied to the device. NVDEC itself
    is a fixed-function engine beside the SMs (bench/nvdec.py measures it): it adds no kernel time."""
    import torch

    hosts = [torch.from_numpy(f) for f in frames]
    if device == "cuda":
        hosts = [h.pin_memory() for h in hosts]
    return lambda: [h.to(device, non_blocking=True) for h in hosts]


def measure(device: str, fp16: bool, batch: int, repeats: int, crops: str, host_profile: int = 0,
            host_threads: int = 0, clips: list[Path] | None = None, fixed_shapes: str = "auto",
            with_images: bool | None = None) -> dict[str, Any]:
    """The ceiling's rows: per image (and per clip of `clips`), kernel and host time per frame of the whole pass.
    `with_images`: the two images too (default: only without clips)."""
    import torch

    from deployments.models import build_classifier, build_detector
    from engines.device_image import DeviceDecoder, fit_side_tensor
    from serve_app.config import PipelineConfig
    from serve_app.graph import ClassifierRoute

    args = workload_args("face", device, "torch", fp16, 224)
    args["detector"]["mtcnn"]["implementation"] = "torch"  # the GPU-resident cascade (auto picks it on CUDA)
    args["detector"]["mtcnn"]["fixed_shapes"] = fixed_shapes if fixed_shapes == "auto" else fixed_shapes == "true"
    config = PipelineConfig.model_validate(args)
    detector = build_detector(config.detector, device)
    classifiers = {c.name: build_classifier(c, device) for c in config.classifiers}
    routes = [ClassifierRoute.from_config(c, None) for c in config.classifiers]
    decoder = DeviceDecoder(device)
    if host_threads:  # override what the engines set (their `intra_op_threads`), to compare
        torch.set_num_threads(host_threads)
    max_side = config.detector.max_detect_side
    cuda = device == "cuda"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch,
                           "fp16": fp16, "fixed_shapes": getattr(detector, "static", None),
                           "nvjpeg": decoder.decodes_jpeg_on_device, "crops": crops, "images": {}}
    sources: dict[str, tuple[Callable[[], list[Any]], Callable[[], list[Any]]]] = {}
    for image, body in (images() if (not clips if with_images is None else with_images) else {}).items():
        decode = (lambda bodies: lambda: decoder.decode_many(bodies))([body] * batch)
        sources[key_of("face", image)] = (decode, decode)
    for clip in clips or []:  # a stream's frames: uploaded, then scaled to the working size on the device
        upload = _uploads(clip_frames(clip, batch), device)
        sources[clip.stem] = (upload, (lambda up: lambda: [fit_side_tensor(f, max_side)[0] for f in up()])(upload))
    for source, (frames_of, detector_input) in sources.items():
        def whole() -> int:
            return _pass(frames_of, detector, classifiers, routes, max_side, crops)

        warm_up_passes, objects = _warm_up(whole, detector)
        if cuda:
            torch.cuda.synchronize()
        counted = cascade_frames(detector)
        start, cpu_start, threads_start = time.perf_counter(), time.process_time(), proc_cpu.threads()
        for _ in range(repeats):
            whole()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / (repeats * batch)
        cpu_ms = (time.process_time() - cpu_start) * 1e3 / (repeats * batch)
        by_name = {name: seconds * 1e3 / (repeats * batch)
                   for name, seconds in proc_cpu.threads_spent(threads_start, proc_cpu.threads()).items()}
        row: dict[str, Any] = {"objects_per_image": objects / batch, "wall_ms_per_image": round(wall_ms, 3),
                               "wall_images_per_s": round(1e3 / wall_ms, 1), "host_cpu_ms_per_image": round(cpu_ms, 3),
                               "torch_threads": torch.get_num_threads(),
                               "warm_up_passes": warm_up_passes,  # then measured: the frames each cascade answered
                               "detector_frames": {k: v - counted[k] for k, v in cascade_frames(detector).items()},
                               "host_cpu_ms_per_image_by_thread": {k: round(v, 3) for k, v in by_name.items()
                                                                   if v >= 0.01}}
        if cuda:
            row |= _kernel_times(whole, lambda: detector.detect_batch(detector_input()), repeats, batch)
        if host_profile:
            row["host_ops"] = _host_ops(whole, host_profile)
        out["images"][source] = row
    return out


def cascade_frames(detector: Any) -> dict[str, int]:
    """The frames the torch MTCNN's two cascades answered so far (zeros for another detector)."""
    return {"fixed_shapes": getattr(detector, "frames_static", 0),
            "data_following": getattr(detector, "frames_followed", 0)}


def _warm_up(whole: Callable[[], int], detector: Any, least: int = 3, most: int = 24) -> tuple[int, int]:
    """Passes until graphs are captured and kernels chosen: at least `least`, and until two passes in a row split
    their frames between the cascades alike and grew no fixed-shape limit (with the fixed shapes, every chunk size
    captured and the limits grown to what the frames need, each growth two passes, both answered by the
    data-following cascade; or their size left to it for good), or `most`. Returns the passes made and the last
    one's objects."""
    split: list[int] = []
    for passes in range(1, most + 1):
        before, limits = cascade_frames(detector), grown_limits(detector)
        objects = whole()
        previous, split = split, [v - before[k] for k, v in cascade_frames(detector).items()]
        if passes >= least and split == previous and grown_limits(detector) == limits:
            break
    return passes, objects


def grown_limits(detector: Any) -> Any:
    """The torch MTCNN's fixed-shape limits grown so far, per frame size and batch (None for another detector)."""
    counts = getattr(detector, "cascade_counts", None)
    return counts()["grown_limits"] if counts is not None else None


def _host_ops(work: Any, top: int) -> list[dict[str, Any]]:
    """The host's busiest operations in one pass (torch.profiler, self CPU time): where a batch's host time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in ops]


def _kernel_times(whole: Any, detect_only: Any, repeats: int, batch: int, top: int = 12) -> dict[str, Any]:
    """CUDA kernel time per image (ms) of the whole pass and of decode + detect alone, from torch.profiler, and
    decode + detect's `top` busiest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def kernels(work: Any) -> list[Any]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                work()
            torch.cuda.synchronize()
        return [e for e in prof.key_averages() if e.self_device_time_total > 0]

    def per_image(us: float) -> float:
        return us / 1e3 / (repeats * batch)

    of_whole, of_detect = kernels(whole), kernels(detect_only)
    whole_ms, detect_ms = (per_image(sum(e.self_device_time_total for e in k)) for k in (of_whole, of_detect))
    busiest = sorted(of_detect, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"kernel_ms_per_image": round(whole_ms, 3), "decode_detect_kernel_ms_per_image": round(detect_ms, 3),
            "ceiling_images_per_s": round(1e3 / whole_ms, 1) if whole_ms else None,
            # where decode + detect's kernel time goes: its busiest kernels, launches per batch
            "decode_detect_busiest_kernels": [
                {"kernel": e.key[:120], "ms_per_image": round(per_image(e.self_device_time_total), 4),
                 "per_batch": round(e.count / repeats, 1)} for e in busiest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--crops", default="batched", choices=["batched", "per-frame"],
                        help="cut each crop geometry once for all frames of the batch, or per classifier per frame")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also list the N operations of one pass that take the most host time")
    parser.add_argument("--host-threads", type=int, default=0, metavar="N",
                        help="torch's CPU threads, set after the engines set theirs (0: as the engines leave it)")
    parser.add_argument("--clips", type=Path, nargs="+",
                        help="videos instead of the two images: a stream's frames, uploaded and scaled on the device")
    parser.add_argument("--fixed-shapes", default="auto", choices=["auto", "true", "false"],
                        help="detector.mtcnn.fixed_shapes: the cascade as one graph replay a batch, or data-following")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    result = measure(opts.device, opts.fp16, opts.batch, opts.repeats, opts.crops, opts.host_profile,
                     opts.host_threads, opts.clips, opts.fixed_shapes)
    threads = next(iter(result["images"].values()))["torch_threads"]
    print(f"device: {result['device']}, batches of {opts.batch}, fp16 {opts.fp16}, nvJPEG {result['nvjpeg']}, "
          f"crops {opts.crops}, torch CPU threads {threads}")
    print("| image | objects | kernel ms/image (decode+detect) | ceiling images/s | one process: wall ms/image, "
          "images/s | host CPU ms/image |")
    print("|---|---|---|---|---|---|")
    for name, row in result["images"].items():
        print(f"| {name} | {row['objects_per_image']:.0f} | {row.get('kernel_ms_per_image', '-')} "
              f"({row.get('decode_detect_kernel_ms_per_image', '-')}) | {row.get('ceiling_images_per_s', '-')} | "
              f"{row['wall_ms_per_image']}, {row['wall_images_per_s']} | {row['host_cpu_ms_per_image']} |")
    for name, row in result["images"].items():
        busiest = list(row["host_cpu_ms_per_image_by_thread"].items())[:6]
        print(f"{name}: host CPU ms/image by thread: " + ", ".join(f"{k} {v}" for k, v in busiest))
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
