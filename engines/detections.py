"""Typed, vectorised containers that flow through the whole pipeline.

One `Detections` per image (boxes, scores, class ids, optional landmarks as numpy arrays), in the
spirit of `supervision.Detections`; one `Classifications` per classifier call. Both pickle
cheaply (a handful of arrays), which is what crosses the Ray Serve hops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    """N detected objects. `xyxy` is in pixels of the original image."""

    xyxy: np.ndarray  # (N, 4) float32: x1, y1, x2, y2
    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int32, index into class_names
    class_names: tuple[str, ...] = ()
    landmarks: np.ndarray | None = None  # (N, K, 2) float32, or None

    def __post_init__(self) -> None:
        n = self.xyxy.shape[0]
        if self.xyxy.shape != (n, 4):
            raise ValueError(f"xyxy must be (N, 4), got {self.xyxy.shape}")
        if self.confidence.shape != (n,) or self.class_id.shape != (n,):
            raise ValueError(
                f"confidence and class_id must be ({n},), got {self.confidence.shape} and {self.class_id.shape}"
            )
        if self.landmarks is not None and (self.landmarks.ndim != 3 or self.landmarks.shape[0] != n):
            raise ValueError(f"landmarks must be (N, K, 2), got {self.landmarks.shape}")

    @classmethod
    def empty(cls, class_names: tuple[str, ...] = (), num_landmarks: int | None = None) -> Detections:
        landmarks = None if num_landmarks is None else np.zeros((0, num_landmarks, 2), np.float32)
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), class_names, landmarks
        )

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index: np.ndarray | slice | list[int]) -> Detections:
        """Select objects by boolean mask or integer indices."""
        return Detections(
            self.xyxy[index],
            self.confidence[index],
            self.class_id[index],
            self.class_names,
            None if self.landmarks is None else self.landmarks[index],
        )

    @property
    def width(self) -> np.ndarray:
        return self.xyxy[:, 2] - self.xyxy[:, 0]

    @property
    def height(self) -> np.ndarray:
        return self.xyxy[:, 3] - self.xyxy[:, 1]

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in self.class_id.tolist()]

    def select(
        self,
        labels: frozenset[str] | None = None,
        min_width: float = 0.0,
        min_height: float = 0.0,
    ) -> np.ndarray:
        """Indices of the objects a secondary model operates on (DeepStream's
        operate-on-class-ids and input-object-min-width/height)."""
        mask = (self.width >= min_width) & (self.height >= min_height)
        if labels is not None:
            mask &= np.array([label in labels for label in self.labels], dtype=bool).reshape(-1)
        return np.flatnonzero(mask)

    def scaled(self, factor: float | tuple[float, float]) -> Detections:
        """Boxes and landmarks multiplied by `factor`, one for both axes or (x, y) (found on a resized frame: back
        to the original's pixels)."""
        fx, fy = (factor, factor) if isinstance(factor, (int, float)) else factor
        if fx == 1.0 and fy == 1.0:
            return self
        xy = np.array([fx, fy], np.float32)
        landmarks = None if self.landmarks is None else (self.landmarks * xy).astype(np.float32)
        return Detections((self.xyxy * np.tile(xy, 2)).astype(np.float32), self.confidence, self.class_id,
                          self.class_names, landmarks)

    def clip(self, width: int, height: int) -> Detections:
        xyxy = self.xyxy.copy()
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
        return Detections(xyxy, self.confidence, self.class_id, self.class_names, self.landmarks)


_ROW_ARRAYS = ("class_id", "score", "accepted", "value", "top_class_id", "top_score", "vector")


@dataclass(frozen=True, eq=False)
class Classifications:
    """One classifier's answer for N crops, row i for crop i.

    `kind` says how to read it: "softmax" rows carry (class_id, score) and, with top-k > 1,
    (top_class_id, top_score); "expected_value" rows carry `value` (and the top class's
    probability as `score`); "vector" rows carry the raw output `vector` (embeddings).
    `accepted` is False where the score fell below the classifier's threshold: those objects get
    no attribute.
    """

    kind: str
    class_id: np.ndarray  # (N,) int32
    score: np.ndarray  # (N,) float32
    accepted: np.ndarray  # (N,) bool
    value: np.ndarray | None = None  # (N,) float32 for expected_value
    labels: tuple[str, ...] = field(default=())
    top_class_id: np.ndarray | None = None  # (N, k) int32 for softmax with top_k > 1
    top_score: np.ndarray | None = None  # (N, k) float32
    vector: np.ndarray | None = None  # (N, D) float32 for vector

    def __len__(self) -> int:
        return int(self.class_id.shape[0])

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {name: getattr(self, name) for name in _ROW_ARRAYS}

    @classmethod
    def concatenate(cls, parts: list[Classifications]) -> Classifications:
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        arrays = {
            name: None if array is None else np.concatenate([getattr(p, name) for p in parts])
            for name, array in first._arrays().items()
        }
        return cls(kind=first.kind, labels=first.labels, **arrays)

    def split(self, sizes: list[int]) -> list[Classifications]:
        bounds = np.cumsum(sizes)[:-1]
        pieces = {
            name: [None] * len(sizes) if array is None else np.split(array, bounds)
            for name, array in self._arrays().items()
        }
        return [
            Classifications(kind=self.kind, labels=self.labels, **{name: pieces[name][i] for name in pieces})
            for i in range(len(sizes))
        ]

    def _label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else str(class_id)

    def attribute(self, i: int) -> dict[str, Any] | None:
        """The JSON attribute for row i, or None where it was below threshold."""
        if not self.accepted[i]:
            return None
        if self.kind == "expected_value":
            assert self.value is not None
            return {"value": round(float(self.value[i]), 2)}
        if self.kind == "vector":
            assert self.vector is not None
            return {"vector": [round(float(v), 6) for v in self.vector[i]]}
        attribute: dict[str, Any] = {"label": self._label(int(self.class_id[i])), "score": round(float(self.score[i]), 4)}
        if self.top_class_id is not None and self.top_score is not None:
            attribute["top_k"] = [
                {"label": self._label(int(c)), "score": round(float(s), 4)}
                for c, s in zip(self.top_class_id[i], self.top_score[i])
            ]
        return attribute
