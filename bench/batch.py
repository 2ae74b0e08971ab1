"""POST /v1/infer/batch against the same images through /v1/infer, one at a time and all at once.

    python -m bench.batch [--images 16] [--rounds 5] [--out bench/out/batch.json]

Deploys the face demo on a local Ray and sends `--images` photos (the committed astronaut, collage and
no-face images in turn) `--rounds` times each way; reports images per second and the median wall time of a
round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import environment


async def _rounds(send, rounds: int) -> list[float]:  # noqa: ANN001 - an async callable
    walls = []
    for _ in range(rounds):
        start = time.perf_counter()
        await send()
        walls.append(time.perf_counter() - start)
    return walls


async def measure(url: str, bodies: list[bytes], rounds: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        async def one(body: bytes) -> None:
            (await client.post("/v1/infer", content=body, headers={"Content-Type": "image/jpeg"})).raise_for_status()

        async def sequential() -> None:
            for body in bodies:
                await one(body)

        async def concurrent() -> None:
            await asyncio.gather(*(one(body) for body in bodies))

        async def batch() -> None:
            files = [("images", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(bodies)]
            response = await client.post("/v1/infer/batch", files=files)
            response.raise_for_status()
            assert all("error" not in r for r in response.json()["results"])

        await batch()  # warm-up
        out = {}
        for name, send in (("infer_sequential", sequential), ("infer_concurrent", concurrent), ("batch", batch)):
            walls = await _rounds(send, rounds)
            median = statistics.median(walls)
            out[name] = {"median_round_s": round(median, 3), "images_per_s": round(len(bodies) / median, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/out/batch.json")
    opts = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.soak import sample_bodies
    from bench.workloads import face_args
    from serve_app.app import build_app

    samples = sample_bodies()
    bodies = [samples[i % len(samples)] for i in range(opts.images)]
    env = environment(argparse.Namespace(device="cpu", backend="onnxruntime"))
    env["command"] = "python -m bench.batch " + " ".join(argv if argv is not None else sys.argv[1:])
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8013})
    try:
        serve.run(build_app(face_args()), name="batch", route_prefix="/")
        result = {"environment": env, "images": opts.images, "rounds": opts.rounds,
                  **asyncio.run(measure("http://127.0.0.1:8013", bodies, opts.rounds))}
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
