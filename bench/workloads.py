"""The pipelines the benchmark runs: the shipped face demo, and MTCNN plus resnet stand-in classifiers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGENET = {"color_format": "RGB", "scale": 1 / 255, "mean": [123.675, 116.28, 103.53], "std": [0.229, 0.224, 0.225]}


def face_args() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"])


def standin_args(models: dict[str, Path], size: int) -> dict[str, Any]:
    """MTCNN detector + resnet18/34/50 classifiers on every face."""
    args = face_args()
    template = args["classifiers"][0]
    args["classifiers"] = [
        {
            "name": name,
            "model": str(path),
            "kind": "softmax",
            "labels": [f"class_{i}" for i in range(1000)],
            "apply_softmax": True,
            "input": {"width": size, "height": size, **IMAGENET},
            "operate_on_labels": ["face"],
            "timeout_s": 10.0,
            "engine": dict(template["engine"]),
            "deployment": dict(template["deployment"]),
        }
        for name, path in models.items()
    ]
    return args


def tune(args: dict[str, Any], *, device: str, backend: str, fp16: bool, layout: str = "separate",
         access_log: bool = True, execution: str = "auto", detector_input: str = "encoded",
         max_batch_size: int | None = None, cpu_work: str = "auto", replicas: int = 1,
         frames_on_device: bool | str = "auto", ingress_replicas: int = 1,
         host_threads: int | None = None, device_pass: str = "whole", decode_apart: bool = False,
         fixed_shapes: bool | str = "auto") -> dict[str, Any]:
    """Apply one benchmark variant's settings to every deployment. `replicas` multiplies every deployment's
    replicas but the streams one: with the shipped fractions (a quarter of a card each, one set of models a card)
    `replicas: 2` is one set of models per card on two GPUs. `ingress_replicas` (layout ingress): that many
    ingress replicas share one card, each model's fraction divided among them. `host_threads`: every engine's
    `intra_op_threads` (torch's CPU pool of its process). `device_pass`: frames on the device, through the whole
    pipeline a batch at a time, or stage by stage (`ingress.device_pass`); `decode_apart`: the whole pass's decode
    on a thread of its own (`ingress.decode_apart`); `fixed_shapes`: the torch MTCNN's fixed-shape cascade
    (`detector.mtcnn.fixed_shapes`; false: the data-following one, fewer kernels and more host work)."""
    if replicas < 1 or ingress_replicas < 1:
        raise ValueError(f"replicas must be >= 1, not {replicas} / {ingress_replicas}")
    args = copy.deepcopy(args)
    args["layout"] = layout
    args["ingress"]["frames_on_device"] = frames_on_device
    args["ingress"]["device_pass"] = device_pass
    args["ingress"]["decode_apart"] = decode_apart
    if fixed_shapes != "auto":
        args["detector"].setdefault("mtcnn", {})["fixed_shapes"] = fixed_shapes
    if frames_on_device is True and backend == "torch":  # the torch cascade takes device frames (auto: on CUDA)
        args["detector"].setdefault("mtcnn", {})["implementation"] = "torch"
    if layout == "ingress" and ingress_replicas > 1:
        args["ingress"].setdefault("deployment", {})["num_replicas"] = ingress_replicas
        for stage in (args["detector"], *args["classifiers"]):
            deployment = stage.setdefault("deployment", {})
            deployment["num_gpus"] = deployment.get("num_gpus", 0.25) / ingress_replicas
    for section in (args["ingress"], args["detector"], *args["classifiers"]):
        deployment = section.setdefault("deployment", {})
        deployment["num_replicas"] = deployment.get("num_replicas", 1) * replicas
    for stage in (args["detector"], *args["classifiers"]):
        stage["engine"].update(device=device, backend=backend, fp16=fp16, execution=execution)
        stage["deployment"]["access_log"] = access_log
        if host_threads is not None:
            stage["engine"]["intra_op_threads"] = host_threads
        if max_batch_size is not None:
            stage.setdefault("batching", {})["max_batch_size"] = max_batch_size
    args["ingress"]["deployment"]["access_log"] = access_log
    args["ingress"]["detector_input"] = detector_input
    args["ingress"]["cpu_work"] = cpu_work
    return args
