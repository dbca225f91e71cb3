"""PNG plots of schedules and samples (matplotlib, Agg backend, optional dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import DiffusionError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DiffusionError("plotting needs matplotlib; run `pip install matplotlib` (or the `plot` extra)") from e
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def plot_schedules(schedules: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """log sigma against step index, one line per schedule."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in schedules.items():
        s = np.asarray(s, dtype=np.float64)
        ax.plot(np.arange(len(s)), s, marker="o", ms=3, label=name, lw=2.5 if name.startswith("ays") else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step i")
    ax.set_ylabel("sigma_i")
    ax.set_title(title or "noise schedules")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_samples(panels: dict[str, np.ndarray], path: str | Path, cols: int = 4, lim: float = 1.6) -> Path:
    """A grid of 2D scatter plots, one per named sample set."""
    plt = _plt()
    n = len(panels)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, x) in zip(axes.ravel(), panels.items()):
        x = np.asarray(x)
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=8)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    out = _save(fig, path)
    plt.close(fig)
    return out
