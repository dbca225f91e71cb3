"""Accept or reject drafted tokens against the target model's distribution.

One target forward pass over ``[y, d_1 .. d_k]`` gives k + 1 rows of logits; row i is the target's
prediction after ``d_1 .. d_i``. Then:

* greedy (``temp == 0``): accept while the target's argmax equals the draft; the first mismatch
  (or, when every draft matched, the row after the last draft) gives the target's own token. The
  output is token for token the argmax sequence plain decoding produces.
* sampling: the rule of Leviathan et al. 2023 (arXiv 2211.17192, Algorithm 1) and Chen et al.
  2023 (arXiv 2302.01318): accept ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``; on the
  first rejection draw from the residual ``max(p_i - q_i, 0)`` (normalised) and stop; when all k
  are accepted draw one more token from ``p_{k+1}``. Every emitted token is then distributed as
  the target's ``p``. A deterministic draft (prompt lookup, a greedy draft model) is a point mass
  ``q_i = 1{d_i}``: acceptance is ``p_i(d_i)`` and the residual is ``p_i`` without ``d_i``.

``p`` is :class:`~mlx_elm.speculative.distribution.SamplingRule`'s distribution, i.e. the
processors, filters and temperature plain decoding applies, evaluated per row with the drafted
prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import numpy as np

from mlx_elm.speculative.distribution import SamplingRule

_TINY = float(np.finfo(np.float32).tiny)  # uniform draws in (0, 1): finite Gumbel noise


@dataclass
class Verdict:
    """``accepted`` drafted tokens are kept, then ``token`` (the target's) follows them."""

    accepted: int
    token: int
    logprobs: mx.array  # (k + 1, V): the target's log-probabilities at each verified position
    drafted: List[int]


def verify(rule: SamplingRule, logits: mx.array, tokens: mx.array, drafted: mx.array,
           q: Optional[mx.array] = None) -> Verdict:
    """Decide how many of ``drafted`` (k,) the target keeps.

    ``logits`` (k + 1, V) are the target's rows for ``[y, d_1 .. d_k]``; ``tokens`` every token the
    processors must see before the first row (prompt and generated, ``y`` included); ``q`` (k, V)
    the draft's distribution at each drafted position, or None for a point mass.
    """
    k = drafted.shape[0]
    logprobs = rule.logprobs(logits, tokens, drafted)
    if rule.greedy:
        target = mx.argmax(logprobs, axis=-1)
        mx.eval(target, drafted)
        target, draft = target.tolist(), drafted.tolist()
        n = 0
        while n < k and target[n] == draft[n]:
            n += 1
        return Verdict(n, target[n], logprobs, draft)
    p = rule.probs(logprobs)
    V = p.shape[-1]
    # One uniform draw serves everything: column V gives the k acceptance tests, the rest Gumbel
    # noise for the k residual draws and the bonus draw (argmax(log w + Gumbel) ~ w / sum(w)).
    u = mx.random.uniform(low=_TINY, high=1.0, shape=(k + 1, V + 1))
    gumbel = -mx.log(-mx.log(u[:, :V]))
    if k == 0:
        token = mx.argmax(mx.log(p[0]) + gumbel[0])
        mx.eval(token)
        return Verdict(0, token.item(), logprobs, [])
    column = drafted[:, None].astype(mx.int32)
    p_d = mx.take_along_axis(p[:k], column, axis=-1)[:, 0]
    if q is None:
        q = (mx.arange(V)[None, :] == column).astype(p.dtype)
    q_d = mx.take_along_axis(q, column, axis=-1)[:, 0]
    accept = u[:k, V] * q_d < p_d  # u < p/q without dividing; q_d > 0 because d was drawn from q
    residual = mx.maximum(p[:k] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(mass > 0, residual, p[:k])  # p == q: rejection has probability 0 anyway
    weights = mx.concatenate([residual, p[k:]], axis=0)
    picks = mx.argmax(mx.log(weights) + gumbel, axis=-1)  # row i < k: residual draw; row k: bonus
    mx.eval(accept, picks, drafted)
    accept, draft, picks = accept.tolist(), drafted.tolist(), picks.tolist()
    n = 0
    while n < k and accept[n]:
        n += 1
    return Verdict(n, picks[n], logprobs, draft)
