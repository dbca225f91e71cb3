"""Does MH-MoE beat a sparse MoE at equal FLOPs? Tiny OpenELM-MoE LMs trained from scratch.

Byte-level language models (V = 256) on an offline English corpus, the reStructuredText sources
of Debian's ``python3.11-doc`` (``apt-get install python3.11-doc``; 497 files, 11 MB), split into
train / validation by file (every 20th file is validation). Arms, all on the ``tiny`` backbone of
``mlx_elm.models.openelm_moe`` (4 blocks, d 128, MoE in blocks 2 and 4):

    dense          OpenELM with the SMoE's active FFN width (344)
    smoe           8 experts, top-1, d_ff 344
    fine-grained   16 experts, top-2, d_ff 172            (equal FLOPs and parameters)
    mhmoe-h2       h 2: 40 experts, top-2, d_ff 128        (v2 rule: equal FLOPs and parameters)
    mhmoe-h4       h 4: 168 experts, top-4, d_ff 64        (v2 rule)
    v1-h4          h 4: 8 experts, top-1, d_ff 1336        (v1 rule: equal parameters, ~4x expert FLOPs)
    *-a0           the same with the balance loss off (the activation-ratio claim; seed 0 only)

Every arm sees the same batches for a given seed (equal training tokens); runs go in the priority
order of ``study_plan`` (all arms on seed 0, then the equal-FLOPs arms, then the rest). The table (validation
perplexity per byte, mean and spread over seeds; expert activation) is written to
``OUT/results.json`` after every run, and finished runs are skipped when the command is repeated,
so an interrupted study continues where it stopped.

    python examples/mhmoe_lm.py --out runs/mhmoe              # the docs/moe.md study (hours, niced)
    python examples/mhmoe_lm.py --fast --out /tmp/mhmoe       # seconds, built-in text; what the test runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mlx_elm import platform  # noqa: E402
from mlx_elm.atomic import atomic_file  # noqa: E402
from mlx_elm.models import openelm, openelm_moe  # noqa: E402
from mlx_elm.moe.stats import model_summary, moe_layers, routing_stats, summary_table  # noqa: E402
from mlx_elm.train.data import Dataset, Example, TokenizedSplit  # noqa: E402
from mlx_elm.train.loop import TrainConfig, train  # noqa: E402
from mlx_elm.train.moe_loss import training_hooks  # noqa: E402

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
ARMS = {  # name -> (preset arm, balance-loss weight)
    "dense": ("dense", 0.01), "smoe": ("smoe", 0.01), "fine-grained": ("fine-grained", 0.01),
    "mhmoe-h2": ("mhmoe-h2", 0.01), "mhmoe-h4": ("mhmoe-h4", 0.01), "v1-h4": ("v1-h4", 0.01),
    "smoe-a0": ("smoe", 0.0), "mhmoe-h2-a0": ("mhmoe-h2", 0.0), "v1-h4-a0": ("v1-h4", 0.0),
}
MAIN_ARMS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h4", "v1-h4")
WEAK_ARMS = ("smoe-a0", "mhmoe-h2-a0", "v1-h4-a0")
FAST_TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data "
    "structures and a simple but effective approach to object-oriented programming. Python's elegant "
    "syntax and dynamic typing, together with its interpreted nature, make it an ideal language for "
    "scripting and rapid application development in many areas on most platforms. "
)


@dataclass
class StudyConfig:
    steps: int = 200
    batch_size: int = 8
    context: int = 128
    learning_rate: float = 1e-3
    warmup: int = 20
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # validation at the end only (64 batches cost about 20 training steps)
    val_batches: int = 64
    stats_batches: int = 16
    seeds: Tuple[int, ...] = (0, 1, 2)
    arms: Tuple[str, ...] = MAIN_ARMS + ("smoe-a0", "v1-h4-a0")  # v1 keeps SMoE's 8 experts: the fair pair
    weak_seeds: Tuple[int, ...] = (0,)  # the balance-loss-off arms run on these seeds only
    overrides: Dict[str, object] = field(default_factory=dict)  # ModelArgs overrides (fast mode)
    compile: bool = True

    @classmethod
    def fast(cls) -> "StudyConfig":
        return cls(steps=2, batch_size=2, context=32, warmup=1, eval_every=2, val_batches=1, stats_batches=1,
                   seeds=(0,), arms=("dense", "smoe", "mhmoe-h2", "v1-h4", "smoe-a0"),
                   overrides={"num_transformer_layers": 2}, compile=False)


# --- data ------------------------------------------------------------------------------------


def read_corpus(root: Path) -> Tuple[bytes, bytes, int, int]:
    """Train and validation bytes, split by file (every 20th file, sorted by path, is validation)."""
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt under {root}; install the corpus: sudo apt-get install python3.11-doc "
                         "(or pass --fast for the built-in text)")
    train, valid = [], []
    for i, f in enumerate(files):
        (valid if i % 20 == 10 else train).append(f.read_bytes())
    return b"\n".join(train), b"\n".join(valid), len(files) - len(valid), len(valid)


def windows(data: bytes, context: int, limit: int = 0) -> List[Example]:
    """Non-overlapping windows of ``context + 1`` bytes (inputs and shifted targets)."""
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    n = (len(arr) - 1) // context
    out = []
    for i in range(n if not limit else min(n, limit)):
        toks = arr[i * context: i * context + context + 1].tolist()
        out.append(Example(toks, [0] + [1] * context))
    return out


# --- one run ---------------------------------------------------------------------------------


def build(arm: str, overrides: dict):
    args = openelm_moe.preset(f"tiny-{ARMS[arm][0]}", **overrides)
    model_cls = openelm_moe.Model if isinstance(args, openelm_moe.ModelArgs) else openelm.Model
    if isinstance(args, openelm_moe.ModelArgs):
        args.balance_loss_weight = ARMS[arm][1]
    return model_cls, args


def run_one(arm: str, seed: int, cfg: StudyConfig, data: Dataset, out_dir: Path) -> dict:
    model_cls, args = build(arm, cfg.overrides)
    mx.random.seed(seed)
    model = model_cls(args)
    mx.eval(model.parameters())
    loss_fn, on_step = training_hooks(model)
    tcfg = TrainConfig(batch_size=cfg.batch_size, iters=cfg.steps, learning_rate=cfg.learning_rate,
                       warmup_steps=cfg.warmup, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                       grad_clip=cfg.grad_clip, max_seq_length=cfg.context, steps_per_eval=cfg.eval_every,
                       val_batches=cfg.val_batches, save_every=0, seed=seed, compile=cfg.compile,
                       progress=True)
    tic = time.perf_counter()
    result = train(model, data, tcfg, out_dir / f"{arm}-s{seed}", lambda m: None, loss_fn=loss_fn,
                   on_step=on_step, log=lambda s: None)
    seconds = time.perf_counter() - tic
    shutil.rmtree(out_dir / f"{arm}-s{seed}", ignore_errors=True)  # checkpoints of a finished run
    val = result.val_losses[-1][1]
    row = {"arm": arm, "seed": seed, "val_loss": val, "val_ppl": math.exp(val), "bits_per_byte": val / math.log(2),
           "val_curve": result.val_losses, "train_tokens": result.tokens, "seconds": seconds,
           "tokens_per_second": result.tokens_per_second, "peak_memory_gb": result.peak_memory_gb,
           "balance_loss_weight": ARMS[arm][1], **openelm_moe.describe(args)}
    if loss_fn is not None:
        batches = [np.array([e.tokens[:-1] for e in data.valid.examples[i: i + cfg.batch_size]])
                   for i in range(0, cfg.stats_batches * cfg.batch_size, cfg.batch_size)]
        batches = [b for b in batches if len(b)]
        stats = routing_stats(model, batches)
        ids = [i for i, _ in moe_layers(model)]
        row["routing"] = model_summary(stats)
        row["routing_layers"] = summary_table(stats, ids)
        row["load_share"] = [s.share.tolist() for s in stats]
        row["train_balance_loss"] = [m.get("balance_loss") for m in result.metrics[-10:]]
    return row


def study_plan(cfg: StudyConfig, fast: bool = False) -> List[Tuple[str, int]]:
    """(arm, seed) runs in priority order, so a study cut short by time still answers the main
    question: every main arm on the first seed, then the arms of the equal-FLOPs comparison (SMoE,
    fine-grained, MH-MoE) on the other seeds, then the balance-loss-off arms, then the context
    arms (dense, v1) on the other seeds."""
    key = [a for a in ("smoe", "fine-grained", "mhmoe-h2", "mhmoe-h4") if a in cfg.arms]
    context = [a for a in cfg.arms if a in MAIN_ARMS and a not in key]
    weak = [a for a in cfg.arms if a in WEAK_ARMS]
    first, rest = cfg.seeds[:1], cfg.seeds[1:]
    plan = [(a, s) for s in first for a in cfg.arms if a in MAIN_ARMS or (a == "smoe-a0" and not fast)]
    plan += [(a, s) for s in rest for a in key]
    plan += [(a, s) for a in weak for s in cfg.seeds if (s in cfg.weak_seeds or fast) and (a, s) not in plan]
    plan += [(a, s) for s in rest for a in context]
    return plan


# --- the table -------------------------------------------------------------------------------


def summarize(runs: Sequence[dict]) -> List[dict]:
    """Mean and spread over seeds per arm (spread = sample std; min/max also given)."""
    table = []
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        ppl = np.array([r["val_ppl"] for r in rows])
        entry = {"arm": arm, "seeds": len(rows), "ppl_mean": float(ppl.mean()),
                 "ppl_std": float(ppl.std(ddof=1)) if len(rows) > 1 else 0.0,
                 "ppl_min": float(ppl.min()), "ppl_max": float(ppl.max()),
                 "bpb_mean": float(np.mean([r["bits_per_byte"] for r in rows])),
                 "flops_per_token": rows[0]["flops_per_token"], "total_parameters": rows[0]["total_parameters"],
                 "seconds_mean": float(np.mean([r["seconds"] for r in rows]))}
        if "routing" in rows[0]:
            for key in rows[0]["routing"]:
                entry[key] = float(np.mean([r["routing"][key] for r in rows]))
            for rel in RELATIVE_THRESHOLDS:  # share above rel / E: comparable across expert counts
                entry[f"act_rel@{rel}"] = float(np.mean([relative_activation(r["load_share"], rel) for r in rows]))
        entry.update(paired(runs, arm, "smoe" if not arm.endswith("-a0") else "smoe-a0"))
        table.append(entry)
    return table


RELATIVE_THRESHOLDS = (0.25, 0.5)


def relative_activation(load_share: Sequence[Sequence[float]], rel: float) -> float:
    """Fraction of (layer, expert) cells whose load share exceeds ``rel`` x the even share 1 / E."""
    cells = [np.asarray(s) * len(s) > rel for s in load_share]
    return float(np.concatenate(cells).mean())


def paired(runs: Sequence[dict], arm: str, ref: str) -> dict:
    """Per-seed perplexity change of ``arm`` against ``ref`` on the same seed (same init seed and
    batches), in percent: seeds differ far more from each other than arms do, so this is the
    comparison that can resolve a few percent."""
    a = {r["seed"]: r["val_ppl"] for r in runs if r["arm"] == arm}
    b = {r["seed"]: r["val_ppl"] for r in runs if r["arm"] == ref}
    common = sorted(set(a) & set(b))
    if arm == ref or not common:
        return {}
    d = np.array([100 * (a[s] / b[s] - 1) for s in common])
    return {f"vs_{ref}_pct": float(d.mean()), f"vs_{ref}_pct_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            f"vs_{ref}_seeds": len(d), f"vs_{ref}_better": int((d < 0).sum())}


def verdicts(table: Sequence[dict]) -> Dict[str, str]:
    """The paper's claims, checked against this table (words, not colours)."""
    by = {t["arm"]: t for t in table}
    out = {}
    if "smoe" in by:
        for arm in ("fine-grained", "mhmoe-h2", "mhmoe-h4", "v1-h4"):
            if arm in by and "vs_smoe_pct" in by[arm]:
                a = by[arm]
                n, better = a["vs_smoe_seeds"], a["vs_smoe_better"]
                verdict = ("one seed only" if n < 2 else "holds on every seed" if better == n else
                           "fails on every seed" if better == 0 else "mixed")
                flops = "at ~2x FLOPs" if arm == "v1-h4" else "at equal FLOPs"
                out[f"{arm} ppl <= smoe {flops}"] = (
                    f"{verdict}: paired change {a['vs_smoe_pct']:+.2f}% (std {a['vs_smoe_pct_std']:.2f} over {n} "
                    f"seeds), lower on {better} of {n} seeds")
    for weak, ref in (("mhmoe-h2-a0", "smoe-a0"), ("v1-h4-a0", "smoe-a0")):
        if weak in by and ref in by:
            w, r = by[weak], by[ref]
            out[f"{weak} activation > {ref}"] = (
                f"per-token basis (paper, tau 0.05) {w['act_token@0.05']:.3f} vs {r['act_token@0.05']:.3f}; per "
                f"sub-token {w['act_subtoken@0.05']:.3f} vs {r['act_subtoken@0.05']:.3f}; share > 1/(4E) "
                f"{w['act_rel@0.25']:.3f} vs {r['act_rel@0.25']:.3f}; load entropy {w['entropy']:.3f} vs {r['entropy']:.3f}")
    return out


def write_results(path: Path, cfg: StudyConfig, runs: List[dict], extra: dict) -> None:
    table = summarize(runs)
    doc = {"settings": {k: v for k, v in asdict(cfg).items()}, **extra, "table": table,
           "verdicts": verdicts(table), "runs": runs}
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")


def print_runs(runs: Sequence[dict]) -> None:
    """One markdown row per finished run: bits/byte, the paired change against SMoE on the same seed,
    expert activation (paper's per-token basis and per sub-token at tau 0.05, share > 1/(4E)), speed."""
    ppl = {(r["arm"], r["seed"]): r for r in runs}
    print("| arm | seed | bits/byte | vs SMoE same seed | act tok@.05 | act sub@.05 | act >1/(4E) | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        for r in sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]):
            ref = ppl.get(("smoe-a0" if arm.endswith("-a0") else "smoe", r["seed"]))
            vs = (f"{r['bits_per_byte'] - ref['bits_per_byte']:+.4f} b/B ({100 * (r['val_ppl'] / ref['val_ppl'] - 1):+.2f}% ppl)"
                  if ref is not None and ref is not r else "-")
            rt = r.get("routing")
            act = (f"| {rt['act_token@0.05']:.3f} | {rt['act_subtoken@0.05']:.3f} | "
                   f"{relative_activation(r['load_share'], 0.25):.3f} |") if rt else "| - | - | - |"
            print(f"| {arm} | {r['seed']} | {r['bits_per_byte']:.4f} | {vs} {act} {r['tokens_per_second']:.0f} |")


def print_table(table: Sequence[dict]) -> None:
    print(f"{'arm':<14}{'seeds':>6}{'ppl/byte':>16}{'bits/byte':>11}{'MFLOP/tok':>11}{'params':>9}"
          f"{'act(tok,.05)':>14}{'act(sub,.05)':>14}{'act(>1/4E)':>12}{'entropy':>9}{'vs smoe':>16}")
    for t in table:
        act = f"{t['act_token@0.05']:.3f}" if "act_token@0.05" in t else "-"
        sub = f"{t['act_subtoken@0.05']:.3f}" if "act_subtoken@0.05" in t else "-"
        ent = f"{t['entropy']:.3f}" if "entropy" in t else "-"
        rel = f"{t['act_rel@0.25']:.3f}" if "act_rel@0.25" in t else "-"
        ref = "smoe-a0" if t["arm"].endswith("-a0") else "smoe"
        vs = (f"{t[f'vs_{ref}_pct']:+.2f}% ({t[f'vs_{ref}_better']}/{t[f'vs_{ref}_seeds']})"
              if f"vs_{ref}_pct" in t else "-")
        print(f"{t['arm']:<14}{t['seeds']:>6}{t['ppl_mean']:>9.4f} ± {t['ppl_std']:.4f}{t['bpb_mean']:>11.4f}"
              f"{t['flops_per_token'] / 1e6:>11.3f}{t['total_parameters'] / 1e6:>8.2f}M{act:>14}{sub:>14}{rel:>12}"
              f"{ent:>9}{vs:>16}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/mhmoe"), help="folder for results.json (default runs/mhmoe)")
    p.add_argument("--fast", action="store_true", help="seconds: built-in text, 2 blocks, 3 steps, one seed")
    p.add_argument("--corpus", type=Path, default=CORPUS, help=f"folder of *.rst.txt files (default {CORPUS})")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 200)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    p.add_argument("--context", type=int, help="bytes per sequence (default 128)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--arms", help=f"comma-separated arms among {', '.join(ARMS)}")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="results.json files of other runs of the same settings (e.g. seeds run elsewhere) to add")
    p.add_argument("--report-only", action="store_true", help="rewrite and print the table; train nothing")
    a = p.parse_args(argv)
    cfg = StudyConfig.fast() if a.fast else StudyConfig()
    for name in ("steps", "batch_size", "context"):
        if getattr(a, name) is not None:
            if getattr(a, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
            setattr(cfg, name, getattr(a, name))
    if a.seeds:
        cfg.seeds = tuple(int(s) for s in a.seeds.split(","))
    if a.arms:
        cfg.arms = tuple(s.strip() for s in a.arms.split(","))
        bad = [x for x in cfg.arms if x not in ARMS]
        if bad:
            p.error(f"unknown arm(s) {', '.join(bad)}; choose among {', '.join(ARMS)}")
    cfg.eval_every = min(cfg.eval_every, cfg.steps)

    if a.fast:
        text = (FAST_TEXT * 40).encode()
        cut = int(len(text) * 0.9)
        train_bytes, valid_bytes, n_train, n_valid = text[:cut], text[cut:], 1, 1
    else:
        train_bytes, valid_bytes, n_train, n_valid = read_corpus(a.corpus)
    data = Dataset(TokenizedSplit(windows(train_bytes, cfg.context)),
                   TokenizedSplit(windows(valid_bytes, cfg.context, cfg.val_batches * cfg.batch_size)))
    extra = {"corpus": "built-in text" if a.fast else str(a.corpus), "train_files": n_train, "valid_files": n_valid,
             "train_bytes": len(train_bytes), "valid_bytes": len(valid_bytes),
             "valid_windows": len(data.valid.examples), "blas": platform.loaded_blas()}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    runs: List[dict] = []
    if path.exists() and not a.fast:
        try:
            old = json.loads(path.read_text())
            if old.get("settings", {}).get("steps") == cfg.steps and old["settings"].get("context") == cfg.context:
                runs = old.get("runs", [])
        except (OSError, ValueError):
            runs = []
    for other in a.merge:
        try:
            doc = json.loads(other.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--merge {other}: {e}")
        if doc.get("settings", {}).get("steps") != cfg.steps or doc["settings"].get("context") != cfg.context:
            p.error(f"--merge {other}: its runs used other steps/context than {cfg.steps} x {cfg.context}")
        runs += [r for r in doc.get("runs", []) if not any(r["arm"] == o["arm"] and r["seed"] == o["seed"] for o in runs)]
    print(f"corpus: {extra['corpus']}: {n_train} train / {n_valid} validation files, {len(train_bytes):,} / "
          f"{len(valid_bytes):,} bytes; {cfg.steps} steps x {cfg.batch_size} x {cfg.context} bytes per run", flush=True)
    for arm, seed in study_plan(cfg, a.fast):
        if a.report_only:
            break
        if any(r["arm"] == arm and r["seed"] == seed for r in runs):
            continue
        row = run_one(arm, seed, cfg, data, a.out / "scratch")
        runs.append(row)
        write_results(path, cfg, runs, extra)
        print(f"{arm} seed {seed}: val ppl/byte {row['val_ppl']:.4f} ({row['bits_per_byte']:.4f} bits/byte), "
              f"{row['seconds']:.0f}s, {row['tokens_per_second']:.0f} tok/s, peak {row['peak_memory_gb']:.2f} GB",
              flush=True)
    missing = [f"{arm} s{seed}" for arm, seed in study_plan(cfg, a.fast)
               if not any(r["arm"] == arm and r["seed"] == seed for r in runs)]
    write_results(path, cfg, runs, {**extra, "not_run": missing})
    if missing:
        print(f"not run ({len(missing)} of the plan): {', '.join(missing)}")
    table = summarize(runs)
    print_runs(runs)
    print_table(table)
    for claim, verdict in verdicts(table).items():
        print(f"{claim}: {verdict}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    platform.maybe_reexec_with_fast_blas()
    sys.exit(main())
