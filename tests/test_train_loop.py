"""The training loop on non-text data: custom collate, a loss with metrics and a step curriculum."""

from __future__ import annotations

import os
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.train.data import Dataset, TokenizedSplit
from mlx_elm.train.loop import TrainConfig, train


def _regression_data(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    w = np.array([1.5, -2.0, 0.5], dtype=np.float32)
    xs = rng.normal(size=(n, 3)).astype(np.float32)
    examples = [(x, np.float32(x @ w)) for x in xs]

    def collate(batch):
        return np.stack([b[0] for b in batch]), np.array([b[1] for b in batch], dtype=np.float32)

    return Dataset(TokenizedSplit(examples), TokenizedSplit(examples[:16]), collate=collate, length=lambda e: 1)


def _loss(model, x, y, step):
    err = (model(x)[:, 0] - y) ** 2
    return err.sum(), mx.array(float(y.shape[0])), {"step_seen": step.astype(mx.float32), "max_err": err.max()}


def _run(tmp_path, iters, resume=False, interrupt_at=None):
    mx.random.seed(0)
    model = nn.Linear(3, 1)
    cfg = TrainConfig(batch_size=8, iters=iters, learning_rate=0.05, steps_per_eval=4, save_every=3, seed=1,
                      resume=resume, progress=False)

    def on_step(step, loss, metrics):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the loop saves and stops

    return model, train(model, _regression_data(), cfg, tmp_path, lambda m: None, loss_fn=_loss,
                        on_step=on_step, log=lambda s: None)


def test_custom_loss_collate_metrics_and_step(tmp_path):
    model, result = _run(tmp_path / "a", 12)
    assert result.val_losses[-1][1] < 0.2 * result.losses[0]
    assert [m["step_seen"] for m in result.metrics] == list(range(12))  # the step before each update
    assert all(m["max_err"] >= 0 for m in result.metrics)


def test_custom_loss_resumes_exactly(tmp_path):
    full_model, full = _run(tmp_path / "full", 8)
    _, part = _run(tmp_path / "part", 8, interrupt_at=5)
    assert part.interrupted and part.step == 5
    part_model, rest = _run(tmp_path / "part", 8, resume=True)
    assert rest.losses == full.losses[5:]
    assert mx.array_equal(part_model.weight, full_model.weight).item()
