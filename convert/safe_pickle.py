"""Read PyTorch ``.pt`` / ``.bin`` checkpoints without torch and without running their code.

A torch checkpoint is a zip archive: ``<name>/data.pkl`` is a pickle describing containers and
tensors, ``<name>/data/<key>`` are the raw storages. Unpickling normally lets the file call any
importable function (``os.system`` included). Here the unpickler resolves only an allow-list of
globals, each replaced by our own constructor that builds a lazy tensor, a dtype marker or a plain
container; any other global stops the read with ``UnsafeCheckpointError`` before anything runs.
Storages are memory-mapped and viewed with numpy (bfloat16 kept as bit patterns), strides checked
against the storage bounds.
"""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from convert.tensors import NUMPY_DTYPES, LazyTensor, as_bfloat16
from mlx_elm.errors import ConversionError, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _NoState:
    """Base for our placeholders: refuse pickle's BUILD (``__setstate__``) on them."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(
            f"the pickle tries to set state on a {type(self).__name__}; a plain checkpoint never does "
            "this, so the file was refused (nothing from it was executed)."
        )


class _StorageType(_NoState):
    """Stands in for ``torch.FloatStorage`` & co: carries only the element dtype."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Storage(_NoState):
    """One ``data/<key>`` entry of the archive, viewed lazily as a flat numpy array."""

    def __init__(self, archive: "_Archive", key: str, dtype: str, numel: int) -> None:
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self.archive.storage_array(self.key, self.dtype, self.numel)
        return self._array


class TorchTensor(_NoState, LazyTensor):
    """A tensor from a torch checkpoint; ``load()`` returns a contiguous numpy copy."""


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> TorchTensor:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("a tensor in the pickle does not point at a storage of the archive; refused.")
    size = tuple(_int(s, "size") for s in size)
    stride = tuple(_int(s, "stride") for s in stride)
    offset = _int(offset, "storage offset")
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ConversionError(f"tensor in storage {storage.key} has an invalid size/stride {size}/{stride}; "
                              "the checkpoint is corrupt.")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel:
        raise ConversionError(f"tensor of size {size} at offset {offset} reads past the end of storage "
                              f"{storage.key} ({storage.numel} elements); the checkpoint is corrupt.")

    def load() -> np.ndarray:
        flat = storage.array()
        if not all(size):
            out = np.empty(size, dtype=flat.dtype)
        else:
            item = flat.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
            out = np.array(view, order="C", copy=True)
        return as_bfloat16(out) if storage.dtype == "bfloat16" else out

    return TorchTensor(size, storage.dtype, load, f"storage {storage.key}")


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise UnsafeCheckpointError(f"tensor {what} is a {type(v).__name__}, not an int; refused.")
    return v


class _OrderedDict(collections.OrderedDict):
    """OrderedDict that tolerates torch's ``_metadata`` attribute (set by BUILD) and nothing else."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and set(state) <= {"_metadata"}:
            return
        raise UnsafeCheckpointError("the pickle sets unexpected state on an OrderedDict; refused.")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError("unexpected arguments to _codecs.encode in the pickle; refused.")
    return text.encode(encoding)


_SAFE_NUMPY_KINDS = set("biufc?")


def _np_dtype(spec: Any, *_rest: Any) -> np.dtype:
    dt = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 8 else None
    if dt is None or dt.kind not in _SAFE_NUMPY_KINDS:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} in the pickle is not a plain number type; refused.")
    return dt


def _np_scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _SAFE_NUMPY_KINDS or not isinstance(data, bytes):
        raise UnsafeCheckpointError("a numpy scalar in the pickle is not a plain number; refused.")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    table: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): tuple,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _np_dtype,
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(dtype)
    return table


_ALLOWED = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: "_Archive") -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.archive.path.name} asks for the global '{module}.{name}', which is not a tensor, "
                "storage or plain container; refused without executing anything. If you trust the file, "
                "re-save just its state_dict with torch.save(model.state_dict(), path)."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {str(pid)[:60]!r} in the pickle; refused.")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise UnsafeCheckpointError(f"malformed storage reference {str(pid)[:60]!r} in the pickle; refused.")
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(self.archive, key, stype.dtype, numel)
        return st


class _Archive:
    """The zip container: locates entries and memory-maps uncompressed storages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(_not_a_zip_message(path, e)) from None
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ConversionError(f"{path.name} is a zip but not a torch checkpoint (no single <name>/data.pkl); "
                                  "pass a file written by torch.save.")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.infos = {i.filename: i for i in self.zip.infolist()}
        order = self.infos.get(self.prefix + "byteorder")
        self.big_endian = order is not None and self.zip.read(order).strip() == b"big"
        self._file = open(path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None

    def read_pickle(self) -> bytes:
        try:
            return self.zip.read(self.prefix + "data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
            raise ConversionError(f"{self.path.name}: cannot read data.pkl ({e}); the file is corrupt or truncated.") from None

    def storage_array(self, key: str, dtype: str, numel: int) -> np.ndarray:
        info = self.infos.get(f"{self.prefix}data/{key}")
        if info is None:
            raise ConversionError(f"{self.path.name}: storage data/{key} is missing from the archive; "
                                  "the checkpoint is truncated or corrupt.")
        np_dtype = np.dtype(NUMPY_DTYPES[dtype])
        need = numel * np_dtype.itemsize
        if info.file_size < need:
            raise ConversionError(f"{self.path.name}: storage data/{key} holds {info.file_size} bytes but "
                                  f"{need} are needed; the checkpoint is truncated or corrupt.")
        if info.compress_type == zipfile.ZIP_STORED and self._mmap is not None:
            start = self._data_offset(info)
            if start + need > len(self._mmap):
                raise ConversionError(f"{self.path.name}: storage data/{key} runs past the end of the file; "
                                      "the checkpoint is truncated.")
            arr = np.frombuffer(self._mmap, dtype=np_dtype, count=numel, offset=start)
        else:
            arr = np.frombuffer(self.zip.read(info), dtype=np_dtype, count=numel)
        if self.big_endian and np_dtype.itemsize > 1:
            arr = arr.byteswap()
        return arr

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        header = self._mmap[info.header_offset: info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise ConversionError(f"{self.path.name}: bad local zip header for {info.filename}; the file is corrupt.")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len


def _not_a_zip_message(path: Path, err: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if head[:1] == b"\x80":
        return (f"{path.name} is a legacy (pre-1.6) torch file or a bare pickle, which this reader does not open; "
                "re-save it with a current torch.save (zip format).")
    return f"{path.name} is not a readable torch checkpoint ({err}); the file is truncated or not a .pt/.bin zip."


def load_checkpoint(path: str | Path) -> Any:
    """The unpickled object of a torch zip checkpoint with every tensor as a lazy ``TorchTensor``.

    Raises ``UnsafeCheckpointError`` for any global outside the allow-list and ``ConversionError``
    for a truncated or malformed archive. Nothing in the file is ever executed.
    """
    path = Path(path)
    archive = _Archive(path)
    unpickler = _SafeUnpickler(archive.read_pickle(), archive)
    try:
        return unpickler.load()
    except (UnsafeCheckpointError, ConversionError):
        raise
    except Exception as e:  # malformed pickle stream
        raise ConversionError(f"{path.name}: malformed pickle in the checkpoint ({type(e).__name__}: {e}); "
                              "the file is corrupt.") from None


def load_arrays(path: str | Path) -> Any:
    """Like ``load_checkpoint`` but with every tensor read into a numpy array (bfloat16 as bits)."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, LazyTensor):
            return obj.load()
        if isinstance(obj, dict):
            return type(obj)((k, walk(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
                else {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return obj

    return walk(load_checkpoint(path))
