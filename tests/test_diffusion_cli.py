"""`mlx-elm ays ...` end to end on tiny settings, plus the example's fast mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_elm.errors import DiffusionError
ROOT = Path(__file__).resolve().parents[1]


def test_schedule_command_prints_published_with_source(cli):
    r = cli("ays", "schedule", "ays-sd15")
    assert r.code == 0, r.stderr
    assert "sigmas: 14.615, 6.475, 3.861" in r.stdout and "999, 850, 736" in r.stdout and "#7760" in r.stdout
    r = cli("ays", "schedule", "karras", "--steps", "4")
    assert r.code == 0 and r.stdout.startswith("sigmas: 80,")


@pytest.mark.slow
def test_train_optimize_roundtrip(cli, tmp_path):
    den = tmp_path / "d.safetensors"
    r = cli("ays", "train-toy", "--dataset", "ring8", "--out", str(den), "--steps", "20",
            "--hidden", "16", "--depth", "1", "--batch", "64")
    assert r.code == 0, r.stderr
    assert den.is_file() and "peak memory" in r.stdout + r.stderr
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    r = cli("ays", "optimize", "--denoiser", "gmm:ring8", "--steps", "8", "--mc-samples", "256",
            "--max-sweeps", "2", "--check-samples", "300", "--out", str(out), "--plot", str(png))
    assert r.code == 0, r.stderr
    rec = json.loads(out.read_text())
    assert len(rec["sigmas"]) == 9 and rec["solver"] == "ddim-stochastic"
    # held out: samples drawn with each schedule, scored against the true density (not the search's KLUB)
    assert rec["check_ays"]["kl_qp"] < 0.9 * rec["check_init"]["kl_qp"]
    assert rec["check_ays"]["mmd2"] < rec["check_init"]["mmd2"]
    assert png.stat().st_size > 1000 and "peak memory" in r.stdout + r.stderr
    r = cli("ays", "optimize", "--denoiser", str(den), "--steps", "4", "--mc-samples", "128",
            "--max-sweeps", "1", "--check-samples", "0", "--refine", "--out", str(out))
    assert r.code == 0, r.stderr
    assert len(json.loads(out.read_text())["sigmas"]) == 5


@pytest.mark.parametrize("args,msg", [
    (["--steps", "1"], "steps"),
    (["--solver", "rk4"], "unknown solver"),
    (["--plot", "x.jpg"], "png"),
])
def test_optimize_rejects_bad_input(cli, args, msg, tmp_path):
    r = cli("ays", "optimize", "--denoiser", "gmm:ring8", "--out", str(tmp_path / "o.json"), *args)
    assert r.code in (1, 2) and len(r.error_lines) == 1 and msg in r.error_lines[0]


def test_missing_denoiser_file_and_unknown_dataset(cli, tmp_path):
    r = cli("ays", "optimize", "--denoiser", str(tmp_path / "nope.safetensors"))
    assert r.code == 1 and "train-toy" in r.stderr
    r = cli("ays", "optimize", "--denoiser", "gmm:moons")
    assert r.code == 1 and "unknown dataset" in r.stderr


@pytest.mark.slow
def test_example_fast_mode(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "ays_toy.py"), "--fast", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| exact:ring8 | 4 | ddim-stochastic |" in table and "mlp:ring8" in table
    assert (tmp_path / "schedules_exact_ring8_N4.png").is_file()
    assert (tmp_path / "samples_mlp_ring8_N4.png").is_file()


def test_png_without_matplotlib_names_the_fix(cli, monkeypatch, tmp_path):
    import numpy as np

    from mlx_elm.diffusion import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(DiffusionError, match="pip install matplotlib"):
        plots.plot_schedules({"a": np.array([1.0, 0.1])}, tmp_path / "a.png")
