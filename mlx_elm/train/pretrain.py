"""``mlx-elm train``: pre-train a small model from scratch on plain text, with checkpoints.

The config is a model ``config.json`` (any ``model_type`` the toolkit loads: ``openelm``, mlx-lm's
architectures, later the MH-MoE models) or ``{"preset": "OpenELM-270M", "overrides": {...}}`` to
scale an OpenELM preset down. The output folder is a normal model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import TrainingError
from mlx_elm.loading import get_model_classes
from mlx_elm.model_folder import count_parameters, update_model_files
from mlx_elm.models import preset_config
from mlx_elm.tokenizers import has_tokenizer, install_tokenizer, load_tokenizer
from mlx_elm.train.data import load_dataset
from mlx_elm.train.distributed import init_world
from mlx_elm.train.loop import TrainConfig, TrainResult, train
from mlx_elm.train.moe_loss import training_hooks

MOE_METRICS_FILE = "moe_metrics.json"


def resolve_config(spec: dict) -> dict:
    """A full model config from a config.json dict or a ``preset`` + ``overrides`` dict."""
    if "preset" in spec:
        try:
            return preset_config(spec["preset"], **spec.get("overrides", {}))
        except (ValueError, TypeError) as e:
            raise TrainingError(f"config preset: {e}") from None
    if "model_type" not in spec:
        raise TrainingError("the --config JSON needs 'model_type' (a model config.json) or 'preset' "
                            "(e.g. {\"preset\": \"OpenELM-270M\", \"overrides\": {\"num_transformer_layers\": 4}})")
    return dict(spec)


def build_model(config: dict, seed: int = 0) -> Tuple[nn.Module, dict]:
    """A freshly initialised model for ``config`` (same weights on every process for one seed)."""
    try:
        model_cls, args_cls = get_model_classes(config)
        args = args_cls.from_dict(config)
        mx.random.seed(seed)
        model = model_cls(args)
    except (ValueError, TypeError, KeyError) as e:
        raise TrainingError(f"cannot build a {config.get('model_type')} model from --config: {str(e).splitlines()[0]}") from None
    mx.eval(model.parameters())
    return model, config


def pretrain(
    config_path,
    data_dir,
    out_dir,
    tokenizer: str,
    cfg: Optional[TrainConfig] = None,
    pack: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a new model described by ``config_path`` on the text in ``data_dir``."""
    cfg = cfg or TrainConfig(learning_rate=1e-3)
    world = init_world()
    try:
        spec = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"cannot read --config {config_path}: {e}; pass a model config JSON file") from None
    config = resolve_config(spec)
    out_dir = Path(out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            install_tokenizer(tokenizer, out_dir)
    if world.size > 1:  # the other processes wait until rank 0 has written the tokenizer files
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world.group))
    if not has_tokenizer(out_dir):
        raise TrainingError("pre-training needs --tokenizer (a SentencePiece .model file or a tokenizer folder)")
    tok = load_tokenizer(out_dir, None, config)
    if len(tok.vocabulary if hasattr(tok, "vocabulary") else tok.get_vocab()) > config.get("vocab_size", 1 << 30):
        raise TrainingError(f"the tokenizer has more tokens than the config's vocab_size {config['vocab_size']}; "
                            "raise vocab_size in --config")
    model, config = build_model(config, cfg.seed)
    data = load_dataset(data_dir, tok, cfg.max_seq_length, pack=pack)
    n_params = count_parameters(model)
    if world.is_main:
        log(f"model: {config.get('model_type')} with {n_params / 1e6:.2f}M parameters, from scratch")
        log(f"data: {data.summary()}")
    fp = {"config": config}
    loss_fn, on_step = training_hooks(model)
    history = read_metrics(out_dir / MOE_METRICS_FILE) if cfg.resume else []

    def save(m):
        update_model_files(out_dir, m, config)
        if loss_fn is not None:  # MoE: per-step auxiliary losses and per-layer routing metrics
            write_metrics(out_dir / MOE_METRICS_FILE, history)

    def record(step, loss, metrics):
        while history and history[-1]["step"] >= step:  # resumed from an earlier checkpoint
            history.pop()
        history.append({"step": step, "loss": loss, **metrics})
        if on_step is not None:
            on_step(step, loss, metrics)

    result = train(model, data, cfg, out_dir, save, fingerprint=fp, world=world, log=log, loss_fn=loss_fn,
                   on_step=record)
    if world.is_main:
        log(result.summary())
        if loss_fn is not None and history:
            log(routing_line(history[-1]) + f" (per step: {out_dir / MOE_METRICS_FILE})")
    return result


def routing_line(metrics: dict) -> str:
    """One line of the last step's per-layer routing metrics (load entropy / log E, dead experts)."""
    layers = sorted({k.split("/")[0] for k in metrics if k.startswith("L") and "/" in k}, key=lambda s: int(s[1:]))
    parts = [f"block {int(name[1:]) + 1}: entropy {metrics[name + '/entropy']:.3f}, max share "
             f"{metrics[name + '/max_share']:.3f}, dead {int(metrics[name + '/dead'])}" for name in layers]
    return f"routing (balance loss {metrics.get('balance_loss', float('nan')):.3f}): " + "; ".join(parts)


def write_metrics(path: Path, history: list) -> None:
    """Per-step training metrics as one JSON file (rewritten atomically at each checkpoint)."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(history) + "\n")


def read_metrics(path: Path) -> list:
    try:
        return list(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return []
