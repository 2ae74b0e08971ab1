"""Which limits the fixed-shape MTCNN cascade (engines/mtcnn_static.py) needs for an image, on a device: the
image at the detector's working side, detected again until the fixed shapes answer it (their limits grown as the
detector grows them) or give it up to the data-following cascade, under each largest `k1` given.

    python -m bench.fixed_limits --device cuda --fp16 --most-k1 1024 2048 4096

Run 9 on an H100: the eight-face photo (1280x640 at the working side) was answered by the data-following cascade
at every level, its limits grown to k1 1024 (the largest), k2 1024, k3 96, where on the CPU device (fp32) the
same limits answer it exactly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def probe(device: str, fp16: bool, most_k1: int, tries: int = 8) -> dict[str, Any]:
    import torch

    from engines import mtcnn_static
    from engines.device_image import fit_side_tensor
    from engines.factory import create_engine
    from engines.mtcnn_torch import TorchMtcnn
    from tests.images import many_faces

    most = mtcnn_static.MOST
    mtcnn_static.MOST = replace(most, k1=most_k1)
    try:
        nets = [create_engine("torch", ROOT / "models" / f"mtcnn_{n}.onnx", device, fp16=fp16) for n in ("pnet", "rnet", "onet")]
        detector = TorchMtcnn(*nets, fixed_shapes=True)
        frame, _ = fit_side_tensor(torch.from_numpy(many_faces()).to(device), 1280)
        found = 0
        for _ in range(tries):
            found = len(detector.detect_batch([frame])[0])
            if detector.frames_static:
                break
        counts = detector.cascade_counts()
        detector.close()
    finally:
        mtcnn_static.MOST = most
    return {"most_k1": most_k1, "faces": found, "frames_fixed_shapes": counts["frames_fixed_shapes"],
            "frames_data_following": counts["frames_data_following"], "grown_limits": counts["grown_limits"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--most-k1", type=int, nargs="+", default=[1024, 2048])
    opts = parser.parse_args()
    for k1 in opts.most_k1:
        print(json.dumps(probe(opts.device, opts.fp16, k1)), flush=True)


if __name__ == "__main__":
    main()
