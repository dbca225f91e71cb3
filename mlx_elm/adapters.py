"""LoRA / DoRA adapters on any model, in mlx-lm's file layout: where they go, how they are saved
and loaded. Loading an adapter is part of loading a model, so this lives in the core; training
(``mlx_elm.train``) only decides their values.

mlx-lm's ``LoRALinear``, ``DoRALinear``, ``LoRAEmbedding``, ``DoRAEmbedding`` and
``LoRASwitchLinear`` (MoE experts) do the math; this module decides *where* they go:

- ``targets`` are module-name suffixes (``qkv_proj``, ``self_attn.q_proj``), ``all-linear``, or
  ``embedding`` (the token embedding, which lives outside the transformer blocks);
- every requested target must match at least one module, and the modules that hold weights but
  were not adapted are reported, so nothing (e.g. expert layers) is skipped silently.

**An adapted embedding tied to the output head** (the one semantic difference between anchors):
- OpenELM (``embedding_head: "base"``): corenet computes logits with the *base* embedding weight
  (``F.linear(x, token_embeddings.weight)``, and its LoRA embedding's ``.weight`` is the base
  weight), so the adapter changes the inputs only. :class:`InputOnlyLoRAEmbedding` does the same,
  and fusing writes an untied ``lm_head.weight`` holding the base rows, as ``convert/lora.py`` does.
- every other model (``embedding_head: "adapted"``): mlx-lm's ``LoRAEmbedding.as_linear`` adds the
  adapter to the head as well, and fusing keeps the model tied, as ``mlx_lm.fuse`` does.
Adapter folders record which one they were trained with; a folder without the key was written by
mlx-lm or by mlx-elm 0.1, both of which used ``"adapted"``.

``adapter_config.json`` carries mlx-lm's fields (``fine_tune_type``, ``num_layers``,
``lora_parameters`` with ``rank``/``scale``/``dropout``/``keys``), so mlx-lm's ``load_adapters``
loads block-level adapters; an embedding adapter is listed under the extra key
``embedding_keys`` and needs :func:`load_adapters` from this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import TrainingError

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
EMBEDDING_TYPES = (nn.Embedding, nn.QuantizedEmbedding)
ADAPTER_TYPES = (LoRALinear, DoRALinear, LoRAEmbedding, DoRAEmbedding, LoRASwitchLinear)  # incl. subclasses
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
EMBEDDING_ALIASES = ("embedding", "embeddings", "token_embeddings", "embed_tokens", "wte", "tok_embeddings")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

# corenet's OpenELM recipe (openelm_lora_*.yaml): r 32, alpha 32, dropout 0.1, these modules.
OPENELM_TARGETS = ("embedding", "qkv_proj", "out_proj", "proj_1", "proj_2")
HEAD_BASE, HEAD_ADAPTED = "base", "adapted"


class InputOnlyLoRAEmbedding(LoRAEmbedding):
    """corenet's LoRA embedding: the adapter changes the looked-up inputs; a tied head reads the
    base weight."""

    @classmethod
    def from_base(cls, embedding: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        rows, dims = embedding.weight.shape
        if isinstance(embedding, nn.QuantizedEmbedding):
            dims = dims * 32 // embedding.bits
        adapter = cls(rows, dims, r=r, dropout=dropout, scale=scale)
        adapter.embedding = embedding
        return adapter

    def as_linear(self, x: mx.array) -> mx.array:
        return self.embedding.as_linear(x)


class InputOnlyDoRAEmbedding(DoRAEmbedding):
    """DoRA counterpart of :class:`InputOnlyLoRAEmbedding`."""

    @classmethod
    def from_base(cls, embedding: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        if isinstance(embedding, nn.QuantizedEmbedding):
            raise TrainingError("DoRA on a quantized embedding is not supported; use LoRA (drop --dora)")
        rows, dims = embedding.weight.shape
        adapter = cls(rows, dims, r=r, dropout=dropout, scale=scale)
        adapter.set_embedding(embedding)
        return adapter

    def as_linear(self, x: mx.array) -> mx.array:
        return self.embedding.as_linear(x)


INPUT_ONLY_TYPES = (InputOnlyLoRAEmbedding, InputOnlyDoRAEmbedding)


def embedding_head_semantics(model_type: str) -> str:
    """What a tied head reads once the embedding is adapted: the base rows (corenet, for OpenELM)
    or the adapted ones (mlx-lm, for everything else)."""
    return HEAD_BASE if model_type == "openelm" else HEAD_ADAPTED


@dataclass
class LoRAConfig:
    """Where adapters go and how big they are. ``scale = alpha / rank``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("all-linear",)
    num_layers: int = -1  # the last N blocks; -1 = all
    dora: bool = False
    embedding_head: str = HEAD_ADAPTED  # see the module docstring

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        if not 1 <= self.rank <= 4096:
            raise TrainingError(f"--rank must be in [1, 4096] (got {self.rank})")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise TrainingError(f"--alpha must be a finite number > 0 (got {self.alpha})")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise TrainingError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.num_layers < -1:
            raise TrainingError(f"--num-layers must be -1 (all) or a positive number (got {self.num_layers})")
        if not self.targets:
            raise TrainingError("--targets is empty; name modules such as qkv_proj,out_proj or all-linear")
        return self


def default_lora_config(model_type: str) -> LoRAConfig:
    """corenet's recipe for OpenELM; a common small-rank setting elsewhere."""
    if model_type == "openelm":
        return LoRAConfig(rank=32, alpha=32.0, dropout=0.1, targets=OPENELM_TARGETS,
                          embedding_head=embedding_head_semantics(model_type))
    return LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=("all-linear",))


def resolve_lora_config(model_type: str, rank: Optional[int] = None, alpha: Optional[float] = None,
                        dropout: Optional[float] = None, targets: Optional[Sequence[str]] = None,
                        num_layers: int = -1, dora: bool = False) -> LoRAConfig:
    """The model's defaults with the given options on top. With ``rank`` but no ``alpha``, the
    default *scale* is kept (OpenELM: alpha = rank, as corenet; others: alpha = 2 x rank)."""
    d = default_lora_config(model_type)
    r = rank if rank is not None else d.rank
    if alpha is None:
        alpha = d.alpha if rank is None else d.scale * r
    return LoRAConfig(rank=r, alpha=float(alpha), dropout=d.dropout if dropout is None else dropout,
                      targets=tuple(targets) if targets else d.targets, num_layers=num_layers, dora=dora,
                      embedding_head=d.embedding_head).validate()


def _adaptable(m: nn.Module) -> bool:
    return hasattr(m, "to_lora") or isinstance(m, LINEAR_TYPES + EMBEDDING_TYPES)


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _top_level_embeddings(model: nn.Module) -> List[str]:
    """Paths of embedding modules outside the transformer blocks (usually exactly one)."""
    layer_ids = {id(layer) for layer in model.layers}
    inside = set()
    for layer in model.layers:
        for _, m in layer.named_modules():
            inside.add(id(m))
    return [p for p, m in model.named_modules()
            if isinstance(m, EMBEDDING_TYPES + (LoRAEmbedding, DoRAEmbedding)) and id(m) not in inside
            and id(m) not in layer_ids]


@dataclass
class AdapterPlan:
    """The resolved placement: layer-local keys (mlx-lm's ``keys``) and top-level embeddings."""

    keys: List[str]
    embedding_keys: List[str]
    num_layers: int
    skipped: List[str] = field(default_factory=list)  # weight-holding modules left without adapter


def plan_adapters(model: nn.Module, cfg: LoRAConfig) -> AdapterPlan:
    """Resolve ``cfg.targets`` against the model, failing on a target that matches nothing."""
    n_total = len(model.layers)
    n = n_total if cfg.num_layers in (-1, 0) or cfg.num_layers > n_total else cfg.num_layers
    if cfg.num_layers < -1:
        raise TrainingError(f"--num-layers must be -1 (all) or a positive number (got {cfg.num_layers})")
    chosen = model.layers[n_total - n :]
    candidates = sorted({p for layer in chosen for p, m in layer.named_modules() if p and _adaptable(m)})
    keys, emb = set(), []
    for t in cfg.targets:
        t = t.strip()
        if t in ("all-linear", "all"):
            keys |= {p for layer in chosen for p, m in layer.named_modules()
                     if p and (hasattr(m, "to_lora") or isinstance(m, LINEAR_TYPES))}
            hit = True
        elif t in EMBEDDING_ALIASES:
            emb = _top_level_embeddings(model)
            hit = bool(emb)
        else:
            found = {p for p in candidates if _matches(p, t)}
            top = [p for p in _top_level_embeddings(model) if _matches(p, t)]
            emb = sorted(set(emb) | set(top))
            keys |= found
            hit = bool(found or top)
        if not hit:
            raise TrainingError(
                f"--targets {t!r} matches no module of this model; choose among: "
                f"{', '.join(sorted({c.rsplit('.', 1)[-1] for c in candidates}))}, embedding, all-linear"
            )
    # A parent and its child both matching (e.g. a module with to_lora holding Linears) → keep parent.
    keys = {k for k in keys if not any(k.startswith(o + ".") for o in keys)}
    linear_paths = {p for layer in chosen for p, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
    skipped = sorted(p for p in linear_paths
                     if p not in keys and not any(p.startswith(k + ".") for k in keys))
    return AdapterPlan(sorted(keys), emb, n, skipped)


def _make_adapter(m: nn.Module, cfg: LoRAConfig) -> nn.Module:
    kw = dict(r=cfg.rank, scale=cfg.scale, dropout=cfg.dropout)
    if not cfg.dora and hasattr(m, "to_lora"):
        return m.to_lora(**kw)
    if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
        return (DoRALinear if cfg.dora else LoRALinear).from_base(m, **kw)
    if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
        if cfg.dora:
            raise TrainingError("DoRA is not available for MoE expert layers; use LoRA (drop --dora)")
        return LoRASwitchLinear.from_base(m, **kw)
    if isinstance(m, EMBEDDING_TYPES):
        if cfg.embedding_head == HEAD_BASE:
            return (InputOnlyDoRAEmbedding if cfg.dora else InputOnlyLoRAEmbedding).from_base(m, **kw)
        if cfg.embedding_head != HEAD_ADAPTED:
            raise TrainingError(f"embedding_head {cfg.embedding_head!r} must be {HEAD_BASE!r} or {HEAD_ADAPTED!r}")
        return (DoRAEmbedding if cfg.dora else LoRAEmbedding).from_base(m, **kw)
    raise TrainingError(f"cannot put an adapter on a {type(m).__name__}")


def apply_adapters(model: nn.Module, cfg: LoRAConfig, plan: Optional[AdapterPlan] = None) -> AdapterPlan:
    """Freeze the model and wrap the planned modules; only adapter weights stay trainable."""
    cfg.validate()
    plan = plan or plan_adapters(model, cfg)
    model.freeze()
    n_total = len(model.layers)
    for layer in model.layers[n_total - plan.num_layers :]:
        mods = dict(layer.named_modules())
        updates = [(k, _make_adapter(mods[k], cfg)) for k in plan.keys if k in mods]
        if updates:
            layer.update_modules(tree_unflatten(updates))
    if plan.embedding_keys:
        mods = dict(model.named_modules())
        model.update_modules(tree_unflatten([(k, _make_adapter(mods[k], cfg)) for k in plan.embedding_keys]))
    return plan


def adapter_modules(model: nn.Module) -> List[str]:
    """Paths of all adapter modules in ``model`` (to count them)."""
    return [p for p, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def adapter_weights(model: nn.Module) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config_dict(cfg: LoRAConfig, plan: AdapterPlan, base_model: Optional[str] = None,
                        extra: Optional[dict] = None) -> dict:
    """mlx-lm's adapter_config.json fields plus ours (alpha, targets, embedding_keys, model)."""
    d = {
        "fine_tune_type": "dora" if cfg.dora else "lora",
        "num_layers": plan.num_layers,
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": plan.keys},
        "alpha": cfg.alpha,
        "targets": list(cfg.targets),
        "embedding_keys": plan.embedding_keys,
        "embedding_head": cfg.embedding_head,
        "model": base_model,
    }
    d.update(extra or {})
    return d


def save_adapters(model: nn.Module, folder: Path, config: dict) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), adapter_weights(model), metadata={"format": "mlx"})
    with atomic_file(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise TrainingError(f"{folder} has no {CONFIG_FILE}; pass the --adapter-path folder written by `mlx-elm lora`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path} is not valid JSON ({e.msg}); re-run training or fix the file") from None


def config_from_dict(d: dict) -> Tuple[LoRAConfig, AdapterPlan]:
    lp = d.get("lora_parameters", {})
    rank = int(lp.get("rank", 8))
    cfg = LoRAConfig(rank=rank, alpha=float(d.get("alpha", lp.get("scale", 1.0) * rank)),
                     dropout=float(lp.get("dropout", 0.0)), targets=tuple(d.get("targets", ("all-linear",))),
                     num_layers=int(d.get("num_layers", -1)), dora=d.get("fine_tune_type") == "dora",
                     embedding_head=d.get("embedding_head", HEAD_ADAPTED))
    keys = lp.get("keys")
    return cfg, AdapterPlan(list(keys) if keys is not None else [], list(d.get("embedding_keys", [])),
                            int(d.get("num_layers", -1)))


def load_adapters(model: nn.Module, folder, strict: bool = True) -> nn.Module:
    """Apply the adapters in ``folder`` (ours or mlx-lm's) to ``model`` and load their weights."""
    folder = Path(folder)
    d = read_adapter_config(folder)
    if d.get("fine_tune_type", "lora") == "full":
        raise TrainingError(f"{folder} holds a full fine-tune, not adapters; load it as a model folder")
    cfg, plan = config_from_dict(d)
    if plan.num_layers in (-1, 0) or plan.num_layers > len(model.layers):
        plan.num_layers = len(model.layers)
    if d.get("lora_parameters", {}).get("keys") is None:  # mlx-lm without keys: all linears
        plan = plan_adapters(model, LoRAConfig(cfg.rank, cfg.alpha, cfg.dropout, ("all-linear",),
                                               plan.num_layers, cfg.dora, cfg.embedding_head))
    apply_adapters(model, cfg, plan)
    weights = mx.load(str(folder / ADAPTER_FILE))
    params = {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    bad = [k for k, v in weights.items() if k not in params or params[k].shape != v.shape]
    if bad:
        raise TrainingError(f"{folder}/{ADAPTER_FILE} does not fit this model ({bad[0]}); was it trained on another base model?")
    missing = [k for k in params if k not in weights]
    if strict and missing:
        raise TrainingError(f"{folder}/{ADAPTER_FILE} lacks {missing[0]}; the file is incomplete, re-save it")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return model
