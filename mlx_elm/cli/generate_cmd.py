"""``mlx-elm generate``, ``chat`` and ``doctor``: parse options, call the library, print."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mlx_elm.cli import options as O
from mlx_elm.errors import GenerationError


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


def _sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed):
    from mlx_elm.generation import SamplingOptions

    return SamplingOptions(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed).validate()


def _draft(draft, draft_model, num_draft):
    """``--draft`` / ``--draft-model`` / ``--num-draft`` → (draft, K) for the library (which checks K)."""
    from mlx_elm.errors import SpeculativeError
    from mlx_elm import speculative

    if draft is not None and draft_model is not None:
        raise SpeculativeError("pass either --draft or --draft-model (they mean the same), not both")
    draft = draft if draft is not None else draft_model
    if draft is None:
        if num_draft is not None:
            raise SpeculativeError("--num-draft needs --draft lookup or --draft MODEL")
        return None, None
    kind = "lookup" if draft == speculative.LOOKUP else "model"
    return draft, speculative.check_num_draft(num_draft, kind)


def _kv(policy, capacity, window, kernel, pool, bits, per_query_head):
    from mlx_elm.kv import KVOptions

    return KVOptions(policy=policy, capacity=capacity, window=window, kernel=kernel, pool=pool, bits=bits,
                     per_query_head=per_query_head).validate()


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (read from stdin when omitted).")] = None,
    model: O.Model = None,
    tokenizer: O.Tokenizer = None,
    adapter: O.Adapter = None,
    max_tokens: O.MaxTokens = 256,
    temp: O.Temp = 0.0,
    top_p: O.TopP = 1.0,
    top_k: O.TopK = 0,
    min_p: O.MinP = 0.0,
    repetition_penalty: O.RepetitionPenalty = 1.0,
    seed: O.Seed = None,
    system: O.System = None,
    chat_template: O.ChatTemplate = None,
    representation: O.Weights = "auto",
    verbose: O.Verbose = False,
    kv_policy: O.KVPolicy = "full",
    kv_capacity: O.KVCapacity = None,
    kv_window: O.KVWindow = 32,
    kv_kernel: O.KVKernel = 7,
    kv_pool: O.KVPool = "max",
    kv_bits: O.KVBits = None,
    kv_per_query_head: O.KVPerQueryHead = False,
    draft: O.Draft = None,
    draft_model: O.DraftModel = None,
    num_draft: O.NumDraft = None,
) -> None:
    """Generate text from a prompt, streaming it to stdout (speed and memory on stderr).

    With --draft lookup (or a draft model) decoding is speculative: the same greedy output, fewer
    passes of the model; fastest where the answer copies the prompt (quote, extract, edit a file).
    """
    from mlx_elm import kv, speculative
    from mlx_elm.generation import GenerationStats, build_prompt, stream_tokens
    from mlx_elm.loading import load_with_info

    options = _sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    kv_options = _kv(kv_policy, kv_capacity, kv_window, kv_kernel, kv_pool, kv_bits, kv_per_query_head)
    draft, num_draft = _draft(draft, draft_model, num_draft)
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt given; pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if draft == speculative.LOOKUP:
        speculative.check_lookup_prompt(prompt)
    model_obj, tok, info = load_with_info(model, tokenizer, representation=representation, adapter_path=adapter)
    if verbose:
        _echo_err(info.describe())
    tokens = build_prompt(tok, prompt, system, chat_template)
    stats = GenerationStats()
    caches = kv.make_cache(model_obj, **vars(kv_options))
    drafting = {}
    if draft is not None:
        proposer, num_draft = speculative.make_proposer(draft, model_obj, tok, speculative.SamplingRule(options),
                                                        num_draft, representation, tokenizer_ref=tokenizer)
        drafting = dict(draft=proposer, num_draft=num_draft)
    for text in stream_tokens(model_obj, tok, tokens, options, info.config, prompt_cache=caches, stats=stats,
                              **drafting):
        typer.echo(text, nl=False)
        sys.stdout.flush()
    typer.echo("")
    if verbose:
        _echo_err(kv.describe(caches))
    _echo_err(stats.summary())


def chat(
    model: O.Model = None,
    tokenizer: O.Tokenizer = None,
    adapter: O.Adapter = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, max=O.BIG, help="Maximum new tokens per turn.")] = 512,
    temp: O.Temp = 0.0,
    top_p: O.TopP = 1.0,
    top_k: O.TopK = 0,
    min_p: O.MinP = 0.0,
    repetition_penalty: O.RepetitionPenalty = 1.0,
    seed: O.Seed = None,
    system: O.System = None,
    representation: O.Weights = "auto",
    verbose: O.Verbose = False,
    kv_policy: O.KVPolicy = "full",
    kv_capacity: O.KVCapacity = None,
    kv_window: O.KVWindow = 32,
    kv_kernel: O.KVKernel = 7,
    kv_pool: O.KVPool = "max",
    kv_bits: O.KVBits = None,
    kv_per_query_head: O.KVPerQueryHead = False,
    draft: O.Draft = None,
    draft_model: O.DraftModel = None,
    num_draft: O.NumDraft = None,
) -> None:
    """Multi-turn chat that keeps the KV cache between turns (/reset clears it, /exit quits).

    With --kv-policy snapkv the first turn's prompt (e.g. a pasted document) is compressed once;
    later turns append to the compressed cache. With --draft every turn decodes speculatively
    (prompt lookup searches the whole conversation).
    """
    from mlx_elm import speculative
    from mlx_elm.chat import ChatSession
    from mlx_elm.loading import load_with_info

    options = _sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    kv_options = _kv(kv_policy, kv_capacity, kv_window, kv_kernel, kv_pool, kv_bits, kv_per_query_head)
    draft, num_draft = _draft(draft, draft_model, num_draft)
    model_obj, tok, info = load_with_info(model, tokenizer, representation=representation, adapter_path=adapter)
    if verbose:
        _echo_err(info.describe())
    if draft is not None:
        draft, num_draft = speculative.make_proposer(draft, model_obj, tok, speculative.SamplingRule(options),
                                                     num_draft, representation, tokenizer_ref=tokenizer)
    session = ChatSession(model_obj, tok, info.config, options, system=system, kv_options=kv_options,
                          draft=draft, num_draft=num_draft)
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
        if session.last_note:
            _echo_err(session.last_note)
        if verbose:
            _echo_err(session.last_stats.summary() + f" | reused {session.last_reused} cached tokens")
            _echo_err(session.describe_cache())


def doctor() -> None:
    """Report backend, device, BLAS in use, and memory."""
    from mlx_elm.platform import doctor as run_doctor

    for line in run_doctor().lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)
    app.command()(doctor)
