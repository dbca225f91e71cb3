"""Regressions for issue 11, classes 1-6: hostile or malformed checkpoints end in one clean line.

Every file is built here (tests/hostile_checkpoints.py writes torch.save's exact layout without
torch). Cases that used to hang or allocate gigabytes run in a child process with a timeout and
a limited address space, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hostile_checkpoints as H
import numpy as np
import pytest

from convert import open_source
from convert.safe_pickle import load_arrays, load_checkpoint
from convert.safetensors_reader import read_safetensors
from mlx_elm.errors import ConversionError, MlxElmError, UnsafeCheckpointError

HERE = Path(__file__).resolve().parent


def _write(tmp_path: Path, data: bytes, name: str = "ck.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _one_clean_line(msg: str) -> None:
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg and msg.isprintable(), ascii(msg)


def _refused(fn, *args, exc=ConversionError, **kw) -> str:
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    _one_clean_line(str(e.value))
    return str(e.value)


def _isolated(path: Path, call: str, timeout: float = 30, extra_as: int = 1536 << 20) -> dict:
    """Run ``call`` on ``path`` in a child with ``extra_as`` bytes of address space to spare and a
    timeout; returns {"outcome": refused/accepted/other, "message", "seconds", "rss_growth_mib"} (the
    growth of peak RSS during the call, imports excluded)."""
    code = textwrap.dedent(f"""
        import json, re, resource, sys, time
        sys.path.insert(0, {str(HERE)!r})
        from convert.safe_pickle import load_arrays, load_checkpoint
        from mlx_elm.errors import MlxElmError
        try:  # Linux: limit what the case may add to the address space (macOS does not enforce it)
            vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + {extra_as}, resource.RLIM_INFINITY))
        except OSError:
            pass
        kib = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB on Linux
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        try:
            {call}({str(path)!r})
            out = {{"outcome": "accepted", "message": ""}}
        except MlxElmError as e:
            out = {{"outcome": "refused", "message": str(e)}}
        except BaseException as e:
            out = {{"outcome": type(e).__name__, "message": str(e)[:300]}}
        out["seconds"] = time.perf_counter() - t
        out["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / kib / 1024
        print(json.dumps(out))
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, MLX_ELM_NO_BLAS_PRELOAD="1"))
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "message": f"over {timeout}s"}
    if r.returncode:
        return {"outcome": f"exit {r.returncode}", "message": r.stderr[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tensor_file(size, stride, offset=0, n_store=24) -> bytes:
    node = H.tensor_node("0", "FloatStorage", n_store, size, stride, offset)
    return H.torch_zip(H.pickle_entries(H.dumps(H.ODict((("w", node),))))
                       + [H.Entry("archive/data/0", np.arange(n_store, dtype=np.float32).tobytes())])


def _set_field(data: bytes, what: str, value: int, entry: int = 0) -> bytes:
    field = [f for f in H.zip_fields(data) if f.what == what][entry]
    b = bytearray(data)
    b[field.offset: field.offset + field.width] = value.to_bytes(field.width, "little")
    return bytes(b)


def _entry_index(data: bytes, suffix: str) -> int:
    names = [data[f.offset: f.offset + f.width] for f in H.zip_fields(data) if f.what == "central.name"]
    return next(i for i, n in enumerate(names) if n.endswith(suffix.encode()))


# --- 1. malformed archives ---------------------------------------------------------------------


def test_entry_name_that_is_not_utf8_is_one_line(tmp_path):
    good = H.checkpoint(H.small_arrays())
    name = [f for f in H.zip_fields(good) if f.what == "central.name"][_entry_index(good, "byteorder")]
    bad = bytearray(good)
    bad[name.offset + 3] = 0xFF  # torch sets the UTF-8 flag, so the name must decode
    _refused(load_checkpoint, _write(tmp_path, bytes(bad)))


def test_unsupported_compression_method_is_one_line(tmp_path):
    good = H.checkpoint(H.small_arrays())
    bad = _set_field(good, "central.method", 14, _entry_index(good, "data.pkl"))  # LZMA
    assert "compression method 14" in _refused(load_checkpoint, _write(tmp_path, bad))


def test_broken_local_header_of_byteorder_is_one_line(tmp_path):
    good = H.checkpoint(H.small_arrays())
    local = [f for f in H.zip_fields(good) if f.what == "local.version"][_entry_index(good, "byteorder")]
    bad = bytearray(good)
    bad[local.offset - 4] = ord("X")  # "PK\3\4" -> "XK\3\4"
    assert "local zip header" in _refused(load_checkpoint, _write(tmp_path, bytes(bad)))


# --- 2. lying metadata -------------------------------------------------------------------------


def test_huge_stride_on_a_size_one_dimension_reads_the_values(tmp_path):
    path = _write(tmp_path, _tensor_file((1, 4), (2**62, 1), offset=2))
    np.testing.assert_array_equal(load_arrays(path)["w"], [[2, 3, 4, 5]])


def test_negative_and_oversized_strides_are_refused(tmp_path):
    assert "invalid size/stride" in _refused(load_arrays, _write(tmp_path, _tensor_file((2, 3), (-3, 1))))
    assert "past the end" in _refused(load_arrays, _write(tmp_path, _tensor_file((2, 3), (2**62, 1))))


SCHEMA_CASES = {
    "layer name not a number": lambda a: a.__setitem__("layers.x.attn_norm.weight", np.zeros(64, np.float32)),
    "layer name without index": lambda a: a.__setitem__("layers.", np.zeros(64, np.float32)),
    "unicode digit as layer index": lambda a: a.__setitem__("layers.\u0663.attn_norm.weight", np.zeros(64, np.float32)),
    "scalar head dim": lambda a: a.__setitem__("layers.0.attn.q_norm.weight", np.ones((), np.float32)),
    "zero head dim": lambda a: a.__setitem__("layers.0.attn.q_norm.weight", np.zeros(0, np.float32)),
    "negative kv heads": lambda a: a.__setitem__("layers.0.attn.qkv_proj.weight", np.zeros((16, 64), np.float32)),
    "zero query heads": lambda a: a.__setitem__("layers.0.attn.out_proj.weight", np.zeros((64, 0), np.float32)),
    "head dim that divides nothing": lambda a: a.__setitem__("layers.0.attn.q_norm.weight", np.zeros(7, np.float32)),
    "scalar embedding": lambda a: a.__setitem__("token_embeddings.weight", np.ones((), np.float32)),
    "zero-width embedding": lambda a: a.__setitem__("token_embeddings.weight", np.zeros((32, 0), np.float32)),
    "scalar LoRA A": lambda a: a.update({"layers.0.ffn.proj_2.lora_A.x.weight": np.ones((), np.float32),
                                         "layers.0.ffn.proj_2.lora_B.x.weight": np.zeros((64, 2), np.float32)}),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_odd_shapes_and_names_fail_shape_inference_cleanly(tmp_path, case):
    arrays = H.tiny_openelm_arrays()
    SCHEMA_CASES[case](arrays)
    _refused(open_source, _write(tmp_path, H.checkpoint(arrays)))


# --- 3. hangs ----------------------------------------------------------------------------------


def test_hash_bomb_dict_key_is_refused_at_once(tmp_path):
    t = H.tensor_node("0", "FloatStorage", 6, (6,), (1,))
    path = _write(tmp_path, H.hostile_pickle_file({"w": t, H.hash_bomb(64): 1}, {"w": np.zeros(6, np.float32)}))
    r = _isolated(path, "load_checkpoint", timeout=20)
    assert r["outcome"] == "refused" and "hash bomb" in r["message"] and r["seconds"] < 5, r


def test_huge_repr_of_a_persistent_id_is_not_built(tmp_path):
    path = _write(tmp_path, H.hostile_pickle_file({"w": H.PersId(("storage", H.hash_bomb(64)))}))
    r = _isolated(path, "load_checkpoint", timeout=20)
    assert r["outcome"] == "refused" and len(r["message"]) < 400 and r["seconds"] < 5, r


# --- 4. memory amplification -------------------------------------------------------------------


def test_stride0_8gib_embedding_is_refused_before_allocating(tmp_path):
    emb = H.tensor_node("0", "FloatStorage", 1024, (2**21, 1024), (0, 1))
    data = H.hostile_pickle_file(H.ODict((("token_embeddings.weight", emb),)), {"e": np.zeros(1024, np.float32)})
    r = _isolated(_write(tmp_path, data), "load_arrays")
    assert r["outcome"] == "refused" and "8.00 GiB" in r["message"], r


def test_deflated_1gib_storage_is_refused(tmp_path):
    blob, crc = H.deflated_zeros(1 << 30)
    node = H.tensor_node("0", "FloatStorage", 1 << 28, (1 << 28,), (1,))
    entries = H.pickle_entries(H.dumps(H.ODict((("w", node),))))
    entries.append(H.Entry("archive/data/0", blob, method=8, crc=crc, usize=1 << 30, raw=True))
    path = _write(tmp_path, H.torch_zip(entries))
    assert path.stat().st_size < 1_200_000
    r = _isolated(path, "load_arrays")
    assert r["outcome"] == "refused" and "inflates" in r["message"] and r["rss_growth_mib"] < 100, r


def test_entry_sizes_that_lie_by_gigabytes_allocate_nothing(tmp_path):
    data = H.checkpoint(H.small_arrays())
    for what in ("central.csize", "central.usize"):
        for i in range(len([f for f in H.zip_fields(data) if f.what == what])):
            data = _set_field(data, what, 2**32 - 1, i)
    r = _isolated(_write(tmp_path, data), "load_arrays")
    assert r["outcome"] == "refused" and r["rss_growth_mib"] < 100, r


def test_deflated_entries_within_the_ratio_still_read(tmp_path):
    arrays = H.small_arrays()
    entries = [H.Entry(e.name, e.data, method=8) for e in H.state_dict_entries(arrays)]
    out = load_arrays(_write(tmp_path, H.torch_zip(entries)))
    for k, v in arrays.items():
        np.testing.assert_array_equal(out[k], v)


# --- 5. silent corruption -----------------------------------------------------------------------


def _flipped(arrays) -> bytes:
    data = bytearray(H.checkpoint(arrays))
    start, _ = H.storage_ranges(bytes(data))[0]
    data[start] ^= 0x40
    return bytes(data)


def test_a_bit_flip_in_tensor_bytes_fails_the_crc_check(tmp_path):
    arrays = H.small_arrays()
    path = _write(tmp_path, _flipped(arrays))
    assert "CRC-32" in _refused(load_arrays, path) and "--no-check-crc" in _refused(load_arrays, path)
    w = load_arrays(path, check_crc=False)["w"]  # the opt-out reads what is there
    assert w.ravel()[0] != arrays["w"].ravel()[0] and np.array_equal(w.ravel()[1:], arrays["w"].ravel()[1:])


def test_no_check_crc_reaches_the_reader_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from mlx_elm.cli.main import app

    path = _write(tmp_path, _flipped(H.tiny_openelm_arrays()))
    runner = CliRunner()
    refused = runner.invoke(app, ["convert", str(path), str(tmp_path / "a"), "--quiet"])
    assert isinstance(refused.exception, ConversionError) and "CRC-32" in str(refused.exception)
    ok = runner.invoke(app, ["convert", str(path), str(tmp_path / "b"), "--quiet", "--no-check-crc"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "b" / "config.json").exists()


# --- 6. messages ---------------------------------------------------------------------------------

NASTY = "\x1b[2J\x1b[31mred\nsecond line\r\x07\u202e"


def _pt(obj, arrays=None) -> bytes:
    return H.hostile_pickle_file(obj, arrays)


def _convert(path: Path) -> None:
    from convert import convert

    convert(path, path.parent / "out", progress=False)


def _lora(adapter: str) -> dict:
    return {f"layers.0.ffn.proj_2.lora_A.{adapter}.weight": np.zeros((2, 128), np.float32),
            f"layers.0.ffn.proj_2.lora_B.{adapter}.weight": np.zeros((64, 2), np.float32)}


MESSAGE_CASES = {
    "global name": (load_checkpoint, lambda: _pt({"w": H.Global("os", NASTY)})),
    "global module": (load_checkpoint, lambda: _pt({"w": H.Global(NASTY, "x")})),
    "persistent id": (load_checkpoint, lambda: _pt({"w": H.PersId(NASTY)})),
    "missing storage key": (load_checkpoint, lambda: _pt({"w": H.tensor_node(NASTY, "FloatStorage", 1, (1,), (1,))})),
    "numpy dtype": (load_checkpoint, lambda: _pt({"w": H.Reduce(H.Global("numpy", "dtype"), (NASTY[:8],))})),
    "pickle error": (load_checkpoint, lambda: _pt({"w": H.Raw(b"I" + NASTY.encode() + b"\n")})),
    "state_dict key": (_convert, lambda: H.checkpoint({**H.tiny_openelm_arrays(), NASTY: np.zeros(2, np.float32)})),
    "non-tensor entry": (open_source, lambda: _pt({NASTY: 1})),
    "LoRA adapter names": (open_source,
                           lambda: H.checkpoint({**H.tiny_openelm_arrays(), **_lora(NASTY), **_lora("b")})),
}


@pytest.mark.parametrize("case", sorted(MESSAGE_CASES))
def test_file_content_in_a_message_is_escaped_and_on_one_line(tmp_path, case):
    fn, build = MESSAGE_CASES[case]
    _refused(fn, _write(tmp_path, build()), exc=MlxElmError)


def test_safetensors_names_are_escaped(tmp_path):
    header, data = H.safetensors_file({NASTY: np.zeros(3, np.float32)})
    header[NASTY]["dtype"] = "Q8"
    assert "\\x1b" in _refused(read_safetensors, _write(tmp_path, H.safetensors_bytes(header, data), "m.safetensors"))
    header, data = H.safetensors_file({"transformer." + NASTY: np.zeros(3, np.float32)})
    _refused(open_source, _write(tmp_path, H.safetensors_bytes(header, data), "n.safetensors"))


# --- safetensors headers ----------------------------------------------------------------------------

ST_CASES = {
    "header is a list": lambda h: [1, 2],
    "negative dims": lambda h: {**h, "w": {**h["w"], "shape": [-4, -6]}},
    "dims whose product wraps int64": lambda h: {**h, "w": {"dtype": "F32", "shape": [2**32, 2**32],
                                                            "data_offsets": [0, 0]}},
    "bool as a dim": lambda h: {**h, "w": {**h["w"], "shape": [True, 24]}},
    "float offsets": lambda h: {**h, "w": {**h["w"], "data_offsets": [0.0, 96.0]}},
    "two tensors on the same bytes": lambda h: {**h, "b": {**h["b"], "data_offsets": [0, 12]}},
    "1000 tensors on one range": lambda h: {**h, **{f"x{i}": h["w"] for i in range(1000)}},
}


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_hostile_safetensors_headers_are_refused(tmp_path, case):
    header, data = H.safetensors_file(H.small_arrays())
    path = _write(tmp_path, H.safetensors_bytes(ST_CASES[case](header), data), "m.safetensors")
    _refused(lambda p: [t.load() for t in read_safetensors(p).values()], path)


def test_safetensors_header_nested_too_deep_is_refused(tmp_path):
    path = _write(tmp_path, H.safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "m.safetensors")
    _refused(read_safetensors, path)


# --- found while hardening: state poisoning and the copyreg cache --------------------------------


def test_build_cannot_set_attributes_of_allow_listed_functions(tmp_path):
    import convert.safe_pickle as sp

    before = sp._rebuild_parameter.__defaults__
    target = H.Global("torch._utils", "_rebuild_parameter")
    path = _write(tmp_path, _pt({"w": H.Build(target, (None, {"__defaults__": (1,)}))}))
    _refused(load_checkpoint, path, exc=UnsafeCheckpointError)
    assert sp._rebuild_parameter.__defaults__ == before


def test_ext_opcode_cannot_reach_a_global_cached_by_copyreg(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    pkl = b"\x80\x02}X\x01\x00\x00\x00w\x82\xf0X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85Rs."
    path = _write(tmp_path, H.torch_zip(H.pickle_entries(pkl)))
    code = ("import copyreg, os, sys; copyreg.add_extension('os', 'system', 240); "
            "copyreg._extension_cache[240] = os.system\n"  # as if another library had used code 240
            "from convert.safe_pickle import load_checkpoint\n"
            f"try:\n    load_checkpoint({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "UnsafeCheckpointError" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the address-space limit is Linux-only")
def test_address_space_helper_really_limits(tmp_path):
    """The memory tests above mean something only if the child's limit bites."""
    path = _write(tmp_path, b"")
    r = _isolated(path, "(lambda p: bytearray(4 << 30))", extra_as=512 << 20)
    assert r["outcome"] == "MemoryError", r
