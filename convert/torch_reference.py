"""An independent PyTorch OpenELM forward (corenet semantics), the oracle for --verify and tests.

Written from the architecture description, not from our MLX model: explicit RMSNorm in fp32,
rotate-half RoPE, GQA by repeat_interleave, causal SDPA, tied head. Its per-layer geometry comes
from the weight shapes alone (heads from ``out_proj`` and ``qkv_proj``, q/k-norm and an untied head
from their presence), never from ``mlx_elm``'s layer-wise scaling, so a bug there cannot hide in
the check. LoRA/DoRA adapters are applied unmerged, as corenet's training forward does (the tied
head reads the *base* embedding), so a merged conversion is checked against what the adapter
actually computed. torch is imported lazily.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from convert.source import LoraAdapter, Source
from convert.tensors import to_float32


def _rms_norm(torch, x, w, eps: float = 1e-6):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def _rope(torch, x, base: float):
    # x: [B, H, S, D]; rotate-half over the full head_dim
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class TorchOpenELM:
    """Float32 (or float64) reference forward over a dict of HF-named weights."""

    def __init__(self, weights: Mapping[str, np.ndarray], head_dim: int, rope_base: float = 10000.0,
                 eps: float = 1e-6, lora: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
                 lora_scale: float = 1.0, dtype: str = "float32") -> None:
        import torch

        self.torch, self.head_dim, self.rope_base, self.eps = torch, head_dim, rope_base, eps
        self.dtype = getattr(torch, dtype)
        self.w = {k: torch.from_numpy(np.array(to_float32(v))).to(self.dtype) for k, v in weights.items()}
        self.lora = {m: {k: torch.from_numpy(np.array(to_float32(v))).to(self.dtype) for k, v in p.items()}
                     for m, p in (lora or {}).items()}
        self.scale = lora_scale

    def _linear(self, name: str, x):
        torch = self.torch
        w = self.w[name + ".weight"]
        ad = self.lora.get(name)
        if ad is None:
            return x @ w.T
        if "magnitude" in ad:  # DoRA: magnitude * (W + s BA) / ||W + s BA||_row
            merged = w + self.scale * ad["b"] @ ad["a"]
            norm = torch.linalg.norm(merged, dim=1).detach()
            return (x @ merged.T) * (ad["magnitude"] / norm)
        return x @ w.T + self.scale * ((x @ ad["a"].T) @ ad["b"].T)

    def folded_weights(self) -> Dict[str, "object"]:
        """Weights with the adapters folded in (torch math), head kept at the base embedding."""
        torch, w = self.torch, dict(self.w)
        for mod, ad in self.lora.items():
            if mod == "transformer.token_embeddings":
                w.setdefault("lm_head.weight", w[mod + ".weight"])
                w[mod + ".weight"] = w[mod + ".weight"] + self.scale * ad["a"].T @ ad["b"].T
                continue
            merged = w[mod + ".weight"] + self.scale * ad["b"] @ ad["a"]
            if "magnitude" in ad:
                merged = merged * (ad["magnitude"] / torch.linalg.norm(merged, dim=1))[:, None]
            w[mod + ".weight"] = merged
        return w

    @property
    def vocab_rows(self) -> int:
        return self.w["transformer.token_embeddings.weight"].shape[0]

    def layer_heads(self):
        """(query heads, KV heads) of each layer, read off the projection shapes."""
        i, hd = 0, self.head_dim
        while f"transformer.layers.{i}.attn.qkv_proj.weight" in self.w:
            p = f"transformer.layers.{i}.attn."
            nq = self.w[p + "out_proj.weight"].shape[1] // hd
            yield nq, (self.w[p + "qkv_proj.weight"].shape[0] // hd - nq) // 2
            i += 1

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] for integer tokens [B, S]."""
        torch, eps = self.torch, self.eps
        with torch.no_grad():
            ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            emb = self.w["transformer.token_embeddings.weight"]
            x = emb[ids]
            ead = self.lora.get("transformer.token_embeddings")
            if ead is not None:
                x = x + self.scale * (ead["a"].T[ids] @ ead["b"].T)
            B, S = ids.shape
            hd = self.head_dim
            for i, (nq, nkv) in enumerate(self.layer_heads()):
                p = f"transformer.layers.{i}."
                h = _rms_norm(torch, x, self.w[p + "attn_norm.weight"], eps)
                qkv = self._linear(p + "attn.qkv_proj", h).view(B, S, nq + 2 * nkv, hd).transpose(1, 2)
                q, k, v = qkv.split([nq, nkv, nkv], dim=1)
                if p + "attn.q_norm.weight" in self.w:
                    q = _rms_norm(torch, q, self.w[p + "attn.q_norm.weight"], eps)
                    k = _rms_norm(torch, k, self.w[p + "attn.k_norm.weight"], eps)
                q, k = _rope(torch, q, self.rope_base), _rope(torch, k, self.rope_base)
                k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5)
                x = x + self._linear(p + "attn.out_proj", o.transpose(1, 2).reshape(B, S, nq * hd))
                h = _rms_norm(torch, x, self.w[p + "ffn_norm.weight"], eps)
                g, u = self._linear(p + "ffn.proj_1", h).chunk(2, dim=-1)
                x = x + self._linear(p + "ffn.proj_2", torch.nn.functional.silu(g) * u)
            x = _rms_norm(torch, x, self.w["transformer.norm.weight"], eps)
            head = self.w.get("lm_head.weight", emb)  # corenet: tied head = base embedding (LoRA not applied)
            return (x @ head.T).float().numpy()


def from_source(source: Source, lora_scale: float = 1.0) -> TorchOpenELM:
    """The reference model of a Source, adapters left unmerged."""
    weights = {k: t.load() for k, t in source.tensors.items()}
    lora = {m: _adapter_arrays(ad) for m, ad in source.lora.items()}
    a = source.args
    return TorchOpenELM(weights, a.head_dim, a.rope_freq_constant, a.rms_norm_eps, lora, lora_scale)


def _adapter_arrays(ad: LoraAdapter) -> Dict[str, np.ndarray]:
    out = {"a": ad.a.load(), "b": ad.b.load()}
    if ad.magnitude is not None:
        out["magnitude"] = ad.magnitude.load()
    return out
