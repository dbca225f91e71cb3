"""--verify: run the source in the PyTorch reference and the written folder in MLX on one probe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from convert.source import Source
from mlx_elm.errors import ConversionError

# The written folder is run with its weights upcast to float32 (so the check is about the
# conversion, not 16-bit arithmetic) against the reference run on the source weights rounded to
# the output dtype; quantized folders against the reference on their own dequantized weights.
# Max |logit difference| allowed, relative to max(1, max |reference logit|). A second run in the
# stored dtype must give finite logits (float16 overflow check).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-3, "float16": 1e-3}
QUANTIZED_FLOOR = 1e-3
PROBE = np.array([[1, 17, 3, 255, 42, 7, 99, 300, 5, 128, 64, 2]], dtype=np.int64)


def load_mlx(folder: Path, representation: str = "as-stored"):
    """The written model through mlx_elm's loader ("as-stored" or upcast to "float32")."""
    from mlx_elm.loading import load_model

    return load_model(Path(folder), representation=representation)[0]


def mlx_logits(folder: Path, tokens: np.ndarray, adapters: Optional[Path] = None,
               representation: str = "as-stored") -> np.ndarray:
    import mlx.core as mx

    model = load_mlx(folder, representation)
    if adapters is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, str(adapters))
    model.eval()
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def tolerance(dtype: str, bits: Optional[int]) -> float:
    return max(TOLERANCE[dtype], QUANTIZED_FLOOR) if bits else TOLERANCE[dtype]


def _round(t, dtype: str) -> np.ndarray:
    """A reference weight rounded to the output dtype the way torch casts (nearest even)."""
    import torch

    return t.to(getattr(torch, dtype)).float().numpy()


def dequantized_weights(folder: Path, group_size: int, bits: int) -> dict:
    """The float weights a quantized folder really holds, HF-named, as float32 numpy."""
    import mlx.core as mx

    raw = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        raw.update(mx.load(str(f)))
    out = {}
    for name, arr in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        if f"{module}.scales" in raw:
            arr = mx.dequantize(arr, raw[f"{module}.scales"], raw[f"{module}.biases"], group_size=group_size, bits=bits)
        out[name] = np.array(arr.astype(mx.float32))
    return out


def verify(source: Source, folder: Path, dtype: str, bits: Optional[int], lora_scale: float,
           adapters: Optional[Path] = None) -> Tuple[float, float]:
    """(max |Δlogit|, allowed); raises ConversionError when the difference exceeds the tolerance."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConversionError("--verify needs PyTorch for the reference model; pip install torch, "
                              "or drop --verify.") from None
    from convert.torch_reference import TorchOpenELM, from_source

    vocab = source.args.vocab_size
    tokens = PROBE % vocab
    reference = from_source(source, lora_scale)
    lora = {m: {k: v.numpy() for k, v in p.items()} for m, p in reference.lora.items()}
    if bits:
        group_size = json.loads((Path(folder) / "config.json").read_text())["quantization"]["group_size"]
        weights = dequantized_weights(folder, group_size, bits)
        lora = {m: p for m, p in lora.items() if m != "transformer.token_embeddings" and adapters is not None}
    else:
        # round what the folder should hold: base weights, with merged adapters folded in first
        # (the embedding adapter is always folded, see convert/lora.py)
        folded = reference.folded_weights()
        exported = set(lora) - {"transformer.token_embeddings"} if adapters is not None else set()
        keep = {f"{m}.weight" for m in exported}
        weights = {k: _round(reference.w[k] if k in keep else v, dtype) for k, v in folded.items()}
        lora = {m: p for m, p in lora.items() if m in exported}
    a = source.args
    ref = TorchOpenELM(weights, a.head_dim, a.rope_freq_constant, a.rms_norm_eps, lora, lora_scale)(tokens)[..., :vocab]
    got = mlx_logits(folder, tokens, adapters, representation="float32")
    stored = mlx_logits(folder, tokens, adapters, representation="as-stored")
    if not np.all(np.isfinite(stored)):
        raise ConversionError(f"--verify failed: the {dtype} folder produces non-finite logits (overflow); "
                              "use --dtype bfloat16. Nothing was written.")
    if got.shape != ref.shape:
        raise ConversionError(f"--verify: converted logits have shape {got.shape}, reference {ref.shape}.")
    diff = float(np.max(np.abs(got - ref)))
    allowed = tolerance(dtype, bits) * max(1.0, float(np.max(np.abs(ref))))
    if not np.isfinite(diff) or diff > allowed:
        raise ConversionError(f"--verify failed: max |logit difference| {diff:.3g} exceeds {allowed:.3g} "
                              f"for {dtype}{f' {bits}-bit' if bits else ''}; the conversion is wrong "
                              "(or float16 overflowed: use bfloat16). Nothing was written.")
    return diff, allowed
