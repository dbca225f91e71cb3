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
    "openelm_moe": "mlx_elm.models.openelm_moe",
}


def preset_config(name: str, **overrides) -> dict:
    """The config dict of a named preset of any of our architectures (``OpenELM-270M``,
    ``tiny-mhmoe-h2``, ...); ValueError naming every family's presets when none matches."""
    problems = []
    for module in MODEL_TYPES.values():
        mod = importlib.import_module(module)
        if not hasattr(mod, "preset"):
            continue
        try:
            return mod.preset(name, **overrides).to_dict()
        except ValueError as e:
            problems.append(str(e).rstrip("."))
    raise ValueError("; ".join(problems))


def model_classes(model_type: str) -> Optional[Tuple[type, type]]:
    """``(Model, ModelArgs)`` for one of our model types, or None if it is not ours."""
    module = MODEL_TYPES.get(model_type)
    if module is None:
        return None
    mod = importlib.import_module(module)
    return mod.Model, mod.ModelArgs
