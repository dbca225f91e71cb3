"""Data parallelism with MLX's own distributed layer (``mx.distributed``, started by ``mlx.launch``).

Every process holds the whole model, reads its own slice of each global batch, and sums its
*unnormalised* gradients and target-token counts with the others; dividing the sum by the global
token count gives exactly the gradient of the mean loss over the combined batch, so N processes
take the same step as one process with the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map


@dataclass
class World:
    group: Optional[Any]
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(backend: str = "any") -> World:
    """The process group set up by ``mlx.launch`` (a singleton group when run directly)."""
    try:
        group = mx.distributed.init(strict=False, backend=backend)
    except TypeError:  # older mlx without keyword arguments
        group = mx.distributed.init()
    return World(group, group.rank(), group.size())


def all_sum(tree, world: World):
    """Sum a tree of arrays over all processes (identity for one process).

    All leaves travel in one flat float32 buffer: one collective per step instead of one per
    tensor, which is what makes the ring backend fast enough over TCP.
    """
    if world.size == 1:
        return tree
    leaves = [v for _, v in tree_flatten(tree)]
    if not leaves:
        return tree
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for v in leaves])
    flat = mx.distributed.all_sum(flat, group=world.group)
    pieces, offset = [], 0
    for v in leaves:
        pieces.append(flat[offset: offset + v.size].reshape(v.shape).astype(v.dtype))
        offset += v.size
    summed = iter(pieces)
    return tree_map(lambda _: next(summed), tree)  # same structure, empty containers included
