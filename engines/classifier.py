"""A secondary classifier: normalisation, the engine call in bounded batches, and post-processing."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import Completed, Engine, EngineError, Pending, PendingRun, RunTiming, span
from engines.batching import bucket_samples, pad_batch
from engines.detections import Classifications
from engines.preprocess import DeviceNormalization, Normalization, to_tensor

logger = logging.getLogger(__name__)

OUTPUT_KINDS = ("softmax", "expected_value", "vector")


@dataclass(frozen=True)
class OutputSpec:
    """How to read the network's output row.

    softmax: top-1 (and top-k) over `labels`; expected_value: sum(p_i * values_i) (e.g. age over
    81 bins); vector: the raw output row (an embedding), optionally L2-normalised.
    `apply_softmax` for networks that output logits. `threshold` on the top-1 probability
    (DeepStream's classifier-threshold): below it the object gets no attribute.
    """

    kind: str
    labels: tuple[str, ...] = ()
    values: tuple[float, ...] = ()
    apply_softmax: bool = False
    threshold: float = 0.0
    top_k: int = 1
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {self.kind!r}")
        if self.kind == "expected_value" and not self.values:
            raise ValueError("expected_value needs values (one per output class)")

    @property
    def num_classes(self) -> int:
        if self.kind == "vector":
            return 0
        return len(self.values) if self.kind == "expected_value" else len(self.labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def postprocess(output: np.ndarray, spec: OutputSpec) -> Classifications:
    """(N, classes) network output -> Classifications."""
    probs = np.asarray(output, dtype=np.float32)
    probs = probs.reshape(probs.shape[0], int(np.prod(probs.shape[1:])))
    if spec.num_classes and probs.shape[1] != spec.num_classes:
        raise EngineError(f"model returned {probs.shape[1]} classes, config names {spec.num_classes}")
    n = len(probs)
    if spec.kind == "vector":
        vector = probs
        if spec.normalize:
            vector = vector / np.maximum(np.linalg.norm(vector, axis=1, keepdims=True), 1e-12)
        return Classifications(
            "vector", np.zeros(n, np.int32), np.ones(n, np.float32), np.ones(n, bool), vector=vector.astype(np.float32)
        )
    if spec.apply_softmax:
        probs = softmax(probs)
    class_id = probs.argmax(axis=1).astype(np.int32) if n else np.zeros(0, np.int32)
    score = probs[np.arange(n), class_id].astype(np.float32)
    value = top_class_id = top_score = None
    if spec.kind == "expected_value":
        value = (probs @ np.asarray(spec.values, dtype=np.float32)).astype(np.float32)
    elif spec.top_k > 1:
        k = min(spec.top_k, probs.shape[1])
        top_class_id = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int32)
        top_score = np.take_along_axis(probs, top_class_id, axis=1).astype(np.float32)
    return Classifications(
        spec.kind, class_id, score, score >= spec.threshold, value, spec.labels, top_class_id, top_score
    )


class ClassifierModel:
    """Runs one classifier on uint8 BGR crops already at network resolution.

    On an engine that runs on a GPU and can take a transform into its forward (the torch backend), the uint8
    crops go to the device as they are and are normalised there, inside the captured graph
    (`DeviceNormalization`); elsewhere `to_tensor` normalises them on the host."""

    def __init__(
        self,
        engine: Engine,
        normalization: Normalization,
        output: OutputSpec,
        max_batch_size: int,
        pad_batches: bool = False,
        fuse_normalization: bool | None = None,
    ) -> None:
        """`fuse_normalization`: normalise on the engine's device (None: where it computes on CUDA)."""
        if len(engine.inputs) != 1:
            raise EngineError(f"a classifier model needs exactly one input, this one has {len(engine.inputs)}")
        self.engine = engine
        self.normalization = normalization
        self.output = output
        # never pad or chunk past what one engine run takes (a TensorRT profile's maximum batch)
        self.max_batch_size = engine.batch_limit(max_batch_size)
        if self.max_batch_size < max_batch_size:
            logger.warning("max_batch_size %d is above the engine's maximum batch; using %d",
                           max_batch_size, self.max_batch_size)
        self.pad_batches = pad_batches  # pad to power-of-two sizes (engines that specialise per shape)
        self._input = engine.inputs[0]
        self._output_name = engine.outputs[0].name
        fuse = getattr(engine, "fuse_input", None)
        if fuse_normalization is None:
            fuse_normalization = fuse is not None and engine.device == "cuda"
        if fuse_normalization:
            if fuse is None:
                raise EngineError(f"backend {engine.backend} cannot normalise crops on its device")
            fuse(DeviceNormalization(normalization, engine.device))
        self.fused = fuse_normalization

    def check_geometry(self, height: int, width: int) -> None:
        """Fail at startup when the configured input size or colour format cannot feed the model."""
        self.engine.check_input_shape(self._input.name, (1, self.normalization.channels, height, width))

    def _feed(self, crops: Any) -> dict[str, Any]:
        """The engine's input for uint8 crops: numpy on the host, or a torch tensor on the engine's device (crops
        cut there, engines/device_crops.py), which stays there when the normalisation is fused."""
        if not isinstance(crops, np.ndarray) and not self.fused:
            crops = crops.cpu().numpy()  # normalised on the host
        x = crops if self.fused else to_tensor(crops, self.normalization).astype(self._input.dtype, copy=False)
        return {self._input.name: pad_batch(x, self.max_batch_size) if self.pad_batches else x}

    def launch(self, crops: np.ndarray) -> Pending[Classifications]:
        """Hand the crops to the engine (chunks of at most max_batch_size); `wait()` gives the answer. On an
        asynchronous engine this returns once the work is enqueued, so classifiers launched one after another
        compute together."""
        runs = [(self.engine.launch(self._feed(crops[i : i + self.max_batch_size])), len(crops[i : i + self.max_batch_size]))
                for i in range(0, len(crops), self.max_batch_size)]
        if not runs:
            empty = postprocess(np.zeros((0, max(self.output.num_classes, 1)), np.float32), self.output)
            now = time.perf_counter()
            return Completed(empty, RunTiming(now, now))
        return _Classifying(runs, self._output_name, self.output)

    def predict(self, crops: np.ndarray) -> Classifications:
        return self.launch(crops).wait()

    def close(self) -> None:
        self.engine.close()

    def warm_up(self, height: int, width: int) -> None:
        """Prepare every batch bucket (run it once, or capture it as a CUDA graph), so no request pays for a
        new shape (only with pad_batches)."""
        if self.pad_batches:
            sample, dtype = ((height, width, 3), np.dtype(np.uint8)) if self.fused else (
                (self.normalization.channels, height, width), self._input.dtype)
            self.engine.prepare(bucket_samples(self._input.name, sample, dtype, self.max_batch_size))


class _Classifying(Pending[Classifications]):
    """The engine runs of one launch; waiting reads each chunk's rows (the padding dropped) and post-processes."""

    def __init__(self, runs: list[tuple[PendingRun, int]], output_name: str, output: OutputSpec) -> None:
        self._runs, self._name, self._output = runs, output_name, output
        self._lock = threading.Lock()
        self._result: Classifications | None = None

    def done(self) -> bool:
        return self._result is not None or all(run.done() for run, _ in self._runs)

    def wait(self) -> Classifications:
        with self._lock:
            if self._result is None:
                parts = [postprocess(run.wait()[self._name][:n], self._output) for run, n in self._runs]
                self._result = parts[0] if len(parts) == 1 else Classifications.concatenate(parts)
        return self._result

    @property
    def timing(self) -> RunTiming | None:
        return span([run.timing for run, _ in self._runs]) if self._result is not None else None
