"""``mlx-elm convert``: PyTorch OpenELM checkpoints (Hugging Face or corenet) and torchscale MH-MoE /
SMoE decoders to MLX folders."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mlx_elm.cli import options as O


def convert(
    source: Annotated[str, typer.Argument(help="Hub repo id (apple/OpenELM-270M), local HF folder, or corenet .pt file.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (must not exist unless --force).")],
    preset: Annotated[Optional[str], typer.Option("--preset", help="Size preset (270M, 450M, 1_1B, 3B); default: inferred from shapes.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16.")] = "bfloat16",
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize the projection matrices.")] = False,
    bits: Annotated[int, typer.Option("--bits", callback=O._bits, help="Quantization bits: 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", min=32, max=128, help="Quantization group size: 32, 64 or 128.")] = 64,
    quantize_embedding: Annotated[bool, typer.Option(
        "--quantize-embedding/--no-quantize-embedding",
        help="With --quantize, also quantize the tied embedding (and head).")] = True,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="SentencePiece .model, tokenizer folder, or Hub repo id to include.")] = None,
    keep_padding: Annotated[bool, typer.Option("--keep-padding", help="Keep corenet's padded vocabulary rows (32128).")] = False,
    vocab_size: Annotated[Optional[int], typer.Option(
        "--vocab-size", min=1, max=1 << 24,
        help="Rows of the embedding to keep (default: 32000 for 32128-row corenet files).")] = None,
    merge_lora: Annotated[bool, typer.Option(
        "--merge-lora/--no-merge-lora", help="Merge a LoRA checkpoint, or export adapters/ for mlx-lm.")] = True,
    lora_scale: Annotated[float, typer.Option(
        "--lora-scale", min=0.0, max=1e6, callback=O._finite,
        help="LoRA alpha / rank (not stored in corenet files; its recipe gives 1.0).")] = 1.0,
    verify: Annotated[bool, typer.Option("--verify", help="Compare logits with a PyTorch reference of the source (needs torch).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    force_float16: Annotated[bool, typer.Option("--force-float16", help="Allow float16 for the 3B model (its activations overflow).")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard (e.g. 2GB, 500MB).")] = "2GB",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag, or commit).")] = None,
    check_crc: Annotated[bool, typer.Option(
        "--check-crc/--no-check-crc",
        help="Check the CRC-32 of every .pt/.bin zip entry before using it (default); "
             "--no-check-crc skips it, saving one pass over the file.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto | openelm | torchscale-moe (MH-MoE / SMoE decoders).")] = "auto",
    heads: Annotated[Optional[int], typer.Option(
        "--heads", min=1, max=4096, help="torchscale-moe: attention heads (default d / 64).")] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", min=1, max=4096, help="torchscale-moe: experts per (sub-)token (released script: 1).")] = 1,
    capacity_factor: Annotated[float, typer.Option(
        "--capacity-factor", min=0.0, max=1e3, callback=O._finite, help="torchscale-moe: 0 = dropless.")] = 0.0,
    rope: Annotated[str, typer.Option("--rope", help="torchscale-moe: rotary layout, half | interleaved.")] = "half",
    norm_eps: Annotated[float, typer.Option(
        "--norm-eps", callback=O._positive, help="torchscale-moe: RMSNorm epsilon (> 0).")] = 1e-5,
    embed_scale: Annotated[float, typer.Option(
        "--embed-scale", callback=O._positive, help="torchscale-moe: embedding scale, > 0 (sqrt(d) if used).")] = 1.0,
    rename: Annotated[Optional[List[str]], typer.Option(
        "--rename", help="torchscale-moe: OLD=NEW rewrite of tensor names (repeatable).")] = None,
) -> None:
    """Convert an OpenELM PyTorch checkpoint into an MLX folder; no code from the file is executed."""
    from convert import convert as run

    command = "mlx-elm convert " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    report = run(source, out_dir, preset=preset, dtype=dtype, quantize=quantize, bits=bits, group_size=group_size,
                 quantize_embedding=quantize_embedding, tokenizer=tokenizer, keep_padding=keep_padding,
                 vocab_size=vocab_size, merge_lora=merge_lora, lora_scale=lora_scale, verify=verify, force=force,
                 force_float16=force_float16, max_shard_size=max_shard_size, revision=revision,
                 progress=not quiet, command=command, check_crc=check_crc, format=fmt,
                 moe_options=_moe_options(heads, top_k, capacity_factor, rope, norm_eps, embed_scale, rename))
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(report.summary())


def _moe_options(heads, top_k, capacity_factor, rope, norm_eps, embed_scale, rename) -> dict:
    from convert import parse_renames

    return dict(heads=heads, top_k=top_k, capacity_factor=capacity_factor, rope=rope, norm_eps=norm_eps,
                embed_scale=embed_scale, renames=parse_renames(rename))


def register(app: typer.Typer) -> None:
    """Add ``convert`` to the CLI."""
    app.command("convert")(convert)
