"""Atomic files and resumable checkpoints.

A checkpoint is a folder ``checkpoints/step_0000100`` holding the trainable weights, the optimizer
state (both safetensors) and ``state.json`` (step, data position, seed, tokens seen). It is written
to a temporary folder and renamed into place, so a crash or Ctrl-C never leaves a half-written one;
resuming picks the newest complete folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_elm.atomic import atomic_file, atomic_folder
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
    final = ckdir / f"step_{state.step:07d}"
    with atomic_folder(final) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        opt = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt, metadata={"format": "mlx"})
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> List[Path]:
    ckdir = Path(root) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.glob("step_*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path):
    """``(state, weights, optimizer_state_tree)`` of a checkpoint folder."""
    path = Path(path)
    try:
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        weights = mx.load(str(path / WEIGHTS_FILE))
        opt = mx.load(str(path / OPTIMIZER_FILE))
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to resume from an older one") from None
    return state, weights, tree_unflatten(list(opt.items()))
