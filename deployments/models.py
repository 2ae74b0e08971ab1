"""Build engine-level models from config: the bridge between serve_app.config and engines."""

from __future__ import annotations

from engines import create_engine
from engines.classifier import ClassifierModel, OutputSpec
from engines.mtcnn import Mtcnn, MtcnnParams
from engines.preprocess import Normalization
from serve_app.config import ClassifierConfig, DetectorConfig, EngineConfig


def _engine(cfg: EngineConfig, device: str, path: object):  # noqa: ANN202 - returns engines.Engine
    return create_engine(cfg.backend, path, device, cfg.intra_op_threads, cfg.inter_op_threads)


def build_detector(cfg: DetectorConfig, device: str) -> Mtcnn:
    m = cfg.mtcnn
    engines = [_engine(cfg.engine, device, p) for p in (m.pnet, m.rnet, m.onet)]
    return Mtcnn(*engines, MtcnnParams(m.min_face_size, m.thresholds, m.scale_factor))


def build_classifier(cfg: ClassifierConfig, device: str) -> ClassifierModel:
    model = ClassifierModel(
        _engine(cfg.engine, device, cfg.model),
        Normalization(cfg.input.color_format, cfg.input.scale, cfg.input.mean),
        OutputSpec(
            cfg.kind,
            tuple(cfg.labels or ()),
            tuple(cfg.values or ()),
            cfg.apply_softmax,
            cfg.threshold,
        ),
        cfg.batching.max_batch_size,
    )
    model.check_geometry(cfg.input.height, cfg.input.width)
    return model
