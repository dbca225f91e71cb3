"""`mlx-elm ays ...`: schedules, toy denoiser training, AYS optimisation and the benchmark table.

Thin layer: parse and validate options, call :mod:`mlx_elm.diffusion`, print.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import DiffusionError

ays_app = typer.Typer(help="Diffusion samplers and Align Your Steps schedules.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the `ays` sub-commands to the main app."""
    app.add_typer(ays_app, name="ays")


def _peak_mb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**20


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise DiffusionError(f"--steps must be comma-separated integers, got '{text}'; e.g. --steps 5,10,20") from e
    if not steps or min(steps) < 2:
        raise DiffusionError(f"every step count must be >= 2, got '{text}'; e.g. --steps 5,10,20")
    return steps


@ays_app.command("schedule")
def schedule_cmd(
    name: str = typer.Argument(..., help="karras, logsnr, time-uniform, sigma-uniform, kl-optimal, or ays-sd15/ays-sdxl/ays-deepfloyd-if/ays-svd"),
    steps: int = typer.Option(10, help="Number of steps (levels = steps + 1)."),
    sigma_min: float = typer.Option(0.002, help="Smallest sigma (hand-crafted schedules)."),
    sigma_max: float = typer.Option(80.0, help="Largest sigma (hand-crafted schedules)."),
) -> None:
    """Print a schedule's sigmas (and, for published AYS arrays, their source and timesteps)."""
    from mlx_elm.diffusion import schedules as S

    if steps < 1:
        raise DiffusionError(f"--steps must be >= 1, got {steps}")
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
    dataset: str = typer.Option("ring8", help="ring8, spiral or checkerboard."),
    out: Path = typer.Option(Path("ring8_denoiser.safetensors"), help="Output .safetensors file."),
    steps: int = typer.Option(4000, help="Training steps."),
    batch: int = typer.Option(1024, help="Batch size."),
    hidden: int = typer.Option(128, help="MLP width."),
    depth: int = typer.Option(3, help="Hidden layers."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (cosine decay)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Train a small MLP denoiser on a 2D toy mixture with the EDM loss."""
    from tqdm import tqdm

    from mlx_elm.diffusion import toy

    if steps < 1 or batch < 2 or hidden < 1 or depth < 1:
        raise DiffusionError("--steps, --hidden, --depth must be >= 1 and --batch >= 2")
    if out.suffix != ".safetensors":
        raise DiffusionError(f"--out must end in .safetensors, got '{out}'")
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
    denoiser: str = typer.Option(..., help="'gmm:<dataset>' for the exact denoiser, or a file from `ays train-toy`."),
    steps: int = typer.Option(10, help="Number of steps to optimise (>= 2)."),
    solver: str = typer.Option("ddim-stochastic", help="Solver the schedule is checked with: ddim-stochastic, euler, dpmpp-2m, heun."),
    out: Path = typer.Option(Path("ays_schedule.json"), help="Output JSON."),
    plot: Optional[Path] = typer.Option(None, help="Also write a PNG comparing with Karras/time-uniform/log-SNR."),
    init: str = typer.Option("logsnr", help="Initial schedule (a hand-crafted name)."),
    max_ratio: Optional[float] = typer.Option(None, help="Cap on sigma_i / sigma_(i+1); default: 4 for heun, none otherwise; 0 disables."),
    max_sweeps: int = typer.Option(20, help="Upper bound on coordinate-descent sweeps (early stopping usually ends sooner)."),
    mc_samples: int = typer.Option(2048, help="Monte-Carlo samples per KLUB interval."),
    refine: bool = typer.Option(False, help="Optimise steps/2 first, then refine by inserting midpoints (coarse to fine)."),
    check_samples: int = typer.Option(4000, help="Samples used to score the solver on init vs optimised (0 skips)."),
    seed: int = typer.Option(0, help="Random seed of the Monte-Carlo estimate."),
) -> None:
    """Optimise a schedule for a denoiser by minimising the KLUB; write JSON (and a PNG)."""
    import mlx.core as mx
    import numpy as np
    from tqdm import tqdm

    from mlx_elm.diffusion import ays as A
    from mlx_elm.diffusion import evaluate as E
    from mlx_elm.diffusion import sampling as SM
    from mlx_elm.diffusion import schedules as S
    from mlx_elm.diffusion import toy
    from mlx_elm.diffusion.klub import KLUBConfig

    if steps < 2:
        raise DiffusionError(f"--steps must be >= 2, got {steps}")
    if refine and (steps % 2 or steps < 4):
        raise DiffusionError(f"--refine needs an even --steps >= 4, got {steps}")
    if solver not in SM.SAMPLERS:
        raise DiffusionError(f"unknown solver '{solver}'; choose one of: {', '.join(SM.SAMPLERS)}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise DiffusionError(f"--plot must end in .png, got '{plot}'")
    den, gmm, label = toy.resolve_denoiser(denoiser)
    cfg = A.AYSConfig(
        steps=steps // 2 if refine else steps, init=init, max_sweeps=max_sweeps,
        max_ratio=A.default_max_ratio(solver) if max_ratio is None else (max_ratio or None),
        klub=KLUBConfig(n_samples=mc_samples, seed=seed),
    )
    data = gmm.sample(8192, key=mx.random.key(seed + 1))
    t0 = time.time()
    bar = tqdm(total=max_sweeps * (2 if refine else 1), desc=f"AYS {label}", unit="sweep")

    def cb(sweep: int, v: float) -> None:
        bar.update(1)
        bar.set_postfix(klub=f"{v:.3f}")

    res = A.optimize(den, data, gmm.sigma_data, cfg, progress=cb)
    init_sig, klub_init = res.init_sigmas, res.klub_init
    if refine:
        res = A.refine(den, data, gmm.sigma_data, res.sigmas, cfg, progress=cb)
        init_sig = S.HAND_CRAFTED[init](steps)
        klub_init = A.KLUBEstimator(den, data, gmm.sigma_data, A.KLUBConfig(n_samples=mc_samples, seed=seed + 1_000_003))(init_sig)
    bar.close()
    record = {
        "denoiser": label, "steps": steps, "solver": solver, "init": init,
        "sigmas": [float(v) for v in res.sigmas.tolist()],
        "init_sigmas": [float(v) for v in init_sig.tolist()],
        "klub": res.klub, "klub_init": klub_init, "history": res.history,
        "config": {k: v for k, v in asdict(cfg).items() if k != "klub"} | {"mc_samples": mc_samples, "refine": refine},
    }
    if check_samples > 0:
        ref = gmm.sample(check_samples, key=mx.random.key(seed + 2))
        for name, sig in (("init", init_sig), ("ays", res.sigmas)):
            x, nfe = E.generate(den, sig, solver, check_samples, gmm.dim, seed + 3)
            record[f"check_{name}"] = E.score(gmm, x, ref) | {"nfe": nfe}
    _write_text(out, json.dumps(record, indent=2) + "\n")
    if plot is not None:
        from mlx_elm.diffusion.plots import plot_schedules

        curves = {k: np.array(S.HAND_CRAFTED[k](steps)) for k in ("karras", "time-uniform", "logsnr")}
        curves[f"AYS ({label})"] = np.array(res.sigmas)
        plot_schedules(curves, plot, title=f"{steps}-step schedules, {label}")
    msg = (f"AYS {label} N={steps}: KLUB {klub_init:.3f} -> {res.klub:.3f} in {len(res.history) - 1} sweeps, "
           f"{time.time() - t0:.1f}s, peak memory {_peak_mb():.0f} MB -> {out}")
    if check_samples > 0:
        a, b = record["check_init"], record["check_ays"]
        msg += (f"; {solver} KL(q|p) {a['kl_qp']:.3f} -> {b['kl_qp']:.3f}, KL(p|q) {a['kl_pq']:.3f} -> {b['kl_pq']:.3f}")
    typer.echo("sigmas: " + ", ".join(f"{v:.4g}" for v in record["sigmas"]))
    typer.echo(msg)


@ays_app.command("evaluate")
def evaluate_cmd(
    denoiser: list[str] = typer.Option(["gmm:ring8", "gmm:spiral"], help="Repeatable: 'gmm:<dataset>' or a trained toy file."),
    steps: str = typer.Option("5,10,20", help="Comma-separated step counts."),
    samples: int = typer.Option(8000, help="Samples per (schedule, solver) cell."),
    out: Path = typer.Option(Path("ays_table.md"), help="Markdown table output."),
    plots: Optional[Path] = typer.Option(None, help="Folder for schedule/sample PNGs."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Benchmark Karras / log-SNR / time-uniform / AYS x solvers x steps; write a markdown table."""
    import numpy as np
    from tqdm import tqdm

    from mlx_elm.diffusion import evaluate as E
    from mlx_elm.diffusion import schedules as S

    if samples < 100:
        raise DiffusionError(f"--samples must be >= 100 for the k-NN metrics, got {samples}")
    cfg = E.EvalConfig(denoisers=list(denoiser), steps=_parse_steps(steps), n_samples=samples, seed=seed)
    total = len(cfg.denoisers) * len(cfg.steps) * (len(cfg.schedules) * len(cfg.solvers) + 1)
    bar = tqdm(total=total, desc="evaluate", unit="cell")
    t0 = time.time()

    def cb(msg: str) -> None:
        bar.update(1)
        tqdm.write(msg)

    res = E.run(cfg, progress=cb)
    bar.close()
    table = E.markdown_table(res.rows)
    checks = E.check_targets(res.rows)
    _write_text(out, table + "\n\nTargets at 10 steps:\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    if plots is not None:
        from mlx_elm.diffusion.plots import plot_samples, plot_schedules

        for label, by_n in res.schedules.items():
            safe = label.replace(":", "_")
            for n, sig in by_n.items():
                curves = {k: np.array(S.HAND_CRAFTED[k](n)) for k in ("karras", "time-uniform", "logsnr")}
                curves["AYS"] = np.array(sig)
                plot_schedules(curves, plots / f"schedules_{safe}_N{n}.png", title=f"{label}, {n} steps")
                panels = {k.split("|", 2)[2]: v for k, v in res.samples.items() if k.startswith(f"{label}|{n}|")}
                plot_samples(panels, plots / f"samples_{safe}_N{n}.png", cols=len(cfg.solvers))
    typer.echo(table)
    typer.echo("\n".join(checks))
    n_pass = sum(c.startswith("PASS") for c in checks)
    typer.echo(f"evaluated {len(res.rows)} cells in {time.time() - t0:.0f}s, targets {n_pass}/{len(checks)} passed, "
               f"peak memory {_peak_mb():.0f} MB -> {out}")
