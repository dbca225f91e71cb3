"""mlx-elm: an on-device ML toolkit for Apple silicon, built on MLX.

>>> import mlx_elm
>>> model, tokenizer = mlx_elm.load()                       # the embedded SmolLM2-135M-Instruct
>>> mlx_elm.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64)
"""

from mlx_elm.lazy import lazy_exports

__version__ = "0.3.0"

__all__ = ["load", "load_with_info", "generate", "stream_generate", "__version__"]

# The top-level functions are imported on first use: importing mlx-lm (and through it
# transformers) takes seconds, which `mlx-elm --help` and `import mlx_elm.errors` should not pay.
_LAZY = {"load": "mlx_elm.loading", "load_with_info": "mlx_elm.loading",
         "generate": "mlx_elm.generation", "stream_generate": "mlx_elm.generation"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
