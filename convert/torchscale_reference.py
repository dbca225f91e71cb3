"""An independent PyTorch forward of a torchscale-style MH-MoE / SMoE decoder, the oracle for
``mlx-elm convert --format torchscale-moe --verify`` and its tests.

Written from the official code's semantics (notes in docs/moe.md), over the checkpoint's own
tensor names, and importing nothing from mlx_elm: pre-norm RMSNorm blocks, multi-head causal
attention with separate q/k/v projections and rotary embeddings, SwiGLU ``fc2(fc1(x) *
silu(fc3(x)))`` FFNs, and in MoE blocks the gate (plain ``wg`` or X-MoE ``wg_reduction`` + unit
``wg``), float32 softmax, top-k (renormalised when k > 1), optional k-major capacity, experts
looped one by one, and, for MH-MoE, the head projection, split into h sub-tokens and merge
projection. torch is imported lazily.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import numpy as np


def _rms(torch, x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(torch, x, base: float, interleaved: bool):
    # x: [B, H, S, D]
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv).to(x.dtype)
    if interleaved:  # pairs (0, 1), (2, 3), ...
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rot = torch.stack([-x2, x1], -1).flatten(-2)
        return x * cos + rot * sin
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class TorchscaleMoEReference:
    """``hp``: heads, top_k, capacity_factor, norm_eps, rope_base, rope ("half" | "interleaved"),
    embed_scale. ``weights``: the checkpoint's tensors (names without a ``decoder.`` prefix)."""

    def __init__(self, weights: Mapping[str, np.ndarray], hp: Dict[str, object], dtype: str = "float64"):
        import torch

        self.torch, self.hp = torch, hp
        self.dtype = getattr(torch, dtype)
        self.w = {k: torch.from_numpy(np.array(v, dtype=np.float64)).to(self.dtype) for k, v in weights.items()}
        self.num_layers = 1 + max(int(k.split(".")[1]) for k in self.w if k.startswith("layers."))

    def _ffn(self, p: str, x):
        F = self.torch.nn.functional
        return (x @ self.w[p + "fc1.weight"].T * F.silu(x @ self.w[p + "fc3.weight"].T)) @ self.w[p + "fc2.weight"].T

    def _moe(self, p: str, x):
        """x: [T, d] -> [T, d] through one MoE layer (MH-MoE when the head projection exists)."""
        torch, w, hp = self.torch, self.w, self.hp
        T, d = x.shape
        mh = p + "head_proj.weight" in w
        if mh:
            x = x @ w[p + "head_proj.weight"].T + w[p + "head_proj.bias"]
        if p + "gate.wg.weight" in w:
            sub_dim = w[p + "gate.wg.weight"].shape[1]
        else:
            sub_dim = w[p + "gate.wg_reduction.weight"].shape[1]
        h = d // sub_dim
        s = x.reshape(T * h, sub_dim)
        if p + "gate.wg.weight" in w:
            logits = s @ w[p + "gate.wg.weight"].T
        else:
            wg = w[p + "gate.wg"]
            wg = wg / wg.norm(dim=1, keepdim=True).clamp_min(1e-4)
            logits = (s @ w[p + "gate.wg_reduction.weight"].T) @ wg.T
        probs = torch.softmax(logits.to(torch.float64), -1).to(s.dtype)
        k = int(hp["top_k"])
        g, e = probs.topk(k, dim=-1)
        if k > 1:
            g = g / g.sum(-1, keepdim=True)
        S, E = probs.shape
        keep = torch.ones_like(g)
        cf = float(hp.get("capacity_factor", 0.0))
        if cf > 0:
            cap = k * math.ceil(cf * S / E)
            used = [0] * E
            for j in range(k):
                for r in range(S):
                    ex = int(e[r, j])
                    if used[ex] < cap:
                        used[ex] += 1
                    else:
                        keep[r, j] = 0
        out = torch.zeros_like(s)
        for ex in range(E):
            rows, slot = (e == ex).nonzero(as_tuple=True)
            if rows.numel():
                y = self._ffn(p + f"experts.{ex}.", s[rows])
                out.index_add_(0, rows, y * (g[rows, slot] * keep[rows, slot])[:, None])
        out = out.reshape(T, d)
        if mh:
            out = out @ w[p + "merge_proj.weight"].T + w[p + "merge_proj.bias"]
        return out

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        torch, w, hp = self.torch, self.w, self.hp
        eps = float(hp.get("norm_eps", 1e-5))
        with torch.no_grad():
            ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            B, S = ids.shape
            x = w["embed_tokens.weight"][ids] * float(hp.get("embed_scale", 1.0))
            heads = int(hp["heads"])
            mask = torch.full((S, S), float("-inf"), dtype=self.dtype).triu(1)
            for i in range(self.num_layers):
                p = f"layers.{i}."
                hx = _rms(torch, x, w[p + "self_attn_layer_norm.weight"], eps)
                d = hx.shape[-1]
                hd = d // heads
                q, k, v = [(hx @ w[p + f"self_attn.{n}_proj.weight"].T).view(B, S, heads, hd).transpose(1, 2)
                           for n in ("q", "k", "v")]
                inter = hp.get("rope", "half") == "interleaved"
                q = _rope(torch, q, float(hp.get("rope_base", 10000.0)), inter)
                k = _rope(torch, k, float(hp.get("rope_base", 10000.0)), inter)
                att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
                x = x + att.transpose(1, 2).reshape(B, S, d) @ w[p + "self_attn.out_proj.weight"].T
                hx = _rms(torch, x, w[p + "final_layer_norm.weight"], eps)
                if p + "ffn.fc1.weight" in w:
                    x = x + self._ffn(p + "ffn.", hx)
                else:
                    x = x + self._moe(p + "moe_layer.", hx.reshape(B * S, d)).reshape(B, S, d)
            x = _rms(torch, x, w["layer_norm.weight"], eps)
            head = w.get("output_projection.weight", w["embed_tokens.weight"])
            return (x @ head.T).double().numpy()
