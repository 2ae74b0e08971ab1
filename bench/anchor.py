"""The anchor: what a user would write instead of the graph. The same engines in one plain FastAPI +
uvicorn process, classifiers one after another, over the same HTTP path and doing the same per-request
work as the graph (read the body, decode, detect, crop, classify, merge, JSON).

    python -m bench.anchor --port 8100 --workload face [--device cuda --backend torch --fp16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from deployments.models import build_classifier, build_detector
from engines.preprocess import crop_resize
from serve_app.config import PipelineConfig
from serve_app.decoding import decode_image
from serve_app.graph import ClassifierRoute, merge
from serve_app.schema import ImageInfo, InferResponse


def make_app(config: PipelineConfig, device: str) -> FastAPI:
    detector = build_detector(config.detector, device)
    models = {c.name: build_classifier(c, device) for c in config.classifiers}
    routes = [ClassifierRoute.from_config(c, None) for c in config.classifiers]
    app = FastAPI()

    @app.post("/v1/infer")
    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        frame = decode_image(await request.body(), config.ingress.max_image_pixels)
        t0 = time.perf_counter()
        detections = detector.detect(frame)
        timings = {"detector": round((time.perf_counter() - t0) * 1e3, 2)}
        outputs: dict[str, tuple[np.ndarray, object]] = {}
        for route in routes:
            t0 = time.perf_counter()
            indices = detections.select(route.labels, route.min_width, route.min_height)
            if len(indices):
                crops = crop_resize(frame, detections.xyxy[indices], route.crop)
                outputs[route.name] = (indices, models[route.name].predict(crops))
            timings[route.name] = round((time.perf_counter() - t0) * 1e3, 2)
        objects = merge(detections, outputs)  # type: ignore[arg-type]
        timings["total"] = round((time.perf_counter() - start) * 1e3, 2)
        answer = InferResponse(image=ImageInfo(width=frame.shape[1], height=frame.shape[0]), objects=objects,
                               errors={}, timings_ms=timings, mode="sequential")
        return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    from bench.run import workload_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", default="face", choices=["face", "standin"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--standin-size", type=int, default=128)
    opts = parser.parse_args()
    config = workload_config(opts.workload, opts.device, opts.backend, opts.fp16, opts.standin_size)
    uvicorn.run(make_app(config, opts.device), host="127.0.0.1", port=opts.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
