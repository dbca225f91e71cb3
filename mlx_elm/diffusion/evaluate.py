"""Benchmark schedules x solvers x step counts on toy data with an exact density.

This is the measurement behind ``mlx-elm ays evaluate`` and ``examples/ays_toy.py``: for each
denoiser (exact GMM or trained MLP) it optimises an AYS schedule per step count, samples with
every (schedule, solver), and scores the samples against the true density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_elm.diffusion import ays as A
from mlx_elm.diffusion import metrics as M
from mlx_elm.diffusion import sampling as SM
from mlx_elm.diffusion import schedules as S
from mlx_elm.diffusion import toy
from mlx_elm.diffusion.klub import KLUBConfig, KLUBEstimator
from mlx_elm.errors import DiffusionError


@dataclass
class EvalConfig:
    """What to measure; the defaults produce the table in docs/diffusion.md."""

    denoisers: list[str] = field(default_factory=lambda: ["gmm:ring8", "gmm:spiral"])
    steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    schedules: list[str] = field(default_factory=lambda: ["karras", "logsnr", "time-uniform", "ays"])
    solvers: list[str] = field(default_factory=lambda: ["ddim-stochastic", "euler", "dpmpp-2m"])
    n_samples: int = 8000
    seed: int = 0
    ays: A.AYSConfig = field(default_factory=A.AYSConfig)
    klub_eval: KLUBConfig = field(default_factory=lambda: KLUBConfig(n_samples=4096, seed=12345))


@dataclass
class EvalResult:
    rows: list[dict]
    schedules: dict[str, dict[int, mx.array]]  # denoiser label -> steps -> ays sigmas
    samples: dict[str, np.ndarray]  # "label|steps|schedule|solver" -> samples (kept for plots)


def generate(
    denoiser: SM.Denoiser, sigmas: mx.array, solver: str, n: int, dim: int, seed: int
) -> tuple[mx.array, int]:
    """Sample n points from the N(0, sigma_max^2 I) prior with a named solver."""
    k_prior, k_sde = mx.random.split(mx.random.key(seed))
    x = float(sigmas[0].item()) * mx.random.normal((n, dim), key=k_prior)
    out, nfe = SM.sample(solver, denoiser, x, sigmas, key=k_sde)
    mx.eval(out)
    return out, nfe


def score(gmm: toy.GMM, samples: mx.array, data: mx.array) -> dict[str, float]:
    """All metrics of samples against the mixture; diverged samplers get inf instead of raising."""
    x = np.array(samples)
    if not np.all(np.isfinite(x)) or np.max(np.abs(x)) > 1e6:
        return {"kl_qp": math.inf, "kl_pq": math.inf, "sw2": math.inf, "mmd2": math.inf, "nll": math.inf}
    lp_s = np.array(gmm.log_prob(samples))
    lp_d = np.array(gmm.log_prob(data))
    return M.all_metrics(x, lp_s, np.array(data), lp_d)


def run(cfg: EvalConfig, progress: Callable[[str], None] | None = None) -> EvalResult:
    """Run the whole benchmark; returns one row per (denoiser, steps, schedule, solver)."""
    for s in cfg.solvers:
        if s not in SM.SAMPLERS:
            raise DiffusionError(f"unknown solver '{s}'; choose one of: {', '.join(SM.SAMPLERS)}")
    for s in cfg.schedules:
        if s != "ays" and s not in S.HAND_CRAFTED:
            raise DiffusionError(f"unknown schedule '{s}'; choose 'ays' or one of: {', '.join(S.HAND_CRAFTED)}")
    rows: list[dict] = []
    all_sched: dict[str, dict[int, mx.array]] = {}
    samples: dict[str, np.ndarray] = {}
    for spec in cfg.denoisers:
        den, gmm, label = toy.resolve_denoiser(spec)
        data_opt = gmm.sample(8192, key=mx.random.key(cfg.seed + 1))
        data_eval = gmm.sample(cfg.n_samples, key=mx.random.key(cfg.seed + 2))
        sd = gmm.sigma_data
        klub_eval = KLUBEstimator(den, data_opt, sd, cfg.klub_eval)
        all_sched[label] = {}
        for n in cfg.steps:
            scheds: dict[str, mx.array] = {}
            for name in cfg.schedules:
                if name == "ays":
                    acfg = A.AYSConfig(**{**cfg.ays.__dict__, "steps": n, "sigma_min": S.SIGMA_MIN, "sigma_max": S.SIGMA_MAX})
                    if n > 10 and n % 2 == 0 and n // 2 in all_sched[label]:  # coarse to fine, as in the paper
                        scheds[name] = A.refine(den, data_opt, sd, all_sched[label][n // 2], acfg).sigmas
                    else:
                        scheds[name] = A.optimize(den, data_opt, sd, acfg).sigmas
                    all_sched[label][n] = scheds[name]
                    if progress:
                        progress(f"{label} N={n} ays={np.round(np.array(scheds[name]), 4).tolist()}")
                else:
                    scheds[name] = S.HAND_CRAFTED[name](n)
            for name, sig in scheds.items():
                kl = klub_eval(sig)
                for solver in cfg.solvers:
                    x, nfe = generate(den, sig, solver, cfg.n_samples, gmm.dim, cfg.seed + 3)
                    m = score(gmm, x, data_eval)
                    samples[f"{label}|{n}|{name}|{solver}"] = np.array(x)
                    rows.append({"denoiser": label, "steps": n, "schedule": name, "solver": solver, "nfe": nfe, "klub": kl, **m})
                    if progress:
                        progress(f"{label} N={n} {name:>12} {solver:>15}  KL(q|p)={m['kl_qp']:.3f} KL(p|q)={m['kl_pq']:.3f} SW={m['sw2']:.3f}")
    return EvalResult(rows, all_sched, samples)


def markdown_table(rows: list[dict]) -> str:
    """One line per (denoiser, steps, solver): KL(q||p) / KL(p||q) / SW2 per schedule, best in bold."""
    scheds = list(dict.fromkeys(r["schedule"] for r in rows))
    head = "| denoiser | N | solver | " + " | ".join(scheds) + " |"
    lines = [head, "|" + "---|" * (3 + len(scheds))]
    keys = list(dict.fromkeys((r["denoiser"], r["steps"], r["solver"]) for r in rows))
    by = {(r["denoiser"], r["steps"], r["solver"], r["schedule"]): r for r in rows}
    for d, n, sol in keys:
        cells = [by[(d, n, sol, s)] for s in scheds]
        best = {m: min(c[m] for c in cells) for m in ("kl_qp", "kl_pq", "sw2")}

        def fmt(c: dict, m: str) -> str:
            v = f"{c[m]:.3f}" if math.isfinite(c[m]) else "inf"
            return f"**{v}**" if c[m] == best[m] else v

        lines.append(f"| {d} | {n} | {sol} | " + " | ".join(f"{fmt(c, 'kl_qp')} / {fmt(c, 'kl_pq')} / {fmt(c, 'sw2')}" for c in cells) + " |")
    # KLUB per schedule
    lines.append("")
    lines.append("| denoiser | N | " + " | ".join(f"KLUB {s}" for s in scheds) + " |")
    lines.append("|" + "---|" * (2 + len(scheds)))
    for d, n in dict.fromkeys((r["denoiser"], r["steps"]) for r in rows):
        vals = [next(r["klub"] for r in rows if r["denoiser"] == d and r["steps"] == n and r["schedule"] == s) for s in scheds]
        lines.append(f"| {d} | {n} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict], steps: int = 10, tol: float = 0.10) -> list[str]:
    """The paper-style targets at `steps`: AYS beats every hand-crafted schedule on both KL directions
    for stochastic DDIM and Euler, and is within `tol` of the best for DPM-Solver++(2M)."""
    out = []
    for d in dict.fromkeys(r["denoiser"] for r in rows):
        for sol in dict.fromkeys(r["solver"] for r in rows):
            cell = [r for r in rows if r["denoiser"] == d and r["steps"] == steps and r["solver"] == sol]
            a = next((r for r in cell if r["schedule"] == "ays"), None)
            if a is None:
                continue
            for m in ("kl_qp", "kl_pq"):
                best = min(r[m] for r in cell if r["schedule"] != "ays")
                if sol == "dpmpp-2m":
                    ok = a[m] <= best + tol * abs(best)
                else:
                    ok = a[m] < best
                out.append(f"{'PASS' if ok else 'FAIL'} {d} N={steps} {sol} {m}: ays {a[m]:.3f} vs best hand-crafted {best:.3f}")
    return out
