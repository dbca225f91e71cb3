"""Data-parallel LoRA with MLX's distributed layer.

Run on two processes of this machine (ring backend over TCP):

    mlx.launch -n 2 --backend ring -- python examples/distributed_lora.py --fast --out /tmp/dp2

and on one process with the same global batch:

    python examples/distributed_lora.py --fast --out /tmp/dp1

Both reach the same adapters (up to float rounding): each process reads half of every global
batch and the summed gradients are divided by the global token count. Across machines, give
``mlx.launch`` a hostfile (``--hostfile hosts.json``) instead of ``-n``; use the same model and
data folders on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default with --fast: a tiny random OpenELM)")
    p.add_argument("--data", help="data folder with train.jsonl")
    p.add_argument("--out", required=True, help="adapter folder (rank 0 writes it)")
    p.add_argument("--fast", action="store_true", help="tiny model and data, a few steps (for tests)")
    p.add_argument("--workdir", default=None, help="where --fast builds its tiny model and data")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)

    from mlx_elm.loading import load_with_info
    from mlx_elm.train.data import load_dataset
    from mlx_elm.train.distributed import init_world
    from mlx_elm.train.finetune import finetune_model
    from mlx_elm.train.loop import TrainConfig
    from mlx_elm.adapters import LoRAConfig

    world = init_world()
    model_dir, data_dir = args.model, args.data
    if args.fast and model_dir is None:
        from mlx_elm.train.tiny import make_tiny_openelm, train_tiny_spm, write_text_data

        # every process builds the same files (fixed seeds) in its own folder: no shared disk needed
        work = Path(args.workdir or args.out + ".work") / f"rank{world.rank}"
        model_dir = make_tiny_openelm(work / "model", train_tiny_spm(work / "spm"))
        data_dir = write_text_data(work / "data", n_train=32, n_valid=0, words=20)
    model, tok, _ = load_with_info(str(model_dir))
    data = load_dataset(data_dir, tok, args.max_seq_length)
    lora = LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=("embedding", "all-linear"))
    cfg = TrainConfig(batch_size=args.batch_size, iters=args.iters, learning_rate=args.learning_rate,
                      steps_per_eval=0, save_every=0, progress=False, compile=not args.no_compile)
    log = print if world.is_main else (lambda s: None)
    result = finetune_model(model, tok, data, Path(args.out), lora, cfg, str(model_dir), world, log)
    summary = {"world": world.size, "rank": world.rank, "losses": result.losses, "tokens": result.tokens,
               "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
               "peak_memory_gb": result.peak_memory_gb}
    if world.is_main:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
