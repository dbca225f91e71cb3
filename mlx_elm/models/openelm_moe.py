"""OpenELM-MoE: OpenELM whose FFN is a sparse MoE or an MH-MoE layer in every ``moe_every``-th block.

Attention (with OpenELM's layer-wise scaling), norms, embeddings and the dense FFNs of the other
blocks are ``mlx_elm.models.openelm``'s; block ``i`` is an MoE block when ``(i + 1) % moe_every ==
0`` (the MH-MoE code's ``moe_freq`` placement: blocks 2, 4, ...). The layers live in
``mlx_elm.models.moe``. ``model(tokens, cache)`` is mlx-lm's protocol; ``model(tokens,
return_aux=True)`` also returns each MoE layer's auxiliary losses and routing counts for training.

The presets at the bottom implement the two papers' sizing rules and report total / active
parameters and FLOPs per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from mlx_elm.models import openelm
from mlx_elm.models.moe import MHMoE, ROUTERS, SparseMoE

MOE_TYPES = ("smoe", "mhmoe")


@dataclass
class ModelArgs(openelm.ModelArgs):
    """OpenELM's fields plus the MoE layer's. ``moe_heads`` is MH-MoE's h (1 for SMoE)."""

    model_type: str = "openelm_moe"
    moe_type: str = "mhmoe"
    moe_every: int = 2
    num_experts: int = 8
    top_k: int = 1
    moe_heads: int = 1
    expert_ffn_dim: int = 344
    router: str = "linear"
    capacity_factor: float = 0.0  # 0: dropless; the official scripts train with 1.0
    normalize_top_k: Optional[bool] = None  # None: renormalise the k scores when k > 1
    mhmoe_head: bool = True
    mhmoe_merge: bool = True
    balance_loss_weight: float = 0.01  # read by the training loss, not by the model
    z_loss_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.moe_type in MOE_TYPES, f"moe_type {self.moe_type!r} must be one of {', '.join(MOE_TYPES)}"),
            (self.router in ROUTERS, f"router {self.router!r} must be one of {', '.join(ROUTERS)}"),
            (self.moe_every >= 1, f"moe_every must be >= 1 (got {self.moe_every})"),
            (1 <= self.top_k <= self.num_experts, f"top_k {self.top_k} must be in 1..num_experts {self.num_experts}"),
            (self.moe_heads >= 1 and self.model_dim % self.moe_heads == 0,
             f"model_dim {self.model_dim} must be divisible by moe_heads {self.moe_heads}"),
            (self.moe_type == "mhmoe" or self.moe_heads == 1, "an smoe layer has moe_heads 1; use moe_type mhmoe"),
            (self.expert_ffn_dim >= 1, f"expert_ffn_dim must be >= 1 (got {self.expert_ffn_dim})"),
            (self.capacity_factor >= 0, f"capacity_factor must be >= 0 (got {self.capacity_factor})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; fix config.json")

    @property
    def moe_layer_ids(self) -> List[int]:
        return [i for i in range(self.num_transformer_layers) if (i + 1) % self.moe_every == 0]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["architectures"] = ["OpenELMMoEForCausalLM"]
        for name in ("moe_type", "moe_every", "num_experts", "top_k", "moe_heads", "expert_ffn_dim", "router",
                     "capacity_factor", "normalize_top_k", "mhmoe_head", "mhmoe_merge", "balance_loss_weight",
                     "z_loss_weight"):
            d[name] = getattr(self, name)
        return d


def make_moe(args: ModelArgs) -> nn.Module:
    kw = dict(top_k=args.top_k, router=args.router, capacity_factor=args.capacity_factor,
              normalize_top_k=args.normalize_top_k)
    if args.moe_type == "smoe":
        return SparseMoE(args.model_dim, args.num_experts, args.expert_ffn_dim, **kw)
    return MHMoE(args.model_dim, args.moe_heads, args.num_experts, args.expert_ffn_dim,
                 head=args.mhmoe_head, merge=args.mhmoe_merge, **kw)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn = openelm.Attention(args, layer_id)
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        if layer_id in args.moe_layer_ids:
            self.moe = make_moe(args)
        else:
            self.ffn = openelm.FeedForward(args, layer_id)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, return_aux: bool = False):
        h = x + self.attn(self.attn_norm(x), mask, cache)
        n = self.ffn_norm(h)
        if "moe" not in self:
            out = h + self.ffn(n)
            return (out, None) if return_aux else out
        if return_aux:
            y, aux = self.moe(n, return_aux=True)
            return h + y, aux
        return h + self.moe(n)


class OpenELMMoEModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence[Any]] = None, return_aux: bool = False):
        h = self.token_embeddings(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        aux = []
        for layer, c in zip(self.layers, cache):
            if return_aux:
                h, a = layer(h, mask, c, return_aux=True)
                if a is not None:
                    aux.append(a)
            else:
                h = layer(h, mask, c)
        h = self.norm(h)
        return (h, aux) if return_aux else h


class Model(openelm.Model):
    """mlx-lm protocol; ``return_aux=True`` gives ``(logits, [aux of each MoE block])``."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMMoEModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence[Any]] = None, return_aux: bool = False):
        out = self.transformer(inputs, cache, return_aux=return_aux)
        h, aux = out if return_aux else (out, None)
        if self.args.share_input_output_layers:
            logits = self.transformer.token_embeddings.as_linear(h)
        else:
            logits = self.lm_head(h)
        return (logits, aux) if return_aux else logits

    @property
    def moe_layer_ids(self) -> List[int]:
        return self.args.moe_layer_ids

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """Keep routers in full precision (mlx-lm's quantize_model consults this)."""
        return ".router" not in path


# --- sizing rules and presets ----------------------------------------------------------------


def _round(x: float, multiple: int = 8) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def fine_grained_sizing(experts: int, top_k: int, ffn: int, granularity: int = 2) -> Dict[str, int]:
    """Each expert split into ``granularity`` narrower ones, k scaled alike (equal FLOPs and params)."""
    return dict(num_experts=experts * granularity, top_k=top_k * granularity, expert_ffn_dim=ffn // granularity)


def v2_sizing(dim: int, experts: int, top_k: int, ffn: int, heads: int, multiple: int = 8) -> Dict[str, int]:
    """MH-MoE sized to an SMoE's FLOPs and parameters (arXiv 2411.16205, Sec. 3), SwiGLU experts.

    k_m = h * k_s; FLOPs per token 4d^2 (head + merge) + 6 d k_m f_m = 6 d k_s f_s gives
    f_m = (k_s f_s - 2d/3) / k_m; parameters 2d^2 + E_m 3 (d/h) f_m = E_s 3 d f_s give E_m.
    Both are rounded to a multiple of 8, which reproduces the paper's 40 / 96 experts at d = 768.
    """
    k = heads * top_k
    f = _round((top_k * ffn - 2 * dim / 3) / k, multiple)
    e = _round((experts * 3 * dim * ffn - 2 * dim**2) / (3 * (dim / heads) * f), multiple)
    return dict(num_experts=e, top_k=k, expert_ffn_dim=f, moe_heads=heads)


def v1_sizing(dim: int, experts: int, top_k: int, ffn: int, heads: int, multiple: int = 8) -> Dict[str, int]:
    """MH-MoE of the first paper: same E and k, experts of input d/h and hidden ~ h * f * beta with
    beta = 1 - 2d / (3 E f) so that total parameters match; each token then costs ~h x the SMoE's
    expert FLOPs (the v2 paper's critique)."""
    f = _round(heads * ffn * (1 - 2 * dim / (3 * experts * ffn)), multiple)
    return dict(num_experts=experts, top_k=top_k, expert_ffn_dim=f, moe_heads=heads)


BASES = {
    # d 768 / 12 layers / MoE every 2nd layer / SMoE 8 experts of SwiGLU 2048, top-1 (the v2 table)
    "paper": dict(num_transformer_layers=12, model_dim=768, head_dim=64, ffn_multipliers=2048 / 768,
                  ffn_dim_divisor=256, qkv_multipliers=1.0, num_gqa_groups=1, vocab_size=32000, experts=8, ffn=2048),
    # the small-reproduction backbone of docs/moe.md: d 128 / 4 layers / 4 attention heads of 32
    "tiny": dict(num_transformer_layers=4, model_dim=128, head_dim=32, ffn_multipliers=344 / 128,
                 ffn_dim_divisor=8, qkv_multipliers=(0.5, 1.0), num_gqa_groups=1, vocab_size=256,
                 max_context_length=512, experts=8, ffn=344),
}
ARMS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3", "mhmoe-h4", "v1-h4")


def preset(name: str, **overrides: Any):
    """Config of a ``BASE-ARM`` preset, e.g. ``paper-mhmoe-h2`` or ``tiny-smoe``.

    Arms: ``dense`` (an OpenELM with the SMoE's active FFN width), ``smoe`` (8 experts, top-1),
    ``fine-grained`` (16 experts of half width, top-2), ``mhmoe-hN`` (the v2 rule: FLOPs and
    parameters of the SMoE), ``v1-h4`` (the v1 rule: parameters matched, ~4x expert FLOPs).
    Returns ``openelm.ModelArgs`` for ``dense``, else :class:`ModelArgs`.
    """
    base_name, _, arm = name.partition("-")
    if base_name not in BASES or arm not in ARMS:
        raise ValueError(f"unknown OpenELM-MoE preset {name!r}; use BASE-ARM with BASE in {', '.join(BASES)} "
                         f"and ARM in {', '.join(ARMS)}")
    base = dict(BASES[base_name])
    experts, ffn = base.pop("experts"), base.pop("ffn")
    dim = base["model_dim"]
    if arm == "dense":
        return openelm.ModelArgs(**{**base, **overrides})
    if arm == "smoe":
        moe = dict(moe_type="smoe", num_experts=experts, top_k=1, expert_ffn_dim=ffn)
    elif arm == "fine-grained":
        moe = dict(moe_type="smoe", **fine_grained_sizing(experts, 1, ffn))
    elif arm.startswith("mhmoe-h"):
        heads = int(arm[len("mhmoe-h"):])
        if dim % heads:
            raise ValueError(f"preset {name!r}: model_dim {dim} is not divisible by {heads} heads")
        moe = dict(moe_type="mhmoe", **v2_sizing(dim, experts, 1, ffn, heads))
    else:
        moe = dict(moe_type="mhmoe", **v1_sizing(dim, experts, 1, ffn, 4))
    return ModelArgs(**{**base, **moe, **overrides})


def _linear(i: int, o: int) -> int:
    return i * o


def moe_layer_parameters(args: ModelArgs) -> Dict[str, int]:
    """Parameters of one MoE layer by part (no arrays are created)."""
    d, h = args.model_dim, args.moe_heads if args.moe_type == "mhmoe" else 1
    sub = d // h
    router = sub * args.num_experts if args.router == "linear" else sub * 16 + args.num_experts * 16
    proj = 0
    if args.moe_type == "mhmoe":
        proj = (d * d + d) * (int(args.mhmoe_head) + int(args.mhmoe_merge))
    expert = 3 * sub * args.expert_ffn_dim
    return {"router": router, "projections": proj, "expert": expert, "experts": expert * args.num_experts}


def describe(args) -> Dict[str, float]:
    """Total and active parameters and matmul FLOPs per token (2 per multiply-add; attention
    scores excluded since they depend on the context length; embedding lookup is free, the tied
    head is not). "Active" counts the experts one token can touch: min(E, h * k) of them."""
    d, hd, V = args.model_dim, args.head_dim, args.vocab_size
    moe_ids = set(getattr(args, "moe_layer_ids", []))
    total = V * d + d + (0 if args.share_input_output_layers else V * d)
    active = total
    flops = 2 * V * d
    for i, (q, kv, f) in enumerate(zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)):
        attn = _linear(d, (q + 2 * kv) * hd) + _linear(q * hd, d)
        norms = 2 * d + (2 * hd if args.normalize_qk_projections else 0)
        total += attn + norms
        active += attn + norms
        flops += 2 * attn
        if i in moe_ids:
            p = moe_layer_parameters(args)
            h = args.moe_heads if args.moe_type == "mhmoe" else 1
            total += p["router"] + p["projections"] + p["experts"]
            active += p["router"] + p["projections"] + min(args.num_experts, h * args.top_k) * p["expert"]
            proj_flops = 2 * d * d * (int(args.mhmoe_head) + int(args.mhmoe_merge)) if args.moe_type == "mhmoe" else 0
            flops += proj_flops + 2 * p["router"] * h + 2 * h * args.top_k * p["expert"]
        else:
            ffn = _linear(d, 2 * f if args.ffn_with_glu else f) + _linear(f, d)
            total += ffn
            active += ffn
            flops += 2 * ffn
    return {"total_parameters": total, "active_parameters": active, "flops_per_token": flops}


def sizing_table(base: str = "paper", arms: Sequence[str] = ARMS) -> List[Dict[str, Any]]:
    """One row per arm: its MoE shape and :func:`describe` numbers (what ``mlx-elm moe sizes`` prints)."""
    rows = []
    for arm in arms:
        try:
            args = preset(f"{base}-{arm}")
        except ValueError:
            continue  # e.g. h = 3 does not divide d = 128
        moe = isinstance(args, ModelArgs)
        row = {"preset": f"{base}-{arm}", "type": args.moe_type if moe else "dense",
               "heads": args.moe_heads if moe else 0, "experts": args.num_experts if moe else 0,
               "top_k": args.top_k if moe else 0, "expert_ffn": args.expert_ffn_dim if moe else 0}
        row.update(describe(args))
        if moe:
            p = moe_layer_parameters(args)
            row["moe_layer_parameters"] = p["router"] + p["projections"] + p["experts"]
        rows.append(row)
    return rows


def expert_flops_ratio(args: ModelArgs, reference: ModelArgs) -> float:
    """FLOPs per token of ``args`` over those of ``reference`` (e.g. MH-MoE v1 over SMoE)."""
    return describe(args)["flops_per_token"] / describe(reference)["flops_per_token"]


