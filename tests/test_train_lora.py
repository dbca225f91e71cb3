"""LoRA on a tiny OpenELM: placement, loss, exact resume, fuse, QLoRA, mlx-lm compatibility."""

from __future__ import annotations

import os
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_elm.errors import TrainingError
from mlx_elm.loading import load_model, load_with_info
from mlx_elm.train.data import load_dataset
from mlx_elm.train.finetune import finetune_model, quantize_in_memory
from mlx_elm.train.fuse import fuse_adapters
from mlx_elm.train.loop import TrainConfig
from mlx_elm.adapters import (
    LoRAConfig,
    adapter_modules,
    apply_adapters,
    default_lora_config,
    load_adapters,
)
from mlx_elm.train.tiny import make_tiny_openelm, write_text_data

LAYERS = 4


@pytest.fixture(scope="module")
def tiny(spm_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lora")
    model_dir = make_tiny_openelm(root / "model", spm_model_path, num_transformer_layers=LAYERS)
    data_dir = write_text_data(root / "data", n_train=24, n_valid=8, words=16)
    return model_dir, data_dir


def _load(model_dir):
    model, _, _ = load_model(model_dir, "float32")
    return model


def _randomize_adapters(model, seed=1):
    mx.random.seed(seed)
    for path, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)


def _tokens():
    return mx.array(np.random.default_rng(0).integers(3, 300, size=(2, 12)), dtype=mx.int32)


def test_every_target_module_gets_an_adapter(tiny):
    model = _load(tiny[0])
    cfg = default_lora_config("openelm")
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.scale) == (32, 32.0, 0.1, 1.0)  # corenet's recipe
    plan = apply_adapters(model, cfg)
    names = adapter_modules(model)
    expected = {f"transformer.layers.{i}.{k}" for i in range(LAYERS)
                for k in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")}
    expected.add("transformer.token_embeddings")
    assert set(names) == expected and len(names) == 4 * LAYERS + 1
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {f"{n}.{leaf}" for n in expected for leaf in ("lora_a", "lora_b")}
    assert plan.skipped == []

    model = _load(tiny[0])
    apply_adapters(model, LoRAConfig(rank=4, targets=("qkv_proj", "proj_2"), num_layers=2, dora=True))
    names = adapter_modules(model)
    assert sorted(names) == [f"transformer.layers.{i}.{k}" for i in (2, 3) for k in ("attn.qkv_proj", "ffn.proj_2")]
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k, _ in tree_flatten(model.trainable_parameters()))
    with pytest.raises(TrainingError, match="'q_proj' matches no module"):
        apply_adapters(_load(tiny[0]), LoRAConfig(targets=("q_proj",)))


def _run(tiny, tok, out, iters, interrupt_at=None, resume=False, **kw):
    model = _load(tiny[0])
    data = load_dataset(tiny[1], tok, 64)
    cfg = TrainConfig(batch_size=4, iters=iters, learning_rate=3e-3, warmup_steps=2, grad_accumulation=2,
                      steps_per_eval=4, save_every=2, seed=7, resume=resume, progress=False, **kw)

    def on_step(step, loss, metrics):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the loop

    return finetune_model(model, tok, data, out, default_lora_config("openelm"), cfg, log=lambda s: None,
                          on_step=on_step)


@pytest.mark.slow
def test_loss_falls_and_resumed_run_equals_uninterrupted(tiny, tmp_path):
    _, tok, _ = load_with_info(str(tiny[0]))
    full = _run(tiny, tok, tmp_path / "full", 8)
    assert full.step == 8 and not full.interrupted
    (_, val_mid), (_, val_end) = full.val_losses  # held-out loss at steps 4 and 8
    assert val_end < val_mid < full.losses[0] - 0.5
    assert full.val_losses[-1][1] < full.val_losses[0][1]

    part = _run(tiny, tok, tmp_path / "part", 8, interrupt_at=3)
    assert part.interrupted and part.step == 3
    assert (tmp_path / "part" / "checkpoints" / "step_0000003" / "state.json").exists()
    assert not list((tmp_path / "part" / "checkpoints").glob(".tmp-*"))
    rest = _run(tiny, tok, tmp_path / "part", 8, resume=True)
    assert rest.step == 8 and rest.losses == full.losses[3:]
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "part" / "adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * (4 * LAYERS + 1)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k  # bitwise
    with pytest.raises(TrainingError, match="batch_size was 4"):
        model = _load(tiny[0])
        finetune_model(model, tok, load_dataset(tiny[1], tok, 64), tmp_path / "part", default_lora_config("openelm"),
                       TrainConfig(batch_size=8, iters=9, resume=True, progress=False, seed=7,
                                   learning_rate=3e-3, warmup_steps=2, grad_accumulation=2), log=lambda s: None)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_model_gives_the_adapter_logits(tiny, dora):
    model = _load(tiny[0])
    apply_adapters(model, LoRAConfig(rank=4, alpha=8, targets=("embedding", "all-linear"), dora=dora))
    _randomize_adapters(model)
    model.eval()
    x = _tokens()
    base = _load(tiny[0])(x)
    with_adapter = model(x)
    assert mx.abs(with_adapter - base).max().item() > 1e-2  # the adapters do something
    assert fuse_adapters(model) == 4 * LAYERS + 1
    assert not adapter_modules(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(with_adapter), atol=2e-4, rtol=1e-4)


def test_fuse_cli_and_adapter_folder_roundtrip(cli, tiny, tmp_path):
    from mlx_elm.adapters import adapter_config_dict, save_adapters

    model = _load(tiny[0])
    cfg = default_lora_config("openelm")
    plan = apply_adapters(model, cfg)
    _randomize_adapters(model)
    save_adapters(model, tmp_path / "ad", adapter_config_dict(cfg, plan, str(tiny[0])))
    model.eval()
    x = _tokens()
    ref = model(x)
    again = load_adapters(_load(tiny[0]), tmp_path / "ad")
    assert mx.array_equal(again(x), ref).item()
    res = cli("fuse", tmp_path / "fused", "--model", tiny[0], "--adapter", tmp_path / "ad")
    assert res.code == 0, res.stderr
    fused = _load(tmp_path / "fused")
    np.testing.assert_allclose(np.array(fused(x)), np.array(ref), atol=2e-4, rtol=1e-4)
    res = cli("fuse", tmp_path / "fused8", "--model", tiny[0], "--adapter", tmp_path / "ad",
              "--quantize", "8", "--group-size", "32")
    assert res.code == 0, res.stderr
    q, _, _ = load_model(tmp_path / "fused8", "as-stored")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in q.named_modules())
    np.testing.assert_allclose(np.array(q(x)), np.array(ref), atol=0.1)  # 8-bit error only


def test_mlx_lm_loads_block_adapters_and_generate_uses_them(cli, tiny, tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((tiny[1] / "train.jsonl").read_text())
    res = cli("lora", "--model", tiny[0], "--data", data, "--adapter-path", tmp_path / "ad",
              "--targets", "qkv_proj,out_proj,proj_1,proj_2", "--iters", "3", "--learning-rate", "0.01",
              "--batch-size", "4", "--rank", "8")
    assert res.code == 0, res.stderr
    assert "adapters on 16 modules" in res.stderr
    x = _tokens()
    ours = load_adapters(_load(tiny[0]), tmp_path / "ad")
    theirs = mlx_lm_load_adapters(_load(tiny[0]), str(tmp_path / "ad"))
    theirs.eval()
    assert mx.array_equal(ours(x), theirs(x)).item()
    assert mx.abs(ours(x) - _load(tiny[0])(x)).max().item() > 1e-4
    res = cli("generate", "the sky", "--model", tiny[0], "--adapter", tmp_path / "ad", "-n", "4", "--no-chat-template")
    assert res.code == 0, res.stderr


def test_qlora_trains_on_a_quantized_base(tiny, tmp_path):
    model, tok, _ = load_with_info(str(tiny[0]))
    quantize_in_memory(model, bits=4, group_size=32)
    frozen = {k: v for k, v in tree_flatten(model.parameters())}
    data = load_dataset(tiny[1], tok, 64)
    r = finetune_model(model, tok, data, tmp_path / "q", LoRAConfig(rank=8, alpha=16, targets=("all-linear",)),
                       TrainConfig(batch_size=4, iters=6, learning_rate=5e-3, steps_per_eval=0, save_every=0,
                                   progress=False), log=lambda s: None)
    assert r.losses[-1] < r.losses[0] - 0.5
    lin = [m for _, m in model.named_modules() if hasattr(m, "lora_a")]
    assert len(lin) == 4 * LAYERS and all(isinstance(m.linear, nn.QuantizedLinear) for m in lin)
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters())}
    for k, v in frozen.items():
        if k.endswith(("weight", "scales", "biases")):
            assert mx.array_equal(after[k], v).item(), k  # the quantized base is untouched


def test_grad_checkpoint_gives_the_same_training(tiny, tmp_path):
    _, tok, _ = load_with_info(str(tiny[0]))
    runs = []
    for gc in (False, True):
        model = _load(tiny[0])
        data = load_dataset(tiny[1], tok, 64)
        r = finetune_model(model, tok, data, tmp_path / str(gc), LoRAConfig(rank=4, targets=("all-linear",)),
                           TrainConfig(batch_size=4, iters=2, learning_rate=1e-2, steps_per_eval=0, save_every=0,
                                       progress=False, grad_checkpoint=gc), log=lambda s: None)
        runs.append(r.losses)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


def _torch_reference_logits(tiny_dir, adapted_model, tokens) -> np.ndarray:
    """corenet's LoRA forward in the independent PyTorch reference: the embedding adapter changes
    the looked-up inputs, the tied head reads the BASE embedding (convert/torch_reference.py)."""
    from needs import needs

    needs("torch")
    from convert.torch_reference import TorchOpenELM

    base = {k: np.array(v) for k, v in tree_flatten(_load(tiny_dir).parameters())}
    lora = {}
    for path, m in adapted_model.named_modules():
        if hasattr(m, "lora_a"):  # mlx-lm layout (in, r) / (r, out) -> corenet layout (r, in) / (out, r)
            lora[path] = {"a": np.array(m.lora_a).T, "b": np.array(m.lora_b).T}
            scale = m.scale
    return TorchOpenELM(base, head_dim=32, lora=lora, lora_scale=scale)(np.array(tokens))


def test_openelm_embedding_lora_matches_corenet_and_fuse_unties(cli, tiny, tmp_path):
    """`mlx-elm lora` on tied OpenELM follows corenet (the head keeps the base embedding), and the
    fused folder computes the same logits with an untied lm_head, as the converter writes it."""
    from mlx_elm.adapters import adapter_config_dict, save_adapters

    model = _load(tiny[0])
    cfg = default_lora_config("openelm")
    plan = apply_adapters(model, cfg)
    _randomize_adapters(model)
    model.eval()
    x = _tokens()
    ours = np.array(model(x))
    ref = _torch_reference_logits(tiny[0], model, x)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    save_adapters(model, tmp_path / "ad", adapter_config_dict(cfg, plan, str(tiny[0])))
    assert cli("fuse", tmp_path / "fused", "--model", tiny[0], "--adapter", tmp_path / "ad").code == 0
    fused, config, _ = load_model(tmp_path / "fused", "float32")
    assert config["share_input_output_layers"] is False
    np.testing.assert_allclose(np.array(fused(x)), ref, atol=2e-4, rtol=1e-4)
