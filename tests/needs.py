"""Optional test dependencies: skipped on a developer's machine without them, a failure in CI.

CI (``CI=true``, set by ``.ci/run``) installs the test extra, so a missing package there means the
install is broken, and skipping would hide every test that needs it.
"""

from __future__ import annotations

import importlib
import os

import pytest


def needs(module: str):
    """Import ``module`` or skip (locally) / fail (in CI) the importing test module."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is required in CI (pip install -e '.[test]'): {e}", pytrace=False)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")
