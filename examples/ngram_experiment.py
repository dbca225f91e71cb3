"""Exact n-gram transformer vs. a trained one: how close does gradient descent get?

Samples token streams from a random n-gram LM, trains a tiny OpenELM on them with AdamW, and
prints, as training proceeds, the mean KL(true || model) of the next-symbol distributions on
held-out contexts, next to the analytic construction (``mlx_elm.models.ngram.build``, KL ~ 0) and
an add-k count estimate fitted on the same training tokens.

    python examples/ngram_experiment.py            # the README table (~7 min on 2 busy CPU cores)
    python examples/ngram_experiment.py --fast     # seconds; what the test runs
    python examples/ngram_experiment.py --plot kl.png   # needs: pip install matplotlib
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mlx_elm.errors import NgramError  # noqa: E402
from mlx_elm.models import ngram as ngram_tf  # noqa: E402
from mlx_elm.models.openelm import Model, ModelArgs  # noqa: E402
from mlx_elm.ngram_lm import NgramLM  # noqa: E402


@dataclass
class ExperimentConfig:
    n: int = 3
    num_symbols: int = 5
    zero_frac: float = 0.3
    alpha: float = 0.5  # Dirichlet concentration: < 1 gives peaked conditionals
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 1500
    eval_every: int = 150
    eval_sequences: int = 128
    learning_rate: float = 3e-3
    add_k: float = 0.5
    seed: int = 0

    @classmethod
    def fast(cls) -> "ExperimentConfig":
        return cls(steps=40, eval_every=20, batch_size=16, seq_len=32, eval_sequences=16)


def batch_inputs(seqs: List[np.ndarray], bos: int) -> np.ndarray:
    """``[B, T+1]``: BOS then the symbols (all sequences have the same length here)."""
    arr = np.stack(seqs)
    return np.concatenate([np.full((arr.shape[0], 1), bos), arr], axis=1).astype(np.int32)


def mean_kl(true: np.ndarray, log_q: np.ndarray) -> float:
    """Mean over rows of KL(p || q) = sum_{p > 0} p (log p - log q), in nats."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(true > 0, true * (np.log(true) - log_q), 0.0)
    return float(terms.sum(axis=-1).mean())


def log_probs(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    logits = model(mx.array(inputs)).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)


def run(cfg: ExperimentConfig, plot: Optional[str] = None, log=print) -> List[dict]:
    """Train and evaluate; returns one row per evaluation (also printed as a table)."""
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise NgramError("--plot needs matplotlib; install it with `pip install matplotlib`.") from e
    mx.random.seed(cfg.seed)
    lm = NgramLM.random(cfg.num_symbols, cfg.n, zero_frac=cfg.zero_frac, eos=False,
                        alpha=cfg.alpha, seed=cfg.seed)
    V = lm.vocab_size
    held_out = batch_inputs(lm.sample(cfg.eval_sequences, cfg.seq_len, seed=cfg.seed + 1), lm.bos)
    truth = np.stack([lm.conditionals(row[1:]) for row in held_out])  # [B, T+1, V]

    exact = ngram_tf.build(lm, variant="heads", attention="hard")
    kl_exact = mean_kl(truth, log_probs(exact, held_out))

    args = ModelArgs(num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=V,
                     num_gqa_groups=1, ffn_dim_divisor=16, qkv_multipliers=(1.0, 1.0),
                     ffn_multipliers=(2.0, 2.0), max_context_length=256)
    model = Model(args)
    mx.eval(model.parameters())
    schedule = optim.cosine_decay(cfg.learning_rate, cfg.steps, cfg.learning_rate * 0.05)
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    step_fn = nn.value_and_grad(model, loss_fn)
    counts: List[np.ndarray] = []
    n_params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    log(f"n-gram LM: n={cfg.n}, |Sigma|={cfg.num_symbols}, {lm.num_histories} histories, "
        f"{int((lm.probs[:, :cfg.num_symbols] == 0).sum())} zero entries")
    log(f"exact construction: {exact.num_parameters():,} parameters; trained OpenELM: {n_params:,}")
    log(f"{'step':>6} {'tokens':>8} {'train loss':>10} {'KL trained':>11} {'KL add-k':>9} {'KL exact':>9}")
    rows: List[dict] = []
    rng_seed = cfg.seed + 1000
    t0, loss = time.time(), float("nan")
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            kl_model = mean_kl(truth, log_probs(model, held_out))
            seen = [s for batch in counts for s in batch]
            kl_addk = math.nan
            if seen:
                est = NgramLM.fit(seen, cfg.n, cfg.num_symbols, k=cfg.add_k, eos=False)
                with np.errstate(divide="ignore"):
                    est_logp = np.log(np.stack([est.conditionals(r[1:]) for r in held_out]))
                kl_addk = mean_kl(truth, est_logp)
            row = dict(step=step, tokens=step * cfg.batch_size * cfg.seq_len, loss=loss,
                       kl_trained=kl_model, kl_addk=kl_addk, kl_exact=kl_exact)
            rows.append(row)
            log(f"{step:>6} {row['tokens']:>8} {loss:>10.4f} {kl_model:>11.2e} {kl_addk:>9.2e} "
                f"{kl_exact:>9.1e}")
        if step == cfg.steps:
            break
        seqs = lm.sample(cfg.batch_size, cfg.seq_len, seed=rng_seed + step)
        counts.append(seqs)
        x = batch_inputs(seqs, lm.bos)
        loss_v, grads = step_fn(model, mx.array(x[:, :-1]), mx.array(x[:, 1:]))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss_v)
        loss = loss_v.item()
    entropy = -float(np.sum(truth * np.log(np.where(truth > 0, truth, 1.0)), axis=-1).mean())
    log(f"({time.time() - t0:.0f}s; true conditional entropy {entropy:.4f} nats = the loss floor)")

    if plot is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["kl_trained"] for r in rows], "o-", label="trained OpenELM")
        ax.plot(steps, [r["kl_addk"] for r in rows], "s--", label=f"add-{cfg.add_k} counts")
        ax.axhline(max(kl_exact, 1e-9), color="k", lw=1, label="exact construction")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean KL(true || model) [nats]")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        log(f"saved {plot}")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--steps", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--symbols", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--plot", help="save a PNG of KL vs step (needs matplotlib)")
    a = p.parse_args(argv)
    cfg = ExperimentConfig.fast() if a.fast else ExperimentConfig()
    for field, value in (("steps", a.steps), ("n", a.n), ("num_symbols", a.symbols), ("seed", a.seed)):
        if value is not None:
            setattr(cfg, field, value)
    if cfg.steps % cfg.eval_every and a.steps is not None:
        cfg.eval_every = max(1, cfg.steps // 10)
    try:
        run(cfg, plot=a.plot)
    except NgramError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
