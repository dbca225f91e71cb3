"""Shared fixtures: everything is built on the fly, nothing is downloaded.

``cli`` runs ``mlx-elm`` in-process through its real entry point (``mlx_elm.cli.main.main``, so
errors are formatted exactly as users see them) and returns the exit code, stdout and stderr.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest



def pytest_configure(config):
    """On Linux with the mlx-cpu wheel, re-run pytest once with OpenBLAS preloaded (~40x faster
    matmuls), exactly as the ``mlx-elm`` CLI does. Set MLX_ELM_NO_BLAS_PRELOAD=1 to opt out."""
    from mlx_elm import platform

    if platform.would_reexec():
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()
        platform.maybe_reexec_with_fast_blas()


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> Path:
    """A tiny SentencePiece BPE model (vocab 320, byte fallback, Llama-style ids 0/1/2)."""
    from mlx_elm.train.tiny import train_tiny_spm

    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep converted models and tokenizers out of the user's cache, but share the embedded
    default between tests of one session (it takes seconds to convert)."""
    home = os.environ.get("MLX_ELM_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "mlx-elm-home")
    monkeypatch.setenv("MLX_ELM_HOME", home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli("generate", "hi", "--model", folder)`` → :class:`CliResult`."""
    from mlx_elm.cli.main import main

    def run(*args, input: str | None = None) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["mlx-elm", *map(str, args)])
        if input is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(input))
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run
