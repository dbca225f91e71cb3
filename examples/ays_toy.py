"""Reproduce the Align Your Steps toy experiment end to end, on a CPU, in minutes.

1. Train a small MLP denoiser on the ring8 mixture (EDM loss, MLX).
2. For the exact GMM denoisers of ring8 and spiral and for the MLP, optimise an AYS schedule by
   minimising the KLUB at 5, 10 and 20 steps.
3. Sample with stochastic DDIM, Euler and DPM-Solver++(2M) under Karras, log-SNR, time-uniform
   and AYS schedules; score KL(q||p), KL(p||q) and sliced W2 against the true density.
4. Write a markdown table, the paper-style target checks, and PNGs of schedules and samples.

    python examples/ays_toy.py --out ays_toy_out          # full run (~15-25 min on 2 cores)
    python examples/ays_toy.py --fast --out /tmp/ays_fast # smoke run (seconds), used by the tests
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

from mlx_elm.diffusion import ays as A
from mlx_elm.diffusion import evaluate as E
from mlx_elm.diffusion import toy
from mlx_elm.diffusion import workflow as W
from mlx_elm.diffusion.klub import KLUBConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ays_toy_out"))
    ap.add_argument("--fast", action="store_true", help="tiny smoke run")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--mlp", type=Path, default=None, help="reuse a trained denoiser instead of training one")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # 1. the learned denoiser
    mlp_path = args.mlp or args.out / "ring8_denoiser.safetensors"
    if args.mlp is None:
        g = toy.get_dataset("ring8")
        mcfg = toy.MLPConfig(dataset="ring8", sigma_data=g.sigma_data,
                             hidden=16 if args.fast else 128, depth=1 if args.fast else 3)
        tcfg = toy.TrainConfig(steps=30 if args.fast else 4000, batch=128 if args.fast else 1024)
        toy.save_mlp(toy.train_mlp(g, mcfg, tcfg), mlp_path)
        print(f"trained ring8 MLP denoiser -> {mlp_path} ({time.time() - t0:.0f}s)")

    # 2-3. optimise and evaluate
    if args.fast:
        cfg = E.EvalConfig(
            denoisers=["gmm:ring8", str(mlp_path)], steps=[4], schedules=["karras", "logsnr", "ays"],
            solvers=["ddim-stochastic", "euler", "dpmpp-2m"], n_samples=400,
            ays=A.AYSConfig(n_candidates=4, max_sweeps=2, klub=KLUBConfig(n_samples=128)),
            klub_eval=KLUBConfig(n_samples=256, seed=12345),
        )
    else:
        cfg = E.EvalConfig(denoisers=["gmm:ring8", "gmm:spiral", str(mlp_path)])
    res = E.run(cfg, progress=print)

    # 4. report
    checks = W.write_report(res, cfg, args.out / "table.md", None if args.no_plots else args.out)
    print(E.markdown_table(res.rows))
    print("\n".join(checks))
    print(f"done in {time.time() - t0:.0f}s, peak memory {mx.get_peak_memory() / 2**20:.0f} MB -> {args.out}")


if __name__ == "__main__":
    main()
