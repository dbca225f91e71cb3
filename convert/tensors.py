"""Lazy tensors shared by the checkpoint readers: shape and dtype now, bytes only when asked.

Readers return these instead of arrays so a conversion can validate every name and shape before
it reads a single weight, and then holds at most a few tensors in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

# dtype names follow safetensors/torch spelling; bfloat16 has no numpy dtype, so its arrays are
# uint16 bit patterns wrapped in ``BFloat16Array``.
NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class BFloat16Array(np.ndarray):
    """uint16 bit patterns of bfloat16 values; the subclass survives slicing and reshapes."""

    def __array_finalize__(self, obj) -> None:  # keep the marker on views
        pass


def as_bfloat16(bits: np.ndarray) -> BFloat16Array:
    """Mark a uint16 array as bfloat16 bits (no copy)."""
    return bits.view(np.uint16).view(BFloat16Array)


def to_float32(a: np.ndarray) -> np.ndarray:
    """Any float array (bfloat16 bits included) as float32, exactly."""
    if isinstance(a, BFloat16Array):
        return (np.asarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def dtype_name(a: np.ndarray) -> str:
    """The torch-style dtype name of an array returned by a reader."""
    if isinstance(a, BFloat16Array):
        return "bfloat16"
    return np.dtype(a.dtype).name if a.dtype != np.bool_ else "bool"


@dataclass
class LazyTensor:
    """A tensor known by shape and dtype; ``load()`` reads (or computes) its values."""

    shape: Tuple[int, ...]
    dtype: str
    loader: Callable[[], np.ndarray]
    origin: str = ""

    def load(self) -> np.ndarray:
        a = self.loader()
        if tuple(a.shape) != tuple(self.shape):
            raise ValueError(f"{self.origin}: loader returned shape {a.shape}, expected {self.shape}")
        return a

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    def derive(self, shape: Tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray],
               dtype: str | None = None) -> "LazyTensor":
        """A new lazy tensor computed from this one when loaded (e.g. a row slice)."""
        return LazyTensor(tuple(shape), dtype or self.dtype, lambda: fn(self.load()), self.origin)


def to_mlx(a: np.ndarray, dtype: str):
    """A reader array as an MLX array of ``dtype`` (float32/bfloat16/float16)."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    if isinstance(a, BFloat16Array):
        arr = mx.array(np.require(np.asarray(a).view(np.uint16), requirements="C")).view(mx.bfloat16)
    elif a.dtype == np.float64:
        arr = mx.array(a.astype(np.float32))
    else:
        arr = mx.array(np.require(a, requirements="C"))
    return arr.astype(target) if arr.dtype != target else arr
