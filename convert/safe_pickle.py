"""Read PyTorch ``.pt`` / ``.bin`` checkpoints without torch and without running their code.

A torch checkpoint is a zip archive: ``<name>/data.pkl`` is a pickle describing containers and
tensors, ``<name>/data/<key>`` are the raw storages. Unpickling normally lets the file call any
importable function (``os.system`` included). Here the unpickler resolves only an allow-list of
globals, each replaced by our own constructor that builds a lazy tensor, a dtype marker or a plain
container; any other global stops the read with ``UnsafeCheckpointError`` before anything runs.

The file also chooses every size in it, so nothing it says is trusted: we run the pure-Python
unpickler (its opcodes can be checked one by one; the C one hashes whatever it is given), dict keys
and set members must be small (a memo-shared nested tuple takes 2**depth steps to hash), strides
are checked against the storage bounds, all tensors together may not declare more than twice the
bytes their storages hold, and the zip entries themselves are read by ``convert.zip_entries``
(bounded, CRC-checked). Storages are memory-mapped and viewed with numpy (bfloat16 kept as bits).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from convert.tensors import NUMPY_DTYPES, LazyTensor, as_bfloat16
from convert.untrusted import human, quote
from convert.zip_entries import ZipArchive
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
MAX_DIMS = 32                   # numpy < 2 cannot view more
MAX_TENSOR_BYTES = 2**48        # any one tensor, even an empty one (numpy refuses shapes this big)
KEY_PARTS = 1000                # atoms in one dict key or set member
VIEW_FACTOR, VIEW_SLACK = 2, 64 << 20  # tensors may declare 2x their storages' bytes (tied weights) + 64 MiB


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co: carries only the element dtype."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Storage:
    """One ``data/<key>`` entry of the archive, viewed lazily as a flat numpy array."""

    def __init__(self, archive: "_TorchArchive", info: zipfile.ZipInfo, key: str, dtype: str, numel: int) -> None:
        self.archive, self.info, self.key, self.dtype, self.numel = archive, info, key, dtype, numel
        self.itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self.archive.storage_array(self.info, self.dtype, self.numel)
        return self._array


class TorchTensor(LazyTensor):
    """A tensor from a torch checkpoint; ``load()`` returns a contiguous numpy copy."""


class _OrderedDict(collections.OrderedDict):
    """OrderedDict that tolerates torch's ``_metadata`` attribute (set by BUILD) and nothing else."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and set(state) <= {"_metadata"}:
            return
        raise UnsafeCheckpointError("the pickle sets unexpected state on an OrderedDict; refused.")


_HASHABLE_ATOMS = (str, bytes, int, float, bool, type(None), complex)


def _key(key: Any) -> Any:
    """``key`` if hashing it is cheap and harmless: atoms, or tuples of at most KEY_PARTS atoms."""
    if type(key) is str or type(key) is int:
        return key
    budget, todo = KEY_PARTS, [key]
    while todo:
        k = todo.pop()
        budget -= 1
        if type(k) is tuple:
            todo.extend(k)
        elif type(k) is frozenset:  # members were checked when it was built; their hashes are cached
            budget -= len(k)
        elif not isinstance(k, (_HASHABLE_ATOMS, np.generic, np.dtype)):
            raise ConversionError(f"a dict key or set member in the pickle is a {type(k).__name__}; a checkpoint's "
                                  "keys are strings, numbers or tuples of them, so the file is corrupt.")
        if budget < 0:
            raise UnsafeCheckpointError(f"a dict key or set member in the pickle nests over {KEY_PARTS} parts (a hash "
                                        "bomb); no checkpoint needs that, so it was refused.")
    return key


def _new_ordered_dict(items: Any = ()) -> _OrderedDict:
    return _OrderedDict((_key(k), v) for k, v in (items.items() if isinstance(items, dict) else items))


def _new_set(items: Any = ()) -> set:
    return {_key(k) for k in items}


def _new_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_key(k) for k in items)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise UnsafeCheckpointError(f"tensor {what} is a {type(v).__name__}, not an int; refused.")
    return v


def _ints(v: Any, what: str) -> Tuple[int, ...]:
    if type(v) not in (tuple, list) or len(v) > MAX_DIMS:
        raise ConversionError(f"tensor {what} {quote(v)} is not a tuple of at most {MAX_DIMS} ints; the checkpoint is "
                              "corrupt.")
    return tuple(_int(s, what) for s in v)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError("unexpected arguments to _codecs.encode in the pickle; refused.")
    return text.encode(encoding)


_SAFE_NUMPY_KINDS = set("biufc?")


def _np_dtype(spec: Any, *_rest: Any) -> np.dtype:
    dt = np.dtype(spec) if isinstance(spec, str) and len(spec) <= 8 else None
    if dt is None or dt.kind not in _SAFE_NUMPY_KINDS:
        raise UnsafeCheckpointError(f"numpy dtype {quote(spec)} in the pickle is not a plain number type; refused.")
    return dt


def _np_scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _SAFE_NUMPY_KINDS or not isinstance(data, bytes):
        raise UnsafeCheckpointError("a numpy scalar in the pickle is not a plain number; refused.")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_STATIC: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _new_ordered_dict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): _new_set,
    ("builtins", "frozenset"): _new_frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _refuse(what: str) -> Callable[[Any], None]:
    def load(self: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle uses {what}, which torch.save never writes; refused without "
                                    "executing anything.")
    return load


class _SafeUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with every opcode that hashes, mutates or looks up an object
    outside the allow-list replaced by a checked version."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: "_TorchArchive") -> None:
        # a length that lies only shortens a read; the STOP opcode is then missing, so load() fails
        super().__init__(io.BytesIO(data))
        self.size, self.archive = len(data), archive
        self.storages: Dict[str, _Storage] = {}
        self.tensor_bytes, self.tensor_count = 0, 0
        self.allowed = dict(_STATIC)
        self.allowed[("torch._utils", "_rebuild_tensor")] = self.rebuild_tensor
        self.allowed[("torch._utils", "_rebuild_tensor_v2")] = self.rebuild_tensor

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self.archive.name} asks for the global {quote(f'{module}.{name}')}, which is not a tensor, "
                "storage or plain container; refused without executing anything. If you trust the file, "
                "re-save just its state_dict with torch.save(model.state_dict(), path)."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {quote(pid)} in the pickle; refused.")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or type(key) is not str or type(numel) is not int or numel < 0:
            raise UnsafeCheckpointError(f"malformed storage reference {quote(pid)} in the pickle; refused.")
        st = self.storages.get(key)
        if st is None:
            info = self.archive.storage_info(key, stype.dtype, numel)
            st = self.storages[key] = _Storage(self.archive, info, key, stype.dtype, numel)
        elif (st.dtype, st.numel) != (stype.dtype, numel):
            raise ConversionError(f"{self.archive.name}: storage {quote(key)} is declared as {st.numel} {st.dtype} and "
                                  f"as {numel} {stype.dtype}; torch.save never does that, the checkpoint is corrupt.")
        return st

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> TorchTensor:
        """torch._utils._rebuild_tensor(_v2): a lazy strided view, every index checked now."""
        if not isinstance(storage, _Storage):
            raise UnsafeCheckpointError("a tensor in the pickle does not point at a storage of the archive; refused.")
        size, stride, offset = _ints(size, "size"), _ints(stride, "stride"), _int(offset, "storage offset")
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
            raise ConversionError(f"tensor in storage {quote(storage.key)} has an invalid size/stride "
                                  f"{quote(size)}/{quote(stride)}; the checkpoint is corrupt.")
        numel, extent = 1, 1
        for n in size:
            numel, extent = numel * n, extent * max(n, 1)
        if extent * storage.itemsize > MAX_TENSOR_BYTES:
            raise ConversionError(f"tensor in storage {quote(storage.key)} declares size {quote(size)}, over "
                                  f"{human(MAX_TENSOR_BYTES)}; the checkpoint is corrupt.")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
        if last >= storage.numel:
            raise ConversionError(f"tensor of size {quote(size)} at offset {offset} reads past the end of storage "
                                  f"{quote(storage.key)} ({storage.numel} elements); the checkpoint is corrupt.")
        self.tensor_bytes += numel * storage.itemsize
        self.tensor_count += 1
        # a stride only matters along a dimension of size > 1; elsewhere it may be anything (2**62)
        strides = tuple(s * storage.itemsize if n > 1 else 0 for n, s in zip(size, stride))

        def load() -> np.ndarray:
            flat = storage.array()
            if not numel:
                out = np.empty(size, dtype=flat.dtype)
            else:
                view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=strides, writeable=False)
                out = np.array(view, order="C", copy=True)
            return as_bfloat16(out) if storage.dtype == "bfloat16" else out

        return TorchTensor(size, storage.dtype, load, f"storage {quote(storage.key)}")

    def check_budget(self) -> None:
        """All tensors together may view their storages at most VIEW_FACTOR times (plus slack)."""
        stored = sum(st.numel * st.itemsize for st in self.storages.values())
        if self.tensor_bytes > VIEW_FACTOR * stored + VIEW_SLACK:
            raise ConversionError(f"{self.archive.name}: its {self.tensor_count} tensors declare "
                                  f"{human(self.tensor_bytes)} but its storages hold only {human(stored)}; a real "
                                  "checkpoint's tensors never add up to more than twice their data, so it was refused "
                                  "(if it is yours, save expanded tensors with .contiguous()).")

    # --- opcodes that would hash, mutate or call what the file chooses ------------------------

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):  # numpy pickles a scalar's dtype as dtype('f8') + BUILD(byte order)
            self.stack[-1] = _dtype_state(inst, state)
            return
        if type(inst) is not _OrderedDict:
            raise UnsafeCheckpointError(f"the pickle tries to set state on a {type(inst).__name__}; a plain checkpoint "
                                        "never does this, so the file was refused (nothing from it was executed).")
        inst.__setstate__(state)

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        _mapping(self.stack[-1])[_key(key)] = value

    def load_setitems(self) -> None:
        items = _pairs(self.pop_mark())
        target = _mapping(self.stack[-1])
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    def load_dict(self) -> None:
        items = _pairs(self.pop_mark())
        self.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise pickle.UnpicklingError(f"ADDITEMS on a {type(target).__name__}")
        target.update(_key(k) for k in items)

    def load_frozenset(self) -> None:
        self.append(frozenset(_key(k) for k in self.pop_mark()))

    def load_append(self) -> None:
        value = self.stack.pop()
        _list(self.stack[-1]).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        _list(self.stack[-1]).extend(items)

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.size:
            raise pickle.UnpicklingError("BYTEARRAY8 is longer than the pickle")
        buf = bytearray(n)
        self.readinto(buf)
        self.append(buf)

    for _op, _name in ((pickle.BUILD, "load_build"), (pickle.SETITEM, "load_setitem"), (pickle.DICT, "load_dict"),
                       (pickle.SETITEMS, "load_setitems"), (pickle.ADDITEMS, "load_additems"),
                       (pickle.FROZENSET, "load_frozenset"), (pickle.APPEND, "load_append"),
                       (pickle.APPENDS, "load_appends"), (pickle.BYTEARRAY8, "load_bytearray8")):
        dispatch[_op[0]] = locals()[_name]
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):  # copyreg's cache would bypass find_class
        dispatch[_op[0]] = _refuse("the copyreg extension registry")
    del _op, _name


def _dtype_state(dtype: np.dtype, state: Any) -> np.dtype:
    """The dtype with the byte order of numpy's pickled state; any other state (fields, subarrays,
    names: a structured dtype in disguise) is refused rather than applied."""
    if type(state) is not tuple or len(state) not in (8, 9) or state[2:5] != (None, None, None) \
            or state[1] not in ("<", ">", "|", "=") or (len(state) == 9 and state[8] is not None):
        raise UnsafeCheckpointError("the pickle sets unexpected state on a numpy dtype; refused.")
    return dtype.newbyteorder(state[1]) if state[1] in "<>" and dtype.itemsize > 1 else dtype


def _mapping(obj: Any) -> dict:
    if type(obj) not in (dict, _OrderedDict):
        raise pickle.UnpicklingError(f"SETITEM on a {type(obj).__name__}")
    return obj


def _list(obj: Any) -> list:
    if type(obj) is not list:
        raise pickle.UnpicklingError(f"APPEND on a {type(obj).__name__}")
    return obj


def _pairs(items: List[Any]) -> List[Any]:
    if len(items) % 2:
        raise pickle.UnpicklingError("odd number of items for a dict")
    return items


class _TorchArchive:
    """The zip container of a torch checkpoint: its pickle, byte order and storages."""

    def __init__(self, path: Path, check_crc: bool) -> None:
        self.zip = ZipArchive(path, check_crc)
        self.name = self.zip.name
        pkls = [n for n in self.zip.entries if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ConversionError(f"{self.name} is a zip but not a torch checkpoint (no single <name>/data.pkl); "
                                  "pass a file written by torch.save.")
        self.prefix = pkls[0][: -len("data.pkl")]
        order = self.zip.entries.get(self.prefix + "byteorder")
        text = self.zip.read(order, limit=16).strip() if order is not None else b"little"
        if text not in (b"little", b"big"):
            raise ConversionError(f"{self.name}: its byteorder entry says {quote(text)}, not 'little' or 'big'; "
                                  "the checkpoint is corrupt.")
        self.big_endian = text == b"big"

    def read_pickle(self) -> bytes:
        return self.zip.read(self.zip.entries[self.prefix + "data.pkl"])

    def storage_info(self, key: str, dtype: str, numel: int) -> zipfile.ZipInfo:
        """The entry of storage ``key``, checked now (present, big enough, inside the file)."""
        info = self.zip.entries.get(f"{self.prefix}data/{key}")
        if info is None:
            raise ConversionError(f"{self.name}: storage data/{quote(key)} is missing from the archive; "
                                  "the checkpoint is truncated or corrupt.")
        need = numel * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if info.file_size < need:
            raise ConversionError(f"{self.name}: storage data/{quote(key)} holds {info.file_size} bytes but "
                                  f"{need} are needed; the checkpoint is truncated or corrupt.")
        self.zip.span(info)
        return info

    def storage_array(self, info: zipfile.ZipInfo, dtype: str, numel: int) -> np.ndarray:
        buf, offset = self.zip.storage(info)
        arr = np.frombuffer(buf, dtype=np.dtype(NUMPY_DTYPES[dtype]), count=numel, offset=offset)
        return arr.byteswap() if self.big_endian and arr.itemsize > 1 else arr


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, LookupError, TypeError, ValueError, AttributeError,
                  struct.error, ArithmeticError)


def load_checkpoint(path: str | Path, *, check_crc: bool = True) -> Any:
    """The unpickled object of a torch zip checkpoint with every tensor as a lazy ``TorchTensor``.

    Raises ``UnsafeCheckpointError`` for any global outside the allow-list and ``ConversionError``
    for a truncated, malformed or corrupt archive (a zip entry failing its CRC-32 check, unless
    ``check_crc`` is False). Nothing in the file is ever executed.
    """
    archive = _TorchArchive(Path(path), check_crc)
    unpickler = _SafeUnpickler(archive.read_pickle(), archive)
    try:
        obj = unpickler.load()
    except ConversionError:
        raise
    except _PICKLE_ERRORS as e:  # a malformed opcode stream
        raise ConversionError(f"{archive.name}: malformed pickle in the checkpoint ({type(e).__name__}: "
                              f"{quote(str(e))}); the file is corrupt.") from e
    unpickler.check_budget()
    return obj


def load_arrays(path: str | Path, *, check_crc: bool = True) -> Any:
    """Like ``load_checkpoint`` but with every tensor read into a numpy array (bfloat16 as bits).

    Walks the object without recursion and once per shared object, so a deep or memo-shared
    structure costs what its pickle costs.
    """
    root = load_checkpoint(path, check_crc=check_crc)
    done: Dict[int, Any] = {}  # id of a container or tensor -> its copy with arrays; atoms stay as they are
    open_ids = set()
    todo: List[Tuple[Any, bool]] = [(root, False)] if _walks(root) else []
    while todo:
        obj, children_done = todo.pop()
        if id(obj) in done:
            continue
        if isinstance(obj, LazyTensor):
            done[id(obj)] = obj.load()
        elif not children_done:
            if id(obj) in open_ids:
                raise ConversionError(f"{Path(path).name}: the checkpoint holds a container that contains itself; "
                                      "it cannot be read into arrays.")
            open_ids.add(id(obj))
            todo.append((obj, True))
            todo.extend((x, False) for x in (obj.values() if isinstance(obj, dict) else obj) if _walks(x))
        elif isinstance(obj, dict):
            pairs = ((k, done.get(id(v), v)) for k, v in obj.items())
            done[id(obj)] = type(obj)(pairs) if isinstance(obj, collections.OrderedDict) else dict(pairs)
        else:
            done[id(obj)] = type(obj)(done.get(id(x), x) for x in obj)
    return done.get(id(root), root)


def _walks(obj: Any) -> bool:
    return isinstance(obj, (LazyTensor, dict, list, tuple))
