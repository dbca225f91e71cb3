"""Model architectures of mlx-elm, one file each, following mlx-lm's model protocol.

``MODEL_TYPES`` maps a config's ``model_type`` to the module that defines ``Model`` and
``ModelArgs``; ``mlx_elm.loading`` consults it before falling back to mlx-lm's own architectures.
Adding an architecture is one file here and one line in this table.
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

MODEL_TYPES = {
    "openelm": "mlx_elm.models.openelm",
}


def model_classes(model_type: str) -> Optional[Tuple[type, type]]:
    """``(Model, ModelArgs)`` for one of our model types, or None if it is not ours."""
    module = MODEL_TYPES.get(model_type)
    if module is None:
        return None
    mod = importlib.import_module(module)
    return mod.Model, mod.ModelArgs
