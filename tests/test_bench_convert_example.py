"""The conversion benchmark's fast mode runs end to end (its figures are not asserted: speed is a bench's job)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from needs import needs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_convert_fast_mode(tmp_path):
    needs("torch")
    needs("safetensors")
    work = tmp_path / "bench"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_convert.py"), "--fast", "--repeats", "1",
                          "--workdir", str(work)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^(corenet \.pt|HF safetensors)\s+-> bfloat16( 4-bit)?: [\d.]+s", out.stdout, re.M)
    assert len(rows) == 4, out.stdout
    for which in ("safe-mmap", "safe-copy", "torch", "torch-mmap"):
        assert f"with {which}" in out.stdout
    assert not work.exists()  # everything it wrote is deleted unless --keep
