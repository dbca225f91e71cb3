"""Transformers that represent n-gram LMs exactly (Svete & Cotterell, arXiv 2404.14994).

The weights are set analytically from an ``NgramLM`` table, never trained:

* ``variant="heads"`` (Thm 3.1 / 4.1): one layer, n-1 heads; head h attends to position t-h and
  copies that token's one-hot into its own slot of the residual stream.
* ``variant="layers"`` (Thm 3.2): n-2 single-head layers forming a shift register; layer l copies
  slot l-1 of position t-1 into slot l, so position t ends up holding (y_t, ..., y_{t-n+2}).

Then an AND layer, ``ReLU(2 * sum_h onehot_h[hist_h] - (2n - 3))``, gives the one-hot of the whole
history (one unit per reachable BOS-padded history) and ``lm_head`` holds the log-probabilities.
The factor 2 and bias 2n-3 (the paper uses 1 and n-2) keep wrong histories at exactly 0 even
when soft attention leaks up to 1/2 of a slot, which is what makes the softmax bound below work.

Scores. ``scores="abs"`` (default, Thm 4.1) uses positional features (1, t), q = (1, t-h),
k = (-s, 1) and score -|q.k| = -|t-h-s|: integers, so float32 is exact up to t ~ 2^24 and the top
score leads by >= 1 (hard and sparsemax attention are then exactly one-hot). A target before the
start lands on position 0, i.e. BOS, so one BOS at position 0 gives the BOS padding for free.
``scores="unit_circle"`` is the paper's dot product of u_t = (1/sqrt t, sqrt(1-1/t)); neighbouring
scores differ by ~1/(8 t^3), so in float32 it stops being exact after about a hundred positions.

Zero probabilities: ``lm_head`` holds ``max(log p, log_floor)`` with a finite floor (default -200)
instead of -inf (-inf times a 0 activation would be NaN). exp(-200) underflows to exactly 0 in
float32, so ``softmax(logits)`` has exact zeros; logits of impossible tokens read ``log_floor``.

Softmax attention with inverse temperature beta leaks eps = 2 e^-beta / (1 - e^-beta) per head; see
``softmax_error_bound`` for the resulting bound on the next-symbol probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.errors import NgramError
from mlx_elm.ngram_lm import NgramLM

VARIANTS = ("heads", "layers")
ATTENTIONS = ("hard", "sparsemax", "softmax")
SCORES = ("abs", "unit_circle")


@dataclass
class ModelArgs:
    """Shape and behaviour of an analytic n-gram transformer (weights come from ``build``)."""

    n: int
    num_symbols: int
    num_histories: int
    variant: str = "heads"
    attention: str = "hard"
    beta: float = 1.0
    scores: str = "abs"
    log_floor: float = -200.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise NgramError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}.")
        if self.attention not in ATTENTIONS:
            raise NgramError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}.")
        if self.scores not in SCORES:
            raise NgramError(f"unknown scores {self.scores!r}; choose one of {', '.join(SCORES)}.")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise NgramError(f"inverse temperature beta={self.beta!r} must be > 0; try beta=20.")
        if not self.log_floor <= -104.0:
            raise NgramError(
                f"log_floor={self.log_floor} is too high for exact zeros in float32; use <= -104 "
                "(exp underflows to 0 there), e.g. -200."
            )

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    @property
    def slot_dim(self) -> int:  # one-hot over symbols + BOS
        return self.num_symbols + 1

    @property
    def offsets(self) -> List[List[int]]:
        """Per layer, the position offset each head looks back by."""
        if self.variant == "heads":
            return [list(range(self.n - 1))] if self.n > 1 else []
        return [[1] for _ in range(max(self.n - 2, 0))]

    @property
    def num_slots(self) -> int:  # slot 0 = the current token
        return self.n if self.variant == "heads" else max(self.n - 1, 1)

    @property
    def pos_dim(self) -> int:
        if self.scores == "abs":
            return 2
        return 2 * (max([o for layer in self.offsets for o in layer], default=0) + 1)

    @property
    def model_dim(self) -> int:
        return self.num_slots * self.slot_dim + self.pos_dim


def sparsemax(x: mx.array, axis: int = -1) -> mx.array:
    """Euclidean projection onto the simplex (Martins & Astudillo 2016); -inf entries get 0."""
    x = mx.moveaxis(x, axis, -1)
    z = -mx.sort(-x, axis=-1)  # descending, -inf last
    cs = mx.cumsum(z, axis=-1)
    k = mx.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    support = (1 + k * z) > cs
    kz = support.astype(mx.int32).sum(axis=-1, keepdims=True)
    tau = (mx.take_along_axis(cs, kz - 1, axis=-1) - 1) / kz.astype(x.dtype)
    return mx.moveaxis(mx.maximum(x - tau, 0), -1, axis)


def _normalise(scores: mx.array, attention: str, beta: float) -> mx.array:
    if attention == "softmax":
        return mx.softmax(beta * scores, axis=-1)
    if attention == "sparsemax":
        return sparsemax(beta * scores, axis=-1)
    hit = (scores == scores.max(axis=-1, keepdims=True)).astype(scores.dtype)
    return hit / hit.sum(axis=-1, keepdims=True)  # average-hard: ties share the weight


class Attention(nn.Module):
    """Causal multi-head attention without LayerNorm; returns x + out_proj(concat(heads))."""

    def __init__(self, args: ModelArgs, num_heads: int):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, 2, args.slot_dim
        self.score_fn, self.attention, self.beta = args.scores, args.attention, float(args.beta)
        d = args.model_dim
        self.q_proj = nn.Linear(d, num_heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(d, num_heads * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(d, num_heads * self.v_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * self.v_dim, d, bias=False)

    def _heads(self, y: mx.array, dim: int) -> mx.array:
        B, T, _ = y.shape
        return y.reshape(B, T, self.num_heads, dim).transpose(0, 2, 1, 3)

    def weights(self, x: mx.array) -> mx.array:
        """Attention weights ``[B, H, T, T]`` (rows: queries, columns: keys)."""
        q = self._heads(self.q_proj(x), self.qk_dim)
        k = self._heads(self.k_proj(x), self.qk_dim)
        s = q @ k.transpose(0, 1, 3, 2)
        if self.score_fn == "abs":
            s = -mx.abs(s)
        T = x.shape[1]
        causal = mx.arange(T)[:, None] >= mx.arange(T)[None, :]
        s = mx.where(causal, s, -mx.inf)
        return _normalise(s, self.attention, self.beta)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        v = self._heads(self.v_proj(x), self.v_dim)
        out = (self.weights(x) @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)
        return x + self.out_proj(out)


class Model(nn.Module):
    """Tokens ``[B, T]`` (position 0 = BOS) in, next-token logits ``[B, T, vocab_size]`` out."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = "ngram_transformer"
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [Attention(args, len(o)) for o in args.offsets]
        self.and_proj = nn.Linear(args.model_dim, args.num_histories)
        self.lm_head = nn.Linear(args.num_histories, args.vocab_size, bias=False)

    def positions(self, T: int) -> mx.array:
        """Fixed positional features ``[T, pos_dim]``: (1, t), or unit-circle points u_{t+1+o}."""
        t = mx.arange(T, dtype=mx.float32)[:, None]
        if self.args.scores == "abs":
            return mx.concatenate([mx.ones_like(t), t], axis=1)
        p = t + 1 + mx.arange(self.args.pos_dim // 2, dtype=mx.float32)[None, :]
        return mx.stack([mx.rsqrt(p), mx.sqrt(1 - 1 / p)], axis=-1).reshape(T, -1)

    def _embed(self, inputs: mx.array) -> mx.array:
        a = self.args
        h = self.embed(inputs)
        pad = mx.zeros((h.shape[1], a.model_dim - a.pos_dim))
        return h + mx.concatenate([pad, self.positions(h.shape[1])], axis=1)

    def residual(self, inputs: mx.array) -> mx.array:
        """The residual stream after the attention layers, ``[B, T, model_dim]``."""
        h = self._embed(inputs)
        for layer in self.layers:
            h = layer(h)
        return h

    def history_onehot(self, inputs: mx.array) -> mx.array:
        """AND layer output ``[B, T, num_histories]``: one-hot of the BOS-padded history."""
        return nn.relu(self.and_proj(self.residual(inputs)))

    def __call__(self, inputs: mx.array, cache: Optional[Any] = None) -> mx.array:
        if cache is not None:
            raise NgramError("the analytic n-gram transformer has no KV cache; call it with cache=None.")
        return self.lm_head(self.history_onehot(inputs))

    def attention_maps(self, inputs: mx.array) -> List[mx.array]:
        """Per layer, the attention weights ``[B, H, T, T]`` (for inspection)."""
        h = self._embed(inputs)
        maps = []
        for layer in self.layers:
            maps.append(layer.weights(h))
            h = layer(h)
        return maps

    def num_parameters(self) -> int:
        return sum(v.size for _, v in nn.utils.tree_flatten(self.parameters()))


def build(lm: NgramLM, variant: str = "heads", attention: str = "hard", beta: float = 1.0,
          scores: str = "abs", log_floor: float = -200.0) -> Model:
    """A transformer whose next-token distribution equals ``lm``'s after every prefix.

    Exact (up to float32 rounding) for ``attention`` "hard" and "sparsemax" (with beta >= 1) and
    ``scores="abs"``; "softmax" approximates within ``softmax_error_bound(beta, ...)``.
    """
    if not isinstance(lm, NgramLM):
        raise NgramError("build needs an NgramLM; estimate one with NgramLM.fit or NgramLM.from_text.")
    args = ModelArgs(n=lm.n, num_symbols=lm.num_symbols, num_histories=lm.num_histories,
                     variant=variant, attention=attention, beta=float(beta), scores=scores,
                     log_floor=float(log_floor))
    model = Model(args)
    S1, D, P = args.slot_dim, args.model_dim, args.pos_dim
    pos0 = D - P  # first positional feature

    emb = np.zeros((args.vocab_size, D), np.float32)
    emb[np.arange(S1), np.arange(S1)] = 1.0  # symbols and BOS; EOS is never an input
    model.embed.weight = mx.array(emb)

    for li, (layer, offsets) in enumerate(zip(model.layers, args.offsets)):
        H = len(offsets)
        wq, wk = np.zeros((H * 2, D), np.float32), np.zeros((H * 2, D), np.float32)
        wv, wo = np.zeros((H * S1, D), np.float32), np.zeros((D, H * S1), np.float32)
        for h, off in enumerate(offsets):
            if scores == "abs":  # q = (1, t - off), k = (-s, 1)  ->  q.k = t - off - s
                wq[2 * h, pos0] = 1.0
                wq[2 * h + 1, pos0 + 1], wq[2 * h + 1, pos0] = 1.0, -float(off)
                wk[2 * h, pos0 + 1] = -1.0
                wk[2 * h + 1, pos0] = 1.0
            else:  # q = u_{t+1}, k = u_{s+1+off}: the dot product is 1 iff s = t - off
                wq[2 * h: 2 * h + 2, pos0: pos0 + 2] = np.eye(2)
                wk[2 * h: 2 * h + 2, pos0 + 2 * off: pos0 + 2 * off + 2] = np.eye(2)
            src = 0 if args.variant == "heads" else li  # slot read at the attended position
            dst = h + 1 if args.variant == "heads" else li + 1  # slot written at the query
            wv[h * S1: (h + 1) * S1, src * S1: (src + 1) * S1] = np.eye(S1)
            wo[dst * S1: (dst + 1) * S1, h * S1: (h + 1) * S1] = np.eye(S1)
        layer.q_proj.weight, layer.k_proj.weight = mx.array(wq), mx.array(wk)
        layer.v_proj.weight, layer.out_proj.weight = mx.array(wv), mx.array(wo)

    # AND layer: history (z_1..z_{n-1}, oldest first); look-back offset o lives in slot slot_of(o)
    hist = lm.histories()
    w_and = np.zeros((lm.num_histories, D), np.float32)
    rows = np.arange(lm.num_histories)
    for o in range(lm.n - 1):
        slot = o + 1 if args.variant == "heads" else o
        w_and[rows, slot * S1 + hist[:, lm.n - 2 - o]] = 2.0
    model.and_proj.weight = mx.array(w_and)
    model.and_proj.bias = mx.full((lm.num_histories,), -(2.0 * lm.n - 3.0))

    with np.errstate(divide="ignore"):
        logp = np.maximum(np.log(lm.probs), log_floor)
    model.lm_head.weight = mx.array(logp.T.astype(np.float32))
    mx.eval(model.parameters())
    return model


def with_bos(tokens: Any, bos: int) -> mx.array:
    """``[B, T+1]`` model inputs: BOS prepended to a batch (or a single list) of symbol ids."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim == 1:
        arr = arr[None]
    return mx.array(np.concatenate([np.full((arr.shape[0], 1), bos), arr], axis=1).astype(np.int32))


def _pairwise_sum(x: mx.array) -> mx.array:
    """Sum over the last axis by halving (error ~log2(V) ulps instead of ~V ulps)."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = mx.concatenate([x, mx.zeros_like(x[..., :1])], axis=-1)
        x = x[..., 0::2] + x[..., 1::2]
    return x


def probs_from_logits(logits: mx.array) -> mx.array:
    """Softmax accurate to ~1e-7 in float32, with exact zeros (exp(log_floor - max) underflows).

    Not ``mx.softmax``/``.sum``: a float32 running sum of V near-equal terms drifts by up to
    V/2 ulps (2.7e-6 for a 45-character alphabet), which would break a 1e-6 exactness claim.
    """
    e = mx.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / _pairwise_sum(e)


def next_token_probs(model: Model, inputs: mx.array) -> mx.array:
    """Next-token probabilities ``[B, T, V]``: exact zeros where the n-gram LM has zeros."""
    _check_inputs(model, inputs)
    return probs_from_logits(model(inputs))


def _check_inputs(model: Model, inputs: mx.array) -> None:
    a = model.args
    if inputs.ndim != 2:
        raise NgramError(f"inputs must be [batch, time] token ids, got shape {tuple(inputs.shape)}.")
    arr = np.array(inputs)
    if arr.shape[1] == 0 or np.any(arr[:, 0] != a.num_symbols):
        raise NgramError(f"inputs must start with BOS (id {a.num_symbols}); use with_bos(tokens, bos).")
    if np.any((arr < 0) | (arr > a.num_symbols)) or np.any(arr[:, 1:] == a.num_symbols):
        raise NgramError(
            f"token ids after position 0 must be symbols 0..{a.num_symbols - 1} (no BOS/EOS inside)."
        )


def generate(model: Model, prompt: Optional[Any] = None, max_tokens: int = 50,
             temperature: float = 1.0, seed: int = 0) -> List[int]:
    """Sample symbols after ``prompt`` until EOS or ``max_tokens``; temperature 0 is greedy.

    Sampling inverts the CDF of the (exactly zero where impossible) probabilities, so tokens with
    probability 0 can never be drawn. No KV cache: each step re-runs the prefix (models are tiny).
    """
    if temperature < 0 or max_tokens < 0:
        raise NgramError("generate needs temperature >= 0 and max_tokens >= 0.")
    a = model.args
    seq = [] if prompt is None else [int(t) for t in np.asarray(prompt).reshape(-1)]
    if any(t < 0 or t >= a.num_symbols for t in seq):
        raise NgramError(f"prompt ids must be symbols 0..{a.num_symbols - 1} (BOS is added for you).")
    key = mx.random.key(seed)
    for _ in range(max_tokens):
        inputs = with_bos(seq, a.num_symbols)
        logits = model(inputs)[0, -1]
        if temperature == 0:
            y = int(mx.argmax(logits).item())
        else:
            p = probs_from_logits(logits / temperature)
            key, sub = mx.random.split(key)
            cdf = mx.cumsum(p)
            u = mx.random.uniform(key=sub) * cdf[-1]
            y = int(mx.minimum((cdf <= u).sum(), a.vocab_size - 1).item())
        if y >= a.num_symbols:  # EOS (BOS is never likely)
            break
        seq.append(y)
    return seq


def softmax_error_bound(beta: float, n: int, vocab_size: int, variant: str = "heads") -> float:
    """Worst-case |p_model - p_ngram| per entry for softmax attention at inverse temperature beta.

    Scores -|t-h-s| have gap >= 1, so each head leaks eps = 2q/(1-q), q = e^-beta, off its target.
    Slot deficits add up to D = (n-1) eps (heads) or (n-1)(n-2)/2 eps (layers: slot l inherits
    l eps). If every slot deficit is < 1/2 the AND layer keeps wrong histories at exactly 0 and the
    right one at a in [1 - 2D, 1], so the logits are a * log p. d softmax(a L)/da = p (L - E_p L)
    and x^a |log x| <= 1/(e a) give |dp| <= (1 - a)(2/e)(V + 1) <= (4/e)(V + 1) D for a >= 1/2.
    Returns 1.0 (the trivial bound) when those conditions fail.
    """
    q = math.exp(-beta)
    eps = 2 * q / (1 - q) if q < 1 else math.inf
    if variant == "heads":
        worst_slot, D = eps, (n - 1) * eps
    else:
        worst_slot, D = max(n - 2, 0) * eps, (n - 1) * (n - 2) / 2 * eps
    if worst_slot >= 0.5 or 2 * D > 0.5:
        return 1.0
    return min(1.0, 4 / math.e * (vocab_size + 1) * D)
