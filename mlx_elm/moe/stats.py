"""Routing statistics of a trained MoE model on text, and the expert-load plot.

``routing_stats(model, batches)`` runs the model with ``return_aux=True`` and accumulates one
:class:`mlx_elm.models.moe.RoutingStats` per MoE layer; ``plot_load`` draws the layer x expert
heat map of load shares (the v1 paper's Fig. 1a layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.errors import MoEError
from mlx_elm.models.moe import PAPER_THRESHOLDS, MHMoE, RoutingStats, activation_ratio, is_moe_layer
from mlx_elm.train.data import read_jsonl


def moe_layers(model: nn.Module) -> List[Tuple[int, nn.Module]]:
    """``(block index, MoE layer)`` for every block holding one (an MH-MoE counts once, not also
    through its inner SparseMoE)."""
    out = []
    for i, block in enumerate(getattr(model, "layers", [model])):
        found = [m for _, m in block.named_modules() if isinstance(m, MHMoE)]
        found = found or [m for _, m in block.named_modules() if is_moe_layer(m)]
        if found:
            out.append((i, found[0]))
    return out


def empty_stats(model: nn.Module) -> List[RoutingStats]:
    out = []
    for _, layer in moe_layers(model):
        inner, group = (layer.moe, layer.heads) if isinstance(layer, MHMoE) else (layer, 1)
        out.append(RoutingStats(inner.num_experts, group=group, top_k=inner.top_k))
    if not out:
        raise MoEError("the model has no MoE layers; routing statistics need an OpenELM-MoE (or other MoE) model")
    return out


def routing_stats(model: nn.Module, batches: Iterable[np.ndarray], progress=None) -> List[RoutingStats]:
    """Accumulate per-layer routing counts over token batches ``(B, L)``."""
    stats = empty_stats(model)
    was_training = model.training
    model.eval()
    for batch in batches:
        _, aux = model(mx.array(batch), return_aux=True)
        mx.eval(aux)
        for s, a in zip(stats, aux):
            s.add(a)
        if progress is not None:
            progress(1)
    if was_training:
        model.train()
    return stats


def summary_table(stats: Sequence[RoutingStats], layer_ids: Sequence[int]) -> List[Dict[str, float]]:
    """One row per MoE layer: entropy, CV, min/max share, dead/cold experts, activation ratios."""
    return [dict(layer=int(i), experts=s.num_experts, **s.summary()) for i, s in zip(layer_ids, stats)]


def model_summary(stats: Sequence[RoutingStats]) -> Dict[str, float]:
    """Activation ratios over all (layer, expert) cells, per basis and threshold, plus means."""
    out: Dict[str, float] = {}
    for basis, key in (("per_token", "act_token"), ("per_subtoken", "act_subtoken"), ("token_coverage", "act_coverage")):
        for tau in PAPER_THRESHOLDS:
            out[f"{key}@{tau}"] = activation_ratio(stats, tau, basis)
    out["entropy"] = float(np.mean([s.entropy() for s in stats]))
    out["dead"] = int(sum(s.dead() for s in stats))
    out["cold"] = int(sum(s.cold() for s in stats))
    out["dropped"] = float(np.mean([s.dropped_fraction() for s in stats]))
    return out


def load_matrix(stats: Sequence[RoutingStats]) -> np.ndarray:
    """Layers x experts load shares, NaN-padded when layers have different expert counts."""
    width = max(s.num_experts for s in stats)
    out = np.full((len(stats), width), np.nan)
    for i, s in enumerate(stats):
        out[i, : s.num_experts] = s.share
    return out


def plot_load(stats: Sequence[RoutingStats], layer_ids: Sequence[int], path, title: Optional[str] = None) -> Path:
    """Save a layer x expert heat map of load share x E (1 = an even share) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoEError("plotting needs matplotlib: pip install matplotlib (or pip install 'mlx-elm[plot]')") from e
    from mlx_elm.atomic import atomic_file

    m = load_matrix(stats) * np.array([[s.num_experts] for s in stats])
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.12 * m.shape[1] + 4), 1.2 + 0.5 * len(stats)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(np.nanmax(m))), interpolation="nearest")
    ax.set_yticks(range(len(stats)), [f"block {i + 1}" for i in layer_ids])
    ax.set_xlabel("expert")
    ax.set_title(title or "expert load (share x number of experts; 1 = even)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def read_texts(source) -> List[str]:
    """Texts to route: a folder's valid.jsonl (else train.jsonl), a .jsonl file of records with
    'text' (or prompt/completion), or any plain-text file."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("valid.jsonl", "train.jsonl"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise MoEError(f"{source} has no valid.jsonl or train.jsonl; pass a folder of JSONL data or a text file")
    if not path.is_file():
        raise MoEError(f"--data {source} does not exist; pass a text file, a .jsonl file or a data folder")
    if path.suffix == ".jsonl":
        records = read_jsonl(path)
        return [r.get("text") or (r.get("prompt", "") + r.get("completion", "")) or
                " ".join(m["content"] for m in r.get("messages", [])) for r in records]
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise MoEError(f"{path} is not UTF-8 text; pass a text or JSONL file") from e


def token_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int, max_batches: int) -> List[np.ndarray]:
    """Windows of ``seq_len`` tokens from the concatenated texts, ``batch_size`` per batch."""
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise MoEError("--seq-len, --batch-size and --batches must be >= 1")
    ids: List[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        if len(ids) >= seq_len * batch_size * max_batches:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise MoEError(f"the text has {len(ids)} tokens, fewer than --seq-len {seq_len}; pass more text or lower it")
    arr = np.array(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return [arr[i: i + batch_size] for i in range(0, min(n, batch_size * max_batches), batch_size)]
