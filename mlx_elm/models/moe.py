"""Mixture-of-experts layers: top-k sparse MoE (SMoE) and Multi-Head MoE (MH-MoE).

``SparseMoE`` routes each row of its input to ``top_k`` of ``num_experts`` SwiGLU experts
(GShard / Switch routing: softmax in float32 over all experts, then the top k; the k scores are
renormalised to sum to one when k > 1, as the official MH-MoE scripts do). Fine-grained SMoE is the
same layer with more, narrower experts and a larger k.

``MHMoE`` (Wu et al., arXiv 2404.15045, Eq. 3-8; sizing of the follow-up arXiv 2411.16205) projects
each token with a d x d "head" layer, cuts it into ``heads`` sub-tokens of d / h (a token's chunks
stay consecutive and in order), routes every sub-token through a ``SparseMoE`` of width d / h,
glues the sub-tokens back and applies a d x d "merge" layer. As in the official code there is no
residual inside the layer (the paper's Eq. 6 writes one); the block's pre-norm residual is the only
one.

Experts are mlx-lm's ``SwitchGLU`` (``gather_mm``, ``gather_qmm`` once quantized, LoRA through
``LoRASwitchLinear``). How they are dispatched (per-assignment gather, or expert-sorted blocks of
real matrix products) is chosen per backend by ``mlx_elm.platform.expert_dispatch``; both give the
same numbers.

The layers compute their auxiliary terms only when asked (``layer(x, return_aux=True)`` returns
``(y, aux)``), so the plain forward used by generation is unchanged. ``aux`` holds the balance loss,
the router z-loss and routing counts; :class:`RoutingStats` turns counts into load shares,
activation ratios, entropy and dead experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_elm.platform import expert_dispatch

ROUTERS = ("linear", "xmoe")
DISPATCHES = ("auto", "gather", "blocked")
XMOE_DIM = 16  # the official code's routing dimension (the paper's Table 9 says 16 / h)
XMOE_NORM = 1.5  # expert embeddings are rescaled to this norm before each forward (no gradient)
XMOE_GAIN = 0.32  # orthogonal-init gain of the expert embeddings


# --- routers ---------------------------------------------------------------------------------


class XMoERouter(nn.Module):
    """X-MoE's low-dimensional router (Chi et al. 2022), as the MH-MoE code uses it.

    ``logits = (x @ reduce_weight.T) @ normalize(wg).T``: the input is projected to 16 dims but not normalised,
    so its norm acts as the temperature; the expert embeddings ``wg`` are unit rows in the forward.
    The official code also rescales the stored ``wg`` to norm 1.5 in place before each forward;
    the forward does not depend on that norm, only the optimizer's step size does, so training
    calls :func:`renormalize_routers` after each step to keep the same dynamics.
    """

    def __init__(self, dims: int, num_experts: int, routing_dims: int = XMOE_DIM):
        super().__init__()
        # plain arrays, not a child Linear: the router stays one leaf module (full precision, and
        # counted by mlx-lm's parameter counter, which only visits leaves)
        bound = 1 / math.sqrt(dims)
        self.reduce_weight = mx.random.uniform(-bound, bound, (routing_dims, dims))
        self.wg = orthogonal((num_experts, routing_dims), XMOE_GAIN)
        self.renormalize()  # what the official code does before its first forward

    def __call__(self, x: mx.array) -> mx.array:
        wg = self.wg.astype(mx.float32)
        wg = wg / mx.maximum(mx.linalg.norm(wg, axis=-1, keepdims=True), 1e-4)
        return (x @ self.reduce_weight.T).astype(mx.float32) @ wg.T

    def renormalize(self) -> None:
        norm = mx.linalg.norm(self.wg, axis=-1, keepdims=True)
        self.wg = self.wg * (XMOE_NORM / mx.maximum(norm, 1e-12))


def orthogonal(shape, gain: float = 1.0) -> mx.array:
    """torch.nn.init.orthogonal_: orthonormal rows (or columns, whichever are fewer), times gain."""
    rows, cols = shape
    a = mx.random.normal((max(rows, cols), min(rows, cols)))
    q, r = mx.linalg.qr(a, stream=mx.cpu)  # MLX implements QR on the CPU stream only
    q = q * mx.sign(mx.diagonal(r))[None, :]
    q = q if rows >= cols else q.T
    return gain * q


def make_router(kind: str, dims: int, num_experts: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dims, num_experts, bias=False)
    if kind == "xmoe":
        return XMoERouter(dims, num_experts)
    raise ValueError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")


def renormalize_routers(model: nn.Module) -> None:
    """The X-MoE routers' in-place rescale of their expert embeddings (call after each step)."""
    for _, m in model.named_modules():
        if isinstance(m, XMoERouter):
            m.renormalize()


# --- routing ---------------------------------------------------------------------------------


def top_k_routing(probs: mx.array, k: int, normalize: bool):
    """Experts ``(S, k)`` in descending score order (column 0 is the first choice) and scores."""
    if k == 1:
        inds = mx.argmax(probs, axis=-1, keepdims=True)
    else:
        inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
        order = mx.argsort(-mx.take_along_axis(probs, inds, axis=-1), axis=-1)
        inds = mx.take_along_axis(inds, order, axis=-1)
    inds = mx.stop_gradient(inds)
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds, scores


def expert_capacity(num_rows: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``k * ceil(cf * S / E)`` (tutel's rule; cf 1.0 in the official scripts)."""
    return k * math.ceil(capacity_factor * num_rows / num_experts)


def capacity_keep(inds: mx.array, num_experts: int, capacity: int) -> mx.array:
    """1 where an assignment gets a slot, 0 where it overflows; slots are taken in k-major order
    (every row's first choice before any second choice), rows in order within a choice."""
    S, k = inds.shape
    onehot = (inds.T.reshape(-1, 1) == mx.arange(num_experts)[None, :]).astype(mx.int32)  # (k*S, E)
    position = (mx.cumsum(onehot, axis=0) * onehot).sum(-1) - 1  # slot index within the expert
    return mx.stop_gradient((position < capacity).astype(mx.float32).reshape(k, S).T)


def balance_loss(probs: mx.array, first_choice: mx.array, num_experts: int) -> mx.array:
    """GShard / Switch load-balancing loss ``E * sum_e mean_s p[s, e] * f_e``.

    ``p`` is the full softmax; ``f_e`` is the fraction of rows whose *first* choice is ``e``
    (before capacity), as in the official gating code.
    """
    frac = bincount(first_choice, num_experts) / first_choice.shape[0]
    return num_experts * (probs.mean(0) * mx.stop_gradient(frac)).sum()


def bincount(ids: mx.array, n: int) -> mx.array:
    """How often each of ``0..n-1`` occurs in ``ids`` (float32, no gradient): a scatter-add,
    O(len(ids)) instead of a one-hot matrix of len(ids) x n."""
    ids = mx.stop_gradient(ids).reshape(-1)
    return mx.zeros((n,), dtype=mx.float32).at[ids].add(mx.ones(ids.shape, dtype=mx.float32))


def router_z_loss(logits: mx.array) -> mx.array:
    """ST-MoE's router z-loss: mean squared log-partition of the router logits."""
    return mx.square(mx.logsumexp(logits, axis=-1)).mean()


# --- expert dispatch -------------------------------------------------------------------------


def block_size(num_assignments: int, num_experts: int) -> int:
    """Rows per block: a power of two near ``N / (4E)`` in [8, 64], so the padding (< one block per
    expert) stays under about a quarter of the work."""
    target = max(1, num_assignments // (4 * num_experts))
    return int(min(64, max(8, 1 << int(math.log2(target)))))


def gather_dispatch(experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """mlx-lm's path: one gathered row per assignment (sorted by expert for >= 64 of them)."""
    return experts(x, inds)


def blocked_dispatch(experts: SwitchGLU, x: mx.array, inds: mx.array, block: Optional[int] = None) -> mx.array:
    """The same result as :func:`gather_dispatch` from blocks of ``block`` rows of one expert each.

    Assignments are sorted by expert; expert e's rows fill ``ceil(count_e / block)`` consecutive
    blocks, padded with a zero row. The number of blocks, ``ceil(N / block) + E``, depends only on
    shapes, so the layer stays compilable and nothing is dropped. Each block is one
    ``(block x d) @ (d x h)`` product through the experts' own switch layers (so quantized and LoRA
    experts work unchanged).
    """
    S, k = inds.shape
    E = _num_experts(experts)
    N = S * k
    block = block or block_size(N, E)
    ids = mx.stop_gradient(inds).reshape(-1)
    order = mx.argsort(ids)
    sorted_ids = ids[order]
    counts = bincount(ids, E).astype(mx.int32)
    blocks = (counts + block - 1) // block
    block_end = mx.cumsum(blocks)
    seg_start = mx.cumsum(counts) - counts
    slot = (block_end - blocks)[sorted_ids] * block + mx.arange(N) - seg_start[sorted_ids]
    num_blocks = -(-N // block) + E
    source = mx.full((num_blocks * block,), S, dtype=mx.int32)  # S = the appended zero row
    source[slot] = (order // k).astype(mx.int32)
    block_expert = (block_end[None, :] <= mx.arange(num_blocks)[:, None]).astype(mx.int32).sum(1)
    block_expert = mx.minimum(block_expert, E - 1).astype(mx.uint32)  # unused tail blocks: any expert
    rows = mx.concatenate([x, mx.zeros((1, x.shape[-1]), dtype=x.dtype)])[source]
    rows = rows.reshape(num_blocks, block, -1)
    up = experts.up_proj(rows, block_expert, sorted_indices=True)
    gate = experts.gate_proj(rows, block_expert, sorted_indices=True)
    out = experts.down_proj(experts.activation(up, gate), block_expert, sorted_indices=True)
    out = out.reshape(num_blocks * block, -1)
    slot_of = mx.zeros((N,), dtype=mx.int32)
    slot_of[order] = slot.astype(mx.int32)
    return out[slot_of].reshape(S, k, -1)


def run_experts(experts: SwitchGLU, x: mx.array, inds: mx.array, dispatch: str = "auto") -> mx.array:
    """Expert outputs ``(S, k, d)`` for rows ``x (S, d)`` and their assignments ``inds (S, k)``."""
    if dispatch == "auto":
        dispatch = expert_dispatch(inds.size, _num_experts(experts))
    if dispatch == "blocked":
        return blocked_dispatch(experts, x, inds)
    if dispatch == "gather":
        return gather_dispatch(experts, x, inds)
    raise ValueError(f"unknown expert dispatch {dispatch!r}; choose one of {', '.join(DISPATCHES)}")


def _num_experts(experts: SwitchGLU) -> int:
    return int(experts.gate_proj.num_experts)  # Switch, QuantizedSwitch and LoRASwitch layers all have it


# --- layers ----------------------------------------------------------------------------------


class SparseMoE(nn.Module):
    """Top-k sparse mixture of SwiGLU experts over the rows of its input (Switch / GShard).

    ``capacity_factor`` > 0 gives each expert ``k * ceil(cf * S / E)`` slots per call and drops
    the assignments that overflow (their output is zero; the experts still compute them, so the
    result equals a tutel-style dropping layer). 0 means dropless.
    """

    def __init__(self, dims: int, num_experts: int, hidden_dims: int, top_k: int = 1, router: str = "linear",
                 capacity_factor: float = 0.0, normalize_top_k: Optional[bool] = None, dispatch: str = "auto"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown expert dispatch {dispatch!r}; choose one of {', '.join(DISPATCHES)}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = float(capacity_factor)
        self.normalize_top_k = top_k > 1 if normalize_top_k is None else bool(normalize_top_k)
        self.dispatch = dispatch
        self.router = make_router(router, dims, num_experts)
        self.experts = SwitchGLU(dims, hidden_dims, num_experts)

    def __call__(self, x: mx.array, return_aux: bool = False, group: int = 1):
        """``x (..., d)`` → same shape. ``group``: consecutive rows that form one token (MH-MoE's
        sub-tokens), used only to count per-token statistics."""
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        logits = self.router(rows).astype(mx.float32)
        probs = mx.softmax(logits, axis=-1)
        inds, scores = top_k_routing(probs, self.top_k, self.normalize_top_k)
        keep = None
        if self.capacity_factor > 0:
            cap = expert_capacity(rows.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            keep = capacity_keep(inds, self.num_experts, cap)
            scores = scores * keep
        out = run_experts(self.experts, rows, inds, self.dispatch)
        y = (out * scores[..., None].astype(out.dtype)).sum(axis=-2).reshape(shape)
        if not return_aux:
            return y
        return y, routing_aux(logits, probs, inds, keep, self.num_experts, group)


class MHMoE(nn.Module):
    """Multi-Head MoE (arXiv 2404.15045): head projection, split into ``heads`` sub-tokens, a
    ``SparseMoE`` of width d / heads over the sub-tokens, merge, merge projection.

    ``head`` / ``merge`` = False drop a projection (the papers' ablations). Initialisation follows
    the paper's appendix E: head xavier-uniform with gain 1/sqrt(2), merge xavier-uniform, biases 0.
    """

    def __init__(self, dims: int, heads: int, num_experts: int, hidden_dims: int, top_k: int = 1,
                 router: str = "linear", capacity_factor: float = 0.0, normalize_top_k: Optional[bool] = None,
                 head: bool = True, merge: bool = True, dispatch: str = "auto"):
        super().__init__()
        if heads < 1 or dims % heads:
            raise ValueError(f"model dim {dims} is not divisible into {heads} MH-MoE heads")
        self.heads = heads
        if head:
            self.head = xavier_linear(dims, dims, gain=1 / math.sqrt(2))
        if merge:
            self.merge = xavier_linear(dims, dims, gain=1.0)
        self.moe = SparseMoE(dims // heads, num_experts, hidden_dims, top_k, router, capacity_factor,
                             normalize_top_k, dispatch)

    def __call__(self, x: mx.array, return_aux: bool = False):
        shape = x.shape
        s = self.head(x) if "head" in self else x
        s = s.reshape(-1, self.heads, shape[-1] // self.heads)  # token t -> rows t*h .. t*h + h-1
        out = self.moe(s, return_aux=return_aux, group=self.heads)
        out, aux = out if return_aux else (out, None)
        y = out.reshape(shape)
        y = self.merge(y) if "merge" in self else y
        return (y, aux) if return_aux else y


def xavier_linear(in_dims: int, out_dims: int, gain: float) -> nn.Linear:
    layer = nn.Linear(in_dims, out_dims, bias=True)
    layer.weight = nn.init.glorot_uniform()(layer.weight, gain=gain)
    layer.bias = mx.zeros((out_dims,))
    return layer


def is_moe_layer(module: nn.Module) -> bool:
    return isinstance(module, (SparseMoE, MHMoE))


# --- routing statistics ----------------------------------------------------------------------


def routing_aux(logits: mx.array, probs: mx.array, inds: mx.array, keep: Optional[mx.array], num_experts: int,
                group: int = 1) -> Dict[str, mx.array]:
    """Auxiliary losses (differentiable) and routing counts (no gradient) of one MoE call.

    Counts: ``load[e]`` = assignments to e over all k choices (sums to rows * k), ``first[e]`` = rows
    whose first choice is e, ``token_hits[e]`` = tokens with at least one of their ``group``
    sub-token rows assigned to e, ``kept`` = assignments that got a capacity slot.
    """
    S, k = inds.shape
    inds = mx.stop_gradient(inds)
    per_token = mx.sort(inds.reshape(S // group, group * k), axis=-1)  # a token's experts, sorted
    distinct = mx.concatenate([mx.ones((per_token.shape[0], 1), dtype=mx.bool_),
                               per_token[:, 1:] != per_token[:, :-1]], axis=1)
    hits = mx.zeros((num_experts,), dtype=mx.float32).at[per_token.reshape(-1)].add(
        distinct.reshape(-1).astype(mx.float32))
    kept = mx.array(float(S * k)) if keep is None else keep.sum()
    counts = {"load": bincount(inds, num_experts), "first": bincount(inds[:, 0], num_experts), "token_hits": hits,
              "kept": kept, "rows": mx.array(float(S)), "tokens": mx.array(float(S // group))}
    aux = {k_: mx.stop_gradient(v) for k_, v in counts.items()}
    aux["balance"] = balance_loss(probs, inds[:, 0], num_experts)
    aux["z"] = router_z_loss(logits)
    return aux


PAPER_THRESHOLDS = (0.01, 0.05, 0.1, 0.25)


@dataclass
class RoutingStats:
    """Routing counts of one MoE layer accumulated over many calls, and what they mean.

    Three normalisations of "how much is expert e used" (see docs/moe.md):
    - ``per_token[e]`` = load[e] / tokens: the v1 paper's selection count per token. For MH-MoE a
      token makes h * k routings, so this sums to h * k and is inflated h-fold against SMoE.
    - ``per_subtoken[e]`` = load[e] / (tokens * h): the share of routed rows choosing e (sums to k).
    - ``token_coverage[e]`` = token_hits[e] / tokens: the fraction of tokens that touch e at all
      through any sub-token (each in [0, 1]).
    The activation ratio at threshold tau is the fraction of experts whose value exceeds tau.
    """

    num_experts: int
    group: int = 1
    top_k: int = 1
    load: np.ndarray = field(default=None)
    first: np.ndarray = field(default=None)
    token_hits: np.ndarray = field(default=None)
    rows: float = 0.0
    tokens: float = 0.0
    kept: float = 0.0

    def __post_init__(self):
        for name in ("load", "first", "token_hits"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.num_experts, dtype=np.float64))

    def add(self, aux: Dict[str, mx.array]) -> None:
        self.load += np.asarray(aux["load"], dtype=np.float64)
        self.first += np.asarray(aux["first"], dtype=np.float64)
        self.token_hits += np.asarray(aux["token_hits"], dtype=np.float64)
        self.rows += float(aux["rows"].item())
        self.tokens += float(aux["tokens"].item())
        self.kept += float(aux["kept"].item())

    @property
    def share(self) -> np.ndarray:
        """Load share per expert (sums to 1)."""
        return self.load / max(self.load.sum(), 1.0)

    @property
    def per_token(self) -> np.ndarray:
        return self.load / max(self.tokens, 1.0)

    @property
    def per_subtoken(self) -> np.ndarray:
        return self.load / max(self.rows, 1.0)

    @property
    def token_coverage(self) -> np.ndarray:
        return self.token_hits / max(self.tokens, 1.0)

    def entropy(self) -> float:
        """Load entropy normalised by log E (1 = perfectly even)."""
        p = self.share[self.share > 0]
        return float(-(p * np.log(p)).sum() / math.log(self.num_experts)) if self.num_experts > 1 else 1.0

    def cv(self) -> float:
        """Coefficient of variation of the load (0 = even)."""
        m = self.load.mean()
        return float(self.load.std() / m) if m > 0 else 0.0

    def dead(self) -> int:
        """Experts never chosen."""
        return int((self.load == 0).sum())

    def cold(self) -> int:
        """Experts with less than a quarter of the even share 1 / E."""
        return int((self.share < 0.25 / self.num_experts).sum())

    def dropped_fraction(self) -> float:
        total = self.rows * self.top_k
        return float(1.0 - self.kept / total) if total > 0 else 0.0

    def activation(self, tau: float, basis: str = "per_token") -> float:
        """Fraction of experts whose ``basis`` value (per_token, per_subtoken, token_coverage)
        exceeds ``tau`` (the v1 paper's activation cells, for one layer)."""
        return float((getattr(self, basis) > tau).mean())

    def summary(self) -> Dict[str, float]:
        return {"entropy": self.entropy(), "cv": self.cv(), "min_share": float(self.share.min()),
                "max_share": float(self.share.max()), "dead": self.dead(), "cold": self.cold(),
                "dropped": self.dropped_fraction(),
                **{f"act_token@{t}": self.activation(t, "per_token") for t in PAPER_THRESHOLDS},
                **{f"act_subtoken@{t}": self.activation(t, "per_subtoken") for t in PAPER_THRESHOLDS},
                **{f"act_coverage@{t}": self.activation(t, "token_coverage") for t in PAPER_THRESHOLDS}}


def activation_ratio(stats: Sequence[RoutingStats], tau: float, basis: str = "per_token") -> float:
    """The v1 paper's Fig. 1a number: activated (layer, expert) cells over all cells."""
    cells = np.concatenate([getattr(s, basis) for s in stats])
    return float((cells > tau).mean()) if cells.size else 0.0


def scalar_metrics(aux: List[Dict[str, mx.array]], layer_ids: Sequence[int]) -> Dict[str, mx.array]:
    """Per-layer scalars for the training log (arrays, so they stay inside a compiled step)."""
    out: Dict[str, mx.array] = {}
    for i, a in zip(layer_ids, aux):
        share = a["load"] / mx.maximum(a["load"].sum(), 1.0)
        e = share.size
        ent = -(share * mx.log(mx.maximum(share, 1e-12))).sum() / math.log(e) if e > 1 else mx.array(1.0)
        out[f"L{i}/entropy"] = ent
        out[f"L{i}/max_share"] = share.max()
        out[f"L{i}/dead"] = (a["load"] == 0).astype(mx.float32).sum()
        out[f"L{i}/dropped"] = 1.0 - a["kept"] / mx.maximum(a["load"].sum(), 1.0)
    return out
