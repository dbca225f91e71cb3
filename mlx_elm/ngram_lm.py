"""n-gram language models as explicit tables: estimation, random models, probabilities, sampling.

This is the ground truth that ``mlx_elm.models.ngram`` turns into transformer weights, so it is
plain NumPy (float64) and keeps every conditional p(y | history) of every reachable history.

Token ids: symbols are ``0 .. S-1``, then ``bos = S`` and ``eos = S + 1`` (``vocab_size = S + 2``).
Histories are the last n-1 tokens, left-padded with BOS, so the reachable histories are
``BOS^k w`` with ``w`` a string of ``n-1-k`` symbols: ``(S^n - 1) / (S - 1)`` of them (``n`` if S = 1).
An LM without EOS (``p(EOS | .) = 0`` everywhere) describes an endless symbol stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from mlx_elm.errors import NgramError

MAX_HISTORIES = 2_000_000


def num_histories(num_symbols: int, n: int) -> int:
    """How many BOS-padded histories of length n-1 can occur: sum over m of S^m, m = 0..n-1."""
    return sum(num_symbols**m for m in range(n))


def _check_order(n: int, num_symbols: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise NgramError(f"n-gram order n={n!r} is invalid; use an integer n >= 1.")
    if not isinstance(num_symbols, (int, np.integer)) or num_symbols < 1:
        raise NgramError(f"num_symbols={num_symbols!r} is invalid; the alphabet needs >= 1 symbol.")
    h = num_histories(int(num_symbols), int(n))
    if h > MAX_HISTORIES:
        raise NgramError(
            f"an order-{n} model over {num_symbols} symbols has {h:,} histories (limit "
            f"{MAX_HISTORIES:,}); use a smaller n or alphabet."
        )


@dataclass
class NgramLM:
    """An n-gram LM: ``probs[i]`` is p(. | history i) over the ``vocab_size`` output ids.

    Column ``bos`` is always 0; column ``eos`` is 0 for LMs without an end symbol.
    ``alphabet`` (optional) maps symbol ids to characters for character-level models.
    """

    n: int
    num_symbols: int
    probs: np.ndarray
    alphabet: Optional[str] = None

    def __post_init__(self) -> None:
        _check_order(self.n, self.num_symbols)
        self.n, self.num_symbols = int(self.n), int(self.num_symbols)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        want = (num_histories(self.num_symbols, self.n), self.vocab_size)
        if self.probs.shape != want:
            raise NgramError(f"probs has shape {self.probs.shape}, expected {want}; one row per history.")
        if np.any(self.probs < 0) or not np.all(np.isfinite(self.probs)):
            raise NgramError("probs must be finite and non-negative; renormalise the table.")
        if np.any(self.probs[:, self.bos] != 0):
            raise NgramError("BOS is never an output; set its probability column to 0.")
        if not np.allclose(self.probs.sum(axis=1), 1.0, atol=1e-9):
            raise NgramError("every history row of probs must sum to 1; normalise the rows.")
        if self.alphabet is not None and len(self.alphabet) != self.num_symbols:
            raise NgramError(f"alphabet has {len(self.alphabet)} characters for {self.num_symbols} symbols.")

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        return self.num_symbols

    @property
    def eos(self) -> int:
        return self.num_symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    @property
    def num_histories(self) -> int:
        return self.probs.shape[0]

    @property
    def has_eos(self) -> bool:
        return bool(np.any(self.probs[:, self.eos] > 0))

    def encode(self, text: str) -> np.ndarray:
        """Character ids of ``text`` (character-level models only)."""
        if self.alphabet is None:
            raise NgramError("this n-gram LM has no alphabet; pass token ids instead of text.")
        index = {c: i for i, c in enumerate(self.alphabet)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise NgramError(f"characters {missing[:5]} are not in the model's alphabet; remove them.")
        return np.array([index[c] for c in text], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of symbol ids; BOS and EOS are dropped."""
        if self.alphabet is None:
            raise NgramError("this n-gram LM has no alphabet; it cannot decode to text.")
        return "".join(self.alphabet[int(i)] for i in ids if int(i) < self.num_symbols)

    # --- histories ----------------------------------------------------------------------------
    def histories(self) -> np.ndarray:
        """``[num_histories, n-1]`` token ids of every history, oldest first, BOS-padded.

        Row order is the index order used by ``probs``: by the number m of real symbols, then
        by the symbols read as a base-S number whose last digit is the most recent symbol.
        """
        S, L = self.num_symbols, self.n - 1
        rows = []
        for m in range(L + 1):
            codes = np.arange(S**m)
            digits = np.stack([(codes // S**j) % S for j in reversed(range(m))], axis=1) if m else (
                np.zeros((1, 0), dtype=np.int64))
            pad = np.full((S**m, L - m), self.bos, dtype=np.int64)
            rows.append(np.concatenate([pad, digits.astype(np.int64)], axis=1))
        return np.concatenate(rows, axis=0)

    def _check_symbols(self, tokens: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= self.num_symbols)]
        if bad.size:
            raise NgramError(
                f"token id {int(bad[0])} is outside the alphabet 0..{self.num_symbols - 1}; "
                "pass symbols only (no BOS/EOS) to n-gram LM methods."
            )
        return arr

    def history_indices(self, tokens: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """Row of ``probs`` after each prefix ``tokens[:i]``, i = 0..len(tokens)."""
        arr = self._check_symbols(tokens)
        return _history_indices(arr, self.num_symbols, self.n)

    # --- probabilities ------------------------------------------------------------------------
    def next_probs(self, context: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """p(. | context) over the ``vocab_size`` output ids (context = symbols, no BOS)."""
        return self.probs[self.history_indices(context)[-1]].copy()

    def conditionals(self, tokens: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """``[len(tokens)+1, vocab_size]``: p(. | tokens[:i]) for every prefix, the empty one first.

        Row i lines up with position i of the model input ``[BOS] + tokens``.
        """
        return self.probs[self.history_indices(tokens)]

    def log_prob(self, tokens: Union[Sequence[int], np.ndarray], include_eos: bool = True) -> float:
        """log p of a string (natural log); with ``include_eos`` the string is complete."""
        arr = self._check_symbols(tokens)
        cond = self.conditionals(arr)
        targets = np.concatenate([arr, [self.eos]]) if include_eos else arr
        with np.errstate(divide="ignore"):
            return float(np.sum(np.log(cond[np.arange(len(targets)), targets])))

    def sample(self, num: int, max_len: int, seed: int = 0) -> List[np.ndarray]:
        """``num`` strings of symbols, each stopping at EOS (not included) or at ``max_len``.

        Vectorised over strings (one NumPy step per position), so large training sets are cheap.
        """
        if num < 1 or max_len < 1:
            raise NgramError("sample needs num >= 1 and max_len >= 1.")
        rng = np.random.default_rng(seed)
        cdf = np.cumsum(self.probs, axis=1)
        S, L = self.num_symbols, self.n - 1
        offsets = np.array([num_histories(S, j) for j in range(self.n)], dtype=np.int64)
        out = np.zeros((num, max_len), dtype=np.int64)
        length = np.full(num, max_len)
        done = np.zeros(num, dtype=bool)
        idx = np.zeros(num, dtype=np.int64)  # history of the empty prefix
        for t in range(max_len):
            u = rng.random(num) * cdf[idx, -1]
            y = (cdf[idx] <= u[:, None]).sum(axis=1)  # first column whose cdf exceeds u
            stop = (y >= S) & ~done  # EOS; BOS has zero width and cannot be drawn
            length[stop] = t
            done |= stop
            out[:, t] = np.where(done, 0, y)
            m = min(t + 1, L)
            code = np.zeros(num, dtype=np.int64)
            for j in range(m):
                code += out[:, t - j] * S**j
            idx = offsets[m] + code
        return [out[i, : length[i]].copy() for i in range(num)]

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        sequences: Union[Sequence[int], np.ndarray, Sequence[Sequence[int]]],
        n: int,
        num_symbols: int,
        k: float = 1.0,
        eos: bool = True,
        alphabet: Optional[str] = None,
    ) -> "NgramLM":
        """Add-k estimate from token sequences (each BOS-padded; EOS counted at each end if ``eos``).

        p(y | h) = (c(h, y) + k) / (c(h) + k |support|), support = symbols (+ EOS). A history never
        seen with k = 0 gets the uniform distribution over the support.
        """
        _check_order(n, num_symbols)
        if not np.isfinite(k) or k < 0:
            raise NgramError(f"add-k smoothing needs k >= 0, got k={k}; use e.g. k=1 (Laplace).")
        seqs = _as_sequences(sequences)
        S, V = num_symbols, num_symbols + 2
        counts = np.zeros((num_histories(S, n), V), dtype=np.float64)
        for seq in seqs:
            arr = np.asarray(seq, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= S):
                bad = arr[(arr < 0) | (arr >= S)][0]
                raise NgramError(f"token id {int(bad)} is outside the alphabet 0..{S - 1}; fix the data.")
            hist = _history_indices(arr, S, n)
            targets = np.concatenate([arr, [S + 1]]) if eos else arr
            np.add.at(counts, (hist[: len(targets)], targets), 1.0)
        support = np.zeros(V, dtype=bool)
        support[:S] = True
        support[S + 1] = eos
        smoothed = np.where(support, counts + k, 0.0)
        totals = smoothed.sum(axis=1, keepdims=True)
        uniform = support / support.sum()
        probs = np.where(totals > 0, smoothed / np.where(totals > 0, totals, 1.0), uniform)
        return cls(n=n, num_symbols=S, probs=probs, alphabet=alphabet)

    @classmethod
    def from_text(cls, text: str, n: int, k: float = 0.1, eos: bool = True,
                  alphabet: Optional[str] = None) -> "NgramLM":
        """Character-level add-k n-gram of ``text`` (alphabet = its sorted distinct characters)."""
        if not text:
            raise NgramError("from_text needs non-empty text.")
        alphabet = "".join(sorted(set(text))) if alphabet is None else alphabet
        index = {c: i for i, c in enumerate(alphabet)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise NgramError(f"characters {missing[:5]} are not in the given alphabet; add them.")
        ids = np.array([index[c] for c in text], dtype=np.int64)
        return cls.fit([ids], n=n, num_symbols=len(alphabet), k=k, eos=eos, alphabet=alphabet)

    @classmethod
    def random(cls, num_symbols: int, n: int, zero_frac: float = 0.3, eos: bool = True,
               alpha: float = 1.0, seed: int = 0) -> "NgramLM":
        """Random LM: Dirichlet(alpha) rows with about ``zero_frac`` exact zeros (>= 1 nonzero per row)."""
        _check_order(n, num_symbols)
        if not 0.0 <= zero_frac < 1.0 or alpha <= 0:
            raise NgramError("random n-gram LMs need 0 <= zero_frac < 1 and alpha > 0.")
        rng = np.random.default_rng(seed)
        S, V, H = num_symbols, num_symbols + 2, num_histories(num_symbols, n)
        cols = np.r_[np.arange(S), [S + 1]] if eos else np.arange(S)
        rows = rng.dirichlet(np.full(len(cols), alpha), size=H)
        zero = rng.random(rows.shape) < zero_frac
        zero[np.arange(H), rows.argmax(axis=1)] = False
        rows = np.where(zero, 0.0, rows)
        rows /= rows.sum(axis=1, keepdims=True)
        probs = np.zeros((H, V))
        probs[:, cols] = rows
        return cls(n=n, num_symbols=S, probs=probs)


def _as_sequences(sequences) -> List[np.ndarray]:
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
        return [sequences]
    seqs = list(sequences)
    if seqs and np.isscalar(seqs[0]):
        return [np.asarray(seqs)]
    return [np.asarray(s) for s in seqs]


def _history_indices(arr: np.ndarray, S: int, n: int) -> np.ndarray:
    """Vectorised history index after each prefix arr[:i], i = 0..len(arr)."""
    T = len(arr)
    i = np.arange(T + 1)
    m = np.minimum(i, n - 1)
    offsets = np.array([num_histories(S, j) for j in range(n)], dtype=np.int64)  # sum_{j'<j} S^j'
    code = np.zeros(T + 1, dtype=np.int64)
    for j in range(n - 1):  # j-th most recent symbol carries weight S^j
        pos = i - 1 - j
        ok = j < m
        code += np.where(ok, arr[np.clip(pos, 0, max(T - 1, 0))] if T else 0, 0) * S**j
    return offsets[m] + code
