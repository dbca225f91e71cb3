"""``mlx-elm lora``: load a model, put adapters on it, train them, save them in mlx-lm's layout."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_elm.adapters import (
    AdapterPlan,
    LoRAConfig,
    adapter_config_dict,
    adapter_modules,
    apply_adapters,
    resolve_lora_config,
    save_adapters,
)
from mlx_elm.loading import load_with_info
from mlx_elm.model_folder import count_parameters
from mlx_elm.train.data import Dataset, load_dataset
from mlx_elm.train.distributed import World, init_world
from mlx_elm.train.loop import TrainConfig, TrainResult, train
from mlx_elm.train.moe_loss import training_hooks


def default_learning_rate(model_type: str) -> float:
    """corenet's OpenELM LoRA rate; a common LoRA rate otherwise."""
    return 3e-4 if model_type == "openelm" else 1e-4


def quantize_in_memory(model: nn.Module, bits: int = 4, group_size: int = 64) -> None:
    """Quantize the linear layers (not the embedding) of a dense base, for QLoRA."""
    def pred(path, m):
        return isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def describe_plan(model: nn.Module, plan: AdapterPlan) -> str:
    n_adapt = len(adapter_modules(model))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = count_parameters(model)
    kinds = sorted({k.rsplit(".", 1)[-1] for k in plan.keys} | {k.rsplit(".", 1)[-1] for k in plan.embedding_keys})
    msg = (f"adapters on {n_adapt} modules ({', '.join(kinds)}) in the last {plan.num_layers} blocks; "
           f"trainable {trainable / 1e6:.3f}M of {total / 1e6:.1f}M parameters ({100 * trainable / max(total, 1):.2f}%)")
    if plan.skipped:
        msg += f"\nnot adapted (not in --targets): {', '.join(sorted({s.rsplit('.', 1)[-1] for s in plan.skipped}))}"
    return msg


def finetune_model(
    model: nn.Module,
    tokenizer,
    data: Dataset,
    adapter_path: Path,
    lora: LoRAConfig,
    cfg: TrainConfig,
    base_model: Optional[str] = None,
    world: Optional[World] = None,
    log: Callable[[str], None] = print,
    on_step=None,
) -> TrainResult:
    """Train adapters on an in-memory model (adapters are applied here)."""
    world = world or init_world()
    mx.random.seed(cfg.seed)  # same adapter init on every process
    plan = apply_adapters(model, lora)
    if world.is_main:
        log(describe_plan(model, plan))
        if world.size > 1:
            log(f"data-parallel over {world.size} processes (each reads 1/{world.size} of every batch)")
    config = adapter_config_dict(lora, plan, base_model, extra={
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress")}})
    adapter_path = Path(adapter_path)  # created by the first save, so a refused run leaves nothing
    fp = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "num_layers": plan.num_layers,
          "dora": lora.dora}
    loss_fn, moe_step = training_hooks(model)  # MoE models: balance loss and routing metrics
    if moe_step is not None:
        user_step = on_step

        def on_step(step, loss, metrics):
            moe_step(step, loss, metrics)
            if user_step is not None:
                user_step(step, loss, metrics)

    result = train(model, data, cfg, adapter_path, lambda m: save_adapters(m, adapter_path, config),
                   fingerprint=fp, world=world, on_step=on_step, log=log, loss_fn=loss_fn)
    if world.is_main:
        log(result.summary())
        if not result.interrupted:
            log(f"adapters saved to {adapter_path} (use: mlx-elm generate --adapter {adapter_path})")
    return result


def finetune(
    model_ref: Optional[str],
    data_dir,
    adapter_path="adapters",
    lora: Optional[LoRAConfig] = None,
    cfg: Optional[TrainConfig] = None,
    tokenizer: Optional[str] = None,
    qlora: bool = False,
    pack: bool = False,
    lora_options: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Load ``model_ref`` (default: the embedded model) and fine-tune adapters on ``data_dir``.

    ``lora`` (or, on top of the model's defaults, ``lora_options``: rank, alpha, dropout, targets,
    num_layers, dora) places the adapters; ``cfg.learning_rate=None`` picks the model's default.
    """
    world = init_world()
    model, tok, info = load_with_info(model_ref, tokenizer, representation="as-stored" if qlora else "auto")
    if qlora and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        quantize_in_memory(model)
        if world.is_main:
            log("QLoRA: the base was dense; quantized its linear layers to 4 bits in memory")
    lora = lora or resolve_lora_config(info.model_type, **(lora_options or {}))
    cfg = cfg or TrainConfig(learning_rate=None)
    if cfg.learning_rate is None:
        cfg.learning_rate = default_learning_rate(info.model_type)
    cfg.validate()
    data = load_dataset(data_dir, tok, cfg.max_seq_length, pack=pack)
    if world.is_main:
        log(f"model: {info.path} ({info.model_type}, weights {info.representation}{', QLoRA' if qlora else ''})")
        log(f"data: {data.summary()}")
        if data.train.num_truncated:
            log(f"note: {data.train.num_truncated} training examples were longer than --max-seq-length "
                f"{cfg.max_seq_length} and were truncated")
    return finetune_model(model, tok, data, Path(adapter_path), lora, cfg, str(info.path), world, log)
