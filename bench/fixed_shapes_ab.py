"""The detector's host cost with and without the fixed-shape cascade (engines/mtcnn_static.py), in one process
on one card: for each batch size, bench.ceiling's pass (decode or upload, detect, crop, classify) over the two
images and a stream's frames, data-following cascade against fixed shapes. Per frame: host CPU, wall time,
kernel time (the ceiling), and how many frames the fixed shapes answered.

    python -m bench.fixed_shapes_ab --clips .gpuclips/720p.mp4 --batches 1 4 16 --out bench/out/gpu/fixed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.ceiling import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clips", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    rows: list[dict[str, Any]] = []
    print("| batch | cascade | source | host CPU ms/frame | wall ms/frame | kernel ms/frame (detect) | frames/s one process |")
    print("|---|---|---|---|---|---|---|")
    for batch in opts.batches:
        for fixed in ("false", "true"):
            result = measure(opts.device, True, batch, opts.repeats, "batched", clips=opts.clips, fixed_shapes=fixed,
                             with_images=True)
            for source, row in result["images"].items():
                rows.append({"batch": batch, "fixed_shapes": fixed, "source": source, "device": result["device"],
                             **{k: v for k, v in row.items() if k != "host_ops"}})
                print(f"| {batch} | {'fixed shapes' if fixed == 'true' else 'data-following'} | {source} | "
                      f"{row['host_cpu_ms_per_image']} | {row['wall_ms_per_image']} | "
                      f"{row.get('kernel_ms_per_image', '-')} ({row.get('decode_detect_kernel_ms_per_image', '-')}) | "
                      f"{row['wall_images_per_s']} |", flush=True)
            if opts.out:
                opts.out.parent.mkdir(parents=True, exist_ok=True)
                opts.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
