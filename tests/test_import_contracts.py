"""The import contracts of pyproject.toml ([tool.importlinter]) hold: which way imports run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from needs import needs

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    needs("importlinter")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
