"""mlx-elm: an on-device ML toolkit for Apple silicon, built on MLX."""

__version__ = "0.1.0"

from mlx_elm.loading import load, load_with_info  # noqa: E402

__all__ = ["load", "load_with_info", "__version__"]
