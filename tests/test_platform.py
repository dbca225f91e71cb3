"""The Linux fast path: re-exec with OpenBLAS preloaded, opt-out, and the doctor report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_elm import platform

PROBE = ("from mlx_elm import platform; platform.maybe_reexec_with_fast_blas(); "
         "import mlx.core as mx; mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4))); "
         "print(platform.loaded_blas())")

needs_openblas = pytest.mark.skipif(
    not (platform.wheel_links_reference_blas() and platform.find_openblas()),
    reason="only meaningful with the Linux mlx-cpu wheel and an installed OpenBLAS",
)


def _run(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", platform.OPT_OUT_ENV, platform.REEXEC_MARK)}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=120)


@needs_openblas
def test_reexec_preloads_openblas():
    out = _run({}).stdout
    assert out.startswith("OpenBLAS, preloaded")


@needs_openblas
def test_opt_out_keeps_the_reference_blas():
    out = _run({platform.OPT_OUT_ENV: "1"}).stdout
    assert "reference BLAS" in out


def test_doctor_reports_backend_blas_and_memory():
    lines = "\n".join(platform.doctor().lines())
    for field in ("backend", "device", "blas", "system memory gb", "mlx version"):
        assert field in lines


def test_missing_fast_blas_prints_one_hint_once_per_cache_home(monkeypatch, tmp_path, capsys):
    """A new Linux user without OpenBLAS learns what it costs and how to fix it, once."""
    monkeypatch.setattr(platform, "wheel_links_reference_blas", lambda: True)
    monkeypatch.setattr(platform, "find_fast_blas", lambda: None)
    monkeypatch.delenv(platform.OPT_OUT_ENV, raising=False)
    monkeypatch.setenv("MLX_ELM_HOME", str(tmp_path / "home"))
    assert platform.warn_if_slow_blas() is True
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install libopenblas0-pthread" in err and "25-40x" in err
    assert platform.warn_if_slow_blas() is False  # once per cache home
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MLX_ELM_HOME", str(tmp_path / "other"))
    monkeypatch.setenv(platform.OPT_OUT_ENV, "1")  # the opt-out silences it too
    assert platform.warn_if_slow_blas() is False
    monkeypatch.setattr(platform, "loaded_blas", lambda: "reference BLAS bundled with the mlx-cpu wheel (slow)")
    assert any("apt-get install" in a for a in platform.doctor().advice)  # and `mlx-elm doctor` says it


@pytest.mark.slow
@needs_openblas
def test_with_openblas_the_first_command_prints_nothing_extra(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", platform.OPT_OUT_ENV, platform.REEXEC_MARK)}
    env["MLX_ELM_HOME"] = str(tmp_path / "home")
    r = subprocess.run([sys.executable, "-m", "mlx_elm.cli.main", "doctor"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "note:" not in r.stderr and "OpenBLAS, preloaded" in r.stdout
