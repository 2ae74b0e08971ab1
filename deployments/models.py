"""Build engine-level models from config: the bridge between serve_app.config and engines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engines import Engine, EngineError, create_engine
from engines.classifier import ClassifierModel, OutputSpec
from engines.mtcnn import Mtcnn, MtcnnParams
from engines.mtcnn_torch import TorchMtcnn
from engines.preprocess import Normalization
from engines.yolo import Yolo, YoloParams
from deployments.config import ClassifierConfig, DetectorConfig, EngineConfig


def _engine(cfg: EngineConfig, device: str, path: Path) -> Engine:
    return create_engine(cfg.backend, path, device, cfg.intra_op_threads, cfg.inter_op_threads, cfg.fp16,
                         cfg.cuda_graphs, cfg.cuda_sync)


def build_detector(cfg: DetectorConfig, device: str) -> Mtcnn | TorchMtcnn | Yolo:
    if cfg.kind == "yolo":
        y = cfg.yolo
        assert y is not None  # checked by DetectorConfig
        params = YoloParams(
            y.input_width,
            y.input_height,
            tuple(y.class_names or ()),
            y.layout,
            y.confidence_threshold,
            y.iou_threshold,
            y.max_detections,
        )
        try:
            return Yolo(_engine(cfg.engine, device, y.model), params, y.model.name)
        except EngineError as exc:
            raise ValueError(f"detector.yolo (model {y.model.name}): {exc}") from exc
    m = cfg.mtcnn
    engines = [_engine(cfg.engine, device, p) for p in (m.pnet, m.rnet, m.onet)]
    params = MtcnnParams(m.min_face_size, m.thresholds, m.scale_factor)
    on_device = m.implementation == "torch" or (
        m.implementation == "auto" and engines[0].backend == "torch" and engines[0].device == "cuda")
    if on_device:
        fixed = None if m.fixed_shapes == "auto" else m.fixed_shapes
        detector: Mtcnn | TorchMtcnn = TorchMtcnn(*engines, params, pad_batches=_pads(cfg.engine, engines[0]),
                                                  fixed_shapes=fixed)
    else:
        detector = Mtcnn(*engines, params, pad_batches=_pads(cfg.engine, engines[0]))
    detector.warm_up()
    return detector


def _pads(cfg: EngineConfig, engine: Engine) -> bool:
    """Bucket batch sizes where the engine specialises per shape: `auto` means on CUDA."""
    return cfg.pad_batches if cfg.pad_batches != "auto" else engine.device == "cuda"


def build_classifier(cfg: ClassifierConfig, device: str) -> ClassifierModel:
    engine = _engine(cfg.engine, device, cfg.model)
    model = ClassifierModel(
        engine,
        Normalization(cfg.input.color_format, cfg.input.scale, cfg.input.mean, cfg.input.std),
        OutputSpec(
            cfg.kind,
            tuple(cfg.labels or ()),
            tuple(cfg.values or ()),
            cfg.apply_softmax,
            cfg.threshold,
            cfg.top_k,
            cfg.normalize,
        ),
        cfg.batching.max_batch_size,
        pad_batches=_pads(cfg.engine, engine),
    )
    try:
        model.check_geometry(cfg.input.height, cfg.input.width)
    except EngineError as exc:
        raise ValueError(f"classifiers[{cfg.name}].input (model {cfg.model.name}): {exc}") from exc
    model.warm_up(cfg.input.height, cfg.input.width)
    return model


def _onnx_checks(detector: DetectorConfig, classifiers: Sequence[ClassifierConfig]
                 ) -> list[tuple[str, EngineConfig, Path, tuple[int, ...], int]]:
    """(where, engine config, model file, input shape the config implies, classes it names or 0) per model."""
    checks = []
    d = detector
    if d.kind == "yolo" and d.yolo is not None:
        checks.append(("detector.yolo", d.engine, d.yolo.model, (1, 3, d.yolo.input_height, d.yolo.input_width), 0))
    else:
        checks += [("detector.mtcnn.rnet", d.engine, d.mtcnn.rnet, (1, 3, 24, 24), 0),
                   ("detector.mtcnn.onet", d.engine, d.mtcnn.onet, (1, 3, 48, 48), 0)]
    for c in classifiers:
        channels = 1 if c.input.color_format == "GRAY" else 3
        classes = len(c.values or ()) if c.kind == "expected_value" else len(c.labels or ()) if c.kind == "softmax" else 0
        checks.append((f"classifiers[{c.name}]", c.engine, c.model, (1, channels, c.input.height, c.input.width), classes))
    return checks


def check_models(detector: DetectorConfig, classifiers: Sequence[ClassifierConfig]) -> list[str]:
    """Open every ONNX model of the detector and the classifiers on CPU and check it against the config, without starting anything:
    the input size and colour channels, and a classifier's number of classes. One line per problem.
    TensorRT engines need a GPU to open; they are checked when they load."""
    problems = []
    for where, engine_cfg, path, shape, classes in _onnx_checks(detector, classifiers):
        if engine_cfg.backend == "tensorrt":
            continue
        try:
            engine = create_engine("onnxruntime", path, "cpu")
            engine.check_input_shape(engine.inputs[0].name, shape)
        except EngineError as exc:
            problems.append(f"{where} (model {path.name}): {exc}")
            continue
        last = engine.outputs[0].fixed_dims()[-1] if engine.outputs and engine.outputs[0].shape else None
        if classes and last is not None and last != classes:
            problems.append(f"{where} (model {path.name}): the model outputs {last} classes, the config names {classes}")
    return problems
