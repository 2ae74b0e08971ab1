"""What a TensorRT engine's I/O looks like, and how a batch maps onto it: pure Python, no TensorRT.

`BindingPlan.from_engine` reads a deserialized `ICudaEngine` through the TensorRT 10 tensor-name
API (`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_shape`,
`get_tensor_dtype`, `get_tensor_profile_shape`); everything after that (shape resolution, profile
checks, batch splitting, buffer sizing) is plain logic, tested without a GPU and against the stand-in
in tests/tensorrt_standin.py, which enforces TensorRT's documented rules.
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

    def batch_range(self) -> tuple[int, int]:
        """The smallest and largest batch (axis 0) this input takes."""
        if self.shape[0] >= 0:
            return self.shape[0], self.shape[0]
        if self.profile is None:
            raise EngineError(f"input {self.name!r} has a dynamic batch axis and no optimization profile")
        return self.profile[0][0], self.profile[2][0]

    def check(self, shape: tuple[int, ...], batch_axis: bool = True) -> None:
        """Raise EngineError when `shape` cannot feed this input. With `batch_axis=False` axis 0 is left to
        the caller, which splits a batch into profile-sized runs before each run is checked in full."""
        if len(shape) != len(self.shape):
            raise EngineError(f"input {self.name!r} has rank {len(self.shape)}, got shape {list(shape)}")
        first = 0 if batch_axis else 1
        for axis, (fixed, given) in enumerate(zip(self.shape, shape)):
            if axis >= first and fixed >= 0 and fixed != given:
                raise EngineError(f"input {self.name!r} takes {list(self.shape)}, got {list(shape)} (axis {axis})")
        if self.profile is not None:
            low, _, high = self.profile
            axes = range(first, len(shape))
            if any(shape[a] < low[a] or shape[a] > high[a] for a in axes):
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
        """The largest batch every input takes on axis 0 (None: no input has a batch axis to split)."""
        limits = [b.batch_range()[1] for b in self.inputs if b.shape]
        return min(limits) if limits else None

    @property
    def min_batch(self) -> int:
        return max((b.batch_range()[0] for b in self.inputs if b.shape), default=1)

    def max_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every input at the largest shape it takes: what the buffers are sized for."""
        return {b.name: b.max_shape() for b in self.inputs}

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Validate names, ranks, fixed axes and the profile on every axis but the batch; returns the batch
        size, which `batch_slices` then splits into runs the profile takes."""
        names = {b.name for b in self.inputs}
        if set(feeds) != names:
            raise EngineError(f"engine inputs are {sorted(names)}, got {sorted(feeds)}")
        batches = {int(feeds[b.name].shape[0]) for b in self.inputs if feeds[b.name].ndim}
        if len(batches) > 1:
            raise EngineError(f"inputs disagree on the batch size: {sorted(batches)}")
        for binding in self.inputs:
            binding.check(tuple(feeds[binding.name].shape), batch_axis=False)
        batch = batches.pop() if batches else 1
        if batch < self.min_batch:
            raise EngineError(f"the engine takes batches of at least {self.min_batch}, got {batch}")
        return batch

    def batch_slices(self, batch: int) -> list[slice]:
        """Split a batch into slices the profile accepts (one slice when it fits). A remainder below the
        profile's minimum batch is refused rather than silently padded."""
        limit = self.max_batch
        if limit is None or batch <= limit:
            return [slice(0, batch)]
        slices = [slice(start, min(start + limit, batch)) for start in range(0, batch, limit)]
        last = slices[-1].stop - slices[-1].start
        if last < self.min_batch:
            raise EngineError(
                f"a batch of {batch} leaves {last} after runs of {limit}, below the engine's minimum batch {self.min_batch}"
            )
        return slices

    def buffer_nbytes(self, output_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Bytes to allocate per tensor: inputs at their largest shapes, outputs at the shapes the execution
        context reports for those inputs (`IExecutionContext.get_tensor_shape` after `set_input_shape` to the
        profile maximum). An output whose shape stays unknown then (data-dependent, e.g. NMS inside the
        engine) would need an output allocator, which this backend does not have: refused by name."""
        sizes = {name: int(np.prod(shape)) * b.dtype.itemsize
                 for b, (name, shape) in zip(self.inputs, self.max_shapes().items())}
        for b in self.outputs:
            shape = tuple(output_shapes[b.name])
            if any(d < 0 for d in shape):
                raise EngineError(
                    f"output {b.name!r} has shape {list(shape)} even with every input at its largest shape: "
                    "data-dependent outputs are not supported by the tensorrt backend"
                )
            sizes[b.name] = int(np.prod(shape)) * b.dtype.itemsize
        return sizes


def profile_for(shape: tuple[int, ...], min_batch: int, opt_batch: int, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """min/opt/max shapes for one ONNX input, as `trtexec` sets them: a dynamic batch axis (axis 0) spans
    min..max batch; a fixed one (a static-batch export such as ultralytics' [1, 3, 640, 640]) gets
    min = opt = max = its shape, which is all TensorRT accepts for a fixed axis."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    rest = shape[1:]
    if any(d < 0 for d in rest):
        raise ValueError(
            f"only the batch axis may be dynamic; shape {list(shape)} has others (fix them with --shape NAME:-1x3x640x640)"
        )
    if shape and shape[0] >= 0:
        return (tuple(shape),) * 3
    return tuple((b, *rest) for b in (min_batch, opt_batch, max_batch))
