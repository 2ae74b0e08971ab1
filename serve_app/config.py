"""The pipeline's configuration: one pydantic model, validated before anything starts.

The model stages' own sections (detector, classifiers, engines, deployments) live in deployments/config.py,
which the deployments import; this module adds the ingress's settings (limits, video, streams, handles) and
the whole-pipeline checks (unique names, classifier chains).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from deployments.config import (
    PROJECT_ROOT,
    RESERVED_NAMES,
    BatchingConfig,
    ClassifierConfig,
    CropConfig,
    DeploymentConfig,
    DetectorConfig,
    EngineConfig,
    InputConfig,
    MtcnnConfig,
    StrictModel,
    YoloConfig,
    resolve_path,
)

__all__ = [
    "PROJECT_ROOT", "RESERVED_NAMES", "BatchingConfig", "ClassifierConfig", "CropConfig", "DeploymentConfig",
    "DetectorConfig", "EngineConfig", "HandleConfig", "IngressConfig", "InputConfig", "Layout", "MtcnnConfig",
    "PipelineConfig", "StreamsConfig", "StrictModel", "TrackerConfig", "VideoConfig", "YoloConfig", "resolve_path",
]

class HandleConfig(StrictModel):
    """How the ingress and the streams deployment call the model deployments (Ray Serve 2.60 handles)."""

    by_reference: Literal["auto"] | bool = Field(
        "auto",
        description="Serve's two transports: by value (pickled over the callee's gRPC server; the fastest for a few "
        "KB) or by reference (through Ray's object store; far faster for megabytes: docs/benchmarks.md, "
        "'Frames between deployments'). auto: by reference when a call's arguments carry more than "
        "by_reference_above_bytes, else by value. Either way no legal frame, body or crop batch is refused by a "
        "transport limit: every replica's gRPC message cap is raised to grpc_max_message_bytes",
    )
    by_reference_above_bytes: int = Field(
        1024 * 1024, ge=0, description="auto: calls carrying more than this go by reference (measured crossover "
        "between 0.8 and 2.7 MB on the 2-core CPU machine)")
    grpc_max_message_bytes: int = Field(
        2**31 - 1, ge=4 * 1024 * 1024, le=2**31 - 1,
        description="RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in every replica of the application: the largest "
        "call or result by value (Serve's default, 4 MiB, refused a 1080p frame)")
    prefer_local_routing: bool = Field(False, description="prefer replicas on the ingress's own node")

    @property
    def above_bytes(self) -> int | None:
        """The threshold for `Routed`: None (always by value), 0 (always by reference) or the configured bytes."""
        if self.by_reference == "auto":
            return self.by_reference_above_bytes
        return 0 if self.by_reference else None


class TrackerConfig(StrictModel):
    """ByteTrack (supervision) for video: DeepStream's tracker settings, by their ByteTrack names."""

    activation_threshold: float = Field(0.25, ge=0, le=1, description="detections above it start tracks")
    lost_track_buffer: int = Field(30, ge=1, description="frames a lost track is kept for re-identification")
    matching_threshold: float = Field(0.8, ge=0, le=1, description="association threshold (IoU cost)")


class VideoConfig(StrictModel):
    """POST /v1/video: limits checked before any frame is processed, and the tracker."""

    max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="larger uploads get 413")
    max_duration_s: float = Field(600.0, gt=0, description="longer videos (frames / fps) get 413")
    max_frame_pixels: int = Field(3840 * 2160, ge=1, description="larger frames get 413")
    decoder: Literal["auto", "ffmpeg", "nvdec"] = Field(
        "auto", description="where H.264 and HEVC videos are decoded: `nvdec` on the GPU (PyNvVideoCodec, the `nvdec` "
        "extra; needs layout ingress with frames on a CUDA device, else the start fails), `ffmpeg` (OpenCV) on the "
        "CPU, `auto`: NVDEC where the ingress keeps frames on a CUDA device and can load it")
    lookahead: int = Field(4, ge=1, le=64, description="frames whose detection is in flight ahead of the one "
                           "being tracked and classified (they batch together at the detector)")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)


class MuxerConfig(StrictModel):
    """How the frames of live streams meet at the detector (DeepStream's nvstreammux)."""

    batch_size: int = Field(16, ge=1, le=256, description="the most frames, of different streams, in one detector "
                            "call; a batch is full when it holds a frame of every running stream (nvstreammux's "
                            "batch-size)")
    batched_push_timeout_ms: float = Field(
        33.0, ge=0, le=10_000,
        description="a batch that is not full goes after its first frame has waited this long (nvstreammux's "
        "batched-push-timeout; 33: a frame at 30 fps); 0: at once, with what queued while the last batch was out",
    )
    batches_in_flight: int = Field(
        2, ge=1, le=4,
        description="batches out at the detector at once: 2, the next batch fills and goes while the last is out, "
        "so the detector starts it as soon as it is free (the GPU kept busy across the last batch's return to its "
        "streams: 34 % more frames in one H100 worker); 1, the next batch fills once the last is back",
    )


class StreamWorkersConfig(StrictModel):
    """Stream workers: processes that each hold the models and run a share of the live streams, so that a frame
    never leaves the process that decoded it and the streams' host work spreads over processes and nodes."""

    count: int = Field(0, ge=0, le=64, description="worker processes (Ray actors); 0: the streams replica runs every "
                       "stream itself and reaches the models by handle")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each worker holds")
    num_gpus: float = Field(0.25, ge=0, le=1, description="the share of one GPU each worker holds, for its copy of "
                            "the models and its NVDEC decoders (on a machine with none: 0, and the models run on CPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources of each worker")
    spread: bool = Field(True, description="place the workers on as many nodes as will take them (Ray's SPREAD)")
    videos: bool = Field(True, description="POST /v1/video runs on the workers too (each upload on the least loaded), "
                         "not in the ingress; /v1/video/annotate stays in the ingress")


class StreamsConfig(StrictModel):
    """POST /v1/streams: which sources may be opened, how many at once, and the deployment that holds them."""

    enabled: bool = Field(True, description="serve /v1/streams (through the `streams` deployment)")
    media_dir: Path | None = Field(None, description="folder whose files may be streamed by name; None: no file sources")
    url_schemes: list[str] = Field(default_factory=lambda: ["rtsp", "rtsps", "http", "https"],
                                   description="URL schemes a stream source may use")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names or CIDRs a stream URL may reach although they are loopback, private, link-local or "
        "this host's own addresses (all refused by default: a client must not make the service fetch internal "
        "addresses)")
    max_streams: int = Field(4, ge=1, le=256, description="streams running or opening at once; more get 429")
    muxer: MuxerConfig = Field(default_factory=MuxerConfig)
    detect_ahead: int = Field(0, ge=0, le=8, description="frames of a stream whose detection starts while an earlier "
                              "frame of it is tracked and classified (0: one frame at a time); for a GPU whose "
                              "stages would otherwise wait on each other: where the host's cores are the limit it "
                              "adds latency and no frames (2-core CPU: p50 99 -> 180 ms, docs/benchmarks.md)")
    workers: StreamWorkersConfig = Field(default_factory=StreamWorkersConfig)
    decoder: Literal["auto", "ffmpeg", "nvdec"] = Field(
        "auto", description="where streams' H.264 and HEVC frames are decoded: `nvdec` on the GPU (PyNvVideoCodec, "
        "the `nvdec` extra; the streams deployment needs a GPU share, and starting it fails where NVDEC cannot be "
        "used), `ffmpeg` on the CPU, `auto`: NVDEC where the streams replica can use it, else FFmpeg")
    max_frame_pixels: int = Field(3840 * 2160, ge=1, description="a source whose frames are larger (declared at the "
                                  "open: 413; met later: the stream fails) is refused; frames are scaled to the "
                                  "detector's max_detect_side as they are decoded")
    max_listeners: int = Field(64, ge=1, le=1024, description="events listeners of all streams at once; more get 429. "
                               "They are counted apart from the ingress's requests, so the API answers whatever "
                               "listens")
    max_listeners_per_stream: int = Field(8, ge=1, le=1024, description="events listeners of one stream at once")
    listener_buffer: int = Field(256, ge=1, description="records an events listener may lag behind before it "
                                 "loses its oldest ones")
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="connecting to a source and reading its first "
                                  "frame (FFmpeg's open timeout)")
    read_timeout_s: float = Field(10.0, gt=0, le=300, description="a source that sends no frame for this long "
                                  "fails its stream, naming it")
    detector_outage_s: float = Field(30.0, gt=0, description="frames the detector does not answer are skipped; a "
                                     "stream fails once it has answered none for this long")
    keep_ended_s: float = Field(60.0, ge=0, description="an ended stream's final description answers GET and "
                                "DELETE this long, then it is forgotten")
    deployment: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, num_gpus=0, max_ongoing_requests=32),
        description="the `streams` deployment: one replica, holding every stream (with `workers`, it places them on "
        "the workers and answers for all of them). max_ongoing_requests counts its "
        "other calls (start, list, stop, the frames' work); each events listener holds one more, and room for "
        "max_listeners is added on top")

    @field_validator("deployment")
    @classmethod
    def _one_replica(cls, value: DeploymentConfig) -> DeploymentConfig:
        if value.num_replicas != 1 or value.autoscaling_config:
            raise ValueError("the streams deployment has exactly one replica (it holds every stream, and "
                             "max_streams counts once); scale the ingress instead")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_or_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError as exc:
                    raise ValueError(f"allowed_hosts: {entry!r} is not a CIDR: {exc}") from exc
            elif not entry or any(c in entry for c in " /:@"):
                raise ValueError(f"allowed_hosts: {entry!r} is neither a host name nor a CIDR")
        return value

    @field_validator("media_dir", mode="before")
    @classmethod
    def _folder(cls, value: str | Path | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        if not path.is_dir():
            raise ValueError(f"media_dir {value} is not a folder")
        return path.resolve()


class IngressConfig(StrictModel):
    mode: Literal["parallel", "sequential"] = "parallel"
    cpu_work: Literal["auto", "loop", "threads"] = Field(
        "auto",
        description="where the ingress and the streams deployment decode images, cut crops, draw, read and write "
        "video files and track: on the event loop, or on a small thread pool. auto is the loop in every layout: "
        "on 2 cores threads cost throughput in two runs of three (docs/benchmarks.md, \"Where the ingress's CPU "
        "work runs\"). Images over 4 Mpx are decoded off the loop either way",
    )
    detector_input: Literal["encoded", "frame"] = Field(
        "encoded",
        description="what goes to a remote detector: the compressed bytes as received (decoded there, while the "
        "ingress decodes its own copy for the crops) or the decoded frame (a 512x512 photo is 786 KB raw)",
    )
    frames_on_device: Literal["auto"] | bool = Field(
        "auto",
        description="layout ingress: decode each image into the detector's device memory (nvJPEG for JPEGs on "
        "CUDA), detect, crop and classify it there; only metadata comes back. auto: where the detector (torch "
        "MTCNN) and every classifier run through the torch backend on one CUDA device; true: also on the CPU "
        "device (the same code, for tests); false: frames stay on the host",
    )
    device_batch_size: int = Field(
        16, ge=1, le=256,
        description="frames on the device: the most requests whose images go through one batch (one nvJPEG call, "
        "one detector batch, one cut per crop geometry); a batch runs as soon as the previous one is done, with "
        "what queued meanwhile (nothing waits for company)",
    )
    device_pass: Literal["whole", "stages"] = Field(
        "whole",
        description="frames on the device: 'whole' takes each batch of requests through decode, detect, crop and "
        "classify on one thread, and each request back to the event loop once (DeepStream's way: a classifier that "
        "fails costs only its attribute; one slower than its timeout_s delays its batch and answers timeout); "
        "'stages' batches each step on its own, a hand-over between the loop and a thread per step and request "
        "(a slow classifier delays only its own attribute)",
    )
    decode_apart: bool = Field(
        False,
        description="device_pass whole: decode and scale each batch of images on a thread of its own, while the "
        "detector works on the batch before (nvJPEG's Huffman stage runs on the host); false: on the detector's "
        "thread, before each batch (docs/benchmarks.md measures both)",
    )
    handles: HandleConfig = Field(default_factory=HandleConfig)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_batch_images: int = Field(32, ge=1, le=1024, description="images one POST /v1/infer/batch may carry")
    video: VideoConfig = Field(default_factory=VideoConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images get 413, from their header")
    max_inflight_pixels: int = Field(80_000_000, ge=1, description="decoded pixels the ingress replica holds at once "
                                     "(each image from its header until its answer); further images wait their turn")
    detector_timeout_s: float = Field(10.0, gt=0)
    auth_token_env: str | None = Field(
        "PIPELINE_API_TOKEN",
        description="environment variable holding the bearer token; when it is set, /v1 requests need "
        "'Authorization: Bearer <token>'",
    )
    deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.25, num_gpus=0))


Layout = Literal["separate", "colocated", "ingress"]


class PipelineConfig(StrictModel):
    """Everything `serve_app.app:build_app` needs; `serve_config.yaml` carries it under `args`."""

    layout: Layout = Field(
        "separate",
        description="where the models run: 'separate' (a deployment per model, each with its own GPU fraction), "
        "'colocated' (the detector alone; every classifier in one shared deployment, run concurrently), "
        "'ingress' (every model inside the ingress replica: no inner hop at all)",
    )
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    classifiers: list[ClassifierConfig] = Field(default_factory=list)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @field_validator("classifiers")
    @classmethod
    def _unique_names(cls, value: list[ClassifierConfig]) -> list[ClassifierConfig]:
        names = [c.name for c in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"classifier names must be unique; repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _budgets(self) -> PipelineConfig:
        if self.ingress.max_inflight_pixels < self.ingress.max_image_pixels:
            raise ValueError("ingress.max_inflight_pixels must be at least ingress.max_image_pixels (one image has to fit)")
        return self

    @model_validator(mode="after")
    def _chains(self) -> PipelineConfig:
        """operate_on_classifiers names known classifiers that give labels, with their labels, and no cycle."""
        by_name = {c.name: c for c in self.classifiers}
        for c in self.classifiers:
            where = f"classifiers[{c.name}].operate_on_classifiers"
            for parent, labels in (c.operate_on_classifiers or {}).items():
                if parent not in by_name:
                    raise ValueError(f"{where}: unknown classifier {parent!r}; the classifiers are {', '.join(by_name)}")
                known = by_name[parent].labels or []
                if by_name[parent].kind != "softmax":
                    raise ValueError(f"{where}.{parent}: {parent} is {by_name[parent].kind} and gives no label to select on")
                for label in labels:
                    if label not in known:
                        raise ValueError(f"{where}.{parent}: {label!r} is not a label of {parent} ({', '.join(known)})")
        cycle = _cycle({c.name: list(c.operate_on_classifiers or {}) for c in self.classifiers})
        if cycle:
            raise ValueError(f"classifiers: operate_on_classifiers form a cycle: {' -> '.join(cycle)}")
        return self

    @property
    def cpu_work(self) -> str:
        """`ingress.cpu_work` resolved: `loop` or `threads`."""
        where = self.ingress.cpu_work
        return "loop" if where == "auto" else where

    def edges(self) -> list[tuple[str, str, list[str]]]:
        """(parent, child, labels) for every operate_on_classifiers entry, in config order."""
        return [(parent, c.name, list(labels)) for c in self.classifiers
                for parent, labels in (c.operate_on_classifiers or {}).items()]

    def with_dependencies(self, names: list[str]) -> list[str]:
        """`names` and every classifier they depend on, directly or not, in config order."""
        parents = {c.name: list(c.operate_on_classifiers or {}) for c in self.classifiers}
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(parents[name])
        return [c.name for c in self.classifiers if c.name in wanted]


def _cycle(parents: dict[str, list[str]]) -> list[str]:
    """A cycle in the child -> parent graph as a closed path (empty when there is none)."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return []
        for parent in parents.get(name, []):
            found = visit(parent, [*path, name])
            if found:
                return found
        done.add(name)
        return []

    for name in parents:
        found = visit(name, [])
        if found:
            return found
    return []
