"""Model folders: ``config.json`` + ``model*.safetensors`` + tokenizer files, read and written here.

The one place that knows the folder layout mlx-lm also reads, so a folder written by fuse,
pre-training, a benchmark or a test fixture is the same folder. Writes go through mlx-lm's
``save_model`` / ``save_config`` (sharding, index, sorted config) inside an atomic folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters, save_config, save_model

from mlx_elm.atomic import atomic_file, atomic_folder
from mlx_elm.errors import MlxElmError, ModelLoadError
from mlx_elm.models.openelm import Model, ModelArgs, preset
from mlx_elm.tokenizers import TOKENIZER_FILES, install_tokenizer

CONFIG_FILE = "config.json"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def read_config(path: Union[str, Path]) -> dict:
    """The folder's ``config.json`` as a dict, or a one-line error saying what is wrong."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a model folder? (convert checkpoints with `mlx-elm convert`)")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-convert it") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg} ({type(e).__name__}); fix its permissions or re-convert it") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg} holds a JSON {type(config).__name__}, not an object; re-convert the model")
    return config


def check_weights(path: Union[str, Path]) -> None:
    """Fail in one line when the folder has no MLX weights (and say how to get them)."""
    path = Path(path)
    if list(path.glob("model*.safetensors")):
        return
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ModelLoadError(f"{path} holds PyTorch weights only; convert them first: mlx-elm convert {path} OUT_DIR")
    raise ModelLoadError(f"no model*.safetensors weights in {path}; re-download or re-convert the model")


def copy_tokenizer_files(src: Union[str, Path], dst: Union[str, Path]) -> list:
    """Copy whichever tokenizer files ``src`` has into ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_model_folder(
    out_dir: Union[str, Path],
    model: nn.Module,
    config: dict,
    tokenizer_from: Optional[Union[str, Path]] = None,
    tokenizer: Optional[str] = None,
    replace: bool = True,
    check: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write ``model`` and ``config`` as a model folder, atomically.

    ``tokenizer_from`` is a folder whose tokenizer files are copied; ``tokenizer`` a tokenizer
    reference (``.model`` file, folder, repo id) installed instead. ``check(folder)`` runs on the
    complete folder before it is moved into place (e.g. a converter's ``--verify``); if it raises,
    nothing is written.
    """
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, replace=replace) as tmp:
        save_model(tmp, model)
        save_config(dict(config), tmp / CONFIG_FILE)
        if tokenizer is not None:
            install_tokenizer(tokenizer, tmp)
        elif tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        if check is not None:
            check(tmp)
    return out_dir


def update_model_files(out_dir: Union[str, Path], model: nn.Module, config: dict) -> None:
    """Rewrite ``model.safetensors`` and ``config.json`` of a folder that also holds other things
    (checkpoints, tokenizer), each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "model.safetensors") as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    with atomic_file(out_dir / CONFIG_FILE) as tmp:
        save_config(dict(config), tmp)


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` with quantized weights counted at their unpacked size (mlx-lm's)."""
    return int(get_total_parameters(model))


def random_model_args(preset_or_args):
    """OpenELM ``ModelArgs`` from a preset name (e.g. ``OpenELM-270M``) or passed through."""
    if isinstance(preset_or_args, ModelArgs):
        return preset_or_args
    try:
        return preset(preset_or_args)
    except ValueError as e:
        raise MlxElmError(str(e)) from e


def write_random_model(preset_or_args, dtype: str, folder: Union[str, Path], seed: int = 0,
                       tokenizer: Optional[str] = None) -> Path:
    """A model folder with random OpenELM weights (for speed and plumbing, not quality)."""
    if dtype not in DTYPES:
        raise MlxElmError(f"unknown --dtype {dtype!r}; choose {', '.join(DTYPES)}")
    args = random_model_args(preset_or_args)
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return write_model_folder(folder, model, args.to_dict(), tokenizer=tokenizer)
