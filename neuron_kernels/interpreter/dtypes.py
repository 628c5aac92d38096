"""NKI data types as the interpreter stores them.

NKI names dtypes by strings (``nl.float32 == "float32"``, as in the API stub ``nki/api/nki/language``).
NumPy has no bfloat16 or tfloat32, so those are stored in float32 arrays whose values are rounded to the
narrower format on every write (round to nearest, ties to even), which reproduces their values exactly.
fp8 formats are not modelled: a kernel that uses them fails with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuron_kernels.interpreter.errors import NkiInterpreterError

_STORAGE = {
    "float32": np.float32,
    "bfloat16": np.float32,
    "tfloat32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.uint8,
}
_ITEMSIZE = {"bfloat16": 2, "tfloat32": 4, "bool": 1}
# Mantissa bits dropped from fp32 by the formats stored in float32 arrays.
_DROPPED_MANTISSA_BITS = {"bfloat16": 16, "tfloat32": 13}
_FROM_NUMPY = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int16): "int16",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.bool_): "bool",
}


def check_dtype(dtype: str) -> str:
    """The dtype name if the interpreter models it, else a clear error."""
    if dtype not in _STORAGE:
        raise NkiInterpreterError(
            f"dtype {dtype!r} is not modelled by the NKI interpreter; "
            f"use one of {', '.join(sorted(_STORAGE))} (fp8 formats need the official simulator)"
        )
    return dtype


def storage_dtype(dtype: str) -> type:
    return _STORAGE[check_dtype(dtype)]


def itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype) or np.dtype(storage_dtype(dtype)).itemsize


def is_float(dtype: str) -> bool:
    return dtype in ("float32", "bfloat16", "tfloat32", "float16")


def from_numpy(array_dtype: np.dtype) -> str:
    try:
        return _FROM_NUMPY[np.dtype(array_dtype)]
    except KeyError:
        raise NkiInterpreterError(
            f"NumPy dtype {array_dtype} has no NKI equivalent; pass float32/float16/int32 arrays, "
            "int64 indices cast to int32, or wrap bfloat16 data in TypedArray(values, 'bfloat16')"
        ) from None


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` converted to the storage array of ``dtype`` (float→int truncates like a C cast)."""
    storage = storage_dtype(dtype)
    if dtype in _DROPPED_MANTISSA_BITS:
        as_f32 = np.ascontiguousarray(values, dtype=np.float32)
        bits = as_f32.view(np.uint32)
        dropped = _DROPPED_MANTISSA_BITS[dtype]
        keep_mask = np.uint32((0xFFFFFFFF >> dropped) << dropped)
        half = np.uint32((1 << (dropped - 1)) - 1)
        lowest_kept = (bits >> np.uint32(dropped)) & np.uint32(1)
        rounded = ((bits + half + lowest_kept) & keep_mask).view(np.float32)
        return np.where(np.isfinite(as_f32), rounded, as_f32)
    if dtype == "bool":
        return (np.asarray(values) != 0).astype(storage)
    if not is_float(dtype):
        return np.trunc(np.asarray(values, dtype=np.float64)).astype(storage)
    return np.asarray(values).astype(storage)


@dataclass(frozen=True)
class TypedArray:
    """Host data for a dtype NumPy lacks: ``values`` (float32) hold numbers representable in ``dtype``."""

    values: np.ndarray
    dtype: str

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
