"""The README's Python example runs as written and prints what the README shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("From Python"):]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    return code, shown.strip()


def test_readme_python_example_is_the_one_call_api(embedded):
    code, shown = _python_example()
    assert "mlx_elm.generate(model, tokenizer" in code and len(code.strip().splitlines()) <= 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip() == shown
