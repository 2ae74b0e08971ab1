"""The configuration of one model stage (detector or classifier): pydantic models, validated before anything starts.

These are what the model deployments and stages take; serve_app/config.py composes them, with the ingress's
own settings, into the application's PipelineConfig. Names follow DeepStream's nvinfer keys for secondary
classifiers, in pythonic form: operate-on-class-ids -> operate_on_labels, input-object-min-width ->
min_object_width, classifier-threshold -> threshold, net-scale-factor -> input.scale, offsets -> input.mean,
model-color-format -> input.color_format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines.preprocess import Normalization

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESERVED_NAMES = frozenset({"detector", "total", "ingress", "streams", "classifiers"})


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
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="a stopping replica checks this often whether its requests are done (Serve sleeps "
        "one period before the first check, so every stop takes at least this long)"
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="how long a stopping replica may wait for its requests before it is killed"
    )
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
    cuda_sync: Literal["auto", "spin", "yield", "block"] = Field(
        "block",
        description="torch and tensorrt backends on CUDA: how a host thread waits for the GPU (the process's "
        "primary context, engines/cuda_sync.py): block (sleep until the GPU signals: no core held spinning while "
        "the GPU works), spin, yield, or auto (CUDA's default, which spins on any machine with more cores than "
        "contexts); stages sharing a process share it (the last loaded sets it)",
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
    fixed_shapes: Literal["auto"] | bool = Field(
        "auto",
        description="the torch cascade in fixed shapes (slots per frame, masks), so a batch of frames is one CUDA "
        "graph replay and one copy back instead of ~600 launches and ~17 waits for the device; exact, the "
        "data-following cascade answering a frame the slots do not hold: auto: where the nets replay CUDA graphs",
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
    max_detect_side: int = Field(
        1280, ge=0, description="frames with a longer side are scaled down to it before detection, and the boxes "
        "mapped back (crops still come from the full frame); 0: never (DeepStream's muxer scales every frame)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="compressed images the detector decodes itself "
                                  "(ingress.detector_input: encoded) are refused above this, from their header")
    max_inflight_pixels: int = Field(80_000_000, ge=1, description="decoded pixels the detector replica holds at "
                                     "once; further images wait for their turn")
    interval: int = Field(
        0, ge=0, le=100,
        description="video and live streams: the detector runs on one processed frame in interval + 1 of each "
        "stream; the frames between carry each tracked object on at its last velocity, with its cached attributes, "
        "and classify nothing (DeepStream nvinfer's interval). Photos are always detected",
    )
    mtcnn: MtcnnConfig = Field(default_factory=MtcnnConfig)
    yolo: YoloConfig | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batching: BatchingConfig = Field(
        default_factory=lambda: BatchingConfig(max_batch_size=8),
        description="frames of concurrent requests batched into one call (YOLO: one engine run; MTCNN: R-Net and "
        "O-Net once for the candidates of all frames, P-Net once per frame size (torch) or per frame (numpy))",
    )
    deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5))

    @model_validator(mode="after")
    def _section_for_kind(self) -> DetectorConfig:
        if self.max_inflight_pixels < self.max_image_pixels:
            raise ValueError("max_inflight_pixels must be at least max_image_pixels (one image has to fit)")
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
