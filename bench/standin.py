"""Stand-in classifiers for benchmarks: torchvision resnet18/34/50 with random (seeded) weights, as ONNX.

Their costs differ (roughly 1 : 2 : 2.3 in FLOPs), so t1, t2, t3 differ and the parallel/sequential
gap is visible. Bench-only: needs torch and torchvision (`pip install '.[torch]' torchvision`).
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("resnet18", "resnet34", "resnet50")


def export_resnets(out_dir: Path, size: int) -> dict[str, Path]:
    import torch
    import torchvision

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in NAMES:
        path = out_dir / f"{name}_{size}.onnx"
        if not path.exists():
            torch.manual_seed(0)
            model = getattr(torchvision.models, name)(weights=None).eval()
            torch.onnx.export(
                model,
                (torch.rand(1, 3, size, size),),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        paths[name] = path
    return paths
