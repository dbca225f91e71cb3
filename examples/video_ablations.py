"""Ablations of the video model at a small, equal training budget, scored on the same questions.

    python examples/video_ablations.py --run runs --out runs/ablations        # after video_pegasus_pattern.py
    python examples/video_ablations.py --run /tmp/v --out /tmp/v/abl --fast   # tiny settings (seconds)

Every variant starts from the main run's stage 0 (the pretrained segment encoder and resampler)
except the M variants, which pretrain their own at a reduced stage-0 budget, then trains stage 1
and stage 2 at the small budget below. ``baseline`` is the main recipe at that budget, so each
row differs from it in one thing:

- ``no_time_tags``: segments are not opened by a ``[12s]`` text tag (training and test);
- ``no_transcript``: the baseline evaluated without the narration (the transcript ablation at test time);
- ``no_stage1``: no alignment stage; stage 2 trains the projector together with LoRA;
- ``no_replay``: stage 2 without stage-1 caption replay and without text-only instructions
  (forgetting is measured for it and for the baseline);
- ``M1`` / ``M4`` / ``M16``: queries per segment (``M8`` is the baseline).

Results (accuracy per family on the ``id`` split, mean, forgetting) go to ``OUT/ablations.json``
and ``OUT/ablations.md``. Variants already evaluated are skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from mlx_elm import platform

platform.maybe_reexec_with_fast_blas()

from mlx_elm.atomic import atomic_file  # noqa: E402
from mlx_elm.video import evaluate as E  # noqa: E402
from mlx_elm.video import questions as Q  # noqa: E402
from mlx_elm.video.aligner import AlignerConfig  # noqa: E402
from mlx_elm.video.assistant import VideoAssistant  # noqa: E402
from mlx_elm.video.forgetting import measure_forgetting  # noqa: E402
from mlx_elm.video.layout import LayoutConfig  # noqa: E402
from mlx_elm.video.training import StageConfig, VideoTrainConfig, train_video_model  # noqa: E402

SMALL = dict(stage0=StageConfig(150, 32, 1e-3, 15), stage1=StageConfig(15, 8, 1e-3, 3), stage2=StageConfig(30, 8, 2e-4, 5),
             limit=20)
FAST = dict(stage0=StageConfig(2, 4, 1e-3, 1), stage1=StageConfig(2, 4, 1e-3, 1), stage2=StageConfig(2, 4, 1e-3, 1),
            limit=1)
VARIANTS = ("baseline", "no_transcript", "no_time_tags", "no_stage1", "no_replay", "M1", "M4", "M16")


def variant_config(name: str, main: VideoTrainConfig, out: Path, budget: dict) -> VideoTrainConfig:
    cfg = replace(main, out=str(out / name), stage0=budget["stage0"], stage1=budget["stage1"], stage2=budget["stage2"],
                  progress=False)
    if name == "no_time_tags":
        cfg = replace(cfg, layout=replace(cfg.layout, time_tags=False))
    elif name == "no_stage1":
        cfg = replace(cfg, stages=("stage0", "stage2"), stage2_train=("projector",))
    elif name == "no_replay":
        cfg = replace(cfg, replay=0.0, text_replay=0.0)
    elif name.startswith("M"):
        m = int(name[1:])
        cfg = replace(cfg, aligner=replace(cfg.aligner, queries=m), layout=replace(cfg.layout, queries=m))
    return cfg


def _share(src: Path, dst: Path) -> None:
    """Reuse a finished stage folder (its done.json makes the run skip that stage)."""
    if (src / "done.json").exists() and not (dst / "done.json").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="The main run folder of video_pegasus_pattern.py.")
    ap.add_argument("--out", type=Path, required=True, help="Folder for the variants and the results.")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--fast", action="store_true", help="Tiny budgets (for tests).")
    args = ap.parse_args(argv)
    budget = FAST if args.fast else SMALL
    main_cfg_d = json.loads((args.run / "run" / "train_config.json").read_text())
    main_cfg = VideoTrainConfig(**{k: v for k, v in main_cfg_d.items() if k in ("data", "out", "encoder", "decoder", "fps",
                                                                               "lora_rank", "lora_layers", "replay",
                                                                               "text_replay", "turns", "seed")})
    main_cfg = replace(main_cfg, aligner=AlignerConfig.from_dict(main_cfg_d["aligner"]),
                       layout=LayoutConfig.from_dict(main_cfg_d["layout"]), stages=tuple(main_cfg_d["stages"]))
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "ablations.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name in results:
            continue
        train_name = "baseline" if name == "no_transcript" else name
        cfg = variant_config(train_name, main_cfg, args.out, budget)
        folder = Path(cfg.out)
        if not name.startswith("M"):
            _share(args.run / "run" / "stage0", folder / "stage0")
        if name == "no_replay":
            _share(args.out / "baseline" / "stage1", folder / "stage1")
        model = folder / "model"
        if not (folder / "stage2" / "done.json").exists() or not (model / "video_config.json").exists():
            model = train_video_model(cfg, log=lambda m: None)
        assistant = VideoAssistant(model)
        ecfg = E.EvalConfig(splits=("id",), controls=("full",), limit=budget["limit"], transcript=name != "no_transcript")
        report = E.evaluate(assistant, Path(cfg.data), ecfg, log=lambda m: None)
        row = {"families": {f: c["accuracy"] for f, c in report["table"]["id"]["full"].items()},
               "mean": report["overall"]["id"]["full"], "chance": report["chance_overall"]["id"],
               "n": sum(c["n"] for c in report["table"]["id"]["full"].values())}
        if name in ("baseline", "no_replay"):
            row["forgetting"] = measure_forgetting(assistant, log=lambda m: None)
        results[name] = row
        with atomic_file(results_file) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
        print(f"{name}: mean {100 * row['mean']:.1f}% over {row['n']} questions", flush=True)
    with atomic_file(args.out / "ablations.md") as tmp:
        tmp.write_text(markdown(results, budget))
    print(markdown(results, budget))
    return 0


def markdown(results: dict, budget: dict) -> str:
    fams = [f for f in Q.FAMILIES if any(f in r["families"] for r in results.values())]
    lines = [f"stage 0 / 1 / 2 steps: {budget['stage0'].iters} (M variants only) / {budget['stage1'].iters} / "
             f"{budget['stage2'].iters}, batch {budget['stage2'].batch_size}; id split, {budget['limit']} questions per family\n",
             "| variant | " + " | ".join(fams) + " | mean | text ppl change |", "|---|" + "---|" * (len(fams) + 2)]
    for name, r in results.items():
        f = r.get("forgetting")
        ppl = f"{f['prose_ppl_change_pct']:+.1f}%" if f else "–"
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['families'].get(x, float('nan')):.0f}" for x in fams)
                     + f" | **{100 * r['mean']:.1f}** | {ppl} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
