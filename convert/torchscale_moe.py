"""torchscale-style MH-MoE / SMoE decoder checkpoints (the official MH-MoE code's layout) → an
OpenELM-MoE model folder, read by the safe pickle reader (nothing in the file is executed).

Names, with or without fairseq's ``decoder.`` prefix (``--rename OLD=NEW`` rewrites others):

    embed_tokens.weight, output_projection.weight (optional: tied when absent), layer_norm.weight
    layers.{i}.self_attn.{q,k,v,out}_proj.weight, layers.{i}.self_attn_layer_norm.weight,
    layers.{i}.final_layer_norm.weight
    layers.{i}.ffn.{fc1,fc2,fc3}.weight                              dense SwiGLU fc2(fc1(x) * silu(fc3(x)))
    layers.{i}.moe_layer.gate.wg.weight                              plain router (E, d/h)
    layers.{i}.moe_layer.gate.wg_reduction.weight, ...gate.wg       X-MoE router (16, d/h), (E, 16)
    layers.{i}.moe_layer.experts.{j}.{fc1,fc2,fc3}.weight            SwiGLU experts of width d/h
    layers.{i}.moe_layer.head_proj.{weight,bias}, ...merge_proj.*    MH-MoE projections (names assumed)

Read from the shapes: width, vocabulary, blocks, which blocks are MoE (must be every k-th), the
number of MH-MoE heads (d / the router's input width), experts and widths. Not in the file, so
options: attention heads (default d / 64), top-k (default 1, the released script), capacity factor
(default 0 = dropless), rotary layout (``half`` or ``interleaved``, the latter converted exactly by
permuting q/k rows), RMSNorm epsilon (1e-5), an embedding scale (folded into the rows, the head
untied). Biases in attention or experts, or LayerNorm biases, are refused: the target has none.
fairseq training checkpoints that pickle an argparse/omegaconf config are refused by the safe
reader; save their state dict alone first (``torch.save(ckpt["model"], "model.pt")``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from convert.tensors import LazyTensor, to_float32
from mlx_elm.errors import ConversionError

ROPE_LAYOUTS = ("half", "interleaved")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^moe_layer\.experts\.(\d+)\.(fc[123])\.weight$")


def read_names(path: Path, check_crc: bool = True) -> Dict[str, LazyTensor]:
    """The checkpoint's tensors by name (torch zip via the safe reader, CRC-checked unless
    ``check_crc`` is False, or safetensors)."""
    from convert.corenet import unwrap
    from convert.safe_pickle import load_checkpoint
    from convert.safetensors_reader import read_safetensors

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    sd, _ = unwrap(load_checkpoint(path, check_crc=check_crc), path)
    return sd


def looks_like_torchscale(names: Sequence[str]) -> bool:
    return any(".moe_layer." in n or n.startswith(("decoder.layers.", "layers.")) and ".self_attn.q_proj." in n
               for n in names)


def normalize_names(sd: Mapping[str, LazyTensor], renames: Sequence[Tuple[str, str]] = ()) -> Dict[str, LazyTensor]:
    out = {}
    for name, t in sd.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name.removeprefix("decoder.")] = t
    return out


def infer_geometry(sd: Mapping[str, LazyTensor]) -> dict:
    """Everything the shapes say: width, blocks, MoE placement and the MoE layer's shape."""
    emb = sd.get("embed_tokens.weight")
    if emb is None or len(emb.shape) != 2:
        raise ConversionError("no 2-D embed_tokens.weight: this is not a torchscale decoder checkpoint "
                              "(use --format openelm for OpenELM, or --rename to map names)")
    vocab, d = emb.shape
    layers = sorted({int(m[1]) for m in map(_LAYER.match, sd) if m})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"layer indices {layers[:5]} are not 0..N-1; the checkpoint is incomplete")
    moe_ids = [i for i in layers if any(k.startswith(f"layers.{i}.moe_layer.") for k in sd)]
    if not moe_ids:
        raise ConversionError("no layers.*.moe_layer.* tensors: not an MoE checkpoint (dense torchscale "
                              "decoders are not supported; OpenELM checkpoints convert with --format openelm)")
    every = moe_ids[0] + 1
    if moe_ids != [i for i in layers if (i + 1) % every == 0]:
        raise ConversionError(f"MoE blocks {[i + 1 for i in moe_ids]} are not every k-th block; only the "
                              "official placement ((i + 1) % moe_freq == 0) is supported")
    p = f"layers.{moe_ids[0]}.moe_layer."
    if p + "gate.wg.weight" in sd:
        router, (experts, sub) = "linear", sd[p + "gate.wg.weight"].shape
    elif p + "gate.wg_reduction.weight" in sd and p + "gate.wg" in sd:
        router, sub, experts = "xmoe", sd[p + "gate.wg_reduction.weight"].shape[1], sd[p + "gate.wg"].shape[0]
    else:
        raise ConversionError(f"{p}gate has neither wg.weight nor wg_reduction.weight + wg; unknown router")
    if d % sub:
        raise ConversionError(f"router input width {sub} does not divide the model width {d}")
    fc1 = sd.get(p + "experts.0.fc1.weight")
    if fc1 is None:
        raise ConversionError(f"{p}experts.0.fc1.weight is missing; experts must be a list of SwiGLU FFNs")
    heads_moe = d // sub
    has_head, has_merge = p + "head_proj.weight" in sd, p + "merge_proj.weight" in sd
    ffn = []
    for i in layers:
        w = sd.get(f"layers.{i}.ffn.fc1.weight")
        ffn.append(int(w.shape[0]) if w is not None else int(fc1.shape[0]))
    return dict(vocab=int(vocab), dim=int(d), layers=len(layers), moe_ids=moe_ids, moe_every=every, router=router,
                experts=int(experts), moe_heads=heads_moe, expert_ffn=int(fc1.shape[0]), ffn=ffn,
                head=has_head, merge=has_merge, tied="output_projection.weight" not in sd)


def build_args(g: dict, heads: Optional[int], top_k: int, capacity_factor: float, norm_eps: float,
               rope_base: float, embed_scale: float):
    from mlx_elm.models.openelm_moe import ModelArgs

    d = g["dim"]
    heads = heads or (d // 64 if d % 64 == 0 else None)
    if not heads or d % heads:
        raise ConversionError(f"--heads {heads} does not divide the width {d}; pass the attention head count")
    divisor = 8 if all(f % 8 == 0 for f in g["ffn"]) else 1
    try:
        return ModelArgs(
            num_transformer_layers=g["layers"], model_dim=d, head_dim=d // heads, vocab_size=g["vocab"],
            num_query_heads=[heads] * g["layers"], num_kv_heads=[heads] * g["layers"],
            ffn_multipliers=[f / d for f in g["ffn"]], ffn_dim_divisor=divisor, normalize_qk_projections=False,
            share_input_output_layers=g["tied"] and embed_scale == 1.0, rms_norm_eps=norm_eps,
            rope_freq_constant=rope_base, moe_type="mhmoe" if g["moe_heads"] > 1 or g["head"] else "smoe",
            moe_every=g["moe_every"], num_experts=g["experts"], top_k=top_k, moe_heads=g["moe_heads"],
            expert_ffn_dim=g["expert_ffn"], router=g["router"], capacity_factor=capacity_factor,
            mhmoe_head=g["head"], mhmoe_merge=g["merge"])
    except ValueError as e:
        raise ConversionError(f"cannot express the checkpoint as OpenELM-MoE: {e}") from None


def _interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's output rows so rotary pairs (2i, 2i+1) become (i, i + hd/2)."""
    hd = w.shape[0] // heads
    order = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
    return w.reshape(heads, hd, -1)[:, order].reshape(w.shape)


def map_weights(sd: Mapping[str, LazyTensor], args, g: dict, rope: str, embed_scale: float) -> Dict[str, np.ndarray]:
    """Our names → float32 arrays; fails on any tensor it does not use."""
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise ConversionError(f"{name} is missing from the checkpoint; it is incomplete or uses other names "
                                  "(see --rename)")
        used.add(name)
        return to_float32(sd[name].load())

    heads = args.num_query_heads[0]
    out = {}
    emb = take("embed_tokens.weight")
    out["transformer.token_embeddings.weight"] = emb * embed_scale
    if not args.share_input_output_layers:
        out["lm_head.weight"] = take("output_projection.weight") if "output_projection.weight" in sd else emb
    out["transformer.norm.weight"] = take("layer_norm.weight")
    for i in range(args.num_transformer_layers):
        p, q = f"layers.{i}.", f"transformer.layers.{i}."
        wq, wk, wv = (take(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v"))
        if rope == "interleaved":
            wq, wk = _interleaved_to_half(wq, heads), _interleaved_to_half(wk, heads)
        out[q + "attn.qkv_proj.weight"] = np.concatenate([wq, wk, wv])
        out[q + "attn.out_proj.weight"] = take(p + "self_attn.out_proj.weight")
        out[q + "attn_norm.weight"] = take(p + "self_attn_layer_norm.weight")
        out[q + "ffn_norm.weight"] = take(p + "final_layer_norm.weight")
        if i not in g["moe_ids"]:
            out[q + "ffn.proj_1.weight"] = np.concatenate([take(p + "ffn.fc3.weight"), take(p + "ffn.fc1.weight")])
            out[q + "ffn.proj_2.weight"] = take(p + "ffn.fc2.weight")
            continue
        m = p + "moe_layer."
        inner = q + ("moe.moe." if args.moe_type == "mhmoe" else "moe.")
        for src, dst in (("head_proj", "head"), ("merge_proj", "merge")):
            if m + f"{src}.weight" in sd:
                out[q + f"moe.{dst}.weight"] = take(m + f"{src}.weight")
                out[q + f"moe.{dst}.bias"] = take(m + f"{src}.bias")
        if args.router == "linear":
            out[inner + "router.weight"] = take(m + "gate.wg.weight")
        else:
            out[inner + "router.reduce_weight"] = take(m + "gate.wg_reduction.weight")
            out[inner + "router.wg"] = take(m + "gate.wg")
        for fc, ours in (("fc3", "gate_proj"), ("fc1", "up_proj"), ("fc2", "down_proj")):
            out[inner + f"experts.{ours}.weight"] = np.stack(
                [take(m + f"experts.{e}.{fc}.weight") for e in range(args.num_experts)])
    unused = sorted(set(sd) - used)
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ConversionError(f"unsupported tensor(s) {', '.join(unused[:3])}{more} (biases, LayerNorm biases, extra "
                              "experts or unknown modules); the target model has no place for them")
    return out


def convert_torchscale_moe(source, out_dir, *, heads: Optional[int] = None, top_k: int = 1,
                           capacity_factor: float = 0.0, rope: str = "half", rope_base: float = 10000.0,
                           norm_eps: float = 1e-5, embed_scale: float = 1.0, dtype: str = "float32",
                           renames: Sequence[Tuple[str, str]] = (), tokenizer=None, verify: bool = False,
                           force: bool = False, progress: bool = True, quantize_bits: Optional[int] = None,
                           group_size: int = 64, check_crc: bool = True):
    """Convert one checkpoint; returns a ``convert.ConversionReport`` (verify: max |Δlogit|).

    ``quantize_bits`` (4 or 8) quantizes the experts, head/merge and attention with mlx-lm (routers
    stay in full precision); ``verify`` then checks the float mapping before quantization and notes
    how far the quantized folder is from the reference.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from convert import ConversionReport, peak_memory_bytes
    from mlx_elm.model_folder import DTYPES, write_model_folder
    from mlx_elm.models.openelm_moe import Model

    start = time.perf_counter()
    path = Path(source).expanduser()
    out = Path(out_dir)
    if not path.is_file():
        raise ConversionError(f"{source} is not a file; pass a torchscale .pt/.bin/.safetensors checkpoint")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it.")
    if rope not in ROPE_LAYOUTS:
        raise ConversionError(f"--rope {rope!r} must be one of {', '.join(ROPE_LAYOUTS)}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if top_k < 1 or capacity_factor < 0 or embed_scale <= 0:
        raise ConversionError("--top-k must be >= 1, --capacity-factor >= 0 and --embed-scale > 0")
    sd = normalize_names(read_names(path, check_crc), renames)
    g = infer_geometry(sd)
    if top_k > g["experts"]:
        raise ConversionError(f"--top-k {top_k} exceeds the checkpoint's {g['experts']} experts")
    args = build_args(g, heads, top_k, capacity_factor, norm_eps, rope_base, embed_scale)
    weights = map_weights(sd, args, g, rope, embed_scale)
    model = Model(args)
    want = {k: v.shape for k, v in tree_flatten(model.parameters())}
    for k, v in weights.items():
        if k not in want or tuple(want[k]) != v.shape:
            raise ConversionError(f"{k}: shape {v.shape} does not fit the model ({want.get(k)}); the checkpoint "
                                  "is inconsistent")
    model.load_weights([(k, mx.array(v).astype(DTYPES[dtype])) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    result, config = {}, args.to_dict()
    if quantize_bits is not None:
        from mlx_lm.utils import quantize_model

        if quantize_bits not in (4, 8):
            raise ConversionError(f"--bits {quantize_bits} is not supported; use 4 or 8")
        if verify:  # the mapping, checked in float before the (lossy) quantization
            result["verify"] = verify_model(sd, model, args, rope, embed_scale, dtype)
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize_bits)

    def check(folder: Path) -> None:  # runs on the complete folder before it is moved into place
        if verify and quantize_bits is None:
            result["verify"] = verify_folder(sd, folder, args, rope, embed_scale, dtype)
        elif verify:
            result["quantized"] = verify_folder(sd, folder, args, rope, embed_scale, dtype, allowed=float("inf"))[0]

    write_model_folder(out, model, config, tokenizer=str(tokenizer) if tokenizer else None, replace=force,
                       check=check)
    diff, allowed = result.get("verify", (None, None))
    files = sorted(p.name for p in out.iterdir())
    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    notes = [f"{len(g['moe_ids'])} MoE blocks of {g['experts']} experts, h {g['moe_heads']}, top-{top_k}, "
             f"router {g['router']}" + (", head/merge projections" if g["head"] else "")]
    if "quantized" in result:
        notes.append(f"{quantize_bits}-bit folder: max |Δlogit| {result['quantized']:.2e} (relative) against the "
                     "float reference; the float mapping passed --verify before quantization")
    return ConversionReport(out.absolute(), str(path), "torchscale MoE state_dict", sum(v.size for v in weights.values()),
                            written, time.perf_counter() - start, peak_memory_bytes(), files, diff, allowed, notes)


TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2, "float16": 1e-2}


def verify_folder(sd, folder: Path, args, rope: str, embed_scale: float, dtype: str,
                  allowed: Optional[float] = None) -> Tuple[float, float]:
    """Max |logit difference| (relative to the logit scale) of the folder, loaded by mlx_elm and
    upcast to float32, against the PyTorch reference on the checkpoint's own tensors."""
    from mlx_elm.loading import load_model

    return verify_model(sd, load_model(folder, representation="float32")[0], args, rope, embed_scale, dtype, allowed)


def verify_model(sd, model, args, rope: str, embed_scale: float, dtype: str,
                 allowed: Optional[float] = None) -> Tuple[float, float]:
    """:func:`verify_folder` on a model in memory."""
    import mlx.core as mx

    from convert.torchscale_reference import TorchscaleMoEReference

    hp = dict(heads=args.num_query_heads[0], top_k=args.top_k, capacity_factor=args.capacity_factor,
              norm_eps=args.rms_norm_eps, rope_base=args.rope_freq_constant, rope=rope, embed_scale=embed_scale)
    ref = TorchscaleMoEReference({k: to_float32(t.load()) for k, t in sd.items()}, hp)
    rng = np.random.default_rng(0)
    probe = rng.integers(0, args.vocab_size, size=(2, 12))
    want = ref(probe)
    got = np.array(model(mx.array(probe)).astype(mx.float32))
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got - want).max()) / scale
    allowed = TOLERANCE[dtype] if allowed is None else allowed
    if not diff <= allowed:
        raise ConversionError(f"--verify failed: max |Δlogit| {diff:.2e} (relative) exceeds {allowed:.0e}, so the "
                              "folder does not reproduce the checkpoint; nothing was written (please report it)")
    return diff, allowed


def parse_renames(items: Optional[List[str]]) -> List[Tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConversionError(f"--rename {item!r} must look like OLD=NEW")
        old, new = item.split("=", 1)
        out.append((old, new))
    return out
