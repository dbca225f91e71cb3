"""Hugging Face OpenELM sources: a Hub repo id or a local folder with config.json and weights.

HF repos (``apple/OpenELM-*``) keep ``transformer.``-prefixed names, a 32000-row vocabulary and
fp32 weights, as safetensors or ``pytorch_model.bin`` (possibly sharded with an index). ``.bin``
files go through the safe unpickler, never ``torch.load``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional

from convert import schema
from convert.corenet import split_lora, unwrap
from convert.safe_pickle import load_checkpoint
from convert.safetensors_reader import read_safetensors
from convert.source import Source
from convert.tensors import LazyTensor
from mlx_elm import hub
from mlx_elm.errors import ConversionError
from mlx_elm.models.openelm import ModelArgs

def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """Fetch config and weights of a Hub repo (safetensors preferred) into the HF cache."""
    path = hub.download(repo_id, ["*.json", "*.safetensors", "*.md"], revision, ConversionError, "the checkpoint")
    if not list(path.glob("*.safetensors")):
        path = hub.download(repo_id, ["*.json", "*.bin", "*.md"], revision, ConversionError, "the checkpoint")
    return path


def config_args(config: dict, where: str) -> ModelArgs:
    """ModelArgs from an HF OpenELM config.json (unknown keys ignored)."""
    if config.get("model_type") != "openelm":
        raise ConversionError(f"{where}: config.json has model_type {config.get('model_type')!r}, not 'openelm'; "
                              "only OpenELM checkpoints can be converted.")
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in config.items() if k in names})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: config.json is inconsistent ({e}).") from None


def weight_files(folder: Path) -> List[Path]:
    """The weight files of a folder: via an index if present, else safetensors, else .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                raise ConversionError(f"{index} is not a valid weight index.") from None
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise ConversionError(f"{folder.name}: shard {missing[0]} named in {index_name} is missing; "
                                      "download the complete repo.")
            return [folder / f for f in files]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if bins:
        return bins
    raise ConversionError(f"{folder} has no *.safetensors or pytorch_model*.bin weights.")


def read_weights(files: List[Path]) -> Dict[str, LazyTensor]:
    tensors: Dict[str, LazyTensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = read_safetensors(f)
        else:
            part, _ = unwrap(load_checkpoint(f), f)
        dup = set(part) & set(tensors)
        if dup:
            raise ConversionError(f"tensor {sorted(dup)[0]} appears in more than one weight file.")
        tensors.update(part)
    return tensors


def read(folder: Path, location: str, preset: Optional[str] = None) -> Source:
    """A local HF OpenELM folder as a Source, validated against its config.json."""
    cfg_path = folder / "config.json"
    files = weight_files(folder)
    tensors = {k: v for k, v in read_weights(files).items() if not schema.is_ignorable(k)}
    base, lora = split_lora(tensors)
    kind = "Hugging Face " + ("safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin")
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError:
            raise ConversionError(f"{cfg_path} is not valid JSON.") from None
        args, geometry = config_args(config, location), "config.json"
        if preset:
            args, geometry = schema.infer_args({k: v.shape for k, v in base.items()}, args.vocab_size, preset)
    else:
        args, geometry = schema.infer_args({k: v.shape for k, v in base.items()}, None, preset)
    return Source(base, args, kind, location, geometry=geometry, lora=lora)
