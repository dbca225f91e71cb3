"""Model-folder output of a conversion: sharded safetensors, an index, a model card.

The folder is built inside ``mlx_elm.atomic.atomic_folder``, so OUT_DIR either does not exist or
is complete. Shards are flushed as they fill so peak memory stays near one shard.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from mlx_elm.errors import ConversionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '64KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConversionError(f"cannot parse size {text!r}; use e.g. 2GB, 500MB or a number of bytes.")
    return int(float(m[1]) * 1024 ** ("KMGT".find(m[2].upper()) + 1)) if m[2] else int(float(m[1]))


class ShardWriter:
    """Collects arrays and writes ``model-XXXXX.safetensors`` shards of at most ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: List[Dict[str, int]] = []  # per shard: name -> nbytes
        self.total_bytes = 0

    def add(self, name: str, arr: mx.array) -> None:
        if self.pending and self.pending_bytes + arr.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = arr
        self.pending_bytes += arr.nbytes
        self.total_bytes += arr.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        mx.eval(list(self.pending.values()))
        path = self.folder / f"_shard-{len(self.shards):05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.shards.append({k: v.nbytes for k, v in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_parameters: int) -> List[str]:
        """Name the shards the way mlx-lm does; write an index when there is more than one."""
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (shard, name) in enumerate(zip(self.shards, names)):
            os.replace(self.folder / f"_shard-{i:05d}.safetensors", self.folder / name)
            weight_map.update({k: name for k in shard})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def model_card(source: str, kind: str, geometry: str, options: Dict[str, object], notes: List[str],
               parameters: int, command: Optional[str]) -> str:
    """A short README.md stating where the weights came from and how they were converted."""
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, openelm, mlx-elm]",
        "---",
        "",
        "# OpenELM for MLX",
        "",
        f"Converted by `mlx-elm convert` from **{source}** ({kind}).",
        "",
        f"- Geometry: {geometry}; {parameters:,} parameters",
    ]
    lines += [f"- {k}: `{v}`" for k, v in options.items()]
    lines += [f"- Note: {n}" for n in notes]
    if command:
        lines += ["", "Command:", "", "```", command, "```"]
    lines += ["", "Loads with `mlx_elm.load(path)` and `mlx_lm.load(path)`.", ""]
    return "\n".join(lines)
