"""The KV-cache policies by name: what each one is, which options it reads, and how to build it.

Everything that used to match a policy name (option checks, cache construction, ``--verbose``
descriptions, CLI help) reads this table, so adding a policy is one entry here and one module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

from mlx_elm.errors import KVCacheError
from mlx_elm.kv.base import CompressingKVCache, KeepAllCache
from mlx_elm.kv.snapkv import SnapKVCache
from mlx_elm.kv.streaming import StreamingCache

POOLS = ("max", "avg")
KV_BITS = (4, 8)
MAX_ROWS = 2**31 - 1


@dataclass(frozen=True)
class KVOptions:
    """Every option any policy reads; each policy uses the subset its ``PolicySpec`` names."""

    policy: str = "full"
    capacity: Optional[int] = None  # rows kept per head, window included
    window: int = 32  # SnapKV observation window
    kernel: int = 7  # SnapKV pooling kernel (odd; 1 = none)
    pool: str = "max"
    per_query_head: bool = False
    sinks: int = 4  # StreamingLLM attention sinks
    bits: Optional[int] = None  # quantize the cache after the prompt
    group_size: int = 64

    def validate(self) -> "KVOptions":
        """Raise ``KVCacheError`` (one line: problem and fix) for inconsistent options."""
        spec = policy_spec(self.policy)
        for name in ("capacity", "window", "kernel", "sinks"):
            value = getattr(self, name)
            if value is not None and not -1 < value <= MAX_ROWS:
                raise KVCacheError(f"--kv-{name} must be in [0, {MAX_ROWS}] (got {value})")
        if self.bits is not None and self.bits not in KV_BITS:
            raise KVCacheError(f"--kv-bits must be 4 or 8 (got {self.bits}); omit it for a float cache")
        if self.group_size not in (32, 64, 128):
            raise KVCacheError(f"KV group size must be 32, 64 or 128 (got {self.group_size})")
        if "capacity" in spec.options and (self.capacity is None or self.capacity <= 0):
            raise KVCacheError(f"--kv-capacity must be a positive number of rows per head for policy {self.policy!r}")
        for check in spec.checks:
            check(self)
        return self

    def describe(self) -> str:
        """``C=128 W=16 kernel=7 pool=max`` for the options this policy uses."""
        spec = policy_spec(self.policy)
        labels = {"capacity": "C", "window": "W", "kernel": "kernel", "pool": "pool", "sinks": "sinks"}
        parts = [f"{labels[o]}={getattr(self, o)}" for o in spec.options if o in labels]
        if "per_query_head" in spec.options and self.per_query_head:
            parts.append("per-query-head")
        if self.bits:
            parts.append(f"bits={self.bits}")
        return " ".join(parts)


def _check_snapkv(o: KVOptions) -> None:
    if o.window <= 0:
        raise KVCacheError(f"--kv-window must be >= 1 (got {o.window})")
    if o.capacity <= o.window:
        raise KVCacheError(f"--kv-capacity ({o.capacity}) must exceed --kv-window ({o.window}): capacity counts the "
                           "window; raise the capacity or shrink the window")
    if o.kernel <= 0 or o.kernel % 2 == 0:
        raise KVCacheError(f"--kv-kernel must be odd and >= 1 (got {o.kernel}); 1 means no pooling")
    if o.pool not in POOLS:
        raise KVCacheError(f"--kv-pool must be max or avg (got {o.pool!r})")


def _check_streaming(o: KVOptions) -> None:
    if not 0 <= o.sinks < o.capacity:
        raise KVCacheError(f"sink count ({o.sinks}) must be in [0, --kv-capacity={o.capacity})")


@dataclass(frozen=True)
class PolicySpec:
    """One policy: its cache class, the options it reads, and whether it needs attention queries."""

    name: str
    description: str
    build: Callable[[KVOptions], CompressingKVCache]
    options: Tuple[str, ...] = ()
    checks: Tuple[Callable[[KVOptions], None], ...] = ()
    needs_queries: bool = False  # attention-guided: the model (or a query tap) hands it queries


POLICIES: Dict[str, PolicySpec] = {
    spec.name: spec
    for spec in (
        PolicySpec("full", "keep every row (with --kv-bits: quantize them after the prompt)",
                   lambda o: KeepAllCache(o.bits, o.group_size)),
        PolicySpec("snapkv", "keep the prompt rows the last W prompt tokens attend to most (SnapKV)",
                   lambda o: SnapKVCache(o.capacity, o.window, o.kernel, o.pool, o.per_query_head, o.bits,
                                         o.group_size),
                   options=("capacity", "window", "kernel", "pool", "per_query_head"), checks=(_check_snapkv,),
                   needs_queries=True),
        PolicySpec("streaming", "keep the first `sinks` rows and the most recent ones (StreamingLLM)",
                   lambda o: StreamingCache(o.capacity, o.sinks, o.bits, o.group_size),
                   options=("capacity", "sinks"), checks=(_check_streaming,)),
    )
}


def policy_spec(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise KVCacheError(f"unknown KV policy {name!r}; use one of {', '.join(POLICIES)}") from None


def options(policy: str = "full", **kwargs) -> KVOptions:
    """Validated options from keywords (``capacity=..., window=...``)."""
    return replace(KVOptions(policy=policy), **kwargs).validate()


def help_text() -> str:
    """One line per policy, for ``--kv-policy`` help."""
    return "; ".join(f"{s.name}: {s.description}" for s in POLICIES.values())
