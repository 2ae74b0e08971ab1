"""What a TensorRT engine's I/O looks like, and how a batch maps onto it: pure Python, no TensorRT.

`BindingPlan.from_engine` reads a deserialized `ICudaEngine` through the TensorRT 10 tensor-name
API (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_shape`,
`get_tensor_dtype`, `get_tensor_profile_shape`); everything after that (shape resolution, profile
checks, batch splitting, buffer sizing) is plain logic, tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import EngineError

# TensorRT DataType names -> numpy (the names are stable across TensorRT 8.6-10).
TRT_DTYPES = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class TensorBinding:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for dynamic dimensions
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # min, opt, max (inputs)

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)

    def max_shape(self) -> tuple[int, ...]:
        if self.profile is not None:
            return self.profile[2]
        if self.dynamic:
            raise EngineError(f"tensor {self.name!r} has dynamic shape {list(self.shape)} and no profile")
        return self.shape

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise EngineError when `shape` cannot feed this input."""
        if len(shape) != len(self.shape):
            raise EngineError(f"input {self.name!r} has rank {len(self.shape)}, got shape {list(shape)}")
        for axis, (fixed, given) in enumerate(zip(self.shape, shape)):
            if fixed >= 0 and fixed != given:
                raise EngineError(f"input {self.name!r} takes {list(self.shape)}, got {list(shape)} (axis {axis})")
        if self.profile is not None:
            low, _, high = self.profile
            if any(g < lo or g > hi for g, lo, hi in zip(shape, low, high)):
                raise EngineError(
                    f"input {self.name!r} shape {list(shape)} is outside the engine's optimization profile "
                    f"min {list(low)} .. max {list(high)}; rebuild the engine with a larger profile"
                )


@dataclass(frozen=True)
class BindingPlan:
    inputs: tuple[TensorBinding, ...]
    outputs: tuple[TensorBinding, ...]

    @classmethod
    def from_engine(cls, engine: Any, profile_index: int = 0) -> BindingPlan:
        """Read the I/O of a TensorRT 10 `ICudaEngine` by tensor name."""
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name).name == "INPUT"  # trt.TensorIOMode.INPUT
            dtype_name = engine.get_tensor_dtype(name).name
            if dtype_name not in TRT_DTYPES:
                raise EngineError(f"tensor {name!r} has unsupported TensorRT type {dtype_name}")
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            profile = None
            if is_input and any(d < 0 for d in shape):
                low, opt, high = engine.get_tensor_profile_shape(name, profile_index)
                profile = (tuple(int(d) for d in low), tuple(int(d) for d in opt), tuple(int(d) for d in high))
            binding = TensorBinding(name, is_input, TRT_DTYPES[dtype_name], shape, profile)
            (inputs if is_input else outputs).append(binding)
        return cls(tuple(inputs), tuple(outputs))

    @property
    def max_batch(self) -> int | None:
        """The largest batch the profile allows on axis 0 of every input (None: not batch-dynamic)."""
        limits = [b.profile[2][0] for b in self.inputs if b.profile is not None and b.shape[0] < 0]
        return min(limits) if limits else None

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Validate names and shapes; returns the batch size (axis 0 of the first input)."""
        names = {b.name for b in self.inputs}
        if set(feeds) != names:
            raise EngineError(f"engine inputs are {sorted(names)}, got {sorted(feeds)}")
        for binding in self.inputs:
            binding.check(tuple(feeds[binding.name].shape))
        return int(feeds[self.inputs[0].name].shape[0])

    def batch_slices(self, batch: int) -> list[slice]:
        """Split a batch into slices the profile accepts (one slice when it fits)."""
        limit = self.max_batch
        if limit is None or batch <= limit:
            return [slice(0, batch)]
        return [slice(start, min(start + limit, batch)) for start in range(0, batch, limit)]

    def buffer_nbytes(self) -> dict[str, int]:
        """Bytes to allocate per tensor for the largest shapes the engine accepts.

        Outputs with dynamic dimensions are sized by scaling their batch axis to the inputs' max batch;
        their other dimensions must be static.
        """
        sizes = {b.name: int(np.prod(b.max_shape())) * b.dtype.itemsize for b in self.inputs}
        batch = self.max_batch or 1
        for b in self.outputs:
            dims = list(b.shape)
            if dims and dims[0] < 0:
                dims[0] = batch
            if any(d < 0 for d in dims):
                raise EngineError(f"output {b.name!r} has dynamic non-batch dimensions {list(b.shape)}")
            sizes[b.name] = int(np.prod(dims)) * b.dtype.itemsize
        return sizes


def profile_for(shape: tuple[int, ...], min_batch: int, opt_batch: int, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """min/opt/max shapes for an ONNX input whose only dynamic axis is the batch (axis 0)."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    rest = shape[1:]
    if any(d < 0 for d in rest):
        raise ValueError(f"only the batch axis may be dynamic; shape {list(shape)} has others (give them explicitly)")
    return tuple((b, *rest) for b in (min_batch, opt_batch, max_batch))
