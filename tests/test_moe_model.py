"""OpenELM-MoE: sizing rules, folders, loading, generation, LoRA on experts, quantization, training."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

from mlx_elm.adapters import LoRAConfig, apply_adapters, load_adapters
from mlx_elm.generation import SamplingOptions, generate_text
from mlx_elm.loading import load_with_info
from mlx_elm.model_folder import count_parameters, write_model_folder
from mlx_elm.models import openelm, openelm_moe
from mlx_elm.models.openelm_moe import Model, ModelArgs, describe, preset
from mlx_elm.train.data import load_dataset
from mlx_elm.train.finetune import finetune_model
from mlx_elm.train.fuse import fuse_adapters
from mlx_elm.train.loop import TrainConfig
from mlx_elm.train.tiny import write_text_data

SMALL = dict(num_transformer_layers=2, vocab_size=320)


def tiny_moe(arm="mhmoe-h2", seed=0, **kw) -> Model:
    mx.random.seed(seed)
    model = Model(preset(f"tiny-{arm}", **dict(SMALL, **kw)))
    mx.eval(model.parameters())
    return model


def test_v2_sizing_reproduces_the_papers_table_and_matches_flops_and_parameters():
    # arXiv 2411.16205's d = 768 configurations: 40 experts of 768 (h 2), 96 of 512 (h 3)
    assert openelm_moe.v2_sizing(768, 8, 1, 2048, 2) == dict(num_experts=40, top_k=2, expert_ffn_dim=768, moe_heads=2)
    assert openelm_moe.v2_sizing(768, 8, 1, 2048, 3) == dict(num_experts=96, top_k=3, expert_ffn_dim=512, moe_heads=3)
    assert openelm_moe.fine_grained_sizing(8, 1, 2048) == dict(num_experts=16, top_k=2, expert_ffn_dim=1024)
    rows = {r["preset"]: r for r in openelm_moe.sizing_table("paper")}
    smoe = rows["paper-smoe"]
    for arm in ("fine-grained", "mhmoe-h2", "mhmoe-h3"):
        r = rows[f"paper-{arm}"]
        assert abs(r["flops_per_token"] / smoe["flops_per_token"] - 1) < 0.01, arm
        assert abs(r["moe_layer_parameters"] / smoe["moe_layer_parameters"] - 1) < 0.04, arm
    # v1: parameters matched, experts ~h = 4 times the expert FLOPs (the v2 paper's 67 vs 16 B d^2)
    v1 = rows["paper-v1-h4"]
    assert abs(v1["moe_layer_parameters"] / smoe["moe_layer_parameters"] - 1) < 0.01
    v1_args, smoe_args = preset("paper-v1-h4"), preset("paper-smoe")
    ratio = 4 * openelm_moe.moe_layer_parameters(v1_args)["expert"] / openelm_moe.moe_layer_parameters(smoe_args)["expert"]
    assert 3.8 < ratio < 4.0


@pytest.mark.parametrize("arm", ["smoe", "fine-grained", "mhmoe-h2", "mhmoe-h4", "v1-h4"])
def test_parameter_count_from_config_equals_the_built_model(arm):
    args = preset(f"tiny-{arm}", router="xmoe" if arm == "mhmoe-h2" else "linear")
    assert describe(args)["total_parameters"] == count_parameters(Model(args))


def test_moe_placement_every_kth_block_and_dense_elsewhere():
    args = preset("paper-smoe", num_transformer_layers=6, moe_every=2, vocab_size=64, model_dim=64, head_dim=16,
                  expert_ffn_dim=32)
    model = Model(args)
    assert args.moe_layer_ids == [1, 3, 5]
    assert ["moe" in layer for layer in model.layers] == [False, True] * 3
    assert [layer.attn.n_heads for layer in model.layers] == args.num_query_heads


def test_folder_roundtrip_loads_and_generates(spm_model_path, tmp_path, cli):
    model = tiny_moe()
    folder = write_model_folder(tmp_path / "m", model, model.args.to_dict(), tokenizer=str(spm_model_path))
    loaded, tok, info = load_with_info(str(folder))
    assert info.model_type == "openelm_moe" and isinstance(loaded, Model)
    x = mx.array([[1, 5, 9, 30, 2]])
    assert mx.array_equal(loaded(x), model(x)).item()
    text = generate_text(loaded, tok, tok.encode("the sky"), SamplingOptions(max_tokens=6, temp=0.0),
                         info.config)
    assert isinstance(text, str)
    res = cli("generate", "the sky", "--model", folder, "--max-tokens", 5)
    assert res.code == 0, res.stderr
    # the plain protocol and the auxiliary one give the same logits
    logits, aux = loaded(x, return_aux=True)
    assert mx.array_equal(logits, loaded(x)).item() and len(aux) == 1


def test_generation_with_a_cache_equals_the_full_forward():
    model = tiny_moe("smoe", capacity_factor=0.0)
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.array([[3, 14, 15, 92, 65, 35]])
    full = model(tokens)
    cache = make_prompt_cache(model)
    step = [model(tokens[:, :4], cache=cache)[:, -1]]
    for t in range(4, 6):
        step.append(model(tokens[:, t:t + 1], cache=cache)[:, -1])
    np.testing.assert_allclose(np.array(mx.stack(step, 1)), np.array(full[:, 3:]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_reaches_expert_layers_trains_and_fuses(spm_model_path, tmp_path):
    probe = tiny_moe("mhmoe-h2")
    plan = apply_adapters(probe, LoRAConfig(rank=4, alpha=8, targets=("all-linear",)))
    lora_experts = [p for p, m in probe.named_modules() if isinstance(m, LoRASwitchLinear)]
    assert {p.rsplit(".", 1)[-1] for p in lora_experts} == {"gate_proj", "up_proj", "down_proj"}
    assert not plan.skipped
    trainable = dict(tree_flatten(probe.trainable_parameters()))
    assert any(k.endswith("experts.up_proj.lora_b") for k in trainable)

    model = tiny_moe("mhmoe-h2")

    from mlx_elm.tokenizers import load_tokenizer

    folder = write_model_folder(tmp_path / "base", tiny_moe("mhmoe-h2"), model.args.to_dict(),
                                tokenizer=str(spm_model_path))
    tok = load_tokenizer(folder, None, {})
    data = load_dataset(write_text_data(tmp_path / "data", n_train=16, n_valid=4, words=12), tok, 32)
    cfg = TrainConfig(batch_size=4, iters=4, learning_rate=1e-2, steps_per_eval=4, val_batches=1, save_every=0,
                      progress=False, max_seq_length=32)
    result = finetune_model(model, tok, data, tmp_path / "adapters", LoRAConfig(rank=4, alpha=8), cfg,
                            log=lambda s: None)
    assert "balance_loss" in result.metrics[-1] and "L1/entropy" in result.metrics[-1]
    b = dict(tree_flatten(model.parameters()))["transformer.layers.1.moe.moe.experts.up_proj.lora_b"]
    assert float(mx.abs(b).sum()) > 0, "expert adapters must be trained"
    x = mx.array([[1, 7, 8, 9]])
    model.eval()
    adapted = model(x)
    reloaded = load_adapters(load_with_info(str(folder))[0], str(tmp_path / "adapters"))
    np.testing.assert_allclose(np.array(reloaded(x)), np.array(adapted), rtol=1e-4, atol=1e-4)
    fuse_adapters(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(adapted), rtol=1e-4, atol=1e-4)


def test_quantized_folder_keeps_routers_dense_loads_and_generates(spm_model_path, tmp_path):
    from mlx_lm.utils import quantize_model

    model = tiny_moe("mhmoe-h2")
    x = mx.array([[1, 7, 8, 9, 10]])
    dense = model(x)
    model, config = quantize_model(model, model.args.to_dict(), group_size=32, bits=8)
    kinds = {p: type(m).__name__ for p, m in model.named_modules()}
    assert kinds["transformer.layers.1.moe.moe.router"] == "Linear"
    assert kinds["transformer.layers.1.moe.moe.experts.up_proj"] == "QuantizedSwitchLinear"
    folder = write_model_folder(tmp_path / "q", model, config, tokenizer=str(spm_model_path))
    loaded, tok, info = load_with_info(str(folder), representation="as-stored")
    assert any(isinstance(m, QuantizedSwitchLinear) for _, m in loaded.named_modules())
    q = loaded(x)
    assert float(mx.abs(q - dense).max()) < 0.05 * float(mx.abs(dense).max()) + 1e-3
    text = generate_text(loaded, tok, tok.encode("the sky"), SamplingOptions(max_tokens=4, temp=0.0),
                         info.config)
    assert isinstance(text, str)


def test_train_cli_pretrains_an_moe_preset_with_routing_metrics(spm_model_path, tmp_path, cli):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"preset": "tiny-mhmoe-h2", "overrides": dict(SMALL, router="xmoe")}))
    data = write_text_data(tmp_path / "data", n_train=24, n_valid=4, words=16)
    res = cli("train", "--config", cfg, "--data", data, "--out", tmp_path / "o", "--tokenizer", spm_model_path,
              "--iters", 4, "--batch-size", 4, "--max-seq-length", 32, "--steps-per-eval", 4, "--save-every", 2)
    assert res.code == 0, res.stderr
    assert "routing (balance loss" in res.stderr and "block 2: entropy" in res.stderr
    metrics = json.loads((tmp_path / "o" / "moe_metrics.json").read_text())
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["balance_loss"] > 0 and 0 < metrics[-1]["L1/entropy"] <= 1
    model, _, info = load_with_info(str(tmp_path / "o"))
    wg = dict(tree_flatten(model.parameters()))["transformer.layers.1.moe.moe.router.wg"]
    np.testing.assert_allclose(np.linalg.norm(np.array(wg), axis=-1), 1.5, rtol=1e-4)  # X-MoE rescale


def test_bad_moe_config_fails_in_one_line():
    with pytest.raises(ValueError, match="moe_heads"):
        ModelArgs(model_dim=64, head_dim=16, moe_heads=3, num_transformer_layers=2)
    with pytest.raises(ValueError, match="unknown OpenELM-MoE preset"):
        preset("tiny-nope")
    assert isinstance(preset("tiny-dense"), openelm.ModelArgs)
