"""Options, failure modes and atomicity of `mlx-elm convert`: errors are one line, nothing is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from needs import needs

torch = needs("torch")

import convert as convert_pkg  # noqa: E402
from convert import convert  # noqa: E402
from convert.source import Source  # noqa: E402
from convert.tensors import LazyTensor  # noqa: E402
from convert_fixtures import (  # noqa: E402
    TOKENS, tiny_args, mlx_lm_logits, random_weights, reference_logits,
    write_corenet_pt, write_hf_safetensors,
)
from mlx_elm.errors import ConversionError, UnsafeCheckpointError  # noqa: E402
from mlx_elm.models.openelm import preset  # noqa: E402


def _leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _expect_clean_failure(tmp_path, src, match, exc=ConversionError, **opts):
    out = tmp_path / "out"
    with pytest.raises(exc) as e:
        convert(src, out, progress=False, **opts)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    assert not out.exists() and not _leftovers(tmp_path, "out")
    return msg


@pytest.fixture
def good(tmp_path):
    args = tiny_args()
    w = random_weights(args, seed=7)
    return args, w


def test_missing_tensor(tmp_path, good):
    args, w = good
    del w["transformer.layers.2.ffn.proj_1.weight"]
    src = write_hf_safetensors(tmp_path / "src", args, w)
    _expect_clean_failure(tmp_path, src, "missing tensor(s) transformer.layers.2.ffn.proj_1.weight")


def test_wrong_shape(tmp_path, good):
    args, w = good
    w["transformer.layers.3.attn.out_proj.weight"] = w["transformer.layers.3.attn.out_proj.weight"][:, :128]
    src = write_hf_safetensors(tmp_path / "src", args, w)
    _expect_clean_failure(tmp_path, src, "transformer.layers.3.attn.out_proj.weight has shape (256, 128)")


def test_unknown_key(tmp_path, good):
    args, w = good
    w["transformer.layers.0.attn.extra_bias"] = np.zeros(4, np.float32)
    src = write_corenet_pt(tmp_path / "ck.pt", w)
    _expect_clean_failure(tmp_path, src, "unknown tensor(s) transformer.layers.0.attn.extra_bias")


def test_truncated_zip(tmp_path, good):
    args, w = good
    src = write_corenet_pt(tmp_path / "ck.pt", w)
    raw = src.read_bytes()
    src.write_bytes(raw[: len(raw) - 5000])
    _expect_clean_failure(tmp_path, src, "truncated")


@pytest.mark.slow
def test_forbidden_global_through_the_cli(tmp_path):
    """End to end: the CLI prints one line naming the global, exits 1, writes nothing, runs nothing."""
    import pickle
    import zipfile

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = f"import os; os.system('touch {marker}')"
    payload = b"\x80\x02cbuiltins\nexec\nq\x00X" + len(code).to_bytes(4, "little") + code.encode() + b"\x85R."
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafeCheckpointError):
        convert(evil, tmp_path / "api_out", progress=False)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "mlx_elm.cli.main", "convert", str(evil), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "builtins.exec" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not marker.exists()
    assert pickle  # the raw pickle above is hand-written, not produced by pickling an object


def test_refuses_existing_folder_and_force_replaces(tmp_path, good):
    args, w = good
    src = write_hf_safetensors(tmp_path / "src", args, w)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--force"):
        convert(src, out, progress=False)
    assert (out / "keep.txt").exists()
    convert(src, out, dtype="float32", force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not _leftovers(tmp_path, "out")


def test_interrupted_conversion_leaves_nothing(tmp_path, good, monkeypatch):
    args, w = good
    src = write_hf_safetensors(tmp_path / "src", args, w)
    import convert.tensors as tensors_mod

    real, calls = tensors_mod.to_mlx, []

    def flaky(a, dtype):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(a, dtype)

    monkeypatch.setattr(tensors_mod, "to_mlx", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", max_shard_size="64KB", progress=False)
    assert len(calls) == 10
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_sharded_output_has_index_and_loads(tmp_path, good):
    args, w = good
    src = write_hf_safetensors(tmp_path / "src", args, w)
    out = tmp_path / "out"
    report = convert(src, out, dtype="float32", max_shard_size="1MB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(w)
    assert report.bytes_written == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    ref = reference_logits(args, w, TOKENS)
    assert np.abs(mlx_lm_logits(out, TOKENS) - ref).max() <= 1e-4


def test_float16_refused_for_3b_unless_forced(tmp_path, monkeypatch):
    """The refusal happens before any weight is read (lazy tensors that would fail if loaded)."""
    args = preset("OpenELM-3B")
    from convert.schema import expected_shapes

    def never():
        raise AssertionError("weights must not be read")

    tensors = {k: LazyTensor(s, "float32", never) for k, s in expected_shapes(args).items()}
    monkeypatch.setattr(convert_pkg, "open_source", lambda *a, **k: Source(tensors, args, "fake", "fake-3b"))
    msg = _expect_clean_failure(tmp_path, "fake-3b", "overflow", dtype="float16")
    assert "bfloat16" in msg
    with pytest.raises(AssertionError, match="must not be read"):  # forced: it proceeds to read weights
        convert("fake-3b", tmp_path / "out", dtype="float16", force_float16=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_verify_catches_a_wrong_conversion(tmp_path, good, monkeypatch):
    args, w = good
    src = write_hf_safetensors(tmp_path / "src", args, w)
    import convert.tensors as tensors_mod

    real = tensors_mod.to_mlx

    def swap_gate_and_up(a, dtype):  # a plausible converter bug: proj_1 halves in the wrong order
        arr = real(a, dtype)
        if a.shape == (512, 256):  # layer 0 proj_1 (2 x 256 rows)
            import mlx.core as mx

            arr = mx.concatenate([arr[256:], arr[:256]])
        return arr

    monkeypatch.setattr(tensors_mod, "to_mlx", swap_gate_and_up)
    _expect_clean_failure(tmp_path, src, "--verify failed", dtype="float32", verify=True)
    monkeypatch.setattr(tensors_mod, "to_mlx", real)
    report = convert(src, tmp_path / "out", dtype="float32", verify=True, progress=False)
    assert report.max_logit_diff <= 1e-4


def test_bad_options_are_one_line(tmp_path, good):
    args, w = good
    src = write_hf_safetensors(tmp_path / "src", args, w)
    _expect_clean_failure(tmp_path, src, "--dtype", dtype="int8")
    _expect_clean_failure(tmp_path, src, "--bits", quantize=True, bits=3)
    _expect_clean_failure(tmp_path, src, "unknown OpenELM preset", preset="OpenELM-9B")
    _expect_clean_failure(tmp_path, src, "not the size given by --preset", preset="OpenELM-270M")
    _expect_clean_failure(tmp_path, tmp_path / "nope", "neither a file")
