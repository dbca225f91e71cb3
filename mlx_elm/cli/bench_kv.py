"""``mlx-elm bench kv``: decode speed and KV bytes, full cache vs SnapKV (registered by bench_cmd)."""

from __future__ import annotations

from typing import List, Optional

import typer


def kv(
    lengths: List[int] = typer.Option([1024, 2048, 4096, 8192], "--length", "-l",
                                      help="Prompt lengths (repeat the option)."),
    capacity: int = typer.Option(1024, "--kv-capacity", help="SnapKV rows kept per head."),
    window: int = typer.Option(32, "--kv-window", help="SnapKV observation window."),
    bits: Optional[int] = typer.Option(None, "--kv-bits", help="Also quantize the SnapKV cache (4 | 8)."),
    tokens: int = typer.Option(16, "--tokens", "-n", help="Timed decode steps per measurement."),
    chunk: int = typer.Option(512, "--chunk", help="Prefill chunk size."),
    preset_name: str = typer.Option("OpenELM-270M", "--preset", help="OpenELM geometry (random weights)."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved timing rounds (the best counts)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Decode tokens/s and KV-cache bytes for full vs SnapKV, as ratios, per prompt length."""
    import time

    import mlx.core as mx
    from tqdm import tqdm

    from mlx_elm.kv import bench, validate

    validate("snapkv", capacity, window, 7, "max", bits)
    t0 = time.time()
    model = bench.random_openelm(preset_name, seed)
    with tqdm(total=len(lengths) + rounds, desc="bench kv", unit="run") as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        rows = bench.run(model, sorted(lengths), capacity, window, tokens, chunk, bits, seed, rounds, progress)
    typer.echo(bench.table(rows))
    typer.echo(f"{preset_name} (random weights, float32), {len(rows)} runs in {time.time() - t0:.0f} s | "
               f"peak memory: {mx.get_peak_memory() / 2**30:.3f} GB")
