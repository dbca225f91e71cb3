"""Per-tensor affine quantization with MLX, deciding up front which tensors are quantized.

Only the four projection matrices of each layer and (if the user chooses) the tied embedding /
untied head are quantized; norms stay in the float dtype. The config records the embedding choice
explicitly so loaders never guess (the cause of mlx-examples #819 / mlx-swift-examples #65).
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import mlx.core as mx

from mlx_elm.errors import ConversionError

LINEAR_SUFFIXES = ("attn.qkv_proj.weight", "attn.out_proj.weight", "ffn.proj_1.weight", "ffn.proj_2.weight")
EMBEDDING_KEYS = ("transformer.token_embeddings.weight", "lm_head.weight")


def should_quantize(name: str, quantize_embedding: bool) -> bool:
    if name in EMBEDDING_KEYS:
        return quantize_embedding
    return name.endswith(LINEAR_SUFFIXES)


def check_shapes(shapes: Iterable[Tuple[str, Tuple[int, ...]]], group_size: int, quantize_embedding: bool) -> None:
    """Fail before writing if a quantized tensor's input width is not a multiple of the group size."""
    for name, shape in shapes:
        if should_quantize(name, quantize_embedding) and shape[-1] % group_size:
            raise ConversionError(f"{name} has input width {shape[-1]}, not a multiple of --group-size "
                                  f"{group_size}; choose a group size that divides it.")


def quantize_tensor(name: str, w: mx.array, bits: int, group_size: int) -> Dict[str, mx.array]:
    """``{module.weight, module.scales, module.biases}`` for one matrix (mlx-lm layout)."""
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    module = name[: -len(".weight")]
    return {f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases}


def config_entry(bits: int, group_size: int, quantize_embedding: bool, untied_head: bool) -> dict:
    """The ``quantization`` block of config.json, with per-module opt-outs mlx-lm understands."""
    q: dict = {"group_size": group_size, "bits": bits}
    if not quantize_embedding:
        q["transformer.token_embeddings"] = False
        if untied_head:
            q["lm_head"] = False
    return q
