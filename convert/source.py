"""The common form every reader produces: HF-named base tensors, model args, optional LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from convert.tensors import LazyTensor
from mlx_elm.models.openelm import ModelArgs


@dataclass
class LoraAdapter:
    """One corenet/peft adapter, in corenet's layout.

    linear: ``a`` [r, in], ``b`` [out, r], delta = scale * b @ a.
    embedding: ``a`` [r, vocab], ``b`` [dim, r], delta = scale * a.T @ b.T.
    DoRA adds ``magnitude`` [out] (linear only).
    """

    kind: str
    a: LazyTensor
    b: LazyTensor
    magnitude: Optional[LazyTensor] = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Source:
    """A checkpoint ready to convert: nothing read yet except names, shapes and config."""

    tensors: Dict[str, LazyTensor]
    args: ModelArgs
    kind: str
    location: str
    geometry: str = "config.json"
    lora: Dict[str, LoraAdapter] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
