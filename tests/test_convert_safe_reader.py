"""The safe checkpoint reader: same arrays as torch.load, and nothing in a file ever runs."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from needs import needs

torch = needs("torch")

from convert.safe_pickle import load_arrays, load_checkpoint  # noqa: E402
from convert.tensors import BFloat16Array  # noqa: E402
from mlx_elm.errors import ConversionError, UnsafeCheckpointError  # noqa: E402


def _same(ours, theirs):
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        if theirs.dtype == torch.bfloat16:
            assert isinstance(ours, BFloat16Array)
            return np.array_equal(np.asarray(ours).view(np.int16), theirs.contiguous().view(torch.int16).numpy())
        return ours.dtype == theirs.numpy().dtype and ours.shape == tuple(theirs.shape) \
            and np.array_equal(ours, theirs.numpy(), equal_nan=True)
    if isinstance(theirs, dict):
        return set(ours) == set(theirs) and all(_same(ours[k], theirs[k]) for k in theirs)
    if isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
    return ours == theirs


def test_matches_torch_load_on_every_dtype_and_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    shared = torch.randn(10, generator=g)
    sd = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g), f64=torch.randn(2, 3, dtype=torch.float64, generator=g),
        f16=torch.randn(5, 7, generator=g).half(), bf16=torch.randn(4, 9, generator=g).bfloat16(),
        bf16_strided=torch.randn(6, 10, generator=g).bfloat16()[1:5, ::3],
        transposed=base.t(), sliced=base[2:5, 1:7], permuted=torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        expanded=torch.randn(3, 1, generator=g).expand(3, 4), shared_a=shared[:4], shared_b=shared[3:],
        i64=torch.arange(7), i32=torch.arange(5, dtype=torch.int32), i8=torch.arange(-3, 3, dtype=torch.int8),
        u8=torch.arange(4, dtype=torch.uint8), flag=torch.tensor([True, False]), scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4), param=torch.nn.Parameter(torch.randn(3, generator=g)),
        nan=torch.tensor([float("nan"), float("inf")]),
    )
    obj = {"model_state_dict": sd, "epoch": 3, "lr": 1e-4, "name": "run", "betas": (0.9, 0.95),
           "flags": [True, None], "blob": b"\x00\xff", "shape": torch.Size([2, 3])}
    path = tmp_path / "mixed.pt"
    torch.save(obj, path)
    theirs = torch.load(path, weights_only=True)
    ours = load_arrays(path)
    assert _same(ours, theirs)
    assert list(ours["model_state_dict"]) == list(sd)  # order preserved


def test_training_checkpoint_with_numpy_scalars_reads(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "best_metric": np.float64(1.5),
                "steps": np.int64(7)}, path)
    ours = load_arrays(path)
    assert ours["best_metric"] == 1.5 and ours["steps"] == 7 and np.array_equal(ours["model_state_dict"]["w"], [1, 1])


class _Payload:
    """Unpickling this runs a shell command (touches a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_like_zip(path, payload_obj):
    """A zip laid out exactly like torch.save's, whose data.pkl is an arbitrary pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload_obj, protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _torch_like_zip(evil, {"weight": _Payload(marker)})
    # The payload is real: a plain unpickler (in a child process) does run it.
    data = zipfile.ZipFile(evil).read("archive/data.pkl")
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=data, check=True)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(evil)
    assert "system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_custom_class_in_torch_save_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(2), "opts": collections.Counter(a=1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="collections.Counter"):
        load_checkpoint(path)


def test_truncated_and_corrupt_archives_give_one_line(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError) as e:
        load_arrays(cut)
    assert "truncated" in str(e.value) and "\n" not in str(e.value)
    # a storage shorter than its tensor: rewrite the archive with half the bytes in data/0
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(short, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            blob = src.read(info)
            dst.writestr(info.filename, blob[: len(blob) // 2] if info.filename.endswith("data/0") else blob)
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_arrays(short)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ConversionError, match="legacy"):
        load_checkpoint(legacy)


def test_out_of_bounds_strides_are_rejected(tmp_path):
    """A crafted tensor whose size/stride would read past its storage is refused, not read."""
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl_name = next(n for n in names if n.endswith("data.pkl"))
        pkl = z.read(pkl_name)
    # size (6,) -> (9,): same pickle length, larger than the 6-element storage
    evil_pkl = pkl.replace(b"K\x06\x85", b"K\x09\x85", 1)
    assert evil_pkl != pkl
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, evil_pkl if info.filename == pkl_name else src.read(info))
    with pytest.raises(ConversionError, match="past the end"):
        load_checkpoint(bad)


def test_hand_built_checkpoints_read_like_torch_load(tmp_path):
    """tests/hostile_checkpoints.py writes torch.save's layout without torch; the fuzz suite and
    the hostile regressions start from its files, so torch must read them as we do."""
    import hostile_checkpoints as H

    path = tmp_path / "built.pt"
    path.write_bytes(H.checkpoint(H.small_arrays()))
    theirs = torch.load(path, weights_only=True)
    assert _same(load_arrays(path), theirs) and list(theirs) == list(H.small_arrays())
