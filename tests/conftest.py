"""Shared fixtures: everything is built on the fly, nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

WORDS = (
    "the sky is blue because of rayleigh scattering light sun air water capital france paris "
    "city river mountain model language token apple small fast device memory cache window"
).split()


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
