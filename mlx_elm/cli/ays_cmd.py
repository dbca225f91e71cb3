"""`mlx-elm ays ...`: schedules, toy denoiser training, AYS optimisation and the benchmark table.

Thin layer: parse options, call :mod:`mlx_elm.diffusion` (the jobs live in its ``workflow``), print.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mlx_elm.cli import options as O
from mlx_elm.errors import DiffusionError

ays_app = typer.Typer(help="Diffusion samplers and Align Your Steps schedules.", no_args_is_help=True)

Sigma = Annotated[float, typer.Option(min=0.0, max=1e6, callback=O._positive)]
Seed = Annotated[int, typer.Option("--seed", min=0, max=O.SEED_MAX, help="Random seed.")]


def register(app: typer.Typer) -> None:
    """Attach the `ays` sub-commands to the main app."""
    app.add_typer(ays_app, name="ays")


def _peak_mb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**20


def _suffix(path: Path, suffix: str, option: str) -> Path:
    if path.suffix.lower() != suffix:
        raise DiffusionError(f"{option} must end in {suffix}, got '{path}'")
    return path


@ays_app.command("schedule")
def schedule_cmd(
    name: Annotated[str, typer.Argument(
        help="karras, logsnr, time-uniform, sigma-uniform, kl-optimal, or ays-sd15/ays-sdxl/ays-deepfloyd-if/ays-svd")],
    steps: Annotated[int, typer.Option(min=1, max=10_000, help="Number of steps (levels = steps + 1).")] = 10,
    sigma_min: Annotated[float, typer.Option(min=0.0, max=1e6, callback=O._positive,
                                             help="Smallest sigma (hand-crafted schedules).")] = 0.002,
    sigma_max: Annotated[float, typer.Option(min=0.0, max=1e6, callback=O._positive,
                                             help="Largest sigma (hand-crafted schedules).")] = 80.0,
) -> None:
    """Print a schedule's sigmas (and, for published AYS arrays, their source and timesteps)."""
    from mlx_elm.diffusion import schedules as S

    sig = S.get_schedule(name, steps, sigma_min, sigma_max)
    exact = name.startswith("ays-") and steps == 10
    vals = S.PUBLISHED_AYS[name[4:]].sigmas if exact else sig.tolist()
    typer.echo("sigmas: " + ", ".join(f"{v:g}" if exact else f"{v:.4g}" for v in vals))
    if name.startswith("ays-"):
        p = S.PUBLISHED_AYS[name[4:]]
        if p.timesteps is not None and steps == 10:
            typer.echo("timesteps: " + ", ".join(str(t) for t in p.timesteps))
        typer.echo(f"source: {p.model}: {p.source}" + ("" if steps == 10 else " (log-linearly interpolated)"))


@ays_app.command("train-toy")
def train_toy_cmd(
    dataset: Annotated[str, typer.Option(help="ring8, spiral or checkerboard.")] = "ring8",
    out: Annotated[Path, typer.Option(help="Output .safetensors file.")] = Path("ring8_denoiser.safetensors"),
    steps: Annotated[int, typer.Option(min=1, max=10**7, help="Training steps.")] = 4000,
    batch: Annotated[int, typer.Option(min=2, max=1 << 20, help="Batch size.")] = 1024,
    hidden: Annotated[int, typer.Option(min=1, max=1 << 14, help="MLP width.")] = 128,
    depth: Annotated[int, typer.Option(min=1, max=64, help="Hidden layers.")] = 3,
    lr: Annotated[float, typer.Option(min=0.0, max=10.0, callback=O._positive,
                                      help="Peak learning rate (cosine decay).")] = 3e-3,
    seed: Seed = 0,
) -> None:
    """Train a small MLP denoiser on a 2D toy mixture with the EDM loss."""
    from tqdm import tqdm

    from mlx_elm.diffusion import toy

    _suffix(out, ".safetensors", "--out")
    gmm = toy.get_dataset(dataset)
    mcfg = toy.MLPConfig(dataset=dataset, dim=gmm.dim, hidden=hidden, depth=depth, sigma_data=gmm.sigma_data)
    tcfg = toy.TrainConfig(steps=steps, batch=batch, lr=lr, seed=seed)
    bar = tqdm(total=steps, desc=f"train {dataset}", unit="step")
    last = [0.0]

    def cb(i: int, loss: float) -> None:
        last[0] = 0.98 * last[0] + 0.02 * loss if i else loss
        bar.update(1)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{last[0]:.4f}")

    t0 = time.time()
    model = toy.train_mlp(gmm, mcfg, tcfg, progress=cb)
    bar.close()
    toy.save_mlp(model, out)
    typer.echo(f"trained {dataset} denoiser: {steps} steps, loss {last[0]:.4f}, {time.time() - t0:.1f}s, "
               f"peak memory {_peak_mb():.0f} MB -> {out}")


@ays_app.command("optimize")
def optimize_cmd(
    denoiser: Annotated[str, typer.Option(help="'gmm:<dataset>' for the exact denoiser, or a file from `ays train-toy`.")],
    steps: Annotated[int, typer.Option(min=2, max=1000, help="Number of steps to optimise.")] = 10,
    solver: Annotated[str, typer.Option(help="Solver the schedule is checked with: ddim-stochastic, euler, dpmpp-2m, heun.")] = "ddim-stochastic",
    out: Annotated[Path, typer.Option(help="Output JSON.")] = Path("ays_schedule.json"),
    plot: Annotated[Optional[Path], typer.Option(help="Also write a PNG comparing with Karras/time-uniform/log-SNR.")] = None,
    init: Annotated[str, typer.Option(help="Initial schedule (a hand-crafted name).")] = "logsnr",
    max_ratio: Annotated[Optional[float], typer.Option(
        min=0.0, max=1e6, callback=O._finite,
        help="Cap on sigma_i / sigma_(i+1); default: 4 for heun, none otherwise; 0 disables.")] = None,
    max_sweeps: Annotated[int, typer.Option(min=1, max=1000, help="Upper bound on coordinate-descent sweeps (early stopping usually ends sooner).")] = 20,
    mc_samples: Annotated[int, typer.Option(min=2, max=1 << 22, help="Monte-Carlo samples per KLUB interval.")] = 2048,
    refine: Annotated[bool, typer.Option(help="Optimise steps/2 first, then refine by inserting midpoints (coarse to fine).")] = False,
    check_samples: Annotated[int, typer.Option(min=0, max=1 << 22, help="Samples used to score the solver on init vs optimised (0 skips, else >= 100).")] = 4000,
    seed: Seed = 0,
) -> None:
    """Optimise a schedule for a denoiser by minimising the KLUB; write JSON (and a PNG)."""
    from tqdm import tqdm

    from mlx_elm.diffusion import workflow as W

    if plot is not None:
        _suffix(plot, ".png", "--plot")
    job = W.OptimizeJob(denoiser, steps, solver, init, max_ratio, max_sweeps, mc_samples, refine,
                        check_samples, seed).validate()
    t0 = time.time()
    with tqdm(total=job.total_sweeps, desc=f"AYS {denoiser}", unit="sweep") as bar:
        def cb(sweep: int, v: float) -> None:
            bar.update(1)
            bar.set_postfix(klub=f"{v:.3f}")

        record = W.optimize_schedule(job, progress=cb)
    W.write_json(out, record)
    if plot is not None:
        W.plot_record(record, plot)
    typer.echo("sigmas: " + ", ".join(f"{v:.4g}" for v in record["sigmas"]))
    typer.echo(W.summary(record) + f", {time.time() - t0:.1f}s, peak memory {_peak_mb():.0f} MB -> {out}")


@ays_app.command("evaluate")
def evaluate_cmd(
    denoiser: Annotated[List[str], typer.Option(help="Repeatable: 'gmm:<dataset>' or a trained toy file.")] = ["gmm:ring8", "gmm:spiral"],
    steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "5,10,20",
    samples: Annotated[int, typer.Option(min=100, max=1 << 22, help="Samples per (schedule, solver) cell.")] = 8000,
    out: Annotated[Path, typer.Option(help="Markdown table output.")] = Path("ays_table.md"),
    plots: Annotated[Optional[Path], typer.Option(help="Folder for schedule/sample PNGs.")] = None,
    seed: Seed = 0,
) -> None:
    """Benchmark Karras / log-SNR / time-uniform / AYS x solvers x steps; write a markdown table."""
    from tqdm import tqdm

    from mlx_elm.diffusion import evaluate as E
    from mlx_elm.diffusion import workflow as W

    cfg = E.EvalConfig(denoisers=list(denoiser), steps=W.parse_steps(steps), n_samples=samples, seed=seed)
    total = len(cfg.denoisers) * len(cfg.steps) * (len(cfg.schedules) * len(cfg.solvers) + 1)
    t0 = time.time()
    with tqdm(total=total, desc="evaluate", unit="cell") as bar:
        def cb(msg: str) -> None:
            bar.update(1)
            tqdm.write(msg)

        res = E.run(cfg, progress=cb)
    checks = W.write_report(res, cfg, out, plots)
    typer.echo(E.markdown_table(res.rows))
    typer.echo("\n".join(checks))
    n_pass = sum(c.startswith("PASS") for c in checks)
    typer.echo(f"evaluated {len(res.rows)} cells in {time.time() - t0:.0f}s, targets {n_pass}/{len(checks)} passed, "
               f"peak memory {_peak_mb():.0f} MB -> {out}")
