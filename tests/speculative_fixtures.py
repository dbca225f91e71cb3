"""Tiny explicit models and a NumPy reference of the toolkit's sampling, for the speculative tests.

The reference is written from the definitions (repetition penalty of Keskar et al. 2019 as
mlx-lm documents it, nucleus / min-p / top-k cuts on the temperature-1 distribution, then the
temperature) and imports nothing from ``mlx_elm.speculative``.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache


class TrigramModel(nn.Module):
    """``logits(next | prev, cur) = table[prev, cur]`` (prev = V before the first token).

    The KV cache stores the token ids themselves, so the model reads ``prev`` across chunks and a
    wrongly trimmed cache changes the distribution; it trims like any mlx-lm cache.
    """

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.vocab = table.shape[-1]
        self.table = mx.array(table.astype(np.float32))

    def make_cache(self) -> list:
        return [KVCache()]

    @property
    def layers(self) -> list:
        return [self]  # one "layer"; mlx-lm counts layers to build caches

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        n = inputs.shape[1]
        ids = inputs.astype(mx.float32)[:, None, :, None]
        seq = ids if cache is None else cache[0].update_and_fetch(ids, ids)[0]
        seq = seq[0, 0, :, 0].astype(mx.int32)
        prev = mx.concatenate([mx.array([self.vocab], dtype=mx.int32), seq[:-1]])
        return self.table[prev[-n:], seq[-n:]][None]


def random_table(vocab: int, seed: int, scale: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (vocab + 1, vocab, vocab))


def reference_probs(logits: np.ndarray, seen: Sequence[int], temp: float, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0, context: int = 20) -> np.ndarray:
    """The next-token distribution plain decoding samples from (float64)."""
    x = np.array(logits, dtype=np.float64)
    if repetition_penalty != 1.0 and len(seen):
        for t in set(list(seen)[-context:]):
            x[t] = x[t] * repetition_penalty if x[t] < 0 else x[t] / repetition_penalty
    logp = x - np.log(np.exp(x - x.max()).sum()) - x.max()
    if temp == 0:
        out = np.zeros_like(x)
        out[np.argmax(logp)] = 1.0
        return out
    p = np.exp(logp)
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if 0 < top_p < 1:
        above = np.cumsum(p[order]) - p[order]  # mass ranked strictly above each token
        keep[order[above >= top_p]] = False
    if min_p > 0:
        keep &= p >= min_p * p.max()
    if top_k > 0:
        keep[order[top_k:]] = False
    z = np.where(keep, logp / temp, -np.inf)
    z = np.exp(z - z.max())
    return z / z.sum()


def sequence_distribution(table: np.ndarray, prompt: Sequence[int], length: int, **sampling) -> Dict[Tuple[int, ...], float]:
    """Exact probability of every ``length``-token continuation of ``prompt`` under a trigram table."""
    vocab = table.shape[-1]
    out = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob, tokens = 1.0, list(prompt)
        for t in seq:
            prev = tokens[-2] if len(tokens) >= 2 else vocab
            p = reference_probs(table[prev, tokens[-1]], tokens, **sampling)
            prob *= p[t]
            tokens.append(t)
        if prob > 0:
            out[seq] = prob
    return out


def chi_square_pvalue(counts: Dict, expected: Dict[Tuple[int, ...], float], total: int,
                      min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit (cells with < ``min_expected`` pooled); p-value via torch."""
    import torch

    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for cell, prob in expected.items():
        e, o = prob * total, counts.get(cell, 0)
        if e < min_expected:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    impossible = sum(v for c, v in counts.items() if c not in expected)
    if impossible:
        return 0.0  # a sequence the target can never produce
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def repeated_prompt(vocab: int, length: int, seed: int, period: int = 23) -> List[int]:
    """Token ids with repeats (so prompt lookup finds matches) plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(3, vocab, period).tolist()
    out = [base[i % period] if rng.random() > 0.1 else int(rng.integers(3, vocab)) for i in range(length)]
    return out
