"""A bounds-checked GGUF parse in pure Python, run before anything native reads the file.

MLX reads GGUF with antirez's gguflib, which trusts every count, length, type id and offset in the
file: a tensor count off by one or a string length of 2**63 is a SIGSEGV, not an exception. So we
walk the header, metadata and tensor table here first, checking each field against the file size
and against what that reader can take (versions 2 and 3, alignment 32, no float64 metadata, which
it misreads as float32, and only the tensor types it decodes), and hand a file to ``mx.load`` only
when it passes. Values are returned as plain Python objects for the config and tokenizer checks.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from mlx_elm.errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
ALIGNMENT = 32  # gguflib uses 32 whatever the file says; other values would shift every tensor
MAX_COUNT = 1 << 16  # metadata entries, tensors (SmolLM2: 33 and 272)
MAX_KEY = 256
MAX_STRING = 1 << 26
MAX_ARRAY = 1 << 22  # vocabularies and merge lists are < 1M; bounds Python memory
MAX_NAME = 64  # GGML_MAX_NAME
MAX_NDIM = 4
MAX_ELEMENTS = 2**31 - 1  # MLX shapes are int32 and gguf_quants multiplies them as int

# value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALARS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B",
            U64: "Q", I64: "q"}
INT_TYPES = frozenset((U8, I8, U16, I16, U32, I32, U64, I64))
TYPE_NAMES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string",
              "array", "uint64", "int64", "float64")

# tensor types MLX decodes (name, values per block, bytes per block)
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                8: ("Q8_0", 32, 34)}
QUANTIZED = frozenset((2, 3, 8))

Buffer = Union[bytes, bytearray, mmap.mmap]


def quote(raw: Union[str, bytes], limit: int = 60) -> str:
    """File content for a message: escaped (no control or non-ASCII bytes reach the terminal),
    on one line, and cut to ``limit`` characters."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, (bytes, bytearray)) else raw
    cut = text[:limit]
    return ascii(cut) + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: Tuple[int, ...]  # GGUF order: dims[0] varies fastest (MLX's shape is the reverse)
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    """What the parse found: metadata values (Python objects), their GGUF types, the tensor table."""

    version: int
    size: int
    metadata: Dict[str, Any] = field(default_factory=dict)
    types: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # key -> (type, element type)
    tensors: List[TensorInfo] = field(default_factory=list)
    data_offset: int = 0


class _Cursor:
    """Reads little-endian fields from ``buf``, refusing any read past its end."""

    def __init__(self, buf: Buffer, fail):
        self.buf, self.size, self.off, self.fail = buf, len(buf), 0, fail

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.off:
            self.fail(f"{what} at byte {self.off} needs {n} bytes but the file has "
                      f"{self.size - self.off} left (truncated or a corrupt length)")
        start = self.off
        self.off += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, start)

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        at = self.off
        n = self.u64(f"length of {what}")
        if n > limit:
            self.fail(f"{what} at byte {at} claims {n} bytes (limit {limit})")
        start = self.take(n, what)
        raw = bytes(self.buf[start:start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {at} is not UTF-8: {quote(raw)}")


def parse_gguf(buf: Buffer, source: str, hint: str = "re-download or re-export the file") -> GGUFFile:
    """Check and read the header, metadata and tensor table of a GGUF held in ``buf``.

    Raises a one-line :class:`ModelLoadError` naming ``source``, the field, and ``hint``.
    """

    def fail(problem: str):
        raise ModelLoadError(f"{source} is not a GGUF file MLX can read safely: {problem}; {hint}")

    cur = _Cursor(buf, fail)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        fail(f"starts with {quote(magic)}, not 'GGUF'")
    cur.take(4, "magic")
    version = cur.u32("version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        why = "big-endian files are not supported" if swapped in VERSIONS else "supported: 2, 3"
        fail(f"version {version} ({why})")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    for n, what in ((n_tensors, "tensor count"), (n_kv, "metadata count")):
        if n > MAX_COUNT:
            fail(f"{what} {n} is over the limit of {MAX_COUNT}")
    gg = GGUFFile(version=version, size=len(buf))
    for i in range(n_kv):
        _read_kv(cur, gg, i, fail)
    for key in ("general.alignment", "general.alignmnet"):  # gguflib reads the misspelt key
        if key in gg.metadata and gg.metadata[key] != ALIGNMENT:
            fail(f"{key} is {quote(str(gg.metadata[key]))}; MLX's reader only handles {ALIGNMENT}")
    infos = [_read_tensor_info(cur, i, fail) for i in range(n_tensors)]
    gg.data_offset = cur.off + (-cur.off % ALIGNMENT)
    _place_tensors(gg, infos, fail)
    return gg


def _read_kv(cur: _Cursor, gg: GGUFFile, i: int, fail) -> None:
    at = cur.off
    key = cur.string(f"metadata key #{i}", MAX_KEY)
    if not key or not all(33 <= ord(c) < 127 for c in key):
        fail(f"metadata key #{i} at byte {at} is {quote(key)} (keys are non-empty printable ASCII)")
    if key in gg.metadata:
        fail(f"metadata key {quote(key)} appears twice")
    vtype = cur.u32(f"type of {key}")
    what = f"metadata {quote(key)}"
    if vtype == ARRAY:
        etype, n = cur.u32(f"element type of {key}"), cur.u64(f"length of {key}")
        if etype in (ARRAY, F64) or etype >= len(TYPE_NAMES):
            fail(f"{what} is an array of {_type_name(etype)} (MLX's reader takes flat arrays of "
                 "integers, float32, bool or strings)")
        if n > MAX_ARRAY:
            fail(f"{what} claims {n} elements (limit {MAX_ARRAY})")
        gg.metadata[key] = _read_array(cur, key, etype, n, fail)
        gg.types[key] = (ARRAY, etype)
        return
    if vtype == F64:
        fail(f"{what} is float64, which MLX's reader misreads; store it as float32")
    if vtype >= len(TYPE_NAMES):
        fail(f"{what} has unknown value type {vtype}")
    gg.metadata[key] = cur.string(what) if vtype == STRING else _scalar(cur, vtype, what, fail)
    gg.types[key] = (vtype, -1)


def _scalar(cur: _Cursor, vtype: int, what: str, fail):
    (v,) = cur.unpack(_SCALARS[vtype], what)
    if vtype == BOOL:
        if v not in (0, 1):
            fail(f"{what} is a bool stored as {v}")
        return bool(v)
    return v


def _read_array(cur: _Cursor, key: str, etype: int, n: int, fail) -> list:
    what = f"metadata {quote(key)}"
    if etype == STRING:
        if n * 8 > cur.size - cur.off:
            fail(f"{what} claims {n} strings but only {cur.size - cur.off} bytes are left")
        return _read_strings(cur, what, n, fail)
    code = _SCALARS[etype]
    values = list(cur.unpack(f"{n}{code}", what))
    if etype == BOOL and any(v not in (0, 1) for v in values):
        fail(f"{what} holds a bool that is neither 0 nor 1")
    return [bool(v) for v in values] if etype == BOOL else values


def _read_strings(cur: _Cursor, what: str, n: int, fail) -> List[str]:
    """The hot loop (SmolLM2 has ~98k token and merge strings): :meth:`_Cursor.string`, inlined."""
    buf, size, off = cur.buf, cur.size, cur.off
    length = struct.Struct("<Q").unpack_from
    out = []
    append = out.append
    j = 0
    try:
        for j in range(n):
            if size - off < 8:
                fail(f"{what}[{j}] at byte {off} is cut off by the end of the file")
            k = length(buf, off)[0]
            off += 8
            if k > size - off or k > MAX_STRING:
                fail(f"{what}[{j}] at byte {off - 8} claims {k} bytes; {size - off} are left")
            append(buf[off:off + k].decode("utf-8"))
            off += k
    except UnicodeDecodeError:
        fail(f"{what}[{j}] at byte {off - 8} is not UTF-8: {quote(bytes(buf[off:off + k]))}")
    cur.off = off
    return out


def _read_tensor_info(cur: _Cursor, i: int, fail) -> Tuple[str, Tuple[int, ...], int, int]:
    at = cur.off
    name = cur.string(f"name of tensor #{i}", MAX_NAME)
    if not name or not name.isprintable():
        fail(f"tensor #{i} at byte {at} has name {quote(name)}")
    what = f"tensor {quote(name)}"
    ndim = cur.u32(f"ndim of {what}")
    if not 1 <= ndim <= MAX_NDIM:
        fail(f"{what} has {ndim} dimensions (1 to {MAX_NDIM} are valid)")
    dims = cur.unpack(f"{ndim}Q", f"dimensions of {what}")
    count = 1
    for d in dims:
        if not 1 <= d <= MAX_ELEMENTS:
            fail(f"{what} has dimension {d}")
        count *= d
    if count > MAX_ELEMENTS:
        fail(f"{what} has {count} elements (limit {MAX_ELEMENTS})")
    ggml_type = cur.u32(f"type of {what}")
    if ggml_type not in TENSOR_TYPES:
        names = ", ".join(t[0] for t in TENSOR_TYPES.values())
        fail(f"{what} has tensor type {ggml_type}; MLX's reader decodes {names}")
    if ggml_type in QUANTIZED and (dims[0] % 32 or not name.endswith(".weight")):
        fail(f"{what} is quantized but its rows of {dims[0]} are not whole blocks of 32 "
             "or its name does not end in '.weight'")
    offset = cur.u64(f"data offset of {what}")
    return name, tuple(dims), ggml_type, offset


def _place_tensors(gg: GGUFFile, infos, fail) -> None:
    if infos and gg.data_offset > gg.size:
        fail(f"the tensor data would start at byte {gg.data_offset}, past the end ({gg.size})")
    seen = set()
    for name, dims, ggml_type, offset in infos:
        what = f"tensor {quote(name)}"
        if name in seen:
            fail(f"{what} appears twice")
        seen.add(name)
        _, per_block, block_bytes = TENSOR_TYPES[ggml_type]
        count = 1
        for d in dims:
            count *= d
        nbytes = -(-count // per_block) * block_bytes
        if offset % ALIGNMENT:
            fail(f"{what} starts at data offset {offset}, not a multiple of {ALIGNMENT}")
        start = gg.data_offset + offset
        if offset > gg.size or nbytes > gg.size - start:
            fail(f"{what} needs bytes {start}..{start + nbytes} but the file ends at {gg.size}")
        gg.tensors.append(TensorInfo(name, dims, ggml_type, start, nbytes))
    # Writers pack tensor data back to back with only alignment padding between, so the table
    # must account for every byte: a retyped tensor or changed dimension shows up as a gap.
    spans = sorted(gg.tensors, key=lambda t: t.offset)
    ends = [gg.data_offset] + [t.offset + t.nbytes for t in spans]
    for prev_end, t, name in zip(ends, spans, [None] + [t.name for t in spans]):
        if t.offset < prev_end:
            fail(f"tensors {quote(name)} and {quote(t.name)} overlap")
        if t.offset - prev_end >= ALIGNMENT:
            after = f"after tensor {quote(name)}" if name else "at the start of the data"
            fail(f"{t.offset - prev_end} bytes {after} belong to no tensor "
                 "(a tensor's type or dimensions do not match the data)")
    if spans and gg.size - ends[-1] >= ALIGNMENT:
        fail(f"{gg.size - ends[-1]} bytes after the last tensor belong to no tensor "
             "(a tensor's type or dimensions do not match the data)")


def _type_name(t: int) -> str:
    return TYPE_NAMES[t] if 0 <= t < len(TYPE_NAMES) else f"unknown type {t}"


def read_gguf_file(path: Path, hint: str = "re-download or re-export the file") -> GGUFFile:
    """:func:`parse_gguf` on a file, through a read-only map (only the header pages are touched)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return parse_gguf(b"", str(path), hint)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return parse_gguf(buf, str(path), hint)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}; check the path and permissions") from None
