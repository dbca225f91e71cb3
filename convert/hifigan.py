"""HiFi-GAN generator checkpoints (the public PyTorch layout, ``g_XXXXXXXX`` + ``config.json``) ->
an MLX vocoder folder that ``mlx_elm.speech.hifigan.Generator`` loads.

The checkpoint is read with the safe pickle reader (nothing in it is executed). Weight norm is
folded: ``w = g * v / ||v||`` with the norm over every axis but the first (torch's ``dim=0``),
from either the old ``weight_g``/``weight_v`` names or the ``parametrizations.weight.original0/1``
names of newer torch. Conv weights go from torch's (out, in, k) to MLX's (out, k, in), transposed
convolutions from (in, out, k) to (out, k, in).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from convert.safe_pickle import load_checkpoint
from convert.tensors import LazyTensor, to_float32
from mlx_elm.errors import ConversionError
from mlx_elm.speech import files
from mlx_elm.speech.hifigan import Generator, HiFiGANArgs


def _state_dict(obj) -> Dict[str, np.ndarray]:
    if isinstance(obj, dict) and "generator" in obj:
        obj = obj["generator"]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError("the checkpoint holds no HiFi-GAN generator state dict ('generator' key); "
                              "pass a g_XXXXXXXX generator checkpoint, not a discriminator one")
    out = {}
    for k, v in obj.items():
        if isinstance(v, LazyTensor):
            out[str(k)] = to_float32(v.load())
    if not out:
        raise ConversionError("the checkpoint holds no HiFi-GAN generator tensors; pass a g_XXXXXXXX "
                              "generator checkpoint, not a discriminator one")
    return out


def fold_weight_norm(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Replace (g, v) pairs by ``g * v / ||v||``; plain weights pass through."""
    out, used = {}, set()
    for k, v in sd.items():
        for g_name, v_name in ((".weight_g", ".weight_v"), (".parametrizations.weight.original0",
                                                              ".parametrizations.weight.original1")):
            if k.endswith(v_name):
                base = k[: -len(v_name)]
                g = sd.get(base + g_name)
                if g is None:
                    raise ConversionError(f"{k} has no matching {base + g_name}; the checkpoint is incomplete")
                norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=tuple(range(1, v.ndim)), keepdims=True))
                out[base + ".weight"] = (g * v / np.maximum(norm, 1e-12)).astype(np.float32)
                used.update({k, base + g_name})
    for k, v in sd.items():
        if k not in used and not k.endswith((".weight_g", ".parametrizations.weight.original0")):
            out[k] = v
    return out


def to_mlx(sd: Dict[str, np.ndarray]) -> Dict[str, mx.array]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 3:
            v = v.transpose(1, 2, 0) if k.startswith("ups.") else v.transpose(0, 2, 1)
        out[k] = mx.array(np.ascontiguousarray(v))
    return out


def convert_hifigan(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """Convert a generator checkpoint with its ``config.json`` into an MLX folder."""
    checkpoint, config = Path(checkpoint), Path(config)
    if not config.is_file():
        raise ConversionError(f"{config} does not exist; pass the config.json that came with the checkpoint")
    try:
        h = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config} is not valid JSON ({e.msg}); pass HiFi-GAN's config.json") from None
    args = HiFiGANArgs.from_dict(h)
    weights = to_mlx(fold_weight_norm(_state_dict(load_checkpoint(checkpoint))))
    model = Generator(args)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ConversionError(f"{checkpoint.name} does not match its config (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); use the config.json of this checkpoint")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise ConversionError(f"{k}: checkpoint shape {tuple(weights[k].shape)} but config implies "
                                  f"{tuple(v.shape)}; use the config.json of this checkpoint")
    model.load_weights(list(weights.items()))
    return files.save(out, model, asdict(args))
