"""Fuzzing the checkpoint readers (issue 11): whatever the bytes, a result or one MlxElmError line,
in bounded time and memory, and nothing from the file ever runs.

Seeded mutation loops (no extra dependency) and hypothesis properties (derandomized, fixed
example counts, so CI is deterministic) start from valid files built by tests/hostile_checkpoints.py:
random byte edits, zip header fields, pickle opcodes, safetensors headers, and code-execution
payloads. Every case is checked by ``_check``: the outcome, a per-case time limit (and a
watchdog that kills the run rather than let a hang stall CI), a tracemalloc peak bound, and an
address-space limit on the whole process while these tests run.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import random
import re
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import hostile_checkpoints as H
import numpy as np
import pytest

import convert.safe_pickle as safe_pickle
from convert.safe_pickle import load_arrays
from convert.safetensors_reader import read_safetensors
from mlx_elm.errors import MlxElmError

PER_CASE_S = 5.0        # a tiny file; anything near this is a hang in the making
WATCHDOG_S = 60.0       # past this the process is killed with a traceback
SEEDED = {"bytes": 300, "zip": 100, "pickle": 100, "safetensors": 100}
EXAMPLES = 75           # per hypothesis property
SLACK = getattr(safe_pickle, "VIEW_SLACK", 64 << 20)  # what tensors may declare beyond their storages


@pytest.fixture(scope="module", autouse=True)
def _limited_address_space():
    """A regression that allocates gigabytes fails with MemoryError instead of taking the machine."""
    vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 \
        if Path("/proc/self/status").exists() else None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if vm is not None:
        resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _load_pt(path: Path):
    return load_arrays(path)


def _load_st(path: Path):
    return {k: np.array(v.load()) for k, v in read_safetensors(path).items()}


def _check(tmp_path: Path, data: bytes, reader=_load_pt, suffix: str = ".pt") -> str:
    """Run one case; return "ok" or "refused" and assert everything the suite promises."""
    path = tmp_path / f"case{suffix}"
    path.write_bytes(data)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        reader(path)
        outcome = "ok"
    except MlxElmError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and msg.isprintable() and len(msg) < 1000, ascii(msg)
        outcome = "refused"
    finally:
        seconds = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
    assert seconds < PER_CASE_S, f"{seconds:.1f}s on a {len(data)}-byte file"
    assert peak < SLACK + (16 << 20) + 16 * len(data), f"{peak / 2**20:.0f} MiB from {len(data)} bytes"
    return outcome


BASE_PT = H.checkpoint(H.small_arrays())
BASE_ENTRIES = H.state_dict_entries(H.small_arrays())
BASE_PKL = BASE_ENTRIES[0].data
ST_HEADER, ST_DATA = H.safetensors_file(H.small_arrays())
BASE_ST = H.safetensors_bytes(ST_HEADER, ST_DATA)


def test_base_files_are_valid(tmp_path):
    assert _check(tmp_path, BASE_PT) == "ok"
    assert _check(tmp_path, BASE_ST, _load_st, ".safetensors") == "ok"


# --- seeded mutation loops ---------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SEEDED))
def test_seeded_mutations(tmp_path, family):
    rng = random.Random(f"issue-11-{family}")
    tally = {"ok": 0, "refused": 0}
    for _ in range(SEEDED[family]):
        if family == "bytes":
            tally[_check(tmp_path, H.mutate_bytes(BASE_PT, rng))] += 1
        elif family == "zip":
            tally[_check(tmp_path, H.mutate_zip_field(BASE_PT, rng))] += 1
        elif family == "pickle":
            tally[_check(tmp_path, H.with_pickle(BASE_ENTRIES, H.mutate_pickle(BASE_PKL, rng)))] += 1
        else:
            tally[_check(tmp_path, H.mutate_bytes(BASE_ST, rng), _load_st, ".safetensors")] += 1
    assert tally["refused"] > 0  # the mutations do reach the checks


def test_every_bit_flip_in_tensor_bytes_is_caught(tmp_path):
    rng = random.Random("issue-11-crc")
    ranges = H.storage_ranges(BASE_PT)
    for _ in range(50):
        start, end = rng.choice(ranges)
        b = bytearray(BASE_PT)
        b[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        assert _check(tmp_path, bytes(b)) == "refused"


# --- hypothesis properties (skipped where hypothesis is not installed) -------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the seeded loops above still run
    st = None

    def test_properties_need_hypothesis():
        pytest.skip("install hypothesis to run the property-based fuzzing")


if st is not None:
    FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


    @st.composite
    def byte_edits(draw, base: bytes) -> bytes:
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b) - 1))
            kind = draw(st.sampled_from(("set", "flip", "insert", "delete", "truncate")))
            if kind == "set":
                b[i] = draw(st.integers(0, 255))
            elif kind == "flip":
                b[i] ^= 1 << draw(st.integers(0, 7))
            elif kind == "insert":
                b[i:i] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del b[i: i + draw(st.integers(1, 16))]
            else:
                del b[max(1, i):]
            if not b:
                b = bytearray(b"\x00")
        return bytes(b)


    @st.composite
    def zip_field_edits(draw) -> bytes:
        fields = H.zip_fields(BASE_PT)
        b = bytearray(BASE_PT)
        for _ in range(draw(st.integers(1, 3))):
            f = draw(st.sampled_from(fields))
            if f.width == 0:
                continue
            top = 2 ** (8 * f.width) - 1
            v = draw(st.one_of(st.integers(0, top), st.sampled_from([0, 1, top, top - 1])))
            b[f.offset: f.offset + f.width] = v.to_bytes(f.width, "little") if f.width <= 4 else \
                bytes([v & 0xFF]) * f.width
        return bytes(b)


    def _global(module: str, name: str) -> bytes:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


    _TENSOR = H.dumps(H.tensor_node("0", "FloatStorage", 24, (4, 6), (6, 1)))[2:-1]
    OPCODES = st.one_of(
        st.sampled_from([b"(", b")", b"]", b"}", b"N", b"\x88", b"\x89", b"t", b"l", b"d", b"s", b"u", b"e", b"a",
                         b"R", b"b", b"0", b"1", b"2", b"\x85", b"\x86", b"\x87", b"Q", b"\x8f", b"\x90", b"\x91",
                         b"\x94", b"\x81", b"\x92", b".", b"\x82\x01", b"\x96", b"\x97", b"\x98"]),
        st.integers(0, 255).map(lambda i: b"K" + bytes([i])),
        st.integers(-2**31, 2**31 - 1).map(lambda v: b"J" + struct.pack("<i", v)),
        st.sampled_from(H.HOSTILE_INTS).map(H._int),
        st.sampled_from(H.HOSTILE_STRINGS).map(lambda s: H.dumps(s)[2:-1]),
        st.text(max_size=12).map(lambda s: H.dumps(s)[2:-1]),
        st.integers(0, 12).map(lambda i: b"h" + bytes([i])),
        st.integers(0, 12).map(lambda i: b"q" + bytes([i])),
        st.integers(0, 2**64 - 1).map(lambda n: b"\x8e" + struct.pack("<Q", n)),   # BINBYTES8
        st.integers(0, 2**64 - 1).map(lambda n: b"\x96" + struct.pack("<Q", n)),   # BYTEARRAY8
        st.integers(0, 2**64 - 1).map(lambda n: b"\x95" + struct.pack("<Q", n)),   # FRAME
        st.sampled_from([("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "Size"),
                         ("torch", "FloatStorage"), ("builtins", "set"), ("builtins", "frozenset"),
                         ("numpy", "dtype"), ("_codecs", "encode"), ("os", "system"), ("builtins", "eval")]
                        ).map(lambda g: _global(*g)),
        st.just(_TENSOR),
        st.just(H.hash_bomb(40).data),
    )


    @st.composite
    def pickle_programs(draw) -> bytes:
        body = b"".join(draw(st.lists(OPCODES, max_size=24)))
        entries = H.pickle_entries(b"\x80\x02" + body + b".")
        return H.torch_zip(entries + [H.Entry("archive/data/0", np.arange(24, dtype=np.float32).tobytes())])


    JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) |
                        st.text(max_size=8), lambda kids: st.lists(kids, max_size=4) |
                        st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)


    @st.composite
    def safetensors_headers(draw) -> bytes:
        header = {k: dict(v) for k, v in ST_HEADER.items()}
        for _ in range(draw(st.integers(1, 4))):
            name = draw(st.sampled_from(sorted(header) + ["new"]))
            entry = header.setdefault(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
            if not isinstance(entry, dict):
                continue
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            entry[key] = draw(st.one_of(JSON, st.lists(st.integers(-2**64, 2**64), max_size=3),
                                        st.sampled_from(["F32", "BF16", "U16", "F8_E4M3"])))
        return H.safetensors_bytes(header, ST_DATA)


    @FUZZ
    @given(data=byte_edits(BASE_PT))
    def test_property_byte_edits_of_a_checkpoint(tmp_path, data):
        _check(tmp_path, data)


    @FUZZ
    @given(data=zip_field_edits())
    def test_property_zip_header_fields(tmp_path, data):
        _check(tmp_path, data)


    @FUZZ
    @given(data=pickle_programs())
    def test_property_pickle_opcode_programs(tmp_path, data):
        _check(tmp_path, data)


    @FUZZ
    @given(data=safetensors_headers())
    def test_property_safetensors_headers(tmp_path, data):
        _check(tmp_path, data, _load_st, ".safetensors")


# --- no code execution ----------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    """Pickles that create ``marker`` if anything in them runs, in every shape a pickle can call."""
    sh = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    cmd = sh.encode()
    real = [_Reduce(os.system, sh), _Reduce(eval, py), _Reduce(exec, py),
            _Reduce(__import__("subprocess").call, ["touch", str(marker)])]
    for obj in real:
        for proto in (2, 4, 5):
            yield pickle.dumps({"w": obj}, protocol=proto)
            yield pickle.dumps(H_OD({"w": obj}), protocol=proto)
    yield H.dumps({"w": H.Reduce(H.Global("posix", "system"), (sh,))})
    yield H.dumps({"w": H.Reduce(H.Global("builtins", "exec"), (py,))})
    yield H.dumps(H.ODict((("w", H.Reduce(H.Global("os", "system"), (sh,))),)))
    yield H.dumps({"w": H.PersId(("storage", H.Reduce(H.Global("os", "system"), (sh,)), "0", "cpu", 1))})
    yield H.dumps({H.Reduce(H.Global("os", "system"), (sh,)): 1})
    yield H.dumps({"w": H.Reduce(H.Global("builtins", "set"), ([H.Reduce(H.Global("os", "system"), (sh,))],))})
    # INST, OBJ, NEWOBJ, STACK_GLOBAL spellings
    yield b"\x80\x02(X" + len(cmd).to_bytes(4, "little") + cmd + b"ios\nsystem\n."
    yield b"\x80\x02(cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"o."
    yield b"\x80\x04\x8c\x02os\x8c\x06system\x93X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    yield b"\x80\x02cbuiltins\ngetattr\ncos\n\nX\x06\x00\x00\x00system\x86R."
    # BUILD on an allow-listed function, then calling it
    yield H.dumps({"w": H.Build(H.Global("torch._utils", "_rebuild_parameter"),
                                (None, {"__code__": H.Reduce(H.Global("os", "system"), (sh,))}))})


def H_OD(d):
    import collections

    return collections.OrderedDict(d)


def test_no_payload_ever_runs(tmp_path):
    marker = tmp_path / "pwned"
    import convert.safe_pickle as sp

    functions = {k: (v.__defaults__, v.__dict__.copy()) for k, v in sp._STATIC.items() if callable(v) and
                 hasattr(v, "__defaults__")}
    rng = random.Random("issue-11-payloads")
    count = 0
    for pkl in _payloads(marker):
        assert _check(tmp_path, H.torch_zip(H.pickle_entries(pkl))) == "refused"
        assert not marker.exists(), pkl
        for _ in range(4 if _parses(pkl) else 0):  # and mutants of it: whatever they do, nothing runs
            _check(tmp_path, H.torch_zip(H.pickle_entries(H.mutate_pickle(pkl, rng))))
            assert not marker.exists()
            count += 1
        count += 1
    assert count > 60
    assert functions == {k: (v.__defaults__, v.__dict__.copy()) for k, v in sp._STATIC.items()
                         if callable(v) and hasattr(v, "__defaults__")}


def _parses(pkl: bytes) -> bool:
    try:
        H.op_spans(pkl)
        return True
    except Exception:  # pickletools rejects some of our crafted streams; they are used as they are
        return False
