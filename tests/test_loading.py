"""mlx_elm.load on MLX folders, Hugging Face folders, Hub repo ids (offline cache), and bad input."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_elm
from mlx_elm.errors import ModelLoadError, TokenizerError
from mlx_elm.loading import load_with_info
from openelm_fixtures import random_model, save_hf_folder, save_mlx_folder, tiny_args


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_args(), seed=7)


def _logits(model, tokens):
    return np.array(model(mx.array(tokens)[None])[0])


def test_mlx_folder_loads_in_mlx_elm_and_mlx_lm(tiny, tmp_path, spm_model_path):
    folder = save_mlx_folder(tiny, tmp_path / "m", spm_model_path)
    tokens = [1, 5, 9, 200, 33]
    model, tok, info = load_with_info(str(folder))
    assert type(model).__module__ == "mlx_elm.models.openelm"
    assert np.abs(_logits(model, tokens) - _logits(tiny, tokens)).max() == 0
    assert tok.encode("the sky")[0] == 1  # Llama-style BOS added

    import mlx_lm

    theirs, their_tok = mlx_lm.load(str(folder))
    assert np.abs(_logits(theirs, tokens) - _logits(tiny, tokens)).max() <= 1e-5
    assert their_tok.encode("the sky") == tok.encode("the sky")


def test_hf_folder_needs_a_tokenizer_and_says_how(tiny, tmp_path, spm_model_path):
    folder = save_hf_folder(tiny, tmp_path / "hf")
    with pytest.raises(TokenizerError, match="--tokenizer"):
        mlx_elm.load(str(folder))
    model, tok = mlx_elm.load(str(folder), tokenizer=str(spm_model_path))
    assert np.abs(_logits(model, [1, 2, 3]) - _logits(tiny, [1, 2, 3])).max() == 0
    # OpenELM-Instruct ships no chat template: the alignment-handbook recipe format is used.
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_hub_repo_id_resolves_through_the_hf_cache_offline(tiny, tmp_path, spm_model_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--apple--OpenELM-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_mlx_folder(tiny, repo / "snapshots" / commit, spm_model_path)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = mlx_elm.load("apple/OpenELM-tiny")
    assert np.abs(_logits(model, [4, 5]) - _logits(tiny, [4, 5])).max() == 0
    with pytest.raises(ModelLoadError, match="Hugging Face Hub"):
        mlx_elm.load("apple/OpenELM-missing")


def test_unknown_reference(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        mlx_elm.load("no-such-model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        mlx_elm.load(str(tmp_path))


def test_missing_weights_and_pytorch_only_folders(tiny, tmp_path, spm_model_path):
    folder = save_mlx_folder(tiny, tmp_path / "m", spm_model_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.*safetensors"):
        mlx_elm.load(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="mlx-elm convert"):
        mlx_elm.load(str(folder))


def test_config_weight_shape_mismatch(tiny, tmp_path, spm_model_path):
    folder = save_mlx_folder(tiny, tmp_path / "m", spm_model_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_query_heads"][2] = 4
    config["num_kv_heads"][2] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match its config.json"):
        mlx_elm.load(str(folder))


def test_tokenizer_option_accepts_a_folder(tiny, tmp_path, spm_model_path):
    folder = save_hf_folder(tiny, tmp_path / "hf")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(spm_model_path, tok_dir / "tokenizer.model")
    _, tok = mlx_elm.load(str(folder), tokenizer=str(tok_dir))
    assert tok.eos_token_id == 2
    with pytest.raises(TokenizerError, match="does not exist"):
        mlx_elm.load(str(folder), tokenizer="missing.model")
