"""``mlx_elm.load``: a model reference (folder, Hub repo id, or alias) → (model, tokenizer).

Loading goes through ``mlx_lm.utils.load_model`` with our ``get_model_classes`` hook, so any
mlx-lm architecture works and ``model_type: openelm`` gets ``mlx_elm.models.openelm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes, dequantize_model
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_elm.adapters import load_adapters
from mlx_elm.embedded import embedded_model_path
from mlx_elm.errors import ModelLoadError
from mlx_elm.hub import MODEL_FILES, download, looks_like_repo_id
from mlx_elm.model_folder import check_weights, count_parameters, read_config
from mlx_elm.models import model_classes
from mlx_elm.platform import is_cpu_backend
from mlx_elm.tokenizers import load_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL: "embedded", "default": "embedded", "smollm2": "embedded"}
REPRESENTATIONS = ("auto", "as-stored", "float32")


@dataclass
class LoadInfo:
    """What was loaded and how, for ``--verbose``."""

    path: Path
    model_type: str
    representation: str
    reason: str
    num_parameters: int
    config: dict

    def describe(self) -> str:
        return (f"model: {self.path} ({self.model_type}, {self.num_parameters / 1e6:.1f}M parameters)\n"
                f"weights: {self.representation} ({self.reason})")


def get_model_classes(config: dict):
    """mlx-lm's hook: our classes for our model types (``mlx_elm.models.MODEL_TYPES``), mlx-lm's
    for everything else."""
    ours = model_classes(config.get("model_type"))
    return ours if ours is not None else _get_classes(config)


def resolve_model_path(ref: Optional[str]) -> Path:
    """A local folder for ``ref``: alias, existing folder, or Hub repo id (via the HF cache)."""
    ref = ref or DEFAULT_MODEL
    if ALIASES.get(ref.lower()) == "embedded":
        return embedded_model_path()
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{ref} is a file; --model takes a model folder, a Hub repo id, or an alias")
    if not looks_like_repo_id(ref):
        raise ModelLoadError(
            f"unknown model {ref!r}: not a local folder, a Hub repo id (owner/name), or an alias "
            f"({', '.join(sorted(ALIASES))})"
        )
    return download(ref, MODEL_FILES, what="the model")


def _has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def choose_representation(model: nn.Module, requested: str = "auto") -> Tuple[str, str]:
    """Dense float32 on the CPU backend (its quantized and 16-bit matmuls are slow), as stored elsewhere."""
    if requested not in REPRESENTATIONS:
        raise ModelLoadError(f"unknown representation {requested!r}; choose {', '.join(REPRESENTATIONS)}")
    if requested == "as-stored":
        return "as-stored", "requested"
    if requested == "float32":
        return "float32", "requested"
    if is_cpu_backend():
        return "float32", "CPU backend: dense float32 matmuls are faster than quantized or 16-bit ones"
    return "as-stored", "GPU backend: quantized / 16-bit weights are fastest and smallest"


def apply_representation(model: nn.Module, representation: str) -> None:
    if representation != "float32":
        return
    if _has_quantized(model):
        dequantize_model(model)
    model.set_dtype(mx.float32)


def load_model(
    path: Path, representation: str = "auto", lazy: bool = False
) -> Tuple[nn.Module, dict, LoadInfo]:
    """Build the model of a local folder and load its weights, with one-line errors."""
    path = Path(path)
    read_config(path)
    check_weights(path)
    try:
        model, config = mlx_lm_load_model(path, lazy=True, get_model_classes=get_model_classes)
    except ValueError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if "not supported" in first:
            raise ModelLoadError(f"{path}: {first}; upgrade mlx-lm or convert to a supported type") from e
        raise ModelLoadError(f"weights in {path} do not match its config.json: {first}; re-convert the model") from e
    except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"config.json in {path} is missing or has a bad field ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]}); re-convert the model") from e
    except MemoryError as e:
        raise ModelLoadError(f"config.json in {path} describes a model too large for this machine's memory; "
                             "check its sizes or re-convert the model") from e
    rep, reason = choose_representation(model, representation)
    apply_representation(model, rep)
    if not lazy:
        mx.eval(model.parameters())
    info = LoadInfo(path, config.get("model_type", "?"), rep, reason, count_parameters(model), config)
    return model, config, info


def load_with_info(
    ref: Optional[str] = None,
    tokenizer: Optional[str] = None,
    representation: str = "auto",
    adapter_path: Optional[str] = None,
):
    """Like :func:`load`, also returning a :class:`LoadInfo`."""
    path = resolve_model_path(ref)
    model, config, info = load_model(path, representation)
    if adapter_path is not None:
        model = load_adapters(model, str(adapter_path))
        model.eval()
    tok = load_tokenizer(path, tokenizer, config)
    return model, tok, info


def load(ref: Optional[str] = None, tokenizer: Optional[str] = None, **kwargs):
    """Load ``(model, tokenizer)`` from a folder, Hub repo id, or alias (default: the embedded model).

    >>> model, tokenizer = mlx_elm.load()                      # SmolLM2-135M-Instruct, offline
    >>> model, tokenizer = mlx_elm.load("apple/OpenELM-270M-Instruct", tokenizer="tokenizer.model")
    """
    model, tok, _ = load_with_info(ref, tokenizer, **kwargs)
    return model, tok
