"""``mlx-elm fuse``: fold trained adapters into the base weights and write a normal model folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import TrainingError
from mlx_elm.train.lora import ADAPTER_TYPES


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every adapter module by its fused base module; returns how many were fused."""
    fused = [(p, m.fuse(dequantize=dequantize)) for p, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def fuse_to_folder(
    model_ref: Optional[str],
    adapter_path,
    out_dir,
    dequantize: bool = False,
    quantize_bits: Optional[int] = None,
    group_size: int = 64,
    tokenizer: Optional[str] = None,
    log=print,
) -> Path:
    """Base + adapters → ``out_dir`` (config.json, model.safetensors, tokenizer files), atomically.

    The base is loaded as stored (quantized stays quantized unless ``dequantize``);
    ``quantize_bits`` re-quantizes the fused model.
    """
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlx_elm.loading import load_model, resolve_model_path
    from mlx_elm.tokenizers import TOKENIZER_FILES, install_tokenizer
    from mlx_elm.train.lora import load_adapters

    base = resolve_model_path(model_ref)
    model, config, _ = load_model(base, representation="as-stored")
    load_adapters(model, adapter_path)
    n = fuse_adapters(model, dequantize=dequantize or quantize_bits is not None)
    config = dict(config)
    if dequantize or quantize_bits is not None:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if quantize_bits is not None:
        nn.quantize(model, group_size=group_size, bits=quantize_bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
        config["quantization"] = {"group_size": group_size, "bits": quantize_bits}
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "config.json").exists() and any(out_dir.iterdir()):
        raise TrainingError(f"{out_dir} exists and is not a model folder; choose another output folder")
    with atomic_folder(out_dir) as tmp:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        if tokenizer is not None:
            install_tokenizer(tokenizer, tmp)
        else:
            for name in TOKENIZER_FILES:
                if (base / name).exists():
                    shutil.copyfile(base / name, tmp / name)
    log(f"fused {n} adapters into {out_dir}")
    return out_dir
