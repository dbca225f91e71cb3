"""Hugging Face OpenELM sources: a Hub repo id or a local folder with config.json and weights.

HF repos (``apple/OpenELM-*``) keep ``transformer.``-prefixed names, a 32000-row vocabulary and
fp32 weights, as safetensors or ``pytorch_model.bin`` (possibly sharded with an index). ``.bin``
files go through the safe unpickler, never ``torch.load``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from convert import schema
from convert.corenet import split_lora, unwrap
from convert.safe_pickle import load_checkpoint
from convert.safetensors_reader import read_safetensors
from convert.source import Source
from convert.tensors import LazyTensor
from convert.untrusted import plain, quote
from mlx_elm import hub
from mlx_elm.errors import ConversionError
from mlx_elm.models.openelm import ModelArgs

def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """Fetch config and weights of a Hub repo (safetensors preferred) into the HF cache."""
    path = hub.download(repo_id, ["*.json", "*.safetensors", "*.md"], revision, ConversionError, "the checkpoint")
    if not list(path.glob("*.safetensors")):
        path = hub.download(repo_id, ["*.json", "*.bin", "*.md"], revision, ConversionError, "the checkpoint")
    return path


def config_args(config: Any, where: str, max_layers: Optional[int] = None) -> ModelArgs:
    """ModelArgs from an HF OpenELM config.json (unknown keys ignored).

    ``max_layers`` (the number of tensors) bounds the layer count before any per-layer list is
    built: a config claiming 10**9 layers would otherwise take minutes and gigabytes to refuse.
    """
    if not isinstance(config, dict) or config.get("model_type") != "openelm":
        found = config.get("model_type") if isinstance(config, dict) else config
        raise ConversionError(f"{where}: config.json has model_type {quote(found)}, not 'openelm'; "
                              "only OpenELM checkpoints can be converted.")
    layers = config.get("num_transformer_layers", 1)
    if type(layers) is not int or layers < 1 or (max_layers is not None and layers > max_layers):
        raise ConversionError(f"{where}: config.json gives num_transformer_layers {quote(layers)}, which the weights "
                              f"({max_layers} tensors) cannot hold; fix config.json.")
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in config.items() if k in names})
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ConversionError(f"{where}: config.json is inconsistent ({quote(str(e), 120)}).") from e


def weight_files(folder: Path) -> List[Path]:
    """The weight files of a folder: via an index if present, else safetensors, else .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
                files = sorted(set(weight_map.values()))
                if not all(isinstance(f, str) for f in files):
                    raise TypeError("a shard name is not a string")
            except (ValueError, RecursionError, OSError, AttributeError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid weight index ({type(e).__name__}).") from e
            outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
            if outside:
                raise ConversionError(f"{folder.name}: {index_name} names shard {plain(outside[0])}, which is not a "
                                      "file of the folder; the index is corrupt or crafted.")
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise ConversionError(f"{folder.name}: shard {plain(missing[0])} named in {index_name} is missing; "
                                      "download the complete repo.")
            return [folder / f for f in files]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if bins:
        return bins
    raise ConversionError(f"{folder} has no *.safetensors or pytorch_model*.bin weights.")


def read_weights(files: List[Path], check_crc: bool = True) -> Dict[str, LazyTensor]:
    tensors: Dict[str, LazyTensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = read_safetensors(f)
        else:
            part, _ = unwrap(load_checkpoint(f, check_crc=check_crc), f)
        dup = set(part) & set(tensors)
        if dup:
            raise ConversionError(f"tensor {plain(sorted(dup)[0])} appears in more than one weight file.")
        tensors.update(part)
    return tensors


def read(folder: Path, location: str, preset: Optional[str] = None, check_crc: bool = True) -> Source:
    """A local HF OpenELM folder as a Source, validated against its config.json."""
    cfg_path = folder / "config.json"
    files = weight_files(folder)
    tensors = {k: v for k, v in read_weights(files, check_crc).items() if not schema.is_ignorable(k)}
    base, lora = split_lora(tensors)
    kind = "Hugging Face " + ("safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin")
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except (ValueError, RecursionError, OSError) as e:
            raise ConversionError(f"{cfg_path} is not valid JSON ({type(e).__name__}).") from e
        args, geometry = config_args(config, location, max_layers=len(base)), "config.json"
        if preset:
            args, geometry = schema.infer_args({k: v.shape for k, v in base.items()}, args.vocab_size, preset)
    else:
        args, geometry = schema.infer_args({k: v.shape for k, v in base.items()}, None, preset)
    return Source(base, args, kind, location, geometry=geometry, lora=lora)
