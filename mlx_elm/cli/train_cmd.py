"""``mlx-elm lora``, ``fuse`` and ``train``: parse options, call ``mlx_elm.train``, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_elm.cli import options as O


def _echo(text: str) -> None:
    typer.echo(text, err=True)


def _train_config(**kwargs):
    from mlx_elm.train.loop import TrainConfig

    kwargs["warmup_steps"] = kwargs.pop("warmup")
    kwargs["compile"] = kwargs.pop("compile_")
    return TrainConfig(**kwargs)


def lora(
    data: O.DataDir,
    model: O.Model = None,
    tokenizer: O.Tokenizer = None,
    adapter_path: Annotated[Path, typer.Option("--adapter-path", help="Where adapters and checkpoints go.")] = Path("adapters"),
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank in [1, 4096] (OpenELM default 32, else 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option(
        "--alpha", help="LoRA alpha > 0; scale = alpha / rank (OpenELM 32, else 2 x rank).")] = None,
    dropout: Annotated[Optional[float], typer.Option(
        "--dropout", help="Dropout on the adapter input, in [0, 1) (OpenELM 0.1, else 0).")] = None,
    targets: Annotated[Optional[str], typer.Option(
        "--targets", help="Comma-separated module names, 'embedding', 'all-linear'.")] = None,
    num_layers: Annotated[int, typer.Option("--num-layers", help="Adapt the last N blocks (-1 = all).")] = -1,
    dora: Annotated[bool, typer.Option("--dora", help="DoRA instead of LoRA.")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Keep the base quantized (quantize a dense base to 4 bits).")] = False,
    pack: O.Pack = False,
    batch_size: O.BatchSize = 4,
    iters: O.Iters = 0,
    epochs: O.Epochs = 0.0,
    learning_rate: O.LearningRate = None,
    warmup: O.Warmup = 0,
    min_lr: O.MinLR = 0.0,
    weight_decay: O.WeightDecay = 0.0,
    grad_accumulation: O.GradAccumulation = 1,
    grad_clip: O.GradClip = 0.0,
    grad_checkpoint: O.GradCheckpoint = False,
    max_seq_length: O.MaxSeqLength = 2048,
    steps_per_eval: O.StepsPerEval = 100,
    val_batches: O.ValBatches = 25,
    save_every: O.SaveEvery = 100,
    seed: O.TrainSeed = 0,
    resume: O.Resume = False,
    compile_: O.Compile = True,
) -> None:
    """Fine-tune LoRA/DoRA adapters (QLoRA with --qlora); Ctrl-C saves a checkpoint."""
    from mlx_elm.train.finetune import finetune

    cfg = _train_config(batch_size=batch_size, iters=iters, epochs=epochs, learning_rate=learning_rate,
                        warmup=warmup, min_lr=min_lr, weight_decay=weight_decay, grad_accumulation=grad_accumulation,
                        grad_clip=grad_clip, grad_checkpoint=grad_checkpoint, max_seq_length=max_seq_length,
                        steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, seed=seed,
                        resume=resume, compile_=compile_)
    opts = dict(rank=rank, alpha=alpha, dropout=dropout, num_layers=num_layers, dora=dora,
                targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)
    result = finetune(model, data, adapter_path, cfg=cfg, tokenizer=tokenizer, qlora=qlora, pack=pack,
                      lora_options=opts, log=_echo)
    if result.interrupted:
        raise typer.Exit(130)


def fuse(
    out: Annotated[Path, typer.Argument(help="Output model folder.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="Adapter folder written by `mlx-elm lora`.")],
    model: O.Model = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer to install into the output folder.")] = None,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Write dense weights even if the base is quantized.")] = False,
    quantize: Annotated[Optional[int], typer.Option("--quantize", callback=O._bits, help="Re-quantize the fused model: 4 | 8.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", min=32, max=128, help="Quantization group size: 32, 64 or 128.")] = 64,
) -> None:
    """Fold adapters into the base weights and write a normal model folder."""
    from mlx_elm.train.fuse import fuse_to_folder

    fuse_to_folder(model, adapter, out, dequantize=dequantize, quantize_bits=quantize, group_size=group_size,
                   tokenizer=tokenizer, log=_echo)


def train(
    config: Annotated[Path, typer.Option("--config", help="Model config.json, or {\"preset\": ..., \"overrides\": {...}}.")],
    data: O.DataDir,
    out: Annotated[Path, typer.Option("--out", help="Output model folder (checkpoints go in OUT/checkpoints).")],
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer (.model file or folder); needed once.")] = None,
    pack: O.Pack = True,
    batch_size: O.BatchSize = 8,
    iters: O.Iters = 0,
    epochs: O.Epochs = 0.0,
    learning_rate: O.LearningRate = 1e-3,
    warmup: O.Warmup = 0,
    min_lr: O.MinLR = 0.0,
    weight_decay: O.WeightDecay = 0.01,
    grad_accumulation: O.GradAccumulation = 1,
    grad_clip: O.GradClip = 1.0,
    grad_checkpoint: O.GradCheckpoint = False,
    max_seq_length: O.MaxSeqLength = 256,
    steps_per_eval: O.StepsPerEval = 100,
    val_batches: O.ValBatches = 25,
    save_every: O.SaveEvery = 100,
    seed: O.TrainSeed = 0,
    resume: O.Resume = False,
    compile_: O.Compile = True,
) -> None:
    """Pre-train a small model from scratch on plain text, with checkpoints."""
    from mlx_elm.train.pretrain import pretrain

    cfg = _train_config(batch_size=batch_size, iters=iters, epochs=epochs, learning_rate=learning_rate,
                        warmup=warmup, min_lr=min_lr, weight_decay=weight_decay, grad_accumulation=grad_accumulation,
                        grad_clip=grad_clip, grad_checkpoint=grad_checkpoint, max_seq_length=max_seq_length,
                        steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, seed=seed,
                        resume=resume, compile_=compile_).validate()
    result = pretrain(config, data, out, tokenizer, cfg, pack=pack, log=_echo)
    if result.interrupted:
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    """Add ``lora``, ``fuse`` and ``train`` to the ``mlx-elm`` app."""
    app.command("lora")(lora)
    app.command("fuse")(fuse)
    app.command("train")(train)
