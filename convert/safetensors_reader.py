"""Lazy, zero-copy reader for ``.safetensors`` files (bfloat16 included) using only numpy.

The format is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and raw
little-endian data; we validate every range against the file before mapping it.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Dict

import numpy as np

from convert.tensors import NUMPY_DTYPES, LazyTensor, as_bfloat16
from mlx_elm.errors import ConversionError

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str | Path) -> Dict[str, LazyTensor]:
    """Name -> lazy tensor for one safetensors file; raises ConversionError if it is malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path.name} is too short to be a safetensors file; it is truncated.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ConversionError(f"{path.name}: safetensors header length {n} exceeds the file; it is truncated or corrupt.")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ConversionError(f"{path.name}: safetensors header is not valid JSON; the file is corrupt.") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = 8 + n
    out: Dict[str, LazyTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: tensor {name!r} has an unsupported dtype or a malformed entry.") from None
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if end - start != numel * itemsize or start < 0 or base + end > size:
            raise ConversionError(f"{path.name}: tensor {name!r} data range [{start}, {end}) does not fit its shape "
                                  "or the file; the file is truncated or corrupt.")

        def load(start=start, numel=numel, dtype=dtype, shape=shape) -> np.ndarray:
            a = np.frombuffer(mm, dtype=NUMPY_DTYPES[dtype], count=numel, offset=base + start).reshape(shape)
            return as_bfloat16(a) if dtype == "bfloat16" else a

        out[name] = LazyTensor(shape, dtype, load, f"{path.name}:{name}")
    return out
