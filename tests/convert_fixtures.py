"""Tiny random OpenELM checkpoints written with torch in every format the converter reads.

Each builder returns the path it wrote plus the float32 numpy weights (HF names) and adapters
the PyTorch reference needs, so tests compare against what was put in, not what was read back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

LINEARS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


def _divisible(v: float, divisor: int) -> int:
    """corenet's make_divisible (round to a multiple, never lose more than 10%), written out here."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@dataclass
class Geometry:
    """A checkpoint's shapes, computed here and never by ``mlx_elm`` or ``convert`` (so a bug in
    their layer-wise scaling cannot also shape the fixture). ``explicit`` fixtures write their
    per-layer lists into config.json (as the released HF configs do); the others write only the
    (start, end) multiplier pairs, so the converter has to derive the geometry itself."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    vocab_size: int
    num_query_heads: list
    num_kv_heads: list
    ffn_multipliers: list  # per layer
    ffn_dim_divisor: int = 256
    max_context_length: int = 256
    explicit: bool = False
    qkv_pair: tuple = (0.5, 1.0)
    ffn_pair: tuple = (0.5, 4.0)

    @property
    def ffn_dims(self) -> list:
        return [_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]


def tiny_args(num_transformer_layers: int = 4, model_dim: int = 256, head_dim: int = 32, vocab_size: int = 512,
              ffn_dim_divisor: int = 256, num_query_heads=None, num_kv_heads=None, ffn_multipliers=None,
              **ignored) -> Geometry:
    """corenet's layer-wise scaling (np.linspace pairs, NumPy two-decimal rounding, GQA groups of
    4) unless per-layer lists are given. Default: q heads [4, 8, 8, 8], kv [1, 2, 2, 2], FFN 256..1024."""
    n = num_transformer_layers
    explicit = num_query_heads is not None
    if num_query_heads is None:
        qkv = [round(v, 2) for v in np.linspace(0.5, 1.0, num=n, dtype=float)]
        num_query_heads = [_divisible(model_dim * m, head_dim * 4) // head_dim for m in qkv]
        num_kv_heads = [q // 4 for q in num_query_heads]
    if ffn_multipliers is None:
        ffn_multipliers = [float(round(v, 2)) for v in np.linspace(0.5, 4.0, num=n, dtype=float)]
    return Geometry(n, model_dim, head_dim, vocab_size, list(num_query_heads), list(num_kv_heads),
                    list(ffn_multipliers), ffn_dim_divisor, explicit=explicit)


def custom_args() -> Geometry:
    """An explicit per-layer HF config: first and last layers differ from the middle ones and from
    each other (no standard rule)."""
    return tiny_args(num_transformer_layers=3, num_query_heads=[8, 4, 2], num_kv_heads=[2, 4, 1],
                     ffn_multipliers=[3.0, 1.0, 2.0])


def shapes_of(g: Geometry, rows: Optional[int] = None) -> Dict[str, tuple]:
    """HF name -> shape, from the geometry alone."""
    d, hd = g.model_dim, g.head_dim
    out = {"transformer.token_embeddings.weight": (rows or g.vocab_size, d), "transformer.norm.weight": (d,)}
    for i, (q, kv, f) in enumerate(zip(g.num_query_heads, g.num_kv_heads, g.ffn_dims)):
        p = f"transformer.layers.{i}."
        out.update({p + "attn.qkv_proj.weight": ((q + 2 * kv) * hd, d), p + "attn.out_proj.weight": (d, q * hd),
                    p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,),
                    p + "ffn.proj_1.weight": (2 * f, d), p + "ffn.proj_2.weight": (d, f),
                    p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
    return out


def random_weights(args: Geometry, seed: int = 0, rows: Optional[int] = None) -> Dict[str, np.ndarray]:
    """HF-named float32 weights; norms perturbed around 1 so each one matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes_of(args, rows).items():
        if name.endswith("norm.weight"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0, 0.08, shape).astype(np.float32)
    return out


def hf_config(g: Geometry) -> dict:
    """config.json as the apple/OpenELM-* repos have it (torch_dtype bf16, HF field names); the
    per-layer lists only for explicit geometries."""
    cfg = {"model_type": "openelm", "architectures": ["OpenELMForCausalLM"], "head_dim": g.head_dim,
           "num_transformer_layers": g.num_transformer_layers, "model_dim": g.model_dim, "vocab_size": g.vocab_size,
           "ffn_dim_divisor": g.ffn_dim_divisor, "num_gqa_groups": 4, "ffn_with_glu": True,
           "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 10000,
           "rope_max_length": 4096, "max_context_length": g.max_context_length, "bos_token_id": 1, "eos_token_id": 2,
           "qkv_multipliers": list(g.qkv_pair), "ffn_multipliers": list(g.ffn_pair), "torch_dtype": "bfloat16",
           "transformers_version": "4.39.3", "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig"},
           "activation_fn_name": "swish", "normalization_layer_name": "rms_norm", "initializer_range": 0.02,
           "use_cache": True}
    if g.explicit:
        cfg.update(num_query_heads=g.num_query_heads, num_kv_heads=g.num_kv_heads, ffn_multipliers=g.ffn_multipliers)
    return cfg


def _torch(weights: Dict[str, np.ndarray], dtype=None, transpose: tuple = ()):
    """numpy -> torch; names in ``transpose`` are stored as non-contiguous transposed views."""
    import torch

    out = {}
    for k, v in weights.items():
        if k in transpose:
            t = torch.from_numpy(np.ascontiguousarray(v.T)).t()
            assert not t.is_contiguous()
        else:
            t = torch.from_numpy(v.copy())
        out[k] = t.to(dtype) if dtype is not None else t
    return out


def write_hf_safetensors(folder: Path, args: Geometry, weights: Dict[str, np.ndarray], dtype=None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    save_file(_torch(weights, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_hf_bin(folder: Path, args: Geometry, weights: Dict[str, np.ndarray], shards: int = 1) -> Path:
    """``pytorch_model.bin`` (or several shards with an index), written by torch.save."""
    import torch

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    tensors = _torch(weights)
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: tensors[k] for k in names[i::shards]}
        torch.save(part, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def corenet_names(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k.removeprefix("transformer."): v for k, v in weights.items()}


def write_corenet_pt(path: Path, weights: Dict[str, np.ndarray], dtype=None, transpose: tuple = (),
                     training: bool = False) -> Path:
    """corenet flat state_dict (no prefix); ``training`` wraps it like a training checkpoint."""
    import collections

    import torch

    sd = collections.OrderedDict(_torch(corenet_names(weights), dtype, transpose))
    obj = sd
    if training:
        opt = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
               "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]}
        obj = {"iterations": 100, "epoch": 0, "model_state_dict": sd, "optim_state_dict": opt,
               "best_metric": np.float64(2.5), "scheduler": None}
    torch.save(obj, path)
    return path


@dataclass
class LoraFixture:
    path: Path
    base: Dict[str, np.ndarray]          # HF names, base weights (padding rows already removed)
    lora: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)  # HF module -> a/b/(magnitude)
    rank: int = 8


def write_corenet_lora(path: Path, args: Geometry, seed: int = 1, rank: int = 8, embedding: bool = True,
                       dora: bool = False, pad_rows: int = 0) -> LoraFixture:
    """corenet PEFT checkpoint: ``*.base_layer.weight`` plus ``lora_A/B.lora.weight`` (and embedding A/B)."""
    import torch

    rng = np.random.default_rng(seed)
    base = random_weights(args, seed, rows=args.vocab_size + pad_rows)
    sd, lora = {}, {}
    targets = [f"transformer.layers.{i}.{m}" for i in range(args.num_transformer_layers) for m in LINEARS]
    for name, w in base.items():
        mod = name.removesuffix(".weight")
        cname = mod.removeprefix("transformer.")
        if mod in targets:
            a = rng.normal(0, 0.05, (rank, w.shape[1])).astype(np.float32)
            b = rng.normal(0, 0.05, (w.shape[0], rank)).astype(np.float32)
            sd[f"{cname}.base_layer.weight"] = w
            sd[f"{cname}.lora_A.lora.weight"], sd[f"{cname}.lora_B.lora.weight"] = a, b
            lora[mod] = {"a": a, "b": b}
            if dora:
                m = (np.linalg.norm(w, axis=1) * rng.uniform(0.8, 1.2, w.shape[0])).astype(np.float32)
                sd[f"{cname}.lora_magnitude_vector.lora"] = m
                lora[mod]["magnitude"] = m
        elif mod == "transformer.token_embeddings" and embedding:
            a = rng.normal(0, 0.05, (rank, w.shape[0])).astype(np.float32)
            b = rng.normal(0, 0.05, (w.shape[1], rank)).astype(np.float32)
            sd[f"{cname}.base_layer.weight"] = w
            sd[f"{cname}.lora_embedding_A.lora"], sd[f"{cname}.lora_embedding_B.lora"] = a, b
            lora[mod] = {"a": a[:, : args.vocab_size], "b": b}
        else:
            sd[name.removeprefix("transformer.")] = w
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, path)
    base["transformer.token_embeddings.weight"] = base["transformer.token_embeddings.weight"][: args.vocab_size]
    return LoraFixture(path, base, lora, rank)


def bf16_round(weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The values a bfloat16 checkpoint really holds (round to nearest even, as torch does)."""
    import torch

    return {k: torch.from_numpy(v.copy()).to(torch.bfloat16).float().numpy() for k, v in weights.items()}


def reference_logits(args: Geometry, weights: Dict[str, np.ndarray], tokens: np.ndarray,
                     lora: Optional[dict] = None, scale: float = 1.0) -> np.ndarray:
    """The PyTorch reference, which reads its geometry from the weight shapes."""
    from convert.torch_reference import TorchOpenELM

    return TorchOpenELM(weights, args.head_dim, lora=lora, lora_scale=scale)(tokens)[..., : args.vocab_size]


def mlx_elm_logits(folder: Path, tokens: np.ndarray, adapters: Optional[Path] = None) -> np.ndarray:
    """Logits of a converted folder through mlx_elm's loader (weights as stored)."""
    from convert.verify import mlx_logits

    return mlx_logits(folder, tokens, adapters)


def mlx_lm_logits(folder: Path, tokens: np.ndarray, adapters: Optional[Path] = None) -> np.ndarray:
    """Logits through plain mlx-lm (its own openelm model class)."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    if adapters is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, str(adapters))
    model.eval()
    return np.array(model(mx.array(tokens)).astype(mx.float32))


TOKENS = np.array([[1, 5, 77, 300, 2, 511, 64, 9, 128, 33, 400, 17]], dtype=np.int64)
