"""Compare ``mlx-elm lora`` with mlx-lm's ``mlx_lm.lora`` on the same model, data and settings.

Both run as fresh subprocesses (same compile/warm-up treatment), alternating, and report target
tokens per second over all steps (first step included) and peak memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

from mlx_elm.errors import MlxElmError
from mlx_elm.loading import load_model, resolve_model_path
from mlx_elm.model_folder import write_model_folder, write_random_model
from mlx_elm.train.tiny import train_tiny_spm, write_text_data

BENCH_MODELS = ("smollm2", "openelm-270m")


@dataclass
class BenchRun:
    tool: str
    tokens_per_second: float
    peak_memory_gb: float
    seconds: float


def make_bench_model(kind: str, out_dir: Path) -> Path:
    """``openelm-270m``: the 270M geometry with random float32 weights and a tiny tokenizer;
    ``smollm2``: the embedded SmolLM2-135M-Instruct as dense float32 (a fair CPU comparison)."""
    if kind not in BENCH_MODELS:
        raise MlxElmError(f"unknown --model {kind!r} for bench lora; choose {' or '.join(BENCH_MODELS)}")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    if kind == "openelm-270m":
        spm = train_tiny_spm(out_dir.parent / f"{out_dir.name}-spm")
        return write_random_model("OpenELM-270M", "float32", out_dir, seed=0, tokenizer=str(spm))
    src = resolve_model_path(None)
    model, config, _ = load_model(src, "float32")
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return write_model_folder(out_dir, model, config, tokenizer_from=src)


def _run(cmd: List[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tool = "mlx-elm lora" if "mlx_elm.cli.main" in cmd else "mlx_lm.lora"
        last = next((line.strip() for line in reversed((proc.stderr or proc.stdout).splitlines()) if line.strip()), "")
        raise MlxElmError(f"bench lora: {tool} exited with {proc.returncode}: {last[:300]!r}; "
                          "rerun that command by hand to see its full output")
    return proc.stdout + proc.stderr


def run_ours(model: Path, data: Path, iters: int, batch_size: int, rank: int, max_seq: int, work: Path) -> BenchRun:
    out = _run([sys.executable, "-m", "mlx_elm.cli.main", "lora", "--model", str(model), "--data", str(data),
                "--adapter-path", str(work / "ours"), "--iters", str(iters), "--batch-size", str(batch_size),
                "--rank", str(rank), "--alpha", str(2 * rank), "--dropout", "0", "--targets", "all-linear",
                "--max-seq-length", str(max_seq), "--steps-per-eval", "0", "--save-every", "0",
                "--learning-rate", "1e-4"])
    m = re.search(r"tokens in ([\d.]+)s \((\d+) tok/s\), peak memory ([\d.]+) GB", out)
    return BenchRun("mlx-elm lora", float(m.group(2)), float(m.group(3)), float(m.group(1)))


_MLX_LM_DRIVER = """
import json, sys, types
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback
reports = []
class CB(TrainingCallback):
    def on_train_loss_report(self, info):
        reports.append(info)
args = vars(lora.build_parser().parse_args(sys.argv[1:]))
for k, v in lora.CONFIG_DEFAULTS.items():
    if args.get(k) is None:
        args[k] = v
args["lora_parameters"] = {"rank": int(args.pop("_rank", 8)), "scale": 2.0, "dropout": 0.0}
lora.get_reporting_callbacks = lambda *a, **k: CB()  # run() drops its training_callback argument
lora.run(types.SimpleNamespace(**args))
print("MLX_LM_REPORT " + json.dumps(reports[-1]))
"""


def run_mlx_lm(model: Path, data: Path, iters: int, batch_size: int, rank: int, max_seq: int, work: Path) -> BenchRun:
    """mlx-lm's own LoRA trainer (``mlx_lm.lora.run``) with a callback that records its report."""
    driver = _MLX_LM_DRIVER.replace('int(args.pop("_rank", 8))', str(rank))
    out = _run([sys.executable, "-c", driver, "--model", str(model), "--train", "--data", str(data),
                "--adapter-path", str(work / "theirs"), "--iters", str(iters),
                "--batch-size", str(batch_size), "--num-layers", "-1", "--max-seq-length", str(max_seq),
                "--steps-per-report", str(iters), "--steps-per-eval", str(10 * iters), "--val-batches", "1",
                "--learning-rate", "1e-4", "--save-every", str(10 * iters)])
    line = [l for l in out.splitlines() if l.startswith("MLX_LM_REPORT ")][-1]
    rep = json.loads(line.split(" ", 1)[1])
    tps = rep["tokens_per_second"]
    return BenchRun("mlx_lm.lora", tps, rep["peak_memory"], rep["trained_tokens"] / max(tps, 1e-9))


def compare(kind: str, work: Path, iters: int = 5, batch_size: int = 2, rank: int = 8, max_seq: int = 64,
            repeats: int = 1) -> dict:
    """Alternate the two tools ``repeats`` times; returns the runs and the throughput ratio."""
    work = Path(work)
    model = make_bench_model(kind, work / kind)
    # mlx-lm batches the validation split too, so both splits hold at least one batch
    data = write_text_data(work / f"data-{batch_size}", n_train=max(32, batch_size), n_valid=max(4, batch_size), words=40)
    runs = []
    for _ in range(repeats):
        runs.append(run_ours(model, data, iters, batch_size, rank, max_seq, work))
        runs.append(run_mlx_lm(model, data, iters, batch_size, rank, max_seq, work))
    ours = [r.tokens_per_second for r in runs if r.tool == "mlx-elm lora"]
    theirs = [r.tokens_per_second for r in runs if r.tool == "mlx_lm.lora"]
    return {"model": kind, "runs": [asdict(r) for r in runs],
            "ratio_tokens_per_second": (sum(ours) / len(ours)) / (sum(theirs) / len(theirs))}
