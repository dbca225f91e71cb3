"""Two processes (mlx.launch, ring backend over localhost) == one process with the combined batch."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distributed_lora.py"
LR = 1e-3


def _example():
    spec = importlib.util.spec_from_file_location("distributed_lora", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_process_data_parallel_matches_one_process(tmp_path, spm_model_path):
    from mlx_elm.train.tiny import make_tiny_openelm, write_text_data

    model = make_tiny_openelm(tmp_path / "model", spm_model_path)
    data = write_text_data(tmp_path / "data", n_train=32, n_valid=0, words=20)
    shared = ["--model", str(model), "--data", str(data), "--iters", "3", "--learning-rate", str(LR)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, str(EXAMPLE), "--out",
           str(tmp_path / "two"), *shared]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"world"')][-1])
    assert two["world"] == 2 and "data-parallel over 2 processes" in proc.stdout

    one = _example().main(["--out", str(tmp_path / "one"), *shared])
    assert one["world"] == 1 and one["tokens"] == two["tokens"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    a, b = mx.load(str(tmp_path / "two" / "adapters.safetensors")), mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    moved = 0
    for k in a:
        # Summing the gradient in another order changes it by float32 ulps; where a gradient is ~0,
        # Adam's normalisation turns that into a whole step of the other sign, at most lr per step.
        # So: nearly every element equal to 1e-6, and none further apart than 2 * lr * steps.
        x, y = np.array(a[k]), np.array(b[k])
        diff = np.abs(x - y)
        assert diff.max() <= 2 * LR * 3 + 1e-6, k
        assert np.mean(diff <= 1e-6) >= 0.99, k
        moved += k.endswith("lora_b") and float(np.abs(x).max()) > 0
    assert moved > 0  # the adapters were trained, not left at their zero init


def test_example_fast_mode_single_process(tmp_path):
    out = _example().main(["--fast", "--out", str(tmp_path / "ad"), "--workdir", str(tmp_path / "w"), "--iters", "2"])
    assert out["world"] == 1 and len(out["losses"]) == 2 and out["losses"][1] < out["losses"][0]
    assert (tmp_path / "ad" / "adapters.safetensors").exists()
