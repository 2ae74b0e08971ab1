"""The pipeline's configuration: one pydantic model, validated before anything starts.

Names follow DeepStream's nvinfer keys for secondary classifiers, in pythonic form:
operate-on-class-ids -> operate_on_labels, input-object-min-width -> min_object_width,
classifier-threshold -> threshold, net-scale-factor -> input.scale, offsets -> input.mean,
model-color-format -> input.color_format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines.preprocess import Normalization

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESERVED_NAMES = frozenset({"detector", "total", "ingress"})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(value: str | Path) -> Path:
    """An existing file: absolute, else relative to the working directory, else to the project root."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    folders = dict.fromkeys(str(c.parent) for c in candidates)
    raise ValueError(f"file not found: {value} (looked in {', '.join(folders)})")


ModelPath = Annotated[Path, Field(description="ONNX file; relative paths resolve against cwd, then the project root")]


class DeploymentConfig(StrictModel):
    """Ray Serve settings of one deployment. `num_gpus` is the fraction of one GPU it holds when a
    GPU is used; on a machine with none, the deployment runs on CPU and asks for no GPU."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(32, ge=1)
    num_cpus: float = Field(0.25, ge=0, description="fractional CPUs: 2-core machines cannot give each replica one")
    num_gpus: float = Field(0.25, ge=0, le=1)
    autoscaling_config: dict[str, Any] | None = None
    access_log: bool = Field(True, description="Serve's per-request access log lines (about 2 ms a hop on 2 cores)")
    max_constructor_retry_count: int = Field(3, ge=1, description="replica start attempts before the app fails")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of this deployment's replicas")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources, e.g. to pin classifiers to a node that offers them"
    )


class EngineConfig(StrictModel):
    backend: Literal["onnxruntime", "tensorrt", "torch"] = Field(
        "onnxruntime",
        description="onnxruntime (ONNX; CPU, or CUDA with onnxruntime-gpu), torch (ONNX through onnx2torch; "
        "CUDA or CPU), tensorrt (a serialized .engine built on the serving GPU; CUDA only)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = Field(False, description="torch backend on CUDA: run the model in half precision")
    pad_batches: Literal["auto"] | bool = Field(
        "auto",
        description="pad batches to power-of-two sizes and warm each at start-up, so per-shape kernel "
        "selection never happens under load; auto: on CUDA only",
    )
    cuda_graphs: Literal["auto"] | bool = Field(
        "auto",
        description="torch backend on CUDA: capture each model's forward once per batch bucket as a CUDA graph at "
        "start-up and replay it (one enqueue per call, as TensorRT does); auto: on CUDA, falling back to eager "
        "with a warning for a model that will not capture; true: such a model fails the start-up; false: eager",
    )
    intra_op_threads: int = Field(1, ge=1)
    inter_op_threads: int = Field(1, ge=1)
    execution: Literal["auto", "thread", "inline", "async"] = Field(
        "auto",
        description="where model compute runs in the replica: 'inline' (on the event loop: no hand-off), "
        "'thread' (one dedicated worker thread, so stages that share a process overlap), 'async' (launched "
        "on the event loop, waited for on a thread that holds no GIL: for engines that enqueue, CUDA graphs "
        "and TensorRT), 'auto' (async for such engines, else inline when the stage has its replica to itself, "
        "thread when it shares it)",
    )


class MtcnnConfig(StrictModel):
    implementation: Literal["auto", "numpy", "torch"] = Field(
        "auto",
        description="'numpy': the cascade's pixel work in numpy/OpenCV on the host, for any backend; 'torch': the "
        "whole cascade on the nets' device, the frame uploaded once (torch backend only); auto: torch where "
        "the nets run on CUDA through the torch backend, numpy elsewhere",
    )
    pnet: ModelPath = Path("models/mtcnn_pnet.onnx")
    rnet: ModelPath = Path("models/mtcnn_rnet.onnx")
    onet: ModelPath = Path("models/mtcnn_onet.onnx")
    min_face_size: float = Field(20.0, gt=0)
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = Field(0.709, gt=0.1, lt=1.0)

    @field_validator("pnet", "rnet", "onet", mode="before")
    @classmethod
    def _exists(cls, value: str | Path) -> Path:
        return resolve_path(value)

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= t <= 1.0 for t in value):
            raise ValueError("thresholds must be probabilities in [0, 1]")
        return value


class YoloConfig(StrictModel):
    """A YOLO-family ONNX export (or TensorRT engine): ultralytics v8/v11 [1, 4+C, N] or v5 [1, N, 5+C]."""

    model: ModelPath
    input_width: int = Field(640, ge=32, le=4096)
    input_height: int = Field(640, ge=32, le=4096)
    layout: Literal["auto", "v8", "v5"] = "auto"
    confidence_threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.45, ge=0, le=1)
    max_detections: int = Field(300, ge=1)
    class_names: list[str] | None = None
    class_names_file: Path | None = Field(None, description="one class name per line")

    @field_validator("model", mode="before")
    @classmethod
    def _model_exists(cls, value: str | Path) -> Path:
        return resolve_path(value)

    @field_validator("class_names_file", mode="before")
    @classmethod
    def _file_exists(cls, value: str | Path | None) -> Path | None:
        return None if value is None else resolve_path(value)

    @model_validator(mode="after")
    def _read_names(self) -> YoloConfig:
        _inline_or_file(self, "class_names", "class_names_file", str)
        return self


class DetectorConfig(StrictModel):
    kind: Literal["mtcnn", "yolo"] = "mtcnn"
    mtcnn: MtcnnConfig = Field(default_factory=MtcnnConfig)
    yolo: YoloConfig | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batching: BatchingConfig = Field(
        default_factory=lambda: BatchingConfig(max_batch_size=8),
        description="frames of concurrent requests batched into one call (YOLO: one engine run; MTCNN: R-Net and "
        "O-Net once for the candidates of all frames, P-Net per frame)",
    )
    deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5))

    @model_validator(mode="after")
    def _section_for_kind(self) -> DetectorConfig:
        if self.kind == "yolo" and self.yolo is None:
            raise ValueError("detector.kind is yolo but the detector.yolo section is missing")
        if self.kind == "mtcnn" and self.mtcnn.implementation == "torch" and self.engine.backend != "torch":
            raise ValueError(
                f"detector.mtcnn.implementation: torch runs the cascade on the torch backend's device; this "
                f"detector's engine.backend is {self.engine.backend} (use implementation numpy or auto)"
            )
        if self.kind == "mtcnn" and self.engine.backend == "tensorrt":
            raise ValueError(
                "detector.engine.backend: kind mtcnn cannot use backend tensorrt: its P-Net runs at a different "
                "input size at every pyramid scale, which one fixed-shape engine cannot take; run MTCNN on "
                "onnxruntime or torch (the classifiers can still use tensorrt), or use kind yolo"
            )
        return self


class InputConfig(StrictModel):
    """The network input: DeepStream's infer-dims, model-color-format, net-scale-factor, offsets."""

    width: int = Field(ge=1, le=4096)
    height: int = Field(ge=1, le=4096)
    color_format: Literal["RGB", "BGR", "GRAY"] = "RGB"
    scale: float = Field(1.0, description="y = scale * (x - mean) / std")
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0,)

    @model_validator(mode="after")
    def _fits_channels(self) -> InputConfig:
        Normalization(self.color_format, self.scale, self.mean, self.std)  # raises ValueError naming the problem
        return self


class CropConfig(StrictModel):
    square: bool = Field(True, description="grow each box to a square around its centre before resizing")
    padding: float = Field(0.0, ge=-0.4, le=2.0, description="grow (or shrink) the box by this fraction per side")
    keep_aspect: bool = Field(False, description="letterbox the crop into the input size instead of stretching it")


class BatchingConfig(StrictModel):
    """Cross-request batching, sized in items (crops for a classifier, frames for the detector).

    A batch never waits for company: a call that finds the engine idle runs at once, and calls that
    arrive while a batch computes go together in the next one (deployments/batcher.py)."""

    max_batch_size: int = Field(32, ge=1)


class ClassifierConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    model: ModelPath
    kind: Literal["softmax", "expected_value", "vector"] = "softmax"
    labels: list[str] | None = Field(None, description="class names, or use labels_file")
    labels_file: Path | None = Field(None, description="one class name per line")
    values: list[float] | None = Field(None, description="expected_value: the value of each class")
    values_file: Path | None = Field(None, description="one value per line")
    apply_softmax: bool = Field(False, description="the model outputs logits, not probabilities")
    top_k: int = Field(1, ge=1, le=100, description="softmax: also return the k best labels")
    normalize: bool = Field(False, description="vector: L2-normalise the output (embeddings)")
    input: InputConfig
    crop: CropConfig = Field(default_factory=CropConfig)
    operate_on_labels: list[str] | None = Field(None, description="detector labels to classify; None: all")
    operate_on_classifiers: dict[str, list[str]] | None = Field(
        None,
        description="classify only objects for which each named classifier gave one of these labels, as soon as "
        "those classifiers have answered (DeepStream's operate-on-gie-id with operate-on-class-ids)",
    )
    min_object_width: float = Field(0, ge=0)
    min_object_height: float = Field(0, ge=0)
    threshold: float = Field(0.0, ge=0, le=1, description="top-1 probability below which no attribute is set")
    timeout_s: float = Field(2.0, gt=0)
    reinfer_area_growth: float = Field(
        0.2, ge=0, description="video: classify a track again once its box area has grown by this fraction since its "
        "last classification (DeepStream re-infers a tracked object that grew by 20%)")
    reinfer_interval: int = Field(
        0, ge=0, description="video: classify a track again after this many frames; 0: only on growth "
        "(DeepStream's secondary-reinfer-interval)")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_exists(cls, value: str | Path) -> Path:
        return resolve_path(value)

    @field_validator("labels_file", "values_file", mode="before")
    @classmethod
    def _file_exists(cls, value: str | Path | None) -> Path | None:
        return None if value is None else resolve_path(value)

    @model_validator(mode="after")
    def _read_label_and_value_files(self) -> ClassifierConfig:
        if self.name in RESERVED_NAMES:
            raise ValueError(f"classifier name {self.name!r} is reserved")
        _inline_or_file(self, "labels", "labels_file", str)
        _inline_or_file(self, "values", "values_file", float)
        if self.kind == "softmax" and not self.labels:
            raise ValueError("a softmax classifier needs labels or labels_file")
        if self.kind == "expected_value" and not self.values:
            raise ValueError("an expected_value classifier needs values or values_file")
        return self


def _inline_or_file(model: BaseModel, field: str, file_field: str, parse: type) -> None:
    """Fill `field` from the one-item-per-line file named by `file_field` (exactly one may be given)."""
    path = getattr(model, file_field)
    if path is None:
        return
    if getattr(model, field) is not None:
        raise ValueError(f"give {field} or {file_field}, not both")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        object.__setattr__(model, field, [parse(line) for line in lines])
    except ValueError as exc:
        raise ValueError(f"{file_field} {path} holds a bad entry: {exc}") from exc


class HandleConfig(StrictModel):
    """Options of the ingress's DeploymentHandles to the detector and classifiers (Ray Serve 2.60)."""

    by_reference: bool = Field(
        False,
        description="True: Serve's default (results through the object store). False measured faster on the 2-core "
        "CPU box (2026-11-28: c16 throughput +18 % on the face demo, +8 % on the stand-ins)",
    )
    prefer_local_routing: bool = Field(False, description="prefer replicas on the ingress's own node")


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
    lookahead: int = Field(4, ge=1, le=64, description="frames whose detection is in flight ahead of the one "
                           "being tracked and classified (they batch together at the detector)")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)


class StreamsConfig(StrictModel):
    """POST /v1/streams: which sources may be opened, and how many at once."""

    media_dir: Path | None = Field(None, description="folder whose files may be streamed by name; None: no file sources")
    url_schemes: list[str] = Field(default_factory=lambda: ["rtsp", "rtsps", "http", "https"],
                                   description="URL schemes a stream source may use")
    max_streams: int = Field(4, ge=1, le=256, description="streams running at once; more get 429")
    listener_buffer: int = Field(256, ge=1, description="records an events listener may lag behind before it "
                                 "loses its oldest ones")

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
    detector_input: Literal["encoded", "frame"] = Field(
        "encoded",
        description="what goes to a remote detector: the compressed bytes as received (decoded there, while the "
        "ingress decodes its own copy for the crops) or the decoded frame (a 512x512 photo is 786 KB raw)",
    )
    handles: HandleConfig = Field(default_factory=HandleConfig)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_batch_images: int = Field(32, ge=1, le=1024, description="images one POST /v1/infer/batch may carry")
    video: VideoConfig = Field(default_factory=VideoConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    max_image_pixels: int = Field(40_000_000, ge=1)
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
