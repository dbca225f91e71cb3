"""Every source format converts, loads in mlx_elm and mlx-lm, and matches the PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from needs import needs

torch = needs("torch")

from convert import convert  # noqa: E402
from convert_fixtures import (  # noqa: E402
    TOKENS, bf16_round, custom_args, mlx_elm_logits, mlx_lm_logits, random_weights, reference_logits,
    tiny_args, write_corenet_lora, write_corenet_pt, write_hf_bin, write_hf_safetensors,
)

TOL = 1e-4


def _check(out, args, weights, lora=None, adapters=None):
    ref = reference_logits(args, weights, TOKENS, lora)
    got_elm = mlx_elm_logits(out, TOKENS, adapters)
    got_lm = mlx_lm_logits(out, TOKENS, adapters)
    assert np.abs(got_elm - ref).max() <= TOL
    assert np.abs(got_lm - ref).max() <= TOL
    return ref


@pytest.mark.parametrize("fmt", ["hf_safetensors", "hf_bin", "hf_bin_sharded", "corenet", "corenet_training",
                                 "corenet_bf16", "corenet_noncontiguous", "custom_geometry"])
def test_format_converts_and_matches_reference(tmp_path, fmt):
    args = custom_args() if fmt == "custom_geometry" else tiny_args()
    w = random_weights(args, seed=3)
    opts = {}
    if fmt == "hf_safetensors":
        src = write_hf_safetensors(tmp_path / "src", args, w)
    elif fmt == "hf_bin":
        src = write_hf_bin(tmp_path / "src", args, w)
    elif fmt == "hf_bin_sharded":
        src = write_hf_bin(tmp_path / "src", args, w, shards=3)
    elif fmt in ("corenet", "corenet_training"):
        padded = random_weights(args, seed=3, rows=args.vocab_size + 128)  # corenet pads the vocabulary
        src = write_corenet_pt(tmp_path / "ck.pt", padded, training=fmt == "corenet_training")
        w = dict(padded, **{"transformer.token_embeddings.weight":
                            padded["transformer.token_embeddings.weight"][: args.vocab_size]})
        opts["vocab_size"] = args.vocab_size
    elif fmt == "corenet_bf16":
        src = write_corenet_pt(tmp_path / "ck.pt", w, dtype=torch.bfloat16)
        w = bf16_round(w)
    elif fmt == "corenet_noncontiguous":
        src = write_corenet_pt(tmp_path / "ck.pt", w, transpose=("transformer.layers.1.attn.qkv_proj.weight",
                                                                 "transformer.token_embeddings.weight"))
    else:
        src = write_corenet_pt(tmp_path / "ck.pt", w)
    out = tmp_path / "out"
    report = convert(src, out, dtype="float32", progress=False, **opts)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_query_heads"] == args.num_query_heads and cfg["vocab_size"] == args.vocab_size
    assert report.parameters == sum(v.size for v in w.values())
    assert "mlx-elm convert" in (out / "README.md").read_text()
    _check(out, args, w)


def test_bf16_default_dtype_and_verify(tmp_path):
    args = tiny_args()
    w = random_weights(args, seed=4)
    src = write_hf_safetensors(tmp_path / "src", args, w)
    report = convert(src, tmp_path / "out", verify=True, progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        pass  # opening works; dtype checked through mlx below
    import mlx.core as mx

    assert mx.load(str(tmp_path / "out" / "model.safetensors"))["transformer.norm.weight"].dtype == mx.bfloat16
    assert report.max_logit_diff is not None and report.max_logit_diff <= report.tolerance


def test_corenet_default_trims_32128_rows(tmp_path):
    args = tiny_args(model_dim=64, head_dim=16, num_transformer_layers=2, vocab_size=32000)
    w = random_weights(args, seed=5, rows=32128)
    src = write_corenet_pt(tmp_path / "ck.pt", w)
    convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 32000
    w["transformer.token_embeddings.weight"] = w["transformer.token_embeddings.weight"][:32000]
    _check(tmp_path / "out", args, w)
    convert(src, tmp_path / "padded", dtype="float32", keep_padding=True, progress=False)
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == 32128


@pytest.mark.parametrize("embedding,dora", [(True, False), (False, True)])
def test_corenet_lora_merge_matches_unmerged_reference(tmp_path, embedding, dora):
    args = tiny_args()
    fx = write_corenet_lora(tmp_path / "lora.pt", args, embedding=embedding, dora=dora, pad_rows=128)
    out = tmp_path / "out"
    report = convert(fx.path, out, dtype="float32", vocab_size=args.vocab_size, progress=False)
    ref = reference_logits(args, fx.base, TOKENS, fx.lora)
    base_only = reference_logits(args, fx.base, TOKENS)
    assert np.abs(ref - base_only).max() > 1e-2  # the adapters really change the model
    for got in (mlx_elm_logits(out, TOKENS), mlx_lm_logits(out, TOKENS)):
        assert np.abs(got - ref).max() <= TOL
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["share_input_output_layers"] is (not embedding)
    assert any("merged" in n for n in report.notes)


def test_corenet_lora_export_loads_as_mlx_lm_adapters(tmp_path):
    args = tiny_args()
    fx = write_corenet_lora(tmp_path / "lora.pt", args, embedding=True)
    out = tmp_path / "out"
    convert(fx.path, out, dtype="float32", merge_lora=False, lora_scale=2.0, progress=False)
    cfg = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == args.num_transformer_layers
    assert cfg["lora_parameters"]["rank"] == fx.rank and cfg["lora_parameters"]["scale"] == 2.0
    assert sorted(cfg["lora_parameters"]["keys"]) == ["attn.out_proj", "attn.qkv_proj", "ffn.proj_1", "ffn.proj_2"]
    ref = reference_logits(args, fx.base, TOKENS, fx.lora, scale=2.0)
    for got in (mlx_elm_logits(out, TOKENS, out / "adapters"), mlx_lm_logits(out, TOKENS, out / "adapters")):
        assert np.abs(got - ref).max() <= TOL
    # without the adapters the folder is the base model with only the embedding adapter merged
    emb_only = {"transformer.token_embeddings": fx.lora["transformer.token_embeddings"]}
    assert np.abs(mlx_lm_logits(out, TOKENS) - reference_logits(args, fx.base, TOKENS, emb_only, 2.0)).max() <= TOL


def test_hub_repo_id_from_offline_cache(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout, with the network disabled."""
    args = tiny_args()
    w = random_weights(args, seed=6)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--apple--OpenELM-Tiny" / "snapshots" / commit
    write_hf_safetensors(snap, args, w)
    (cache / "models--apple--OpenELM-Tiny" / "refs").mkdir()
    (cache / "models--apple--OpenELM-Tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    report = convert("apple/OpenELM-Tiny", tmp_path / "out", dtype="float32", progress=False)
    assert "Hugging Face Hub" in report.source
    _check(tmp_path / "out", args, w)
