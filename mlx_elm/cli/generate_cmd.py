"""``mlx-elm generate``, ``chat`` and ``doctor``: parse options, call the library, print."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from mlx_elm.errors import GenerationError

MODEL_HELP = "Model folder, Hub repo id, or alias (default: the embedded SmolLM2-135M-Instruct)."
TOKENIZER_HELP = "Tokenizer: SentencePiece .model file, folder, or Hub repo id (OpenELM ships none)."


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


def _options(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed):
    from mlx_elm.generation import SamplingOptions

    return SamplingOptions(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed).validate()


def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt (read from stdin when omitted)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter folder to apply."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Maximum new tokens."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    chat_template: Optional[bool] = typer.Option(
        None, "--chat-template/--no-chat-template", help="Wrap the prompt in the chat template (default: when the tokenizer has one)."
    ),
    representation: str = typer.Option("auto", "--weights", help="auto | as-stored | float32 (auto: float32 on CPU)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print what was loaded and how."),
    kv_policy: str = typer.Option("full", "--kv-policy", help="KV cache policy: full | snapkv | streaming."),
    kv_capacity: Optional[int] = typer.Option(
        None, "--kv-capacity", help="Prompt rows kept per head, window included (snapkv, streaming)."),
    kv_window: int = typer.Option(32, "--kv-window", help="SnapKV observation window (last prompt tokens)."),
    kv_kernel: int = typer.Option(7, "--kv-kernel", help="SnapKV pooling kernel (odd; 1 = no pooling)."),
    kv_pool: str = typer.Option("max", "--kv-pool", help="SnapKV pooling: max | avg."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the KV cache after the prompt: 4 | 8."),
    kv_per_query_head: bool = typer.Option(
        False, "--kv-per-query-head", help="SnapKV: select per query head (original code; no GQA saving)."),
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    from mlx_elm.generation import GenerationStats, build_prompt, stream_tokens
    from mlx_elm.loading import load_with_info

    from mlx_elm import kv

    options = _options(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    kv_args = dict(policy=kv_policy, capacity=kv_capacity, window=kv_window, kernel=kv_kernel,
                   pool=kv_pool, bits=kv_bits)
    kv.validate(**kv_args)
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt given; pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    model_obj, tok, info = load_with_info(model, tokenizer, representation=representation, adapter_path=adapter)
    if verbose:
        _echo_err(info.describe())
    tokens = build_prompt(tok, prompt, system, chat_template)
    stats = GenerationStats()
    caches = kv.make_cache(model_obj, per_query_head=kv_per_query_head, **kv_args)
    for text in stream_tokens(model_obj, tok, tokens, options, info.config, prompt_cache=caches, stats=stats):
        typer.echo(text, nl=False)
        sys.stdout.flush()
    typer.echo("")
    if verbose:
        _echo_err(kv.describe(caches))
    _echo_err(stats.summary())


def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter folder to apply."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Maximum new tokens per turn."),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Multi-turn chat that keeps the KV cache between turns (/reset clears it, /exit quits)."""
    from mlx_elm.chat import ChatSession
    from mlx_elm.loading import load_with_info

    options = _options(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    model_obj, tok, info = load_with_info(model, tokenizer, adapter_path=adapter)
    if verbose:
        _echo_err(info.describe())
    session = ChatSession(model_obj, tok, info.config, options, system=system)
    _echo_err("Type a message; /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input(">> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        for text in session.send(line):
            typer.echo(text, nl=False)
            sys.stdout.flush()
        typer.echo("")
        if verbose:
            _echo_err(session.last_stats.summary() + f" | reused {session.last_reused} cached tokens")


def doctor() -> None:
    """Report backend, device, BLAS in use, and memory."""
    from mlx_elm.platform import doctor as run_doctor

    for line in run_doctor().lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)
    app.command()(doctor)
