"""Training an MoE model: the LM loss plus the MoE layers' auxiliary losses, with routing metrics.

Total loss = cross-entropy + alpha * sum over MoE layers of the balance loss + beta * sum of the
router z-losses (alpha, beta from the model config: ``balance_loss_weight`` 0.01 and
``z_loss_weight`` 0 by default). The auxiliary terms are added in training mode only, so
validation loss (and perplexity) is the plain cross-entropy. Per-layer routing scalars (load
entropy, largest share, dead experts, dropped fraction) are returned as metrics, which the loop
averages, logs and keeps in ``TrainResult.metrics``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_elm.models.moe import is_moe_layer, renormalize_routers, scalar_metrics, XMoERouter


def is_moe_model(model: nn.Module) -> bool:
    return any(is_moe_layer(m) for _, m in model.named_modules())


def moe_loss(balance_weight: Optional[float] = None, z_weight: Optional[float] = None,
             layer_metrics: bool = True) -> Callable:
    """A ``loss_fn(model, tokens, mask)`` for :func:`mlx_elm.train.loop.train`; weights default to
    the model config's."""

    def loss_fn(model: nn.Module, tokens: mx.array, mask: mx.array):
        logits, aux = model(tokens[:, :-1], return_aux=True)
        ce = (nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:]) * mask).sum()
        n = mask.sum()
        if not aux:
            return ce, n
        balance = sum(a["balance"] for a in aux)
        z = sum(a["z"] for a in aux)
        metrics = {"ce": ce / mx.maximum(n, 1), "balance_loss": balance, "z_loss": z}
        if layer_metrics:
            metrics.update(scalar_metrics(aux, getattr(model, "moe_layer_ids", range(len(aux)))))
        total = ce
        if model.training:  # validation reports the plain cross-entropy
            args = getattr(model, "args", None)
            wb = getattr(args, "balance_loss_weight", 0.01) if balance_weight is None else balance_weight
            wz = getattr(args, "z_loss_weight", 0.0) if z_weight is None else z_weight
            # the loop divides by the number of targets, so the auxiliary terms are scaled by it
            total = ce + n * (wb * balance + wz * z)
        return total, n, metrics

    return loss_fn


def training_hooks(model: nn.Module, balance_weight: Optional[float] = None,
                   z_weight: Optional[float] = None) -> Tuple[Optional[Callable], Optional[Callable]]:
    """``(loss_fn, on_step)`` for ``train`` when ``model`` has MoE layers, else ``(None, None)``.

    ``on_step`` rescales X-MoE routers' expert embeddings after each update, as the official
    code does before each forward.
    """
    if not is_moe_model(model):
        return None, None

    def rescale_routers(step, loss, metrics):
        renormalize_routers(model)

    has_xmoe = any(isinstance(m, XMoERouter) for _, m in model.named_modules())
    return moe_loss(balance_weight, z_weight), rescale_routers if has_xmoe else None
