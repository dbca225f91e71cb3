"""Lazy package exports: a name is imported from its module on first use.

Importing mlx-lm (and through it transformers) takes seconds, which `mlx-elm --help` and
`import mlx_elm.errors` should not pay; packages list their heavy exports and get them on demand.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, table: Dict[str, str], namespace: dict) -> Tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps a name to its module; the first
    lookup imports it and caches it in ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(list(namespace) + list(table))

    return __getattr__, __dir__
