"""Quantized and tokenizer-carrying conversions load in mlx_elm and mlx-lm and generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from needs import needs

torch = needs("torch")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from convert import convert  # noqa: E402
from convert.verify import load_mlx  # noqa: E402
from convert_fixtures import TOKENS, random_weights, reference_logits, tiny_args, write_hf_safetensors  # noqa: E402


def _greedy(model, prompt, n=6):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


@pytest.mark.parametrize("bits,group_size,quantize_embedding", [(4, 64, True), (8, 32, False)])
def test_quantized_conversion_loads_and_generates(tmp_path, bits, group_size, quantize_embedding):
    from mlx_lm.utils import load_model

    args = tiny_args()
    w = random_weights(args, seed=11)
    src = write_hf_safetensors(tmp_path / "src", args, w)
    out = tmp_path / "out"
    report = convert(src, out, dtype="float32", quantize=True, bits=bits, group_size=group_size,
                     quantize_embedding=quantize_embedding, verify=True, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == bits and q["group_size"] == group_size
    assert ("transformer.token_embeddings" in q) is (not quantize_embedding)
    ref = reference_logits(args, w, TOKENS)
    for model in (load_mlx(out), load_model(out)[0]):
        emb = model.transformer.token_embeddings
        assert isinstance(emb, nn.QuantizedEmbedding) is quantize_embedding
        qkv = model.transformer.layers[0].attn.qkv_proj
        assert isinstance(qkv, nn.QuantizedLinear) and qkv.bits == bits and qkv.group_size == group_size
        logits = np.array(model(mx.array(TOKENS)).astype(mx.float32))
        err = np.abs(logits - ref).max() / np.abs(ref).max()
        assert 0 < err < (0.1 if bits == 8 else 0.6)  # really quantized, still the same model
        toks = _greedy(model, [1, 5, 77])
        assert len(toks) == 6 and all(0 <= t < args.vocab_size for t in toks)
    # verify compares against the PyTorch reference run on the folder's dequantized weights
    assert report.max_logit_diff is not None and report.max_logit_diff <= report.tolerance <= 1e-2


def test_group_size_must_divide_widths(tmp_path):
    args = tiny_args(model_dim=96, head_dim=32, num_query_heads=[4, 4], num_kv_heads=[1, 1],
                     num_transformer_layers=2, ffn_multipliers=[8 / 3, 8 / 3])
    w = random_weights(args, seed=2)
    src = write_hf_safetensors(tmp_path / "src", args, w)
    from mlx_elm.errors import ConversionError

    with pytest.raises(ConversionError, match="not a multiple of --group-size 64"):
        convert(src, tmp_path / "out", quantize=True, group_size=64, progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_included_and_mlx_lm_load_generates(tmp_path, spm_model_path):
    import mlx_lm

    import mlx_elm

    args = tiny_args()
    w = random_weights(args, seed=12)
    src = write_hf_safetensors(tmp_path / "src", args, w)
    out = tmp_path / "out"
    convert(src, out, tokenizer=spm_model_path, dtype="float32", progress=False)
    assert (out / "tokenizer.model").exists()
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode("the sky is blue")
    assert ids[0] == 1  # BOS added, Llama-2 style
    text = mlx_lm.generate(model, tok, "the sky", max_tokens=5)
    assert isinstance(text, str)
    model2, tok2 = mlx_elm.load(str(out))
    assert tok2.encode("the sky is blue") == ids
    assert _greedy(model, ids) == _greedy(model2, ids)
