"""Generation: the embedded default, sampling checks, chat cache reuse, and the CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mlx_elm
from mlx_elm.chat import ChatSession
from mlx_elm.errors import GenerationError
from mlx_elm.generation import SamplingOptions, build_prompt, check_prompt_length, generate_text
from openelm_fixtures import random_model, save_mlx_folder, tiny_args


@pytest.fixture(scope="module")
def smollm():
    model, tok, info = mlx_elm.load_with_info()
    return model, tok, info


def test_embedded_default_knows_the_capital_of_france(smollm):
    model, tok, info = smollm
    assert info.model_type == "llama" and info.config["max_position_embeddings"] == 8192
    tokens = build_prompt(tok, "What is the capital of France?")
    text = generate_text(model, tok, tokens, SamplingOptions(max_tokens=24), info.config)
    assert "Paris" in text


def test_embedded_tokenizer_round_trips_and_splits_digits(smollm):
    _, tok, _ = smollm
    text = "Grüße, 東京! naïve café — 40712 ✓"
    assert tok.decode(tok.encode(text)) == text
    pieces = tok._tokenizer.convert_ids_to_tokens(tok.encode(" 40712"))
    assert pieces == ["Ġ", "4", "0", "7", "1", "2"]
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1


def test_cpu_representation_is_dense_float32(smollm):
    import mlx.core as mx
    import mlx.nn as nn

    model, _, info = smollm
    if info.representation == "float32":
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32


@pytest.mark.parametrize("field,value,match", [
    ("temp", -1.0, "--temp"), ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"),
    ("top_k", -2, "--top-k"), ("min_p", 1.0, "--min-p"), ("repetition_penalty", 0.0, "--repetition"),
    ("max_tokens", 0, "--max-tokens"),
])
def test_invalid_sampling_values(field, value, match):
    with pytest.raises(GenerationError, match=match):
        SamplingOptions(**{field: value}).validate()


def test_prompt_longer_than_context():
    with pytest.raises(GenerationError, match="context is 256"):
        check_prompt_length(300, SamplingOptions(), {"max_context_length": 256})
    assert check_prompt_length(250, SamplingOptions(max_tokens=100), {"max_context_length": 256}) == 6


def test_chat_reuses_the_cache_and_matches_a_fresh_generation(tmp_path, spm_model_path):
    folder = save_mlx_folder(random_model(tiny_args(), seed=11), tmp_path / "m", spm_model_path)
    model, tok, info = mlx_elm.load_with_info(str(folder))
    options = SamplingOptions(max_tokens=6)
    session = ChatSession(model, tok, info.config, options)
    first = "".join(session.send("the sky is blue"))
    second = "".join(session.send("why is the water blue"))
    assert session.last_reused > 0
    history = [{"role": "user", "content": "the sky is blue"}, {"role": "assistant", "content": first}]
    fresh_tokens = build_prompt(tok, "why is the water blue", history=history)
    assert second == generate_text(model, tok, fresh_tokens, options, info.config)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_elm.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--temp", "-1"], "--temp must be >= 0"),
    (["generate", "hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--model", "no-such-model"], "unknown model"),
])
def test_cli_bad_input_is_one_line(args, needle):
    result = _cli(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_cli_generates_with_a_local_model_and_reports_speed(tmp_path, spm_model_path):
    folder = save_mlx_folder(random_model(tiny_args(), seed=12), tmp_path / "m", spm_model_path)
    result = _cli("generate", "the sky", "--model", str(folder), "--max-tokens", "5", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr
    assert "float32" in result.stderr  # --verbose names the representation


def test_cli_prompt_too_long_for_the_context(tmp_path, spm_model_path):
    folder = save_mlx_folder(random_model(tiny_args(max_context_length=16), seed=13), tmp_path / "m",
                             spm_model_path)
    result = _cli("generate", "the sky is blue " * 20, "--model", str(folder))
    assert result.returncode == 1 and "shorten the prompt" in result.stderr
    assert "Traceback" not in result.stderr
