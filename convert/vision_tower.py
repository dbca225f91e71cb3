"""Convert a CLIP or SigLIP vision tower (Hugging Face layout) into an mlx-elm frame-encoder folder.

Sources: a folder with ``config.json`` (``CLIPVisionModel``, ``CLIPModel``, ``SiglipVisionModel``
or ``SiglipModel``) and ``model.safetensors`` or ``pytorch_model.bin``; or one weights file plus
``--config``. Tensors are read by the safe readers (nothing in a pickle is executed) and only the
vision tower is kept (text tower, projections and SigLIP's pooling head are dropped). The patch
convolution ``[D, 3, p, p]`` becomes the linear map on ``(kh, kw, c)``-flattened patches that
``mlx_elm.video.vit`` uses; every other tensor maps one to one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from convert.safe_pickle import load_checkpoint
from convert.safetensors_reader import read_safetensors
from convert.tensors import LazyTensor, to_float32
from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import ConversionError, VideoError
from mlx_elm.video.vit import ViTConfig, VisionTransformer, save_encoder

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ACTS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
PREFIXES = ("vision_tower.vision_model.", "model.vision_model.", "vision_model.")  # older files nest the tower
TOWER_MODULES = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")


def _vision_config(config: dict) -> Tuple[str, dict]:
    mt = str(config.get("model_type", ""))
    vc = config.get("vision_config", config)
    kind = "siglip" if "siglip" in mt or "siglip" in str(vc.get("model_type", "")) else (
        "clip" if "clip" in mt or "clip" in str(vc.get("model_type", "")) else "")
    if not kind:
        raise ConversionError(f"config model_type {mt!r} is neither CLIP nor SigLIP; pass a CLIP/SigLIP vision config")
    return kind, vc


def encoder_config(config: dict, pool_grid: int = 4, preprocessor: Optional[dict] = None):
    """Our ``ViTConfig`` for a Hugging Face CLIP/SigLIP (vision) config."""
    kind, vc = _vision_config(config)
    act = vc.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    if act not in ACTS:
        raise ConversionError(f"hidden_act {act!r} is not supported; expected one of {', '.join(ACTS)}")
    mean = (preprocessor or {}).get("image_mean") or (CLIP_MEAN if kind == "clip" else [0.5, 0.5, 0.5])
    std = (preprocessor or {}).get("image_std") or (CLIP_STD if kind == "clip" else [0.5, 0.5, 0.5])
    try:
        cfg = ViTConfig(
            image_size=int(vc.get("image_size", 224)), patch_size=int(vc.get("patch_size", 16 if kind == "siglip" else 32)),
            hidden_size=int(vc["hidden_size"]), num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]), intermediate_size=int(vc["intermediate_size"]),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)), hidden_act=ACTS[act],
            class_token=kind == "clip", pre_layernorm=kind == "clip", post_layernorm=kind == "siglip",
            patch_bias=kind == "siglip", image_mean=[float(v) for v in mean], image_std=[float(v) for v in std],
            pool_grid=pool_grid, kind=kind)
    except KeyError as e:
        raise ConversionError(f"the vision config lacks {e}; pass the tower's full config.json") from None
    return cfg.validate()


def _read_tensors(path: Path) -> Dict[str, LazyTensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = load_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path.name} does not hold a state dict; save the model's state_dict()")
    return {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    if list(folder.glob("model-*.safetensors")) or list(folder.glob("pytorch_model-*.bin")):
        raise ConversionError(f"{folder} holds sharded weights; vision towers are small, save them unsharded")
    raise ConversionError(f"{folder} has no model.safetensors or pytorch_model.bin")


def map_weights(tensors: Dict[str, LazyTensor], cfg) -> Dict[str, np.ndarray]:
    """Hugging Face names -> ours, float32 numpy; fails on a missing or misshapen tensor."""
    out: Dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        for p in PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        if name.split(".", 1)[0] not in TOWER_MODULES or name.endswith("position_ids"):
            continue  # text tower, projections, SigLIP's pooling head, buffers
        if name.startswith("post_layernorm") and not cfg.post_layernorm:
            continue  # CLIP normalises only its pooled class token, which frame features do not use
        a = to_float32(t.load())
        if name == "embeddings.patch_embedding.weight":
            a = a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1)
        elif name == "embeddings.position_embedding.weight":
            name = "embeddings.position_embedding"
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def convert_vision_tower(source, out, config: Optional[Path] = None, pool_grid: int = 4) -> str:
    """Write ``out`` (encoder.json + encoder.safetensors); returns a one-line summary."""
    source = Path(source)
    if source.is_dir():
        config = config or source / "config.json"
        weights = _weights_file(source)
        pre = source / "preprocessor_config.json"
    elif source.is_file():
        if config is None:
            raise ConversionError(f"{source} is a single file; pass --config with the tower's config.json")
        weights, pre = source, Path(config).parent / "preprocessor_config.json"
    else:
        raise ConversionError(f"{source} does not exist; pass a CLIP/SigLIP folder or weights file")
    try:
        cfg_dict = json.loads(Path(config).read_text())
        pre_dict = json.loads(pre.read_text()) if pre.exists() else None
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {config} ({type(e).__name__}); pass a valid config.json") from None
    try:
        cfg = encoder_config(cfg_dict, pool_grid, pre_dict)
    except VideoError as e:
        raise ConversionError(str(e)) from None
    cfg.source = str(source)
    arrays = map_weights(_read_tensors(weights), cfg)
    model = VisionTransformer(cfg)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ConversionError(f"{weights.name}: vision-tower tensors do not match the config "
                              f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]}); is it a {cfg.kind} tower?")
    for k, shape in expected.items():
        if tuple(arrays[k].shape) != tuple(shape):
            raise ConversionError(f"{weights.name}: {k} has shape {arrays[k].shape}, the config implies {tuple(shape)}")
    model.load_weights([(k, mx.array(v)) for k, v in arrays.items()], strict=True)
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_encoder(tmp, model, dtype=mx.float32)
    n = sum(v.size for v in arrays.values())
    return (f"converted {cfg.kind} vision tower: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.image_size} px / "
            f"{cfg.patch_size} px patches, {n / 1e6:.1f}M parameters, {cfg.tokens_per_frame} pooled tokens per frame -> {out}")
