"""Option types shared by the commands, so ``--model``, the sampling, KV-cache and training options
mean the same thing, take the same ranges and say the same help everywhere.

Families that the library validates (sampling: ``SamplingOptions``, KV: ``KVOptions``, training:
``TrainConfig`` / ``LoRAConfig``) state their ranges in the help text and leave the check to the
library, whose one-line messages name the fix, so Python callers get the same checks. Options with
no library counterpart carry their range here (typer shows it in ``--help`` and refuses values
outside it before anything runs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

BIG = 2**31 - 1  # counts above this are typos or attacks, not requests
SEED_MAX = 2**32 - 1


def _finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number (got {value})")
    return value


def _positive(value: Optional[float]) -> Optional[float]:
    _finite(value)
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be > 0 (got {value})")
    return value


def _fraction(value: Optional[float]) -> Optional[float]:
    """[0, 1): dropout-like probabilities."""
    _finite(value)
    if value is not None and not 0 <= value < 1:
        raise typer.BadParameter(f"must be in [0, 1) (got {value})")
    return value


def _bits(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in (4, 8):
        raise typer.BadParameter(f"must be 4 or 8 (got {value})")
    return value


def _nonempty(value: Optional[str]) -> Optional[str]:
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; pass a model folder, a Hub repo id, or an alias (or omit it)")
    return value


# --- models ----------------------------------------------------------------------------------
MODEL_HELP = "Model folder, Hub repo id, or alias (default: the embedded SmolLM2-135M-Instruct)."
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, callback=_nonempty)]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Tokenizer: SentencePiece .model file, folder, or Hub repo id (OpenELM ships none).")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder to apply.")]
Weights = Annotated[str, typer.Option("--weights", help="auto | as-stored | float32 (auto: float32 on the CPU backend).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print what was loaded and how.")]

# --- sampling --------------------------------------------------------------------------------
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Maximum new tokens (>= 1).")]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature, >= 0 (0 = greedy).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1]; 1 disables.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens, >= 0 (0 = off).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min_p x the top probability, in [0, 1) (0 = off).")]
RepetitionPenalty = Annotated[float, typer.Option(
    "--repetition-penalty", help="> 0; above 1 discourages repeats (1 = off).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed, in [0, 2^32).")]
System = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
ChatTemplate = Annotated[Optional[bool], typer.Option(
    "--chat-template/--no-chat-template", help="Wrap the prompt in the chat template (default: when the tokenizer has one).")]

# --- KV-cache policies -----------------------------------------------------------------------
KVPolicy = Annotated[str, typer.Option("--kv-policy", help="KV cache policy: full | snapkv | streaming.")]
KVCapacity = Annotated[Optional[int], typer.Option(
    "--kv-capacity", help="Prompt rows kept per head, window included (snapkv, streaming; > --kv-window).")]
KVWindow = Annotated[int, typer.Option("--kv-window", help="SnapKV observation window: the last W prompt tokens (>= 1).")]
KVKernel = Annotated[int, typer.Option("--kv-kernel", help="SnapKV pooling kernel (odd; 1 = no pooling).")]
KVPool = Annotated[str, typer.Option("--kv-pool", help="SnapKV pooling: max | avg.")]
KVBits = Annotated[Optional[int], typer.Option("--kv-bits", help="Quantize the KV cache after the prompt: 4 | 8.")]
KVPerQueryHead = Annotated[bool, typer.Option(
    "--kv-per-query-head", help="SnapKV: select per query head (the original code; no GQA saving).")]

# --- speculative decoding ----------------------------------------------------------------------
Draft = Annotated[Optional[str], typer.Option(
    "--draft", help="Speculative decoding (same greedy output, fewer model passes): lookup (copy continuations "
                    "from the prompt) or a draft model (folder, Hub id, alias) with the model's tokenizer.")]
DraftModel = Annotated[Optional[str], typer.Option("--draft-model", help="A draft model (mlx-lm's name for --draft MODEL).")]
NumDraft = Annotated[Optional[int], typer.Option(
    "--num-draft", "--num-draft-tokens",
    help="Most tokens proposed per verification, in [1, 64] (default: 16 for lookup, which adapts below it; 3 for a model).")]

# --- training --------------------------------------------------------------------------------
BatchSize = Annotated[int, typer.Option("--batch-size", help="Examples per batch (>= 1).")]
Iters = Annotated[int, typer.Option("--iters", help="Optimizer steps (0: from --epochs, default 1 epoch).")]
Epochs = Annotated[float, typer.Option("--epochs", help="Epochs when --iters is 0.")]
LearningRate = Annotated[Optional[float], typer.Option(
    "--learning-rate", help="Peak learning rate (> 0, finite).")]
Warmup = Annotated[int, typer.Option("--warmup", help="Linear warmup steps before the cosine decay.")]
MinLR = Annotated[float, typer.Option("--min-lr", help="Learning rate at the end of the decay.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
GradAccumulation = Annotated[int, typer.Option("--grad-accumulation", help="Batches per optimizer step (>= 1).")]
GradClip = Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm (0 = off).")]
GradCheckpoint = Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute activations to save memory (~30% slower).")]
MaxSeqLength = Annotated[int, typer.Option("--max-seq-length", help="Longest training sequence in tokens (>= 2).")]
StepsPerEval = Annotated[int, typer.Option("--steps-per-eval", help="Validation every N steps (0 = only at the end).")]
ValBatches = Annotated[int, typer.Option("--val-batches", help="Validation batches (-1 = all).")]
SaveEvery = Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0 = only at the end).")]
TrainSeed = Annotated[int, typer.Option("--seed", help="Random seed (data order, dropout, init), in [0, 2^32).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the output folder.")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="Compile the step function.")]
Pack = Annotated[bool, typer.Option("--pack/--no-pack", help="Pack examples into full-length windows instead of padding.")]

# --- paths -----------------------------------------------------------------------------------
DataDir = Annotated[Path, typer.Option("--data", help="Folder with train.jsonl (and valid.jsonl, test.jsonl).")]
