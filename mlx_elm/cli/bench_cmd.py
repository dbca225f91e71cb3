"""``mlx-elm bench …``: speed and memory figures, thin over ``mlx_elm.bench`` and friends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mlx_elm.cli import options as O

bench_app = typer.Typer(help="Reproducible speed and memory benchmarks.", no_args_is_help=True)

Runs = Annotated[int, typer.Option("--runs", min=1, max=1000, help="Timed runs (the median counts).")]


@bench_app.command("generate")
def generate(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", callback=O._nonempty,
        help="Model folder, Hub id, alias, or random:PRESET (e.g. random:OpenELM-270M).")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, max=1 << 20,
                                               help="Random prompt length (without --draft).")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=2, max=1 << 20)] = 128,
    runs: Annotated[Optional[int], typer.Option(
        "--runs", min=1, max=1000, help="Timed runs (the median counts); default 3, or 1 round per task with --draft.")] = None,
    vs: Annotated[Optional[str], typer.Option("--vs", help="Peer to compare with: mlx-lm.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype for random: models (float32, bfloat16, float16).")] = "float32",
    representation: O.Weights = "auto",
    tokenizer: O.Tokenizer = None,
    draft: O.Draft = None,
    num_draft: O.NumDraft = None,
    tasks: Annotated[str, typer.Option(
        "--tasks", help="With --draft: task kinds from the shipped set, comma-separated: grounded, chat, long "
                        "(one ~8K-token document).")] = "grounded,chat",
    tasks_file: Annotated[Optional[Path], typer.Option(
        "--tasks-file", help="With --draft: a JSONL task file instead of the shipped one (fields: id, kind, task, "
                             "prompt, source).")] = None,
    kv_policy: O.KVPolicy = "full",
    kv_capacity: O.KVCapacity = None,
    kv_window: O.KVWindow = 32,
    kv_bits: O.KVBits = None,
    with_full: Annotated[bool, typer.Option(
        "--with-full", help="With --draft and another --kv-policy: also run the full cache from the same prefill, "
                            "so the two speed-ups can be compared.")] = False,
) -> None:
    """Median prefill and decode tokens/s and peak memory (optionally against mlx-lm).

    With --draft lookup|MODEL: speculative against plain greedy decoding on a shipped task set
    (grounded work and open-ended chat), alternating in one process from one prefill per task:
    acceptance, accepted tokens per verification, decode tokens/s of both and their ratio, and
    whether the outputs are identical.
    """
    if draft is not None:
        _bench_speculative(model, tokenizer, gen_tokens, runs or 1, representation, draft, num_draft, tasks,
                           tasks_file, kv_policy, kv_capacity, kv_window, kv_bits, with_full)
        return
    if num_draft is not None or tasks_file is not None or tokenizer is not None:
        raise typer.BadParameter("--num-draft, --tasks-file and --tokenizer need --draft lookup or --draft MODEL")
    from tqdm import tqdm

    from mlx_elm.bench import bench_generate, format_table

    runs = runs or 3
    total = runs * (2 if vs else 1)
    with tqdm(total=total, desc="bench runs", leave=False) as bar:
        results = bench_generate(model, prompt_tokens, gen_tokens, runs, vs, dtype, representation,
                                 progress=bar.update)
    typer.echo(f"model {model or 'default'}, prompt {prompt_tokens}, generate {gen_tokens}, median of {runs} runs")
    for row in format_table(results):
        typer.echo(row)


def _bench_speculative(model, tokenizer, gen_tokens, rounds, representation, draft, num_draft, kinds, tasks_file,
                       kv_policy, kv_capacity, kv_window, kv_bits, with_full) -> None:
    import mlx.core as mx
    from tqdm import tqdm

    from mlx_elm import kv
    from mlx_elm.loading import load_with_info
    from mlx_elm.generation import SamplingOptions
    from mlx_elm.speculative import SamplingRule, bench, check_num_draft, make_proposer
    from mlx_elm.speculative.tasks import load_tasks

    kv_options = kv.KVOptions(policy=kv_policy, capacity=kv_capacity, window=kv_window, bits=kv_bits).validate()
    policies = [kv.KVOptions()] * (with_full and kv_options != kv.KVOptions()) + [kv_options]
    check_num_draft(num_draft, "lookup" if draft == "lookup" else "model")
    task_list = load_tasks(tasks_file, [k.strip() for k in kinds.split(",") if k.strip()])
    model_obj, tok, info = load_with_info(model, tokenizer, representation=representation)
    name = draft
    if draft != "lookup":  # load the draft once, with the target's tokenizer if it ships none
        draft, num_draft = make_proposer(draft, model_obj, tok, SamplingRule(SamplingOptions()), num_draft,
                                         representation, tokenizer_ref=tokenizer)
    with tqdm(total=len(task_list) * 2 * rounds * len(policies), desc="plain / speculative runs", leave=False) as bar:
        results = bench.run(model_obj, tok, task_list, draft, num_draft, gen_tokens, rounds, policies, info.config,
                            progress=lambda _: bar.update())
    typer.echo(f"model {model or 'default'} ({info.representation}), draft {name}, greedy, up to {gen_tokens} "
               f"tokens, {rounds} round(s), plain and speculative alternating from one prefill per task")
    for row in bench.table(results):
        typer.echo(row)
    for (kind, policy), s in bench.summarize(results).items():
        typer.echo(f"{kind} [{policy}]: decode {s['speculative_tps']:.2f} vs {s['plain_tps']:.2f} tokens/s plain = "
                   f"{s['ratio']:.2f}x | acceptance {100 * s['acceptance']:.0f}% | "
                   f"{s['accepted_per_verification']:.2f} accepted per verification | "
                   f"{s['tokens_per_pass']:.2f} tokens per target pass | identical {s['identical']}/{s['tasks']}")
    summary = bench.summarize(results)
    if len(policies) == 2:
        full, other = (bench.policy_label(p) for p in policies)
        for kind in sorted({k for k, _ in summary}):
            a, b = summary.get((kind, full)), summary.get((kind, other))
            if a and b:
                typer.echo(f"{kind}: speed-up under {other} is {b['ratio']:.2f}x vs {a['ratio']:.2f}x under the full "
                           f"cache ({b['ratio'] / a['ratio']:.2f} of it)")
    typer.echo(f"peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")


@bench_app.command("kv")
def kv(
    lengths: Annotated[List[int], typer.Option("--length", "-l", min=2, max=1 << 20,
                                               help="Prompt lengths (repeat the option).")] = [1024, 2048, 4096, 8192],
    capacity: Annotated[int, typer.Option("--kv-capacity", min=2, max=1 << 20, help="SnapKV rows kept per head.")] = 1024,
    window: O.KVWindow = 32,
    bits: O.KVBits = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", min=1, max=1 << 16, help="Timed decode steps per measurement.")] = 16,
    chunk: Annotated[int, typer.Option("--chunk", min=1, max=1 << 20, help="Prefill chunk size.")] = 512,
    preset_name: Annotated[str, typer.Option("--preset", help="OpenELM geometry (random weights).")] = "OpenELM-270M",
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Interleaved timing rounds (the best counts).")] = 3,
    seed: Annotated[int, typer.Option("--seed", min=0, max=O.SEED_MAX)] = 0,
) -> None:
    """Decode tokens/s and KV-cache bytes for full vs SnapKV, as ratios, per prompt length."""
    from mlx_elm.kv import bench

    for line in bench.run_report(sorted(lengths), capacity, window, bits, tokens, chunk, preset_name, rounds, seed):
        typer.echo(line)


@bench_app.command("lora")
def lora(
    model: Annotated[str, typer.Option("--model", help="smollm2 | openelm-270m")] = "smollm2",
    workdir: Annotated[Path, typer.Option("--workdir", help="Scratch folder for the models, data and adapters.")] = Path("/tmp/mlx-elm-bench-lora"),
    iters: Annotated[int, typer.Option("--iters", min=1, max=100000)] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 2,
    rank: Annotated[int, typer.Option("--rank", min=1, max=4096)] = 8,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", min=2, max=1 << 20)] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=100)] = 1,
) -> None:
    """Tokens/s and peak memory of `mlx-elm lora` vs `mlx_lm.lora` (ratio > 1: ours is faster)."""
    from mlx_elm.train.bench import compare

    typer.echo(json.dumps(compare(model, workdir, iters, batch_size, rank, max_seq_length, repeats), indent=2))


MOE_LAYERS = "dense,smoe,fine-grained,mhmoe-h2,mhmoe-h3"


@bench_app.command("moe")
def moe(
    dim: Annotated[int, typer.Option("--dim", min=8, max=1 << 16, help="Model width d (the papers: 768).")] = 768,
    experts: Annotated[int, typer.Option("--experts", min=1, max=4096,
                                         help="SMoE experts; the other layers are sized from it by the v2 rule.")] = 8,
    ffn: Annotated[int, typer.Option("--ffn", min=8, max=1 << 18, help="SMoE expert (and dense FFN) SwiGLU width.")] = 2048,
    layers: Annotated[str, typer.Option("--layers", help="Comma-separated: dense, smoe, fine-grained, mhmoe-h2, "
                                                          "mhmoe-h3, mhmoe-h4.")] = MOE_LAYERS,
    tokens: Annotated[List[int], typer.Option("--tokens", "-t", min=1, max=1 << 20,
                                              help="Tokens per call (repeat; 1 = decode, 2048 = prefill).")] = [1, 2048],
    modes: Annotated[str, typer.Option("--modes", help="forward and/or forward+backward, comma-separated.")] = "forward,forward+backward",
    dispatch: Annotated[str, typer.Option("--dispatch", help="Expert dispatches to time: gather, blocked.")] = "gather,blocked",
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Interleaved timing rounds (the best counts).")] = 3,
    out_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the rows as JSON here.")] = None,
) -> None:
    """One MoE layer: tokens/s and peak memory of SMoE vs MH-MoE vs a dense FFN of equal FLOPs, per dispatch."""
    import time

    import mlx.core as mx
    from tqdm import tqdm

    from mlx_elm.atomic import atomic_file
    from mlx_elm.moe.bench import auto_choice, bench_moe, best_ratios, describe_backend, format_table

    names = [s.strip() for s in layers.split(",") if s.strip()]
    mode_list = [s.strip() for s in modes.split(",") if s.strip()]
    disp = [s.strip() for s in dispatch.split(",") if s.strip()]
    total = sum((1 if n == "dense" else len(disp)) * len(tokens) * len(mode_list) for n in names)
    tic = time.perf_counter()
    with tqdm(total=total, desc="bench moe", leave=False) as bar:
        rows = bench_moe(names, dim, experts, ffn, tokens, mode_list, disp, rounds, progress=bar.update)
    typer.echo(f"one layer, d {dim}, SMoE {experts} x SwiGLU {ffn} top-1, v2-sized peers; {describe_backend()}; "
               f"best of {rounds} interleaved rounds")
    for line in format_table(rows):
        typer.echo(line)
    for line in best_ratios(rows):
        typer.echo(line)
    if out_json is not None:
        with atomic_file(out_json) as tmp:
            Path(tmp).write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    auto = auto_choice(max(tokens), experts, 1)
    typer.echo(f"{len(rows)} rows in {time.perf_counter() - tic:.0f}s, peak memory {mx.get_peak_memory() / 2**20:.0f} MB; "
               f"auto dispatch here at {max(tokens)} tokens: {auto}" + (f"; json {out_json}" if out_json else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
