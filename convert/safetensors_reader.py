"""Lazy, zero-copy reader for ``.safetensors`` files (bfloat16 included) using only numpy.

The format is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and raw
little-endian data. The header is the file's word, so every entry is checked before anything is
mapped: exact types (no bools or floats for sizes), shapes that match their byte ranges in exact
integer arithmetic, ranges inside the data and not overlapping one another (so the tensors never
add up to more than the file), and a header no larger than the reference implementation allows.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from convert.tensors import NUMPY_DTYPES, LazyTensor, as_bfloat16
from convert.untrusted import file_name, quote, regular_file
from mlx_elm.errors import ConversionError

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_DIMS, MAX_TENSOR_BYTES = 32, 2**48


def read_safetensors(path: str | Path) -> Dict[str, LazyTensor]:
    """Name -> lazy tensor for one safetensors file; raises ConversionError if it is malformed."""
    path = Path(path)
    name = file_name(path)
    size = regular_file(path, name)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{name} is too short to be a safetensors file; it is truncated.")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise ConversionError(f"{name}: safetensors header length {n} exceeds the file or "
                                      f"{MAX_HEADER} bytes; it is truncated or corrupt.")
            raw = f.read(n)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ConversionError(f"cannot read {name} ({e.strerror}); check the path and its permissions.") from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ConversionError(f"{name}: safetensors header is not valid JSON ({type(e).__name__}); "
                              "the file is corrupt.") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{name}: safetensors header is a JSON {type(header).__name__}, not an object; "
                              "the file is corrupt.")
    base = 8 + n
    out: Dict[str, LazyTensor] = {}
    spans: List[Tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, start, end = _entry(name, key, info, size - base)
        spans.append((start, end, key))

        def load(start=start, end=end, dtype=dtype, shape=shape) -> np.ndarray:
            count = (end - start) // np.dtype(NUMPY_DTYPES[dtype]).itemsize
            a = np.frombuffer(mm, dtype=NUMPY_DTYPES[dtype], count=count, offset=base + start).reshape(shape)
            return as_bfloat16(a) if dtype == "bfloat16" else a

        out[key] = LazyTensor(shape, dtype, load, f"{name}:{quote(key)}")
    _check_disjoint(name, spans)
    return out


def _entry(name: str, key: str, info: Any, data_size: int) -> Tuple[str, Tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, or a one-line error saying what is wrong."""
    where = f"{name}: tensor {quote(key)}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where} is a JSON {type(info).__name__}, not an object; the file is corrupt.")
    dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise ConversionError(f"{where} has dtype {quote(info.get('dtype'))}, which is not one of "
                              f"{', '.join(_ST_DTYPES)}; convert it to one of those first.")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if type(shape) is not list or len(shape) > MAX_DIMS or any(type(s) is not int or s < 0 for s in shape):
        raise ConversionError(f"{where} has shape {quote(shape)}, not a list of at most {MAX_DIMS} non-negative "
                              "ints; the file is corrupt.")
    if type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets):
        raise ConversionError(f"{where} has data_offsets {quote(offsets)}, not two ints; the file is corrupt.")
    start, end = offsets
    numel, extent = 1, 1
    for s in shape:
        numel, extent = numel * s, extent * max(s, 1)
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    if extent * itemsize > MAX_TENSOR_BYTES:  # an empty tensor too: numpy refuses such shapes
        raise ConversionError(f"{where} has shape {quote(shape)}, over 2**48 bytes; the file is corrupt.")
    need = numel * itemsize
    if not 0 <= start <= end <= data_size or end - start != need:
        raise ConversionError(f"{where} data range [{start}, {end}) does not fit its shape {quote(shape)} ({need} "
                              f"bytes) or the file's {data_size} data bytes; the file is truncated or corrupt.")
    return dtype, tuple(shape), start, end


def _check_disjoint(name: str, spans: List[Tuple[int, int, str]]) -> None:
    """No two tensors share bytes (the format forbids it; it would let a small file declare a large model)."""
    spans = sorted(s for s in spans if s[1] > s[0])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ConversionError(f"{name}: tensors {quote(a)} and {quote(b)} overlap in the data; the file is "
                                  "corrupt or crafted.")
