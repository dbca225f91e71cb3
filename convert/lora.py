"""corenet LoRA/DoRA adapters: merge into the base weights, or export in mlx-lm's adapter format.

corenet's training forward applies the embedding adapter to the *input* embedding only; its tied
head reads the base embedding. A merged tied matrix would silently change the head, so when an
embedding adapter is present we untie: ``lm_head.weight`` keeps the base rows and the embedding
gets the adapter. mlx-lm's ``LoRAEmbedding`` would apply the adapter to the head too, so exports
merge the embedding adapter the same way and export only the linear adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from convert.source import LoraAdapter, Source
from convert.tensors import LazyTensor, to_float32
from convert.untrusted import plain
from mlx_elm.errors import ConversionError
from mlx_elm.models.openelm import ModelArgs

EMB = "transformer.token_embeddings"


def _merge_linear(base: LazyTensor, ad: LoraAdapter, scale: float) -> LazyTensor:
    def fn(w: np.ndarray) -> np.ndarray:
        merged = to_float32(w) + scale * (to_float32(ad.b.load()) @ to_float32(ad.a.load()))
        if ad.magnitude is not None:
            norm = np.linalg.norm(merged, axis=1)
            merged = merged * (to_float32(ad.magnitude.load()) / norm)[:, None]
        return merged.astype(np.float32)

    return base.derive(base.shape, fn, dtype="float32")


def _merge_embedding(base: LazyTensor, ad: LoraAdapter, scale: float) -> LazyTensor:
    def fn(w: np.ndarray) -> np.ndarray:
        delta = to_float32(ad.a.load()).T @ to_float32(ad.b.load()).T
        return (to_float32(w) + scale * delta).astype(np.float32)

    return base.derive(base.shape, fn, dtype="float32")


def apply(source: Source, scale: float, merge: bool) -> Tuple[Dict[str, LazyTensor], ModelArgs, Optional[dict], List[str]]:
    """(tensors to write, their args, adapter export or None, notes)."""
    tensors, args, notes = dict(source.tensors), source.args, []
    if not source.lora:
        return tensors, args, None, notes
    dora = any(a.magnitude is not None for a in source.lora.values())
    if dora and not merge:
        raise ConversionError("DoRA adapters can only be merged (mlx-lm's DoRA layout differs); drop --no-merge-lora.")
    emb = source.lora.get(EMB)
    if emb is not None:
        if args.share_input_output_layers:
            tensors["lm_head.weight"] = tensors[f"{EMB}.weight"]
            args = dataclasses.replace(args, share_input_output_layers=False)
        tensors[f"{EMB}.weight"] = _merge_embedding(tensors[f"{EMB}.weight"], emb, scale)
        notes.append("embedding adapter merged into the input embedding only; the head keeps the base "
                     "embedding as an untied lm_head.weight, exactly as corenet's LoRA forward computes")
    linear = {m: a for m, a in source.lora.items() if a.kind == "linear"}
    if merge:
        for mod, ad in linear.items():
            tensors[f"{mod}.weight"] = _merge_linear(tensors[f"{mod}.weight"], ad, scale)
        notes.append(f"{len(linear)} {'DoRA' if dora else 'LoRA'} adapters merged with scale {scale:g} "
                     f"(rank {next(iter(source.lora.values())).rank})")
        return tensors, args, None, notes
    return tensors, args, export(linear, args, scale), notes


def export(linear: Dict[str, LoraAdapter], args: ModelArgs, scale: float) -> dict:
    """mlx-lm adapter files: lazily transposed weights plus adapter_config.json content."""
    weights: Dict[str, LazyTensor] = {}
    keys, layers, ranks = set(), set(), set()
    for mod, ad in linear.items():
        parts = mod.split(".")
        numbered = len(parts) > 3 and parts[2].isascii() and parts[2].isdigit()
        if parts[:2] != ["transformer", "layers"] or not numbered:
            raise ConversionError(f"LoRA adapter on {plain(mod)} cannot be expressed in mlx-lm's adapter format.")
        layers.add(int(parts[2]))
        keys.add(".".join(parts[3:]))
        ranks.add(ad.rank)
        weights[f"{mod}.lora_a"] = ad.a.derive(ad.a.shape[::-1], lambda x: to_float32(x).T.copy(), "float32")
        weights[f"{mod}.lora_b"] = ad.b.derive(ad.b.shape[::-1], lambda x: to_float32(x).T.copy(), "float32")
    if len(ranks) > 1:
        raise ConversionError(f"adapters have different ranks {sorted(ranks)}; mlx-lm needs one rank: use --merge-lora.")
    num_layers = args.num_transformer_layers - min(layers) if layers else 0
    config = {"fine_tune_type": "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": ranks.pop() if ranks else 0, "scale": scale, "dropout": 0.0,
                                  "keys": sorted(keys)}}
    return {"weights": weights, "config": config}
