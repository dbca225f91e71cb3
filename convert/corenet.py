"""corenet checkpoints (flat ``.pt`` state_dicts, training checkpoints, LoRA/DoRA checkpoints).

corenet names have no ``transformer.`` prefix, pad the vocabulary to 32128 rows, may be wrapped in
``model_state_dict`` by the trainer, and PEFT checkpoints rename base weights to ``*.base_layer.*``
with peft-style ``lora_A``/``lora_B`` adapters. This module maps all of them to HF names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from convert import schema
from convert.safe_pickle import load_checkpoint
from convert.source import LoraAdapter, Source
from convert.tensors import LazyTensor
from convert.untrusted import file_name, plain, quote
from mlx_elm.errors import ConversionError

CORENET_PADDED_VOCAB, OPENELM_VOCAB = 32128, 32000
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
_LORA = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                   r"\.(?P<adapter>[^.]+)(?:\.weight)?$")


def unwrap(obj: Any, path: Path) -> tuple[Dict[str, LazyTensor], str]:
    """The model state_dict inside a checkpoint, and which kind of checkpoint it was."""
    kind = "corenet state_dict"
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                if any(isinstance(v, LazyTensor) for v in inner.values()):
                    obj, kind = inner, f"corenet training checkpoint ('{key}')"
                    break
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{file_name(path)} does not hold a state_dict (a dict of tensors); pass a model "
                              "checkpoint.")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, LazyTensor)]
    if bad:
        raise ConversionError(f"{file_name(path)}: entry {quote(bad[0])} is not a tensor; expected a flat state_dict "
                              "or a training checkpoint with 'model_state_dict'.")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, kind


def to_hf_name(name: str) -> str:
    if name.startswith(("transformer.", "lm_head.")):
        return name
    if name == "classifier.weight":
        return "lm_head.weight"
    return "transformer." + name


def split_lora(sd: Dict[str, LazyTensor]) -> tuple[Dict[str, LazyTensor], Dict[str, LoraAdapter]]:
    """Base tensors (``base_layer`` removed) and adapters keyed by HF module name."""
    base: Dict[str, LazyTensor] = {}
    parts: Dict[str, Dict[str, LazyTensor]] = {}
    adapters_seen = set()
    for name, t in sd.items():
        m = _LORA.match(name)
        if m:
            parts.setdefault(to_hf_name(m["mod"]), {})[m["part"]] = t
            adapters_seen.add(m["adapter"])
            continue
        base[to_hf_name(name.replace(".base_layer.", "."))] = t
    if len(adapters_seen) > 1:
        raise ConversionError(f"the checkpoint holds several LoRA adapters {quote(sorted(adapters_seen))}; "
                              "only single-adapter checkpoints are supported.")
    lora: Dict[str, LoraAdapter] = {}
    for mod, p in parts.items():
        if "lora_A" in p and "lora_B" in p:
            lora[mod] = LoraAdapter("linear", p["lora_A"], p["lora_B"], p.get("lora_magnitude_vector"))
        elif "lora_embedding_A" in p and "lora_embedding_B" in p:
            lora[mod] = LoraAdapter("embedding", p["lora_embedding_A"], p["lora_embedding_B"])
        else:
            raise ConversionError(f"LoRA adapter of {plain(mod)} is incomplete (has {sorted(p)}); the checkpoint is "
                                  "corrupt.")
        if f"{mod}.weight" not in base:
            raise ConversionError(f"LoRA adapter targets {plain(mod)}, which has no base weight in the checkpoint.")
        _check_lora_shapes(mod, lora[mod], base[f"{mod}.weight"].shape)
    return base, lora


def _check_lora_shapes(mod: str, ad: LoraAdapter, w: tuple) -> None:
    ok = len(ad.a.shape) == len(ad.b.shape) == len(w) == 2 and ad.a.shape[0] > 0
    if ok and ad.kind == "linear":
        r = ad.rank
        ok = ad.a.shape == (r, w[1]) and ad.b.shape == (w[0], r)
        ok = ok and (ad.magnitude is None or ad.magnitude.shape == (w[0],))
    elif ok:
        r = ad.rank
        ok = ad.a.shape == (r, w[0]) and ad.b.shape == (w[1], r)
    if not ok:
        raise ConversionError(f"LoRA adapter of {plain(mod)} has shapes A{ad.a.shape}/B{ad.b.shape} that do not fit "
                              f"the base weight {w} with a rank of at least 1; the checkpoint is corrupt.")


def read(path: Path, preset: Optional[str] = None, vocab_size: Optional[int] = None,
         keep_padding: bool = False, check_crc: bool = True) -> Source:
    """A corenet (or HF-named) ``.pt``/``.bin`` file as a Source; the vocabulary padding is trimmed."""
    sd, kind = unwrap(load_checkpoint(path, check_crc=check_crc), path)
    sd = {k: v for k, v in sd.items() if not schema.is_ignorable(k)}
    base, lora = split_lora(sd)
    if lora:
        dora = any(a.magnitude is not None for a in lora.values())
        kind = f"{kind} + {'DoRA' if dora else 'LoRA'} adapter"
    emb = base.get("transformer.token_embeddings.weight")
    if emb is None:
        raise ConversionError(f"{file_name(path)} has no token_embeddings.weight; it is not an OpenELM checkpoint.")
    if len(emb.shape) != 2:
        raise ConversionError(f"{file_name(path)}: token_embeddings.weight has shape {emb.shape}, not "
                              "[vocab, dim]; it is not an OpenELM checkpoint.")
    rows = emb.shape[0]
    notes = []
    if keep_padding:
        target = rows
    elif vocab_size:
        target = vocab_size
    else:
        target = OPENELM_VOCAB if rows == CORENET_PADDED_VOCAB else rows
    if target > rows:
        raise ConversionError(f"--vocab-size {target} exceeds the {rows} embedding rows of the checkpoint.")
    if target < rows:
        base, lora = trim_vocab(base, lora, target)
        notes.append(f"embedding trimmed from {rows} to {target} rows (corenet padding removed)")
    shapes = {k: v.shape for k, v in base.items()}
    args, geometry = schema.infer_args(shapes, vocab_size=target, preset_name=preset)
    return Source(base, args, kind, str(path), geometry=geometry, lora=lora, notes=notes)


def trim_vocab(base: Dict[str, LazyTensor], lora: Dict[str, LoraAdapter], n: int):
    """Keep the first ``n`` vocabulary rows of the embedding, the head and an embedding adapter."""
    base = dict(base)
    for key in ("transformer.token_embeddings.weight", "lm_head.weight"):
        if key in base:
            t = base[key]
            base[key] = t.derive((n,) + tuple(t.shape[1:]), lambda a: a[:n])
    lora = dict(lora)
    emb = lora.get("transformer.token_embeddings")
    if emb is not None:
        a = emb.a
        lora["transformer.token_embeddings"] = LoraAdapter("embedding", a.derive((a.shape[0], n), lambda x: x[:, :n]), emb.b)
    return base, lora
