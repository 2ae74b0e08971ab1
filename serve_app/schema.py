"""The HTTP API's JSON shapes (kept stable: other tools depend on these names)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Mode = Literal["parallel", "sequential"]


class ImageInfo(BaseModel):
    width: int
    height: int


class DetectedObject(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the original image")
    score: float
    label: str
    landmarks: list[list[float]] | None = None
    track_id: int | None = Field(None, description="video: the object's track (absent for photos)")
    attributes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='per classifier: {"label", "score"} (softmax) or {"value"} (expected_value)',
    )


class StageError(BaseModel):
    code: Literal["timeout", "failed", "unavailable", "skipped"]
    message: str


class CallTrace(BaseModel):
    """One stage call on the critical path, split into its parts (milliseconds)."""

    start_ms: float = Field(description="when the call was made, from the request's arrival in the ingress")
    round_trip_ms: float = Field(description="the call as the ingress saw it")
    transport_ms: float = Field(description="round trip minus the stage's own time: routing, (de)serialisation, "
                                "scheduling of the replica's threads and processes")
    queue_ms: float = Field(description="inside the stage, waiting for the engine (a batch in progress)")
    compute_ms: float = Field(description="model compute of the batch this call rode in")
    batch_size: int = Field(description="frames or crops in that batch")
    attempts: int = Field(1, description="calls it took: 2 when a replica was lost under the first and the call was retried")
    launch_ms: float | None = Field(None, description="host time the stage spent handing the batch to its engine "
                                    "(copy in, enqueue); compute_ms minus this is waiting for the device")
    gpu_start_ms: float | None = Field(None, description="when the batch's work began on the GPU, from the request's "
                                       "arrival (CUDA events; on the ingress's host only): the classifiers' GPU "
                                       "windows [gpu_start_ms, gpu_end_ms] overlap when they compute together")
    gpu_end_ms: float | None = Field(None, description="when the batch's work ended on the GPU, from the request's arrival")


class Trace(BaseModel):
    """Where one request's time went inside the service (`?trace=true`). What the client measures
    beyond `total_ms` is the HTTP proxy, the response's serialisation and the network."""

    read_body_ms: float
    decode_ms: float = Field(description="the ingress's decode; with detector_input 'encoded' it runs while the "
                             "detector works, off the critical path")
    detector: CallTrace
    crop_ms: float
    classifiers: dict[str, CallTrace] = Field(description="each classifier that answered")
    classify_ms: float = Field(description="the fan-out, first call sent to last answer in")
    merge_ms: float
    total_ms: float


class InferResponse(BaseModel):
    image: ImageInfo
    objects: list[DetectedObject]
    errors: dict[str, StageError] = Field(default_factory=dict, description="per classifier that did not answer")
    timings_ms: dict[str, float]
    mode: Mode
    trace: Trace | None = Field(None, description="the per-request breakdown, with ?trace=true")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Edge(BaseModel):
    """A chain: `child` runs on the objects for which `parent` gave one of `labels`."""

    parent: str
    child: str
    labels: list[str]


class PipelineDescription(BaseModel):
    mode: Mode
    layout: str
    detector: dict[str, Any]
    classifiers: list[dict[str, Any]]
    edges: list[Edge] = Field(default_factory=list, description="classifier chains (operate_on_classifiers)")
    limits: dict[str, int]
    frames: str = Field("host", description="where an image is decoded, cropped and classified: `host`, or the "
                        "device that holds it from decode to answer (ingress.frames_on_device)")
    streams: dict[str, Any] | None = Field(None, description="the streams deployment: streams held, opening, "
                                           "listeners, and its muxer's batches (frames of all streams per detector "
                                           "call); null where streams are off")


class BatchResponse(BaseModel):
    """One entry per image, in the order sent: the /v1/infer answer, or the error for that image alone."""

    results: list[InferResponse | ErrorResponse]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    layout: str = Field(description="where the models run: separate, colocated or ingress")
    deployments: int = Field(description="deployments of the graph that answered, the ingress included")


_BINARY = {"type": "string", "format": "binary"}


def _file_body(description: str, media_types: tuple[str, ...], form_field: str) -> dict[str, Any]:
    """An OpenAPI request body: the file's bytes under any of `media_types`, or multipart with `form_field`."""
    form = {"type": "object", "required": [form_field], "properties": {form_field: _BINARY}}
    return {"requestBody": {"required": True, "description": description, "content": {
        **{media: {"schema": _BINARY} for media in media_types}, "multipart/form-data": {"schema": form}}}}


IMAGE_BODY = _file_body(
    "The image: its bytes as the body (any image/* type, or application/octet-stream), or multipart/form-data "
    "with the file in the field `image`.",
    ("image/jpeg", "image/png", "image/*", "application/octet-stream"), "image")

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "multipart/form-data with the field `images` repeated, one file each "
        "(up to ingress.max_batch_images, and the body under ingress.max_body_bytes).",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["images"],
                           "properties": {"images": {"type": "array", "items": _BINARY, "minItems": 1}}}
            }
        },
    }
}

VIDEO_BODY = _file_body(
    "The video file as the body (video/mp4, video/quicktime, video/x-msvideo, video/x-matroska or "
    "application/octet-stream), or multipart/form-data with the file in the field `video`.",
    ("video/mp4", "video/quicktime", "video/x-msvideo", "video/x-matroska", "application/octet-stream"), "video")


class StreamRequest(BaseModel):
    source: str = Field(description="an rtsp:// or http(s):// URL, or the name of a file in ingress.streams.media_dir",
                        min_length=1, max_length=2048)


class FrameSize(BaseModel):
    width: int
    height: int


class StreamError(BaseModel):
    code: str
    message: str
    frame: int | None = None


class StreamInfo(BaseModel):
    id: str
    source: str = Field(description="the source as given, its password (and secret-looking query values) as ***")
    state: Literal["running", "ended", "stopped", "failed", "lost"]
    fps: float = Field(description="frames processed per second")
    frames_read: int
    frames_processed: int
    dropped_frames: int = Field(description="frames the source delivered while the pipeline was busy")
    failed_frames: int = Field(0, description="frames whose processing failed (the detector did not answer, or it "
                               "raised); the stream goes on, and fails once none went through for detector_outage_s")
    decode_errors: int = Field(0, description="packets of the source that did not decode")
    decoder: Literal["ffmpeg", "nvdec"] = Field("ffmpeg", description="where its frames are decoded: FFmpeg on the "
                                                "CPU, or the GPU's NVDEC (ingress.streams.decoder)")
    tracks: int
    image: FrameSize | None = Field(None, description="the size of the source's frames (boxes are in its pixels)")
    size_changes: int = Field(0, description="times the source changed its frame size")
    last_error: StreamError | None = Field(None, description="the last frame that failed, or what ended the stream")
    error: str | None = Field(None, description="why the stream failed")
    worker: str | None = Field(None, description="the stream worker that runs it (ingress.streams.workers; none: the "
                               "streams replica runs it)")


class StreamList(BaseModel):
    streams: list[StreamInfo]
