"""mlx-elm: an on-device ML toolkit for Apple silicon, built on MLX.

>>> import mlx_elm
>>> model, tokenizer = mlx_elm.load()                       # the embedded SmolLM2-135M-Instruct
>>> mlx_elm.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64)
"""

__version__ = "0.2.0"

from mlx_elm.generation import generate, stream_generate  # noqa: E402
from mlx_elm.loading import load, load_with_info  # noqa: E402

__all__ = ["load", "load_with_info", "generate", "stream_generate", "__version__"]
