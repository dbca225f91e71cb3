"""``mlx-elm convert``: PyTorch OpenELM checkpoints (Hugging Face or corenet) and torchscale MH-MoE /
SMoE decoders to MLX folders."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def convert(
    source: str = typer.Argument(..., help="Hub repo id (apple/OpenELM-270M), local HF folder, or corenet .pt file."),
    out_dir: Path = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Size preset (270M, 450M, 1_1B, 3B); default: inferred from shapes."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | bfloat16 | float16."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the projection matrices."),
    bits: int = typer.Option(4, "--bits", help="Quantization bits: 4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    quantize_embedding: bool = typer.Option(True, "--quantize-embedding/--no-quantize-embedding",
                                            help="With --quantize, also quantize the tied embedding (and head)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="SentencePiece .model, tokenizer folder, or Hub repo id to include."),
    keep_padding: bool = typer.Option(False, "--keep-padding", help="Keep corenet's padded vocabulary rows (32128)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Rows of the embedding to keep (default: 32000 for 32128-row corenet files)."),
    merge_lora: bool = typer.Option(True, "--merge-lora/--no-merge-lora", help="Merge a LoRA checkpoint, or export adapters/ for mlx-lm."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA alpha / rank (not stored in corenet files; its recipe gives 1.0)."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with a PyTorch reference of the source (needs torch)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    force_float16: bool = typer.Option(False, "--force-float16", help="Allow float16 for the 3B model (its activations overflow)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag, or commit)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    fmt: str = typer.Option("auto", "--format", help="auto | openelm | torchscale-moe (MH-MoE/SMoE decoders)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="torchscale-moe: attention heads (default d / 64)."),
    top_k: int = typer.Option(1, "--top-k", help="torchscale-moe: experts per (sub-)token, >= 1 (released script: 1)."),
    capacity_factor: float = typer.Option(0.0, "--capacity-factor", help="torchscale-moe: >= 0; 0 = dropless."),
    rope: str = typer.Option("half", "--rope", help="torchscale-moe: rotary layout, half or interleaved."),
    norm_eps: float = typer.Option(1e-5, "--norm-eps", help="torchscale-moe: RMSNorm epsilon."),
    embed_scale: float = typer.Option(1.0, "--embed-scale", help="torchscale-moe: embedding scale (sqrt(d) if used)."),
    rename: Optional[list[str]] = typer.Option(None, "--rename", help="torchscale-moe: OLD=NEW name rewrite (repeatable)."),
) -> None:
    """Convert an OpenELM PyTorch checkpoint into an MLX folder; no code from the file is executed."""
    from convert import convert as run

    command = "mlx-elm convert " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    report = run(source, out_dir, preset=preset, dtype=dtype, quantize=quantize, bits=bits, group_size=group_size,
                 quantize_embedding=quantize_embedding, tokenizer=tokenizer, keep_padding=keep_padding,
                 vocab_size=vocab_size, merge_lora=merge_lora, lora_scale=lora_scale, verify=verify, force=force,
                 force_float16=force_float16, max_shard_size=max_shard_size, revision=revision,
                 progress=not quiet, command=command, format=fmt,
                 moe_options=_moe_options(heads, top_k, capacity_factor, rope, norm_eps, embed_scale, rename))
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(report.summary())


def _moe_options(heads, top_k, capacity_factor, rope, norm_eps, embed_scale, rename) -> dict:
    from convert.torchscale_moe import parse_renames

    return dict(heads=heads, top_k=top_k, capacity_factor=capacity_factor, rope=rope, norm_eps=norm_eps,
                embed_scale=embed_scale, renames=parse_renames(rename))


def register(app: typer.Typer) -> None:
    """Add ``convert`` to the CLI."""
    app.command("convert")(convert)
