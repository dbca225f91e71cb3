"""Analytic n-gram transformers reproduce n-gram LMs: checked against independent NumPy references."""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import io
import itertools
import math
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.errors import NgramError
from mlx_elm.models import ngram as ng
from mlx_elm.ngram_lm import NgramLM

ROOT = Path(__file__).resolve().parents[1]


# --- independent references -------------------------------------------------------------------
def ref_table(lm: NgramLM) -> dict:
    """history tuple (oldest first, BOS-padded) -> probability row, keyed without index arithmetic."""
    return {tuple(int(x) for x in h): lm.probs[i] for i, h in enumerate(lm.histories())}


def ref_conditionals(lm: NgramLM, table: dict, seq) -> np.ndarray:
    """p(. | seq[:i]) for i = 0..len(seq), by explicit BOS padding and a dictionary lookup."""
    padded = [lm.bos] * (lm.n - 1) + [int(s) for s in seq]
    return np.stack([table[tuple(padded[i: i + lm.n - 1])] for i in range(len(seq) + 1)])


def model_probs(model, lm: NgramLM, seqs: np.ndarray) -> np.ndarray:
    out = ng.next_token_probs(model, ng.with_bos(seqs, lm.bos))
    assert out.dtype == mx.float32
    return np.array(out).astype(np.float64)


def assert_exact(p: np.ndarray, ref: np.ndarray, tol: float = 1e-6) -> None:
    assert not np.isnan(p).any()
    assert np.abs(p - ref).max() <= tol, np.abs(p - ref).max()
    assert np.all(p[ref == 0] == 0.0), "a zero of the n-gram LM is not exactly zero"


def zen_text() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import
    return codecs.decode(this.s, "rot13")


# --- the n-gram LM itself -----------------------------------------------------------------------
def test_add_k_estimate_matches_counter():
    text = "abracadabra cadabra abba"
    k, n = 0.5, 3
    lm = NgramLM.from_text(text, n, k=k)
    alpha = sorted(set(text))
    padded = ["<s>"] * (n - 1) + list(text) + ["</s>"]
    grams = Counter(tuple(padded[i: i + n]) for i in range(len(padded) - n + 1))
    support = alpha + ["</s>"]
    for ctx in ["", "a", "ab", "br", "zz"[:0] + "ca", "bb"]:
        hist = tuple((["<s>"] * (n - 1) + list(ctx))[-(n - 1):])
        c = np.array([grams[hist + (y,)] for y in support], dtype=float)
        want = (c + k) / (c.sum() + k * len(support))
        got = lm.next_probs(lm.encode(ctx))
        np.testing.assert_allclose(got[: len(alpha)], want[:-1], atol=1e-12)
        assert got[lm.eos] == pytest.approx(want[-1], abs=1e-12) and got[lm.bos] == 0


def test_histories_and_indices_agree_with_padding():
    lm = NgramLM.random(3, 4, seed=3)
    assert lm.num_histories == (3**4 - 1) // (3 - 1)
    hist = lm.histories()
    assert len({tuple(h) for h in hist}) == lm.num_histories
    seq = np.random.default_rng(0).integers(0, 3, 12)
    padded = [lm.bos] * 3 + list(seq)
    for i, idx in enumerate(lm.history_indices(seq)):
        assert tuple(hist[idx]) == tuple(padded[i: i + 3])


@pytest.mark.parametrize("eos", [True, False])
def test_random_lm_has_exact_zeros_and_normalised_rows(eos):
    lm = NgramLM.random(4, 3, zero_frac=0.4, eos=eos, seed=1)
    assert np.allclose(lm.probs.sum(1), 1) and np.all(lm.probs[:, lm.bos] == 0)
    assert (lm.probs[:, :4] == 0).any() and np.all((lm.probs > 0).sum(1) >= 1)
    assert lm.has_eos == eos


def test_sampling_follows_the_table_and_never_draws_zeros():
    lm = NgramLM.random(3, 3, zero_frac=0.4, seed=5)
    seqs = lm.sample(3000, 12, seed=0)
    table = ref_table(lm)
    first = Counter(int(s[0]) if len(s) else lm.eos for s in seqs)
    emp = np.array([first[y] for y in range(lm.vocab_size)]) / len(seqs)
    assert np.abs(emp - lm.probs[0]).max() < 0.04  # ~4 standard errors at n=3000
    for s in seqs[:500]:
        cond = ref_conditionals(lm, table, s)
        targets = list(s) + ([lm.eos] if len(s) < 12 else [])
        assert all(cond[i, y] > 0 for i, y in enumerate(targets))


def test_log_prob_is_sum_of_conditionals():
    lm = NgramLM.random(3, 2, zero_frac=0.0, seed=2)
    seq = [0, 2, 1, 1]
    ref = math.log(lm.probs[0, 0]) + sum(
        math.log(lm.probs[1 + a, b]) for a, b in zip(seq, seq[1:] + [lm.eos]))
    assert lm.log_prob(seq) == pytest.approx(ref, abs=1e-12)


# --- exactness of the constructions ---------------------------------------------------------------
@pytest.mark.parametrize("S,n,L", [(2, 1, 6), (2, 2, 8), (2, 4, 8), (3, 2, 6), (3, 3, 6), (3, 4, 6),
                                   (5, 3, 4), (5, 4, 4)])
def test_every_prefix_is_exact(S, n, L):
    lm = NgramLM.random(S, n, zero_frac=0.3, seed=10 * S + n)
    table = ref_table(lm)
    seqs = np.array(list(itertools.product(range(S), repeat=L)))  # every prefix up to length L
    ref = np.stack([ref_conditionals(lm, table, s) for s in seqs])
    assert (ref[..., :S] == 0).any()
    for variant in ng.VARIANTS:
        for attention in ("hard", "sparsemax"):
            model = ng.build(lm, variant=variant, attention=attention)
            assert_exact(model_probs(model, lm, seqs), ref)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_long_sequences_are_exact_in_float32(n):
    lm = NgramLM.random(3, n, zero_frac=0.3, seed=n)
    seq = np.random.default_rng(n).integers(0, 3, 2500)
    ref = ref_conditionals(lm, ref_table(lm), seq)[None]
    for variant in ng.VARIANTS:
        for attention in ("hard", "sparsemax"):
            assert_exact(model_probs(ng.build(lm, variant, attention), lm, seq[None]), ref)


@pytest.mark.slow
def test_real_text_character_4gram_is_reproduced():
    text = zen_text()
    lm = NgramLM.from_text(text, 4, k=0.1)
    assert lm.num_symbols > 30
    # the reference: add-k counts of the text, computed here with a Counter
    pad = [None] * 3 + list(text) + ["EOS"]
    grams = Counter(tuple(pad[i: i + 4]) for i in range(len(pad) - 3))
    ctx_counts = Counter(tuple(pad[i: i + 3]) for i in range(len(pad) - 3))
    outs = list(lm.alphabet) + ["EOS"]
    ref = np.array([[(grams[tuple(pad[i: i + 3]) + (y,)] + 0.1) / (ctx_counts[tuple(pad[i: i + 3])]
                     + 0.1 * len(outs)) for y in outs] for i in range(len(text) + 1)])
    ids = lm.encode(text)
    for variant, attention in (("heads", "hard"), ("layers", "sparsemax")):
        model = ng.build(lm, variant, attention)
        p = model_probs(model, lm, ids[None])[0]
        assert np.abs(p[:, : lm.num_symbols] - ref[:, :-1]).max() <= 1e-6
        assert np.abs(p[:, lm.eos] - ref[:, -1]).max() <= 1e-6 and np.all(p[:, lm.bos] == 0)
        logits = np.array(model(ng.with_bos(ids, lm.bos)))[0].astype(np.float64)
        targets = np.r_[ids, lm.eos]
        ll = logits[np.arange(len(targets)), targets].sum()
        assert ll == pytest.approx(float(np.log(ref[np.arange(len(targets)), np.r_[ids, -1]]).sum()),
                                   rel=1e-5)


def test_attention_maps_point_at_the_history():
    lm = NgramLM.random(3, 4, seed=0)
    x = ng.with_bos(np.random.default_rng(0).integers(0, 3, 20), lm.bos)
    T = x.shape[1]
    (heads,) = ng.build(lm, "heads", "hard").attention_maps(x)
    for h in range(3):
        want = np.zeros((T, T))
        want[np.arange(T), np.maximum(np.arange(T) - h, 0)] = 1
        np.testing.assert_array_equal(np.array(heads[0, h]), want)
    for layer in ng.build(lm, "layers", "sparsemax").attention_maps(x):
        want = np.zeros((T, T))
        want[np.arange(T), np.maximum(np.arange(T) - 1, 0)] = 1
        np.testing.assert_array_equal(np.array(layer[0, 0]), want)


def test_unit_circle_scores_lose_exactness_in_float32_after_about_100_positions():
    """The paper's bounded encoding: neighbouring scores differ by ~1/(8 t^3) < float32 ulp."""
    lm = NgramLM.random(3, 3, zero_frac=0.3, seed=7)
    seq = np.random.default_rng(7).integers(0, 3, 400)
    ref = ref_conditionals(lm, ref_table(lm), seq)
    circle = model_probs(ng.build(lm, "heads", "hard", scores="unit_circle"), lm, seq[None])[0]
    err = np.abs(circle - ref).max(axis=1)
    assert err[:100].max() <= 1e-6  # exact for the first hundred positions ...
    assert err.max() > 0.05  # ... but not over 400 (wrong attention targets)
    t = np.float32(110.0)
    u = lambda s: np.array([1 / np.sqrt(s), np.sqrt(1 - 1 / s)], np.float32)  # noqa: E731
    assert np.dot(u(t), u(t)) - np.dot(u(t), u(t + 1)) < np.finfo(np.float32).eps
    assert_exact(model_probs(ng.build(lm, "heads", "hard"), lm, seq[None])[0], ref)  # abs: fine


# --- softmax attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant,n", [("heads", 3), ("heads", 4), ("layers", 4)])
def test_softmax_error_shrinks_with_beta_within_the_bound(variant, n):
    lm = NgramLM.random(3, n, zero_frac=0.3, seed=11 + n)
    seqs = np.random.default_rng(1).integers(0, 3, (12, 50))
    table = ref_table(lm)
    ref = np.stack([ref_conditionals(lm, table, s) for s in seqs])
    errs = []
    for beta in (3.0, 5.0, 8.0, 12.0, 16.0, 24.0):
        p = model_probs(ng.build(lm, variant, "softmax", beta=beta), lm, seqs)
        assert not np.isnan(p).any() and np.all(p[ref == 0] == 0)
        err = np.abs(p - ref).max()
        bound = ng.softmax_error_bound(beta, n, lm.vocab_size, variant)
        assert err <= bound + 2e-7, (beta, err, bound)
        errs.append(err)
    assert errs[0] > 1e-2  # soft attention is not hard attention at small beta ...
    assert all(b <= a + 1e-7 for a, b in zip(errs, errs[1:]))  # ... the error shrinks ...
    assert errs[-1] <= 1e-6  # ... down to float32 rounding
    assert ng.softmax_error_bound(12.0, n, lm.vocab_size, variant) < 1e-3


def test_softmax_head_leak_matches_eps():
    lm = NgramLM.random(2, 3, seed=0)
    x = ng.with_bos(np.zeros(30, int), lm.bos)
    for beta in (2.0, 4.0, 8.0):
        (maps,) = ng.build(lm, "heads", "softmax", beta=beta).attention_maps(x)
        w = np.array(maps[0]).astype(np.float64)  # [H, T, T]
        T = w.shape[-1]
        target = np.maximum(np.arange(T)[None, :] - np.arange(2)[:, None], 0)
        leak = 1 - np.take_along_axis(w, target[..., None], axis=-1)[..., 0]
        q = math.exp(-beta)
        assert leak.max() <= 2 * q / (1 - q) + 1e-6 and leak[:, 10:].max() > q  # two-sided, tight


def test_sparsemax_matches_bisection_reference():
    z = np.random.default_rng(0).normal(size=(50, 9)).astype(np.float32) * 2
    got = np.array(ng.sparsemax(mx.array(z)))
    for row, p in zip(z.astype(np.float64), got):
        lo, hi = row.min() - 1, row.max()
        for _ in range(200):  # tau solves sum(max(z - tau, 0)) = 1
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(row - mid, 0).sum() > 1 else (lo, mid)
        np.testing.assert_allclose(p, np.maximum(row - lo, 0), atol=1e-5)
    masked = np.array(ng.sparsemax(mx.array([[0.0, -mx.inf, -1.0, -0.5]])))
    np.testing.assert_allclose(masked, [[0.75, 0.0, 0.0, 0.25]], atol=1e-7)


# --- the module as a model -------------------------------------------------------------------------
def test_call_convention_and_generation():
    lm = NgramLM.random(3, 3, zero_frac=0.4, seed=4)
    model = ng.build(lm)
    x = ng.with_bos([[0, 1, 2, 1], [2, 2, 0, 0]], lm.bos)
    logits = model(x)
    assert logits.shape == (2, 5, lm.vocab_size) and isinstance(model.layers, list)
    assert np.all(np.array(logits)[..., lm.bos] == model.args.log_floor)
    greedy = ng.generate(model, prompt=[1], max_tokens=8, temperature=0)
    seq = [1]  # independent greedy chain from the table
    for _ in range(8):
        y = int(np.argmax(lm.next_probs(seq)))
        if y == lm.eos:
            break
        seq.append(y)
    assert greedy == seq
    table = ref_table(lm)
    for seed in range(20):
        out = ng.generate(model, max_tokens=15, temperature=1.0, seed=seed)
        cond = ref_conditionals(lm, table, out)
        assert all(cond[i, y] > 0 for i, y in enumerate(out))
        if len(out) < 15:
            assert cond[-1, lm.eos] > 0
    assert ng.generate(model, max_tokens=15, seed=3) == ng.generate(model, max_tokens=15, seed=3)


def test_user_errors_name_the_fix():
    lm = NgramLM.random(3, 2, seed=0)
    cases = [
        lambda: NgramLM.random(3, 0),
        lambda: NgramLM.fit([[0, 5]], 2, 3),
        lambda: NgramLM.fit([[0, 1]], 2, 3, k=-1),
        lambda: lm.next_probs([3]),
        lambda: ng.build(lm, attention="softmax", beta=0.0),
        lambda: ng.build(lm, variant="diagonal"),
        lambda: ng.build(lm, log_floor=-10.0),
        lambda: ng.next_token_probs(ng.build(lm), mx.array([[0, 1]])),
        lambda: NgramLM.random(50_000, 3),
    ]
    for case in cases:
        with pytest.raises(NgramError):
            case()


# --- the experiment example never rots ------------------------------------------------------------
def _load_example():
    spec = importlib.util.spec_from_file_location("ngram_experiment", ROOT / "examples" / "ngram_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ngram_experiment", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_experiment_fast_mode(tmp_path):
    ex = _load_example()
    lines = []
    plot = tmp_path / "kl.png" if importlib.util.find_spec("matplotlib") else None
    rows = ex.run(ex.ExperimentConfig.fast(), plot=None if plot is None else str(plot), log=lines.append)
    assert any("KL trained" in line for line in lines)
    assert all(abs(r["kl_exact"]) < 1e-5 for r in rows)
    assert rows[-1]["kl_trained"] < rows[0]["kl_trained"]
    assert all(np.isfinite(r["kl_trained"]) for r in rows)
    if plot is not None:
        assert plot.stat().st_size > 0


def test_experiment_plot_without_matplotlib_says_how_to_install(monkeypatch):
    ex = _load_example()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(NgramError, match="pip install matplotlib"):
        ex.run(ex.ExperimentConfig.fast(), plot="x.png", log=lambda s: None)
