"""``mlx-elm lora``, ``fuse`` and ``train``: parse options, call ``mlx_elm.train``, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

MODEL_HELP = "Model folder, Hub repo id, or alias (default: the embedded SmolLM2-135M-Instruct)."


def _echo(text: str) -> None:
    typer.echo(text, err=True)


def _train_config(batch_size, iters, epochs, learning_rate, warmup, min_lr, weight_decay, grad_accumulation,
                  grad_clip, grad_checkpoint, max_seq_length, steps_per_eval, val_batches, save_every, seed,
                  resume, compile_):
    from mlx_elm.train.loop import TrainConfig

    return TrainConfig(
        batch_size=batch_size, iters=iters, epochs=epochs,
        learning_rate=learning_rate,
        warmup_steps=warmup, min_lr=min_lr, weight_decay=weight_decay, grad_accumulation=grad_accumulation,
        grad_clip=grad_clip, grad_checkpoint=grad_checkpoint, max_seq_length=max_seq_length,
        steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, seed=seed,
        resume=resume, compile=compile_,
    )


# Shared training options (typer needs them spelled out per command).
O = typer.Option


def lora(
    data: Path = O(..., "--data", help="Folder with train.jsonl (and valid.jsonl, test.jsonl)."),
    model: Optional[str] = O(None, "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[str] = O(None, "--tokenizer", help="Tokenizer (.model file, folder or repo id)."),
    adapter_path: Path = O(Path("adapters"), "--adapter-path", help="Where adapters and checkpoints go."),
    rank: Optional[int] = O(None, "--rank", help="LoRA rank (OpenELM default 32, else 8)."),
    alpha: Optional[float] = O(None, "--alpha", help="LoRA alpha; scale = alpha / rank (OpenELM 32, else 2 x rank)."),
    dropout: Optional[float] = O(None, "--dropout", help="Dropout on the adapter input (OpenELM 0.1, else 0)."),
    targets: Optional[str] = O(None, "--targets", help="Comma-separated module names, 'embedding', 'all-linear'."),
    num_layers: int = O(-1, "--num-layers", help="Adapt the last N blocks (-1 = all)."),
    dora: bool = O(False, "--dora", help="DoRA instead of LoRA."),
    qlora: bool = O(False, "--qlora", help="Keep the base quantized (quantize a dense base to 4 bits)."),
    pack: bool = O(False, "--pack", help="Pack examples into full-length windows instead of padding."),
    batch_size: int = O(4, "--batch-size"),
    iters: int = O(0, "--iters", help="Optimizer steps (0: from --epochs, default 1 epoch)."),
    epochs: float = O(0.0, "--epochs"),
    learning_rate: Optional[float] = O(None, "--learning-rate", help="Peak LR (OpenELM 3e-4, else 1e-4)."),
    warmup: int = O(0, "--warmup", help="Linear warmup steps before the cosine decay."),
    min_lr: float = O(0.0, "--min-lr"),
    weight_decay: float = O(0.0, "--weight-decay"),
    grad_accumulation: int = O(1, "--grad-accumulation"),
    grad_clip: float = O(0.0, "--grad-clip", help="Clip the gradient norm (0 = off)."),
    grad_checkpoint: bool = O(False, "--grad-checkpoint", help="Recompute activations to save memory."),
    max_seq_length: int = O(2048, "--max-seq-length"),
    steps_per_eval: int = O(100, "--steps-per-eval", help="Validation loss/perplexity every N steps."),
    val_batches: int = O(25, "--val-batches", help="Validation batches (-1 = all)."),
    save_every: int = O(100, "--save-every", help="Checkpoint every N steps."),
    seed: int = O(0, "--seed"),
    resume: bool = O(False, "--resume", help="Continue from the newest checkpoint in --adapter-path."),
    compile_: bool = O(True, "--compile/--no-compile", help="Compile the step function."),
) -> None:
    """Fine-tune LoRA/DoRA adapters (QLoRA with --qlora); Ctrl-C saves a checkpoint."""
    from mlx_elm.train.finetune import finetune

    cfg = _train_config(batch_size, iters, epochs, learning_rate, warmup, min_lr, weight_decay, grad_accumulation,
                        grad_clip, grad_checkpoint, max_seq_length, steps_per_eval, val_batches, save_every, seed,
                        resume, compile_)
    opts = dict(rank=rank, alpha=alpha, dropout=dropout, num_layers=num_layers, dora=dora,
                targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)
    result = finetune(model, data, adapter_path, cfg=cfg, tokenizer=tokenizer, qlora=qlora, pack=pack,
                      lora_options=opts, log=_echo)
    if result.interrupted:
        raise typer.Exit(130)


def fuse(
    out: Path = typer.Argument(..., help="Output model folder."),
    adapter: Path = O(..., "--adapter", help="Adapter folder written by `mlx-elm lora`."),
    model: Optional[str] = O(None, "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[str] = O(None, "--tokenizer", help="Tokenizer to install into the output folder."),
    dequantize: bool = O(False, "--dequantize", help="Write dense weights even if the base is quantized."),
    quantize: Optional[int] = O(None, "--quantize", help="Re-quantize the fused model to this many bits (4 or 8)."),
    group_size: int = O(64, "--group-size", help="Quantization group size for --quantize."),
) -> None:
    """Fold adapters into the base weights and write a normal model folder."""
    from mlx_elm.train.fuse import fuse_to_folder

    fuse_to_folder(model, adapter, out, dequantize=dequantize, quantize_bits=quantize, group_size=group_size,
                   tokenizer=tokenizer, log=_echo)


def train(
    config: Path = O(..., "--config", help="Model config.json, or {\"preset\": ..., \"overrides\": {...}}."),
    data: Path = O(..., "--data", help="Folder with train.jsonl (and valid.jsonl) of {\"text\"} records."),
    out: Path = O(..., "--out", help="Output model folder (checkpoints go in OUT/checkpoints)."),
    tokenizer: Optional[str] = O(None, "--tokenizer", help="Tokenizer (.model file or folder); needed once."),
    pack: bool = O(True, "--pack/--no-pack", help="Pack text into full --max-seq-length windows."),
    batch_size: int = O(8, "--batch-size"),
    iters: int = O(0, "--iters", help="Optimizer steps (0: from --epochs, default 1 epoch)."),
    epochs: float = O(0.0, "--epochs"),
    learning_rate: float = O(1e-3, "--learning-rate"),
    warmup: int = O(0, "--warmup"),
    min_lr: float = O(0.0, "--min-lr"),
    weight_decay: float = O(0.01, "--weight-decay"),
    grad_accumulation: int = O(1, "--grad-accumulation"),
    grad_clip: float = O(1.0, "--grad-clip"),
    grad_checkpoint: bool = O(False, "--grad-checkpoint"),
    max_seq_length: int = O(256, "--max-seq-length"),
    steps_per_eval: int = O(100, "--steps-per-eval"),
    val_batches: int = O(25, "--val-batches"),
    save_every: int = O(100, "--save-every"),
    seed: int = O(0, "--seed"),
    resume: bool = O(False, "--resume", help="Continue from the newest checkpoint in --out."),
    compile_: bool = O(True, "--compile/--no-compile"),
) -> None:
    """Pre-train a small model from scratch on plain text, with checkpoints."""
    from mlx_elm.train.pretrain import pretrain

    cfg = _train_config(batch_size, iters, epochs, learning_rate, warmup, min_lr, weight_decay, grad_accumulation,
                        grad_clip, grad_checkpoint, max_seq_length, steps_per_eval, val_batches, save_every, seed,
                        resume, compile_).validate()
    result = pretrain(config, data, out, tokenizer, cfg, pack=pack, log=_echo)
    if result.interrupted:
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    """Add ``lora``, ``fuse`` and ``train`` to the ``mlx-elm`` app."""
    app.command("lora")(lora)
    app.command("fuse")(fuse)
    app.command("train")(train)
