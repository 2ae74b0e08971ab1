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
    attributes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='per classifier: {"label", "score"} (softmax) or {"value"} (expected_value)',
    )


class StageError(BaseModel):
    code: Literal["timeout", "failed", "unavailable"]
    message: str


class InferResponse(BaseModel):
    image: ImageInfo
    objects: list[DetectedObject]
    errors: dict[str, StageError] = Field(default_factory=dict, description="per classifier that did not answer")
    timings_ms: dict[str, float]
    mode: Mode


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PipelineDescription(BaseModel):
    mode: Mode
    detector: dict[str, Any]
    classifiers: list[dict[str, Any]]
    limits: dict[str, int]
