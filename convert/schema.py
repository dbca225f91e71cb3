"""What an OpenELM checkpoint must contain: expected names/shapes per config, and the reverse
(geometry inferred from shapes), so every tensor is checked before anything is written.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

from convert.untrusted import plain, quote
from mlx_elm.errors import ConversionError
from mlx_elm.models.openelm import PRESETS, ModelArgs, preset

Shape = Tuple[int, ...]
LAYER_KEYS = ("attn.qkv_proj.weight", "attn.out_proj.weight", "attn.q_norm.weight", "attn.k_norm.weight",
              "ffn.proj_1.weight", "ffn.proj_2.weight", "attn_norm.weight", "ffn_norm.weight")
# Buffers some exporters include; they are recomputed by every runtime and never converted.
_LAYER = re.compile(r"transformer\.layers\.(0|[1-9][0-9]{0,8})\.[^.]")
IGNORABLE_SUFFIXES = ("inv_freq", "_cached_cos", "_cached_sin", "causal_mask", "rotary_emb.cos", "rotary_emb.sin")


def expected_shapes(args: ModelArgs) -> Dict[str, Shape]:
    """HF/mlx-lm name -> shape for a model with these args (no arrays are created)."""
    d, hd = args.model_dim, args.head_dim
    out: Dict[str, Shape] = {"transformer.token_embeddings.weight": (args.vocab_size, d),
                             "transformer.norm.weight": (d,)}
    for i, (q, kv, f) in enumerate(zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)):
        p = f"transformer.layers.{i}."
        out[p + "attn.qkv_proj.weight"] = ((q + 2 * kv) * hd, d)
        out[p + "attn.out_proj.weight"] = (d, q * hd)
        if args.normalize_qk_projections:
            out[p + "attn.q_norm.weight"] = (hd,)
            out[p + "attn.k_norm.weight"] = (hd,)
        out[p + "ffn.proj_1.weight"] = (2 * f if args.ffn_with_glu else f, d)
        out[p + "ffn.proj_2.weight"] = (d, f)
        out[p + "attn_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    if not args.share_input_output_layers:
        out["lm_head.weight"] = (args.vocab_size, d)
    return out


def is_ignorable(name: str) -> bool:
    return name.endswith(IGNORABLE_SUFFIXES)


def infer_args(shapes: Mapping[str, Shape], vocab_size: Optional[int] = None,
               preset_name: Optional[str] = None) -> Tuple[ModelArgs, str]:
    """ModelArgs for HF-named shapes: a released preset when they match one, else exact geometry.

    Returns (args, description). With ``preset_name`` the preset is used and checked later.
    Shapes come from the file, so each one is checked before it is divided by or indexed.
    """
    emb = shapes.get("transformer.token_embeddings.weight")
    if emb is None or len(emb) != 2 or not all(emb):
        raise ConversionError(f"the checkpoint has no non-empty 2-D token_embeddings.weight (its shape is "
                              f"{quote(emb)}); is it an OpenELM checkpoint?")
    rows, d = emb
    vocab = vocab_size or rows
    untied = "lm_head.weight" in shapes
    if preset_name:
        try:
            return preset(preset_name, vocab_size=vocab, share_input_output_layers=not untied), f"preset {preset_name}"
        except ValueError as e:
            raise ConversionError(str(e)) from None
    layers = sorted({_layer_index(k) for k in shapes if k.startswith("transformer.layers.")})
    n = len(layers)
    if n == 0 or layers != list(range(n)):
        raise ConversionError(f"the checkpoint's layer indices {layers[:5]}... are not 0..N-1; it is incomplete.")
    hd = _dim(shapes, "transformer.layers.0.attn.q_norm.weight", 1, 0, "head_dim")
    q_heads, kv_heads, ffn = [], [], []
    for i in range(n):
        p = f"transformer.layers.{i}."
        qkv = _dim(shapes, p + "attn.qkv_proj.weight", 2, 0, "the qkv rows")
        out_in = _dim(shapes, p + "attn.out_proj.weight", 2, 1, "the query width")
        if out_in % hd or qkv % hd or (qkv // hd - out_in // hd) % 2 or qkv // hd - out_in // hd <= 0:
            raise ConversionError(f"layer {i}: qkv_proj rows ({qkv}) and out_proj columns ({out_in}) do not split "
                                  f"into query and key/value heads of head_dim {hd}; pass --preset, or the "
                                  "checkpoint is not OpenELM.")
        q_heads.append(out_in // hd)
        kv_heads.append((qkv // hd - out_in // hd) // 2)
        ffn.append(_dim(shapes, p + "ffn.proj_2.weight", 2, 1, "the FFN width"))
    for name, kw in PRESETS.items():
        if (kw["num_transformer_layers"], kw["model_dim"], kw["head_dim"]) == (n, d, hd):
            cand = preset(name, vocab_size=vocab, share_input_output_layers=not untied)
            if cand.num_query_heads == q_heads and cand.num_kv_heads == kv_heads and cand.ffn_dims == ffn:
                return cand, f"inferred preset {name}"
    # The standard layer-wise scaling rule for this (layers, width, head_dim): what corenet/HF build.
    try:
        std = ModelArgs(num_transformer_layers=n, model_dim=d, head_dim=hd, vocab_size=vocab,
                        share_input_output_layers=not untied)
        if std.num_query_heads == q_heads and std.num_kv_heads == kv_heads and std.ffn_dims == ffn:
            return std, f"inferred geometry ({n} layers, dim {d}, head_dim {hd}, standard scaling)"
    except (ValueError, ArithmeticError):
        pass
    divisor = 256 if all(f % 256 == 0 for f in ffn) else 8 if all(f % 8 == 0 for f in ffn) else 1
    try:
        args = ModelArgs(num_transformer_layers=n, model_dim=d, head_dim=hd, vocab_size=vocab,
                         num_query_heads=q_heads, num_kv_heads=kv_heads, ffn_multipliers=[f / d for f in ffn],
                         ffn_dim_divisor=divisor, share_input_output_layers=not untied)
    except (ValueError, ArithmeticError) as e:
        raise ConversionError(f"the checkpoint's shapes give no valid OpenELM geometry ({quote(str(e), 120)}); "
                              "pass --preset.") from e
    if args.ffn_dims != ffn:
        raise ConversionError(f"cannot express FFN widths {ffn} as OpenELM multipliers; pass --preset.")
    return args, f"inferred geometry ({n} layers, dim {d}, head_dim {hd}, custom per-layer widths)"


def _layer_index(name: str) -> int:
    """N of ``transformer.layers.N.<weight>``; anything else under transformer.layers is refused."""
    m = _LAYER.match(name)
    if m is None:
        raise ConversionError(f"tensor {plain(name)} is not named transformer.layers.<N>.<weight>; the checkpoint "
                              "is not a plain OpenELM checkpoint.")
    return int(m[1])


def _dim(shapes: Mapping[str, Shape], name: str, ndim: int, axis: int, what: str) -> int:
    """``shapes[name][axis]`` when the tensor exists with ``ndim`` dims and that size is positive."""
    shape = shapes.get(name)
    if shape is None or len(shape) != ndim or shape[axis] <= 0:
        raise ConversionError(f"cannot infer {what}: {name.removeprefix('transformer.')} has shape {quote(shape)}, "
                              f"not {ndim}-D with a positive size; the checkpoint is incomplete (or pass --preset).")
    return shape[axis]


def validate(shapes: Mapping[str, Shape], args: ModelArgs, where: str) -> None:
    """Every expected tensor present with its exact shape and nothing unknown; one-line errors."""
    want = expected_shapes(args)
    missing = [k for k in want if k not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConversionError(f"{where} is missing tensor(s) {', '.join(missing[:3])}{more}; "
                              "the checkpoint is incomplete, not OpenELM, or not the size given by --preset.")
    unknown = [k for k in shapes if k not in want]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ConversionError(f"{where} has unknown tensor(s) {', '.join(plain(k) for k in unknown[:3])}{more}; "
                              "it is not a plain OpenELM checkpoint (wrong --preset or another architecture?).")
    for k, s in want.items():
        if tuple(shapes[k]) != tuple(s):
            raise ConversionError(f"{where}: {k} has shape {tuple(shapes[k])} but the config needs {tuple(s)}; "
                                  "check --preset / config.json against the weights.")
