"""``mlx-elm fuse``: fold trained adapters into the base weights and write a normal model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model

from mlx_elm.adapters import ADAPTER_TYPES, INPUT_ONLY_TYPES, load_adapters
from mlx_elm.errors import TrainingError
from mlx_elm.loading import load_model, resolve_model_path
from mlx_elm.model_folder import write_model_folder

TIE_FLAGS = ("share_input_output_layers", "tie_word_embeddings")  # OpenELM, mlx-lm models


def _head_from_embedding(emb: nn.Module) -> nn.Module:
    """An output head holding exactly the rows of ``emb`` (quantized stays quantized)."""
    rows, cols = emb.weight.shape
    if isinstance(emb, nn.QuantizedEmbedding):
        head = nn.QuantizedLinear(cols * 32 // emb.bits, rows, bias=False, group_size=emb.group_size, bits=emb.bits)
        head.update({"weight": emb.weight, "scales": emb.scales, "biases": emb.biases})
        return head
    head = nn.Linear(cols, rows, bias=False)
    head.weight = emb.weight
    return head


def untie_head(model: nn.Module, base_embedding: nn.Module) -> Optional[str]:
    """Give a tied model its own ``lm_head`` with the base rows; returns the config flag cleared."""
    args = getattr(model, "args", None)
    for flag in TIE_FLAGS:
        if getattr(args, flag, False):
            model.lm_head = _head_from_embedding(base_embedding)
            setattr(args, flag, False)
            return flag
    return None


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every adapter module by its fused base module; returns how many were fused.

    An input-only embedding adapter (corenet's semantics) on a tied model unties it first, so the
    fused head still reads the base embedding, as ``convert/lora.py`` writes corenet checkpoints.
    """
    for _, m in model.named_modules():
        if isinstance(m, INPUT_ONLY_TYPES):
            untie_head(model, m.embedding)
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
    base = resolve_model_path(model_ref)
    model, config, _ = load_model(base, representation="as-stored")
    load_adapters(model, adapter_path)
    n = fuse_adapters(model, dequantize=dequantize or quantize_bits is not None)
    config = dict(config)
    for flag in TIE_FLAGS:  # untied by an input-only embedding adapter
        if flag in config and getattr(model.args, flag, config[flag]) != config[flag]:
            config[flag] = False
            log("the embedding adapter changes the inputs only, so the fused model gets its own lm_head "
                "holding the base embedding (untied)")
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
    write_model_folder(out_dir, model, config, tokenizer_from=base, tokenizer=tokenizer)
    log(f"fused {n} adapters into {out_dir}")
    return out_dir
