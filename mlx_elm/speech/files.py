"""Speech model folders (``config.json`` + ``model.safetensors``) and the shipped defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config

from mlx_elm.atomic import atomic_folder
from mlx_elm.errors import ModelLoadError, SpeechError
from mlx_elm.model_folder import CONFIG_FILE, read_config
from mlx_elm.speech.judges import JudgeArgs, PhoneRecognizer, SpeakerEncoder
from mlx_elm.speech.model import Model, ModelArgs

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "flashspeech-mini"
DEFAULT_RECOGNIZER = ASSETS / "phone-recognizer"
DEFAULT_SPEAKER = ASSETS / "speaker-encoder"


def save(out: str | Path, model: nn.Module, config: dict, dtype=mx.float32) -> Path:
    """Write ``config.json`` + ``model.safetensors`` as one atomic folder; float16 halves a shipped file."""
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    out = Path(out)
    with atomic_folder(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_config(dict(config), tmp / CONFIG_FILE)
    return out


def load(path: str | Path, build: Callable[[dict], nn.Module], kind: str) -> nn.Module:
    """Build ``build(config)`` and load the folder's weights (as float32) into it, strictly."""
    path = Path(path)
    if not path.is_dir():
        raise SpeechError(f"{kind} folder {path} does not exist; train one with `mlx-elm speech train` "
                          "or omit the option to use the shipped model")
    try:
        config = read_config(path)
    except ModelLoadError as e:
        raise SpeechError(str(e)) from e
    model = build(config)
    weights_file = path / "model.safetensors"
    if not weights_file.exists():
        raise SpeechError(f"{path} has no model.safetensors; re-export the {kind}")
    weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in mx.load(str(weights_file)).items()}
    expected = set(k for k, _ in tree_flatten(model.parameters()))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise SpeechError(f"{path} does not match a {kind} (missing {missing}, unexpected {extra}); "
                          "re-export it with this version of mlx-elm")
    model.load_weights(list(weights.items()))
    model.eval()
    mx.eval(model.parameters())
    return model


def build_tts(config: dict) -> nn.Module:
    return Model(ModelArgs.from_dict(config))


def build_judge(config: dict) -> nn.Module:
    a = JudgeArgs.from_dict(config)
    return PhoneRecognizer(a) if a.kind == "recognizer" else SpeakerEncoder(a)


def load_tts(path) -> nn.Module:
    """A FlashSpeech-mini model folder."""
    return load(path, build_tts, "speech model")


def load_judge(path) -> nn.Module:
    """A phone-recognizer or speaker-encoder folder."""
    return load(path, build_judge, "speech judge")
