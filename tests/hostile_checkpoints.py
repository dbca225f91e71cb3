"""Torch checkpoints built byte by byte in torch.save's layout, and hostile variants of them.

No torch is needed and every build is deterministic, so the fuzz suite, the regression tests and
the campaign (``tests/fuzz_campaign.py``) produce the same files on every machine. The pickle
writer emits opcodes directly, which is what lets us write what ``pickle.dumps`` never would
(memo-shared hash bombs, lying strides, references to ``os.system``).
"""

from __future__ import annotations

import pickle
import pickletools
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

# --- a minimal pickle (protocol 2) writer -------------------------------------------------


class Global(NamedTuple):
    module: str
    name: str


class Reduce(NamedTuple):
    func: Any
    args: Any


class PersId(NamedTuple):
    pid: Any


class Put(NamedTuple):
    """Emit ``obj`` and store it in memo slot ``idx``."""

    idx: int
    obj: Any


class Get(NamedTuple):
    idx: int


class Build(NamedTuple):
    obj: Any
    state: Any


class Raw(NamedTuple):
    """Opcodes inserted verbatim."""

    data: bytes


class ODict(NamedTuple):
    """``collections.OrderedDict`` filled by SETITEMS, as torch writes a state_dict."""

    items: Tuple[Tuple[Any, Any], ...]


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    return b"\x8a" + bytes([len(raw)]) + raw


def _emit(obj: Any, out: bytearray) -> None:
    if isinstance(obj, Raw):
        out += obj.data
    elif isinstance(obj, Global):
        out += b"c" + obj.module.encode("utf-8", "surrogatepass") + b"\n" + \
            obj.name.encode("utf-8", "surrogatepass") + b"\n"
    elif isinstance(obj, Reduce):
        _emit(obj.func, out)
        _emit(obj.args, out)
        out += b"R"
    elif isinstance(obj, PersId):
        _emit(obj.pid, out)
        out += b"Q"
    elif isinstance(obj, Put):
        _emit(obj.obj, out)
        out += b"q" + bytes([obj.idx]) if obj.idx < 256 else b"r" + struct.pack("<I", obj.idx)
    elif isinstance(obj, Get):
        out += b"h" + bytes([obj.idx]) if obj.idx < 256 else b"j" + struct.pack("<I", obj.idx)
    elif isinstance(obj, Build):
        _emit(obj.obj, out)
        _emit(obj.state, out)
        out += b"b"
    elif isinstance(obj, ODict):
        _emit(Reduce(Global("collections", "OrderedDict"), ()), out)
        _setitems(obj.items, out)
    elif obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        out += _int(obj)
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, bytes):
        out += b"C" + bytes([len(obj)]) + obj if len(obj) < 256 else b"B" + struct.pack("<I", len(obj)) + obj
    elif isinstance(obj, tuple):
        if not obj:
            out += b")"
            return
        out += b"("
        for x in obj:
            _emit(x, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for x in obj:
            _emit(x, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}"
        _setitems(tuple(obj.items()), out)
    else:
        raise TypeError(f"cannot emit {type(obj).__name__}")


def _setitems(items, out: bytearray) -> None:
    if items:
        out += b"("
        for k, v in items:
            _emit(k, out)
            _emit(v, out)
        out += b"u"


def dumps(obj: Any) -> bytes:
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


# --- torch-style tensors and archives --------------------------------------------------------

STORAGE = {"float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage",
           "int64": "LongStorage", "int32": "IntStorage", "int8": "CharStorage", "uint8": "ByteStorage",
           "bool": "BoolStorage", "int16": "ShortStorage"}


def tensor_node(key: str, storage_type: str, numel: int, size: tuple, stride: tuple, offset: int = 0) -> Reduce:
    """What torch pickles for a tensor: ``_rebuild_tensor_v2(persid, offset, size, stride, False, {})``."""
    pid = PersId(("storage", Global("torch", storage_type), key, "cpu", numel))
    return Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                  (pid, offset, tuple(size), tuple(stride), False, Reduce(Global("collections", "OrderedDict"), ())))


def contiguous_strides(shape: tuple) -> tuple:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


@dataclass
class Entry:
    name: str
    data: bytes
    method: int = 0          # 0 stored, 8 deflated
    crc: Optional[int] = None  # None: the true CRC-32
    usize: Optional[int] = None  # None: len(data) (for deflate: the inflated size; give it when data is raw deflate)
    raw: bool = False        # data is already compressed


def state_dict_entries(arrays: Dict[str, np.ndarray], prefix: str = "archive", extra: Any = None) -> List[Entry]:
    """data.pkl + one storage per array (contiguous, little-endian), as torch.save writes them."""
    items, storages = [], []
    for i, (name, a) in enumerate(arrays.items()):
        a = np.asarray(a)  # not ascontiguousarray: it turns a 0-d array into shape (1,)
        items.append((name, tensor_node(str(i), STORAGE[a.dtype.name], a.size, a.shape, contiguous_strides(a.shape))))
        storages.append(Entry(f"{prefix}/data/{i}", a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")))
    obj: Any = ODict(tuple(items))
    if extra is not None:
        obj = {"model_state_dict": obj, **extra}
    return pickle_entries(dumps(obj), prefix) + storages


def pickle_entries(pkl: bytes, prefix: str = "archive") -> List[Entry]:
    return [Entry(f"{prefix}/data.pkl", pkl), Entry(f"{prefix}/byteorder", b"little"),
            Entry(f"{prefix}/version", b"3\n")]


def torch_zip(entries: List[Entry]) -> bytes:
    """A zip exactly as torch's writer lays it out: 64-byte aligned data ('FB' padding), data
    descriptors (flag 0x808), zero times and versions."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode("utf-8", "surrogatepass")
        if e.method == 8 and not e.raw:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = c.compress(e.data) + c.flush()
        else:
            body = e.data
        usize = e.usize if e.usize is not None else len(e.data)
        crc = e.crc if e.crc is not None else zlib.crc32(e.data)
        offset = len(out)
        pad = (-(offset + 30 + len(name) + 4)) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, 0x808, e.method, 0, 0, 0, 0, 0, len(name), len(extra))
        out += name + extra + body
        out += struct.pack("<4sIII", b"PK\x07\x08", crc, len(body), usize)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, 0x808, e.method, 0, 0, crc, len(body),
                               usize, len(name), 0, 0, 0, 0, 0, offset) + name
    start = len(out)
    out += central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0)
    return bytes(out)


def checkpoint(arrays: Dict[str, np.ndarray], extra: Any = None) -> bytes:
    return torch_zip(state_dict_entries(arrays, extra=extra))


def small_arrays(seed: int = 0) -> Dict[str, np.ndarray]:
    """A handful of tensors in several dtypes: the base every mutation starts from."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float16),
            "ids": np.arange(5, dtype=np.int64), "mask": np.array([True, False, True])}


def tiny_openelm_arrays(seed: int = 0) -> Dict[str, np.ndarray]:
    """A 2-layer OpenELM in corenet names (dim 64, head_dim 16, vocab 32): a real conversion in ms."""
    from convert.schema import expected_shapes
    from mlx_elm.models.openelm import ModelArgs

    args = ModelArgs(num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=32, max_context_length=64)
    rng = np.random.default_rng(seed)
    return {k.removeprefix("transformer."): (rng.standard_normal(s) * 0.05).astype(np.float32)
            for k, s in expected_shapes(args).items()}


# --- reading the layout back (for structure-aware mutations) ---------------------------------


class ZipField(NamedTuple):
    offset: int
    width: int
    what: str


_LOCAL = ((4, 2, "version"), (6, 2, "flags"), (8, 2, "method"), (14, 4, "crc"), (18, 4, "csize"),
          (22, 4, "usize"), (26, 2, "name_len"), (28, 2, "extra_len"))
_CENTRAL = ((4, 2, "made_by"), (6, 2, "version"), (8, 2, "flags"), (10, 2, "method"), (16, 4, "crc"),
            (20, 4, "csize"), (24, 4, "usize"), (28, 2, "name_len"), (30, 2, "extra_len"), (32, 2, "comment_len"),
            (34, 2, "disk"), (42, 4, "offset"))
_EOCD = ((4, 2, "disk"), (6, 2, "cd_disk"), (8, 2, "entries_here"), (10, 2, "entries"), (12, 4, "cd_size"),
         (16, 4, "cd_offset"), (20, 2, "comment_len"))


def zip_fields(data: bytes) -> List[ZipField]:
    """Every header field of a (valid) zip, located in the bytes."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd = struct.unpack("<HII", data[eocd + 10: eocd + 20])
    fields = [ZipField(eocd + o, w, "eocd." + n) for o, w, n in _EOCD]
    pos = cd
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28: pos + 34])
        (local,) = struct.unpack("<I", data[pos + 42: pos + 46])
        fields += [ZipField(pos + o, w, "central." + f) for o, w, f in _CENTRAL]
        fields.append(ZipField(pos + 46, n, "central.name"))
        fields += [ZipField(local + o, w, "local." + f) for o, w, f in _LOCAL]
        ln = struct.unpack("<H", data[local + 26: local + 28])[0]
        fields.append(ZipField(local + 30, ln, "local.name"))
        pos += 46 + n + m + k
    return fields


def storage_ranges(data: bytes, prefix: str = "archive/data/") -> List[Tuple[int, int]]:
    """(start, end) of the bytes of every stored storage entry."""
    import io
    import zipfile

    out = []
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        if info.filename.startswith(prefix) and info.file_size:
            n, m = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + n + m
            out.append((start, start + info.compress_size))
    return out


# --- mutations -----------------------------------------------------------------------------------

HOSTILE_INTS = (0, 1, -1, 2, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63,
                2**64, -2**63, 10**30)
HOSTILE_STRINGS = ("", "\x1b[31mred\x1b[0m", "a\nb", "\r\x07", "\u202e", "x" * 5000, "\ud800", "../../etc/passwd",
                   "storage", "0", "transformer.layers.x.attn", "\x00")


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One random edit anywhere: overwrite, bit flip, insert, delete, duplicate or truncate."""
    b = bytearray(data)
    op = rng.randrange(6)
    i = rng.randrange(len(b))
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 3:
        del b[i: i + rng.randint(1, 16)]
    elif op == 4:
        j = min(len(b), i + rng.randint(1, 64))
        b[j:j] = b[i:j]
    else:
        del b[i:]
    return bytes(b)


def mutate_zip_field(data: bytes, rng: random.Random) -> bytes:
    """Set one zip header field (or name) to a hostile value."""
    f = rng.choice(zip_fields(data))
    b = bytearray(data)
    if f.what.endswith(".name"):
        k = f.offset + rng.randrange(max(1, f.width))
        b[k] = rng.choice((0xFF, 0xC3, 0x00, 0x1B, 0x0A, ord("/")))  # torch sets the UTF-8 flag
        return bytes(b)
    if f.what.endswith(("flags",)):
        v = rng.choice((0x1, 0x8, 0x800, 0x809, 0x40, 0xFFFF))
    elif f.what.endswith("method"):
        v = rng.choice((1, 8, 9, 12, 14, 93, 99, 0xFFFF))
    else:
        old = int.from_bytes(data[f.offset: f.offset + f.width], "little")
        v = rng.choice((0, 1, old + 1, old - 1, old * 2, 2**(8 * f.width) - 1, rng.randrange(2**(8 * f.width))))
    v %= 2**(8 * f.width)
    b[f.offset: f.offset + f.width] = v.to_bytes(f.width, "little")
    return bytes(b)


def op_spans(pkl: bytes) -> List[Tuple[Any, Any, int, int]]:
    """(opcode, argument, start, end) of every opcode of a valid pickle."""
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    return [(op, arg, pos, end) for (op, arg, pos), end in zip(ops, ends)]


def mutate_pickle(pkl: bytes, rng: random.Random) -> bytes:
    """A structure-aware edit of the opcode stream: hostile ints and strings, dropped, repeated or
    inserted opcodes, dangerous globals."""
    ops = op_spans(pkl)
    _, _, pos, end = rng.choice(ops)
    kind = rng.randrange(6)
    ints = [(p, q) for o, _, p, q in ops if o.name in ("BININT1", "BININT2", "BININT", "LONG1")]
    strs = [(p, q) for o, _, p, q in ops if o.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    if kind == 0 and ints:
        p, q = rng.choice(ints)
        return pkl[:p] + _int(rng.choice(HOSTILE_INTS)) + pkl[q:]
    if kind == 1 and strs:
        p, q = rng.choice(strs)
        raw = rng.choice(HOSTILE_STRINGS).encode("utf-8", "surrogatepass")
        return pkl[:p] + b"X" + struct.pack("<I", len(raw)) + raw + pkl[q:]
    if kind == 2:
        return pkl[:pos] + pkl[end:]
    if kind == 3:
        return pkl[:end] + pkl[pos:end] + pkl[end:]
    if kind == 4:
        ins = rng.choice((b"(", b"0", b"2", b"R", b"b", b"t", b"}", b"]", b"N", b"u", b"e", b"Q", b".", b"h\x00",
                          b"\x94", b"\x85", b"\x86", b"\x87", b"\x8f", b"\x91", b"\x90"))
        return pkl[:pos] + ins + pkl[pos:]
    evil = rng.choice((Global("os", "system"), Global("posix", "system"), Global("builtins", "exec"),
                       Global("builtins", "eval"), Global("subprocess", "Popen"), Global("builtins", "getattr"),
                       Global("builtins", "__import__"), Global("torch", "load"), Global("numpy", "load")))
    out = bytearray()
    _emit(evil, out)
    return pkl[:pos] + bytes(out) + pkl[pos:]


def with_pickle(entries: List[Entry], pkl: bytes) -> bytes:
    """The archive of ``entries`` with data.pkl replaced (and a correct CRC)."""
    return torch_zip([Entry(e.name, pkl) if e.name.endswith("/data.pkl") else e for e in entries])


# --- hostile files, one family per audit class -------------------------------------------------


def hash_bomb(depth: int = 60) -> Raw:
    """t_k = (t_{k-1}, t_{k-1}) through the memo: 6 bytes per level, 2**depth work to hash."""
    out = bytearray(b")q\x00")                  # () -> memo 0
    for i in range(1, depth + 1):
        prev = (i - 1) % 250
        out += b"h" + bytes([prev]) + b"h" + bytes([prev]) + b"\x86q" + bytes([i % 250])
    return Raw(bytes(out))


def deep_tuple(depth: int) -> Raw:
    """A tuple nested ``depth`` times: one byte per level."""
    return Raw(b")" + b"\x85" * depth)


def hostile_pickle_file(obj: Any, arrays: Optional[Dict[str, np.ndarray]] = None) -> bytes:
    """An archive whose data.pkl is ``obj`` (plus storages for ``arrays`` named data/0..)."""
    entries = pickle_entries(dumps(obj))
    for i, a in enumerate((arrays or {}).values()):
        entries.append(Entry(f"archive/data/{i}", np.ascontiguousarray(a).tobytes()))
    return torch_zip(entries)


def deflated_zeros(nbytes: int) -> Tuple[bytes, int]:
    """Raw deflate of ``nbytes`` zeros (a multiple of 1 MiB) without allocating them, and its CRC."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(nbytes >> 20):
        crc = zlib.crc32(mib, crc)
    return piece * (nbytes >> 20) + b"\x03\x00", crc


# --- safetensors --------------------------------------------------------------------------------

ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32", "int8": "I8",
             "uint8": "U8", "bool": "BOOL", "int16": "I16"}


def safetensors_bytes(header: Any, data: bytes = b"", header_len: Optional[int] = None) -> bytes:
    """A .safetensors file from any JSON-able header (lying or not) and a data blob."""
    import json

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def safetensors_file(arrays: Dict[str, np.ndarray]) -> Tuple[dict, bytes]:
    """(header, data) of a valid file holding ``arrays``."""
    header, blob = {"__metadata__": {"format": "pt"}}, bytearray()
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    return header, bytes(blob)
