"""The interface every inference backend implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class EngineError(RuntimeError):
    """A model could not be loaded, or its inputs do not fit it."""


Dim = int | str | None  # a fixed size, or a symbolic / unknown one


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and element type of one model input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def fixed_dims(self) -> tuple[int | None, ...]:
        """The shape with symbolic dimensions replaced by None."""
        return tuple(d if isinstance(d, int) and d >= 0 else None for d in self.shape)


class Engine(abc.ABC):
    """One loaded model: describes its tensors and runs a batch.

    `run` is synchronous and thread-compatible (one call at a time per engine); callers that
    need concurrency own the scheduling.
    """

    backend: str
    device: str
    max_batch: int | None = None  # the largest batch one engine run takes (None: any); `run` splits larger ones
    _inputs: list[TensorSpec]  # set by each backend's constructor
    _outputs: list[TensorSpec]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""

    def batch_limit(self, wanted: int) -> int:
        """`wanted`, or the engine's own maximum batch when that is smaller: the size to chunk and pad to."""
        return wanted if self.max_batch is None else max(1, min(wanted, self.max_batch))

    def run_single(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a model that has exactly one input."""
        if len(self.inputs) != 1:
            raise EngineError(f"model has {len(self.inputs)} inputs; run_single needs exactly one")
        return self.run({self.inputs[0].name: batch})

    def check_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise EngineError naming the tensor when `shape` cannot feed input `name`."""
        spec = next((t for t in self.inputs if t.name == name), None)
        if spec is None:
            raise EngineError(f"model has no input named {name!r}; it has {[t.name for t in self.inputs]}")
        dims = spec.fixed_dims()
        if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise EngineError(f"input {name!r} takes shape {list(spec.shape)}, got {list(shape)}")
