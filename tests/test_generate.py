"""Generation: the embedded default, sampling checks, chat cache reuse, and the CLI's errors."""

from __future__ import annotations


import pytest

import mlx_elm
from mlx_elm.chat import ChatSession
from mlx_elm.errors import GenerationError
from mlx_elm.generation import SamplingOptions, build_prompt, check_prompt_length, generate_text
from openelm_fixtures import random_model, save_mlx_folder, tiny_args


@pytest.fixture(scope="module")
def smollm(embedded):
    return embedded


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


def test_representation_follows_the_backend(smollm):
    """CPU: dense float32 (its quantized matmuls are slow); GPU: the 4-bit weights as stored."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_elm.platform import is_cpu_backend

    model, _, info = smollm
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if is_cpu_backend():
        assert info.representation == "float32" and not quantized
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    else:
        assert info.representation == "as-stored" and quantized


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


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--temp", "-1"], "--temp must be >= 0"),
    (["generate", "hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--model", "no-such-model"], "unknown model"),
])
def test_cli_bad_input_is_one_line(cli, args, needle):
    result = cli(*args)
    assert result.code == 1
    assert len(result.error_lines) == 1 and needle in result.error_lines[0]


def test_cli_generates_with_a_local_model_and_reports_speed(cli, tmp_path, spm_model_path):
    folder = save_mlx_folder(random_model(tiny_args(), seed=12), tmp_path / "m", spm_model_path)
    result = cli("generate", "the sky", "--model", folder, "--max-tokens", "5", "--verbose")
    assert result.code == 0, result.stderr
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr
    assert "float32" in result.stderr  # --verbose names the representation


def test_cli_prompt_too_long_for_the_context(cli, tmp_path, spm_model_path):
    folder = save_mlx_folder(random_model(tiny_args(max_context_length=16), seed=13), tmp_path / "m",
                             spm_model_path)
    result = cli("generate", "the sky is blue " * 20, "--model", folder)
    assert result.code == 1 and "shorten the prompt" in result.stderr and len(result.error_lines) == 1
