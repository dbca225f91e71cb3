"""Tiny random OpenELM models and folders for tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_elm.models.openelm import Model, ModelArgs


def tiny_args(**overrides) -> ModelArgs:
    """4 layers, non-uniform: q heads [4, 8, 8, 8], kv heads [1, 2, 2, 2], FFN 256..1024."""
    kwargs = dict(num_transformer_layers=4, model_dim=256, head_dim=32, vocab_size=512,
                  ffn_dim_divisor=256, max_context_length=256)
    kwargs.update(overrides)
    return ModelArgs(**kwargs)


def random_model(args: ModelArgs, seed: int = 0) -> Model:
    """Random weights with perturbed norms, so every norm weight matters."""
    mx.random.seed(seed)
    model = Model(args)
    rng = np.random.default_rng(seed)
    params = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            params[name] = mx.array(rng.uniform(0.5, 1.5, value.shape).astype(np.float32))
        else:
            params[name] = mx.array(rng.normal(0, 0.06, value.shape).astype(np.float32))
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    return model


def numpy_weights(model: Model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def save_mlx_folder(model: Model, folder: Path, tokenizer_model: Path | None = None) -> Path:
    from mlx_elm.model_folder import write_model_folder

    return write_model_folder(folder, model, model.args.to_dict(),
                              tokenizer=str(tokenizer_model) if tokenizer_model is not None else None)


def save_hf_folder(model: Model, folder: Path) -> Path:
    """A folder shaped like an ``apple/OpenELM-*`` Hub repo: HF config, fp32 safetensors, no tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    config = {
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig"},
        "model_type": "openelm", "torch_dtype": "bfloat16", "transformers_version": "4.39.3",
        "head_dim": a.head_dim, "model_dim": a.model_dim, "num_transformer_layers": a.num_transformer_layers,
        "vocab_size": a.vocab_size, "ffn_dim_divisor": a.ffn_dim_divisor, "ffn_with_glu": True,
        "ffn_multipliers": list(a.ffn_multipliers), "qkv_multipliers": [0.5, 1.0],
        "num_query_heads": list(a.num_query_heads), "num_kv_heads": list(a.num_kv_heads),
        "num_gqa_groups": 4, "normalize_qk_projections": True, "share_input_output_layers": True,
        "rope_freq_constant": 10000, "rope_max_length": 4096, "max_context_length": a.max_context_length,
        "bos_token_id": 1, "eos_token_id": 2, "activation_fn_name": "swish", "initializer_range": 0.02,
        "use_cache": True, "normalization_layer_name": "rms_norm",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    return folder
