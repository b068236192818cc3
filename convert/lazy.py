"""Tensors made only when used, so that a conversion holds one at a time, not the whole model twice.

A `LazyTensor` knows the shape and dtype of the array it stands for, which is all that checking a
checkpoint against its config needs; `np.asarray(t)` makes the array (reads it from disk,
reshapes or trims it, casts it) each time it is asked for and keeps nothing. The converters take them
wherever they take numpy arrays, and every writer asks for one tensor at a time.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


class LazyTensor:
    __slots__ = ("shape", "dtype", "_make")

    def __init__(self, shape, dtype, make: Callable[[], np.ndarray]):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._make = make

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self._make()
        if x.shape != self.shape or x.dtype != self.dtype:  # a maker that broke its promise: a bug
            raise RuntimeError(f"lazy tensor of shape {self.shape} and dtype {self.dtype} made "
                               f"an array of shape {x.shape} and dtype {x.dtype}")
        return x if dtype is None else x.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"
