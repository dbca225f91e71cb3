"""Atomic files and resumable checkpoints.

A checkpoint is a folder ``checkpoints/step_0000100`` holding the trainable weights, the optimizer
state (both safetensors) and ``state.json`` (step, data position, seed, tokens seen). It is written
to a temporary folder and renamed into place, so a crash or Ctrl-C never leaves a half-written one;
resuming picks the newest complete folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_elm.atomic import atomic_file, atomic_folder, sweep_stale
from mlx_elm.errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def atomic_write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))


def atomic_save_safetensors(path: Path, arrays: Dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    with atomic_file(path) as tmp:  # keeps the .safetensors suffix, so mx appends none
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {"format": "mlx"})


@dataclass
class TrainState:
    """Everything besides arrays that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next global batch
    index: int = 0
    micro_step: int = 0  # batches consumed (drives the per-batch dropout seed)
    seed: int = 0
    tokens: int = 0  # training target tokens seen (all processes)
    fingerprint: dict = field(default_factory=dict)  # settings that must not change on resume


def save_checkpoint(root: Path, state: TrainState, weights: Dict[str, mx.array], optimizer, keep: int = 2) -> Path:
    """Write ``root/checkpoints/step_N`` atomically, then drop all but the newest ``keep``."""
    ckdir = Path(root) / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    sweep_stale(ckdir)  # debris of a run killed while it wrote some other step
    final = ckdir / f"step_{state.step:07d}"
    with atomic_folder(final) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        opt = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt, metadata={"format": "mlx"})
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


_STEP_DIR = re.compile(r"^step_(\d{1,12})$")


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoint folders (``step_N`` with a state file), oldest first; anything else in
    the folder (a user's ``step_abc``, a writer's temporary folder) is ignored."""
    ckdir = Path(root) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _read_state(path: Path) -> TrainState:
    raw = json.loads((path / STATE_FILE).read_text())
    if not isinstance(raw, dict):
        raise ValueError("state.json is not an object")
    fields = {f.name: f.type for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in raw.items() if k in fields})
    for name in ("step", "epoch", "index", "micro_step", "seed", "tokens"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"state.json field {name!r} is {value!r}, not a count")
    if not isinstance(state.fingerprint, dict):
        raise ValueError("state.json field 'fingerprint' is not an object")
    return state


def load_checkpoint(path: Path):
    """``(state, weights, optimizer_state_tree)`` of a checkpoint folder, or a one-line error."""
    path = Path(path)
    try:
        state = _read_state(path)
        weights = mx.load(str(path / WEIGHTS_FILE))
        opt = mx.load(str(path / OPTIMIZER_FILE))
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # RuntimeError: mx.load on a torn file
        detail = " ".join(str(e).split())[:120]
        raise TrainingError(f"checkpoint {path} is damaged ({type(e).__name__}: {detail}); delete it to resume "
                            "from an older one") from e
    return state, weights, tree_unflatten(list(opt.items()))


def load_latest_good(root: Path, log=print):
    """The newest checkpoint that loads; a damaged newer one is skipped with one line saying so.
    Returns ``(path, (state, weights, optimizer_tree))`` or raises when none is usable."""
    found = list_checkpoints(root)
    if not found:
        raise TrainingError(f"--resume: no checkpoint under {Path(root) / CHECKPOINT_DIR}; run without --resume")
    last_error = None
    for path in reversed(found):
        try:
            loaded = load_checkpoint(path)
        except TrainingError as e:
            last_error = e
            log(f"note: {e}; trying the previous checkpoint")
            continue
        return path, loaded
    raise TrainingError(f"--resume: every checkpoint under {Path(root) / CHECKPOINT_DIR} is damaged "
                        f"(newest: {last_error}); delete them or run without --resume")
