"""Reproduce the shipped video model: data -> frame encoder -> stages 0/1/2 -> evaluation -> export.

    python examples/video_pegasus_pattern.py --out runs --install          # the shipped model (about an hour on a CPU)
    python examples/video_pegasus_pattern.py --out /tmp/v --fast           # every step on tiny settings (seconds)

Every step is resumable: run the same command again after an interruption and finished steps are
skipped (data, encoder, stages), an interrupted stage continues from its last checkpoint.
With ``--install`` the exported model replaces the one shipped in ``mlx_elm/video/pretrained``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from mlx_elm import platform

platform.maybe_reexec_with_fast_blas()

from mlx_elm.train.loop import TrainConfig  # noqa: E402
from mlx_elm.video.aligner import AlignerConfig  # noqa: E402
from mlx_elm.video.dataset import DataConfig, make_dataset  # noqa: E402
from mlx_elm.video.frame_pretrain import train_frame_encoder  # noqa: E402
from mlx_elm.video.layout import LayoutConfig  # noqa: E402
from mlx_elm.video.model import default_model_dir, export_model_folder  # noqa: E402
from mlx_elm.video.training import StageConfig, VideoTrainConfig, train_video_model  # noqa: E402
from mlx_elm.video.vit import ViTConfig  # noqa: E402

FULL = dict(
    data=DataConfig(train=3000, valid=100, id=400, comp=300, length_per_duration=6, per_family_eval=40),
    vit=ViTConfig(patch_size=16, hidden_size=64, intermediate_size=256, num_heads=4),
    encoder=TrainConfig(batch_size=64, iters=500, learning_rate=2e-3, warmup_steps=30, min_lr=2e-4, weight_decay=0.01,
                        steps_per_eval=100, val_batches=4, save_every=100),
    # sized to train in about 45 minutes on one free CPU core (docs/video.md: where that budget falls short)
    stage0=StageConfig(600, 32, 2e-3, 30), stage1=StageConfig(30, 4, 1e-3, 3), stage2=StageConfig(80, 4, 5e-4, 8),
    text_replay=0.1, aligner=AlignerConfig(), layout=LayoutConfig(),
)
FAST = dict(
    data=DataConfig(train=12, valid=3, id=6, comp=3, length_per_duration=1, durations=(8, 20), per_family_eval=2),
    vit=ViTConfig(patch_size=16, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2),
    encoder=TrainConfig(batch_size=8, iters=3, learning_rate=1e-3, steps_per_eval=3, val_batches=1, save_every=3),
    stage0=StageConfig(3, 4, 1e-3, 1), stage1=StageConfig(2, 4, 1e-3, 1), stage2=StageConfig(3, 4, 1e-3, 1),
    aligner=AlignerConfig(dim=32, heads=2, segment_layers=1, resampler_layers=1, queries=2),
    text_replay=0.0, layout=LayoutConfig(queries=2),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Run folder (data, encoder, stages, exported model).")
    ap.add_argument("--fast", action="store_true", help="Tiny settings and a tiny random decoder (for tests).")
    ap.add_argument("--install", action="store_true", help="Copy the exported model into mlx_elm/video/pretrained.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = FAST if args.fast else FULL
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    data = out / "data"
    if not (data / "meta.json").exists():
        counts = make_dataset(data, replace(s["data"], seed=args.seed), progress=not args.fast)
        print(f"data: {counts}")
    encoder = out / "encoder"
    if not (encoder / "done.json").exists():
        tc = replace(s["encoder"], seed=args.seed, resume=(encoder / "checkpoints").exists(), progress=not args.fast)
        _, res = train_frame_encoder(encoder, s["vit"], tc, examples=tc.iters * tc.batch_size, seed=args.seed,
                                     log=print if not args.fast else (lambda m: None))
        (encoder / "done.json").write_text(json.dumps({"steps": res.step, "loss": res.losses[-1]}))
    decoder = "smollm2-135m-instruct"
    if args.fast:
        from mlx_elm.train.tiny import make_tiny_openelm, train_tiny_spm

        if not (out / "decoder" / "config.json").exists():
            make_tiny_openelm(out / "decoder", train_tiny_spm(out / "spm"), max_context_length=2048)
        decoder = str(out / "decoder")
    cfg = VideoTrainConfig(data=str(data), out=str(out / "run"), encoder=str(encoder), decoder=decoder,
                           aligner=s["aligner"], layout=s["layout"], stage0=s["stage0"], stage1=s["stage1"],
                           stage2=s["stage2"], seed=args.seed, progress=not args.fast,
                           text_replay=s["text_replay"])
    model = train_video_model(cfg, log=print if not args.fast else (lambda m: None))
    exported = export_model_folder(model, out / "export")
    print(f"exported -> {exported} ({sum(p.stat().st_size for p in exported.rglob('*') if p.is_file()) / 2**20:.1f} MB)")
    if args.install:  # export_model_folder replaces the folder atomically
        print(f"installed -> {export_model_folder(model, default_model_dir())}")
    print(json.dumps({"model": str(model), "export": str(exported)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
