"""Batch-size buckets for engines that specialise per input shape.

On CUDA, torch/cuDNN (and TensorRT profiles) pick and cache kernels per shape, so the first batch of
each new size is slow; under cross-request batching the size varies from call to call. Padding a
batch up to the next power of two bounds the distinct shapes to log2(max) + 1, and `bucket_samples`
gives one batch per bucket for `Engine.prepare` at start-up: each is run once, or, on an engine that
replays CUDA graphs, captured once. (On the GPU machine, unpadded face classifiers timed out at
concurrency 16 while new shapes were compiled: docs/benchmarks.md.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at `limit` (n itself when n >= limit)."""
    if n >= limit:
        return n
    return min(1 << max(n - 1, 0).bit_length(), limit)


def buckets(limit: int) -> list[int]:
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def pad_batch(x: Any, limit: int) -> Any:
    """`x` (a numpy array, or a torch tensor on its device) with zero rows appended up to its bucket size
    (unchanged when already there)."""
    target = bucket(len(x), limit)
    if target == len(x):
        return x
    if not isinstance(x, np.ndarray):  # a torch tensor: padded where it is
        import torch

        return torch.cat([x, x.new_zeros((target - len(x), *x.shape[1:]))])
    padding = np.zeros((target - len(x), *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, padding])


def concatenate(parts: list[Any]) -> Any:
    """numpy arrays or torch tensors joined along the batch axis (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def bucket_samples(name: str, sample_shape: tuple[int, ...], dtype: np.dtype, limit: int) -> list[dict[str, np.ndarray]]:
    """One zero batch per bucket up to `limit`, largest first, as feeds for input `name` (largest first: an
    engine that captures CUDA graphs then fits the smaller ones into the memory the largest reserved)."""
    return [{name: np.zeros((size, *sample_shape), dtype=dtype)} for size in reversed(buckets(limit))]
