"""The Align Your Steps jobs end to end: optimise a schedule for a denoiser and check it, and write
the evaluation report with its plots. ``mlx-elm ays ...`` and ``examples/ays_toy.py`` both call
these, so the command line only parses options and prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from mlx_elm.atomic import atomic_file
from mlx_elm.diffusion import ays as A
from mlx_elm.diffusion import evaluate as E
from mlx_elm.diffusion import sampling as SM
from mlx_elm.diffusion import schedules as S
from mlx_elm.diffusion import toy
from mlx_elm.diffusion.klub import KLUBConfig
from mlx_elm.diffusion.plots import plot_samples, plot_schedules
from mlx_elm.errors import DiffusionError

COMPARED = ("karras", "time-uniform", "logsnr")  # hand-crafted schedules drawn beside AYS


@dataclass
class OptimizeJob:
    """What ``mlx-elm ays optimize`` asks for."""

    denoiser: str
    steps: int = 10
    solver: str = "ddim-stochastic"
    init: str = "logsnr"
    max_ratio: Optional[float] = None  # None: the solver's default; 0: no cap
    max_sweeps: int = 20
    mc_samples: int = 2048
    refine: bool = False
    check_samples: int = 4000
    seed: int = 0

    def validate(self) -> "OptimizeJob":
        if self.steps < 2:
            raise DiffusionError(f"--steps must be >= 2, got {self.steps}")
        if self.refine and (self.steps % 2 or self.steps < 4):
            raise DiffusionError(f"--refine needs an even --steps >= 4, got {self.steps}")
        if self.solver not in SM.SAMPLERS:
            raise DiffusionError(f"unknown solver '{self.solver}'; choose one of: {', '.join(SM.SAMPLERS)}")
        if self.init not in S.HAND_CRAFTED:
            raise DiffusionError(f"unknown --init '{self.init}'; choose one of: {', '.join(S.HAND_CRAFTED)}")
        if self.mc_samples < 2:
            raise DiffusionError(f"--mc-samples must be >= 2, got {self.mc_samples}")
        if self.check_samples != 0 and self.check_samples < 100:
            raise DiffusionError(f"--check-samples must be 0 (skip) or >= 100 for the k-NN metrics, "
                                 f"got {self.check_samples}")
        if self.max_sweeps < 1:
            raise DiffusionError(f"--max-sweeps must be >= 1, got {self.max_sweeps}")
        return self

    @property
    def total_sweeps(self) -> int:
        return self.max_sweeps * (2 if self.refine else 1)


def optimize_schedule(job: OptimizeJob, progress: Optional[Callable[[int, float], None]] = None) -> dict:
    """Optimise the KLUB for ``job.denoiser``, then score init vs AYS with the solver; the record
    ``mlx-elm ays optimize`` writes as JSON."""
    job.validate()
    den, gmm, label = toy.resolve_denoiser(job.denoiser)
    cfg = A.AYSConfig(
        steps=job.steps // 2 if job.refine else job.steps, init=job.init, max_sweeps=job.max_sweeps,
        max_ratio=A.default_max_ratio(job.solver) if job.max_ratio is None else (job.max_ratio or None),
        klub=KLUBConfig(n_samples=job.mc_samples, seed=job.seed),
    )
    data = gmm.sample(8192, key=mx.random.key(job.seed + 1))
    res = A.optimize(den, data, gmm.sigma_data, cfg, progress=progress)
    init_sig, klub_init = res.init_sigmas, res.klub_init
    if job.refine:
        res = A.refine(den, data, gmm.sigma_data, res.sigmas, cfg, progress=progress)
        init_sig = S.HAND_CRAFTED[job.init](job.steps)
        klub_init = A.KLUBEstimator(den, data, gmm.sigma_data,
                                    KLUBConfig(n_samples=job.mc_samples, seed=job.seed + 1_000_003))(init_sig)
    record = {
        "denoiser": label, "steps": job.steps, "solver": job.solver, "init": job.init,
        "sigmas": [float(v) for v in res.sigmas.tolist()],
        "init_sigmas": [float(v) for v in init_sig.tolist()],
        "klub": res.klub, "klub_init": klub_init, "history": res.history,
        "config": {k: v for k, v in asdict(cfg).items() if k != "klub"} | {"mc_samples": job.mc_samples,
                                                                           "refine": job.refine},
    }
    if job.check_samples > 0:
        ref = gmm.sample(job.check_samples, key=mx.random.key(job.seed + 2))
        for name, sig in (("init", init_sig), ("ays", res.sigmas)):
            x, nfe = E.generate(den, sig, job.solver, job.check_samples, gmm.dim, job.seed + 3)
            record[f"check_{name}"] = E.score(gmm, x, ref) | {"nfe": nfe}
    return record


def write_json(path: Path, record: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def plot_record(record: dict, path: Path) -> None:
    """The optimised schedule beside the hand-crafted ones (PNG)."""
    steps = record["steps"]
    curves = {k: np.array(S.HAND_CRAFTED[k](steps)) for k in COMPARED}
    curves[f"AYS ({record['denoiser']})"] = np.array(record["sigmas"])
    plot_schedules(curves, path, title=f"{steps}-step schedules, {record['denoiser']}")


def summary(record: dict) -> str:
    """The one line ``mlx-elm ays optimize`` ends with (before the time and memory)."""
    msg = (f"AYS {record['denoiser']} N={record['steps']}: KLUB {record['klub_init']:.3f} -> {record['klub']:.3f} "
           f"in {len(record['history']) - 1} sweeps")
    if "check_ays" in record:
        a, b = record["check_init"], record["check_ays"]
        msg += (f"; {record['solver']} KL(q|p) {a['kl_qp']:.3f} -> {b['kl_qp']:.3f}, "
                f"KL(p|q) {a['kl_pq']:.3f} -> {b['kl_pq']:.3f}")
    return msg


def write_report(res: E.EvalResult, cfg: E.EvalConfig, out: Path, plots: Optional[Path] = None,
                 target_steps: Optional[int] = None) -> List[str]:
    """The markdown table and the paper-style target checks into ``out``, PNGs of schedules and
    samples into ``plots``; returns the check lines."""
    steps = target_steps or (10 if 10 in cfg.steps else cfg.steps[0])
    table = E.markdown_table(res.rows)
    checks = E.check_targets(res.rows, steps=steps)
    with atomic_file(out) as tmp:
        tmp.write_text(table + f"\n\nTargets at {steps} steps:\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    if plots is not None:
        for label, by_n in res.schedules.items():
            safe = label.replace(":", "_").replace("/", "_")
            for n, sig in by_n.items():
                curves = {k: np.array(S.HAND_CRAFTED[k](n)) for k in COMPARED}
                curves["AYS (optimised)"] = np.array(sig)
                plot_schedules(curves, plots / f"schedules_{safe}_N{n}.png", title=f"{label}, {n} steps")
                panels = {k.split("|", 2)[2]: v for k, v in res.samples.items() if k.startswith(f"{label}|{n}|")}
                plot_samples(panels, plots / f"samples_{safe}_N{n}.png", cols=len(cfg.solvers))
    return checks


def parse_steps(text: str) -> List[int]:
    """``"5,10,20"`` → ``[5, 10, 20]`` with a one-line error for anything else."""
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise DiffusionError(f"--steps must be comma-separated integers, got '{text}'; e.g. --steps 5,10,20") from e
    if not steps or min(steps) < 2 or max(steps) > 1000:
        raise DiffusionError(f"every step count must be in [2, 1000], got '{text}'; e.g. --steps 5,10,20")
    return steps
