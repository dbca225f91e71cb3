"""Every notebook in ``examples/notebooks`` runs top to bottom in its fast setting, like code.

Each ``*.ipynb`` found there is executed with nbclient in a fresh ``python3`` kernel that runs
this interpreter (``sys.executable``) and imports this checkout (``PYTHONPATH``), with
``MLX_ELM_FAST=1``, ``MLX_ELM_NOTEBOOK_OUT`` = a temporary folder and a temporary working folder.
A cell error or a cell running past ``CELL_TIMEOUT`` fails the test. Notebooks that load the
embedded model (metadata ``mlx_elm.embedded_model``, or a ``mlx_elm.load()`` call) are ``slow``
and reuse the session's converted copy of it. A separate fast check refuses notebooks committed
with outputs or execution counts.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import pytest

from needs import needs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = int(os.environ.get("MLX_ELM_NOTEBOOK_CELL_TIMEOUT", "180"))  # seconds per cell
FAST_CELL = 'FAST = os.environ.get("MLX_ELM_FAST") == "1"'
# mlx_elm.load() / load_with_info() with no model argument: the embedded default model
EMBEDDED_CALL = re.compile(r"\bmlx_elm\.load(_with_info)?\(\s*\)|\bload_with_info\(\s*(None)?\s*[,)]")


def read_json(path: Path) -> dict:
    """The notebook as plain JSON (the output check needs no notebook packages)."""
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def uses_embedded_model(nb: dict) -> bool:
    """The notebook's own flag when it has one, else whether its code loads the default model."""
    flag = nb.get("metadata", {}).get("mlx_elm", {}).get("embedded_model")
    if flag is not None:
        return bool(flag)
    return any(EMBEDDED_CALL.search(source(c)) for c in code_cells(nb))


def _params():
    for path in NOTEBOOKS:
        marks = [pytest.mark.slow] if uses_embedded_model(read_json(path)) else []
        yield pytest.param(path, marks=marks, id=path.stem)


# --- fast checks: what is committed ----------------------------------------------------------
def test_the_capability_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"generate", "snapkv", "lora", "ays", "ngram"} <= names, names


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = read_json(path)
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; strip them with "
                       f"`jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)}`")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_notebook_follows_the_conventions(path):
    """First code cell reads FAST and names OUT; every saved figure goes under OUT."""
    cells = code_cells(read_json(path))
    assert cells, f"{path.name} has no code cell"
    first = source(cells[0])
    assert FAST_CELL in first, f"{path.name}: the first code cell must set {FAST_CELL}"
    assert 'os.environ.get("MLX_ELM_NOTEBOOK_OUT"' in first, \
        f"{path.name}: the first code cell must name OUT from MLX_ELM_NOTEBOOK_OUT"
    saves = [m for c in cells for m in re.findall(r"savefig\(([^,)]*)", source(c))]
    assert all(s.strip().startswith("OUT") for s in saves), f"{path.name}: figures saved outside OUT: {saves}"


# --- executing them --------------------------------------------------------------------------
def _kernel_dir(tmp_path: Path, env: dict) -> Path:
    """A ``python3`` kernelspec that runs this interpreter with ``env`` on top of ours."""
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mlx-elm tests)", "language": "python", "env": env}))
    return spec.parent


def _displayed_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(_params()))
def test_notebook_runs_in_fast_mode(path, tmp_path, request):
    nbformat = needs("nbformat")
    nbclient = needs("nbclient")
    needs("ipykernel")
    needs("matplotlib")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    if uses_embedded_model(read_json(path)):
        request.getfixturevalue("embedded")  # converted once into this session's MLX_ELM_HOME (or skip)
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = {"MLX_ELM_FAST": "1", "MLX_ELM_NOTEBOOK_OUT": str(out),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(_kernel_dir(tmp_path, env))]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        client.execute(cleanup_kc=True)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran past {CELL_TIMEOUT} s in fast mode: {e}", pytrace=False)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in fast mode:\n{e}", pytrace=False)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} s CPU (kernel)")

    pngs = sorted(out.glob("*.png")) if out.exists() else []
    assert pngs, f"{path.name} saved no figure under MLX_ELM_NOTEBOOK_OUT"
    assert _displayed_images(nb) <= len(pngs), \
        f"{path.name} shows {_displayed_images(nb)} figures but saved {len(pngs)}: save each one to OUT"


@pytest.mark.slow
def test_kernel_runs_this_interpreter_and_checkout(tmp_path):
    """The kernel the notebook tests start is this Python, importing this checkout's mlx_elm."""
    nbformat = needs("nbformat")
    nbclient = needs("nbclient")
    needs("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    env = {"MLX_ELM_FAST": "1", "PYTHONPATH": str(ROOT)}
    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(_kernel_dir(tmp_path, env))]))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys, mlx_elm; print(sys.executable); print(mlx_elm.__file__); print(os.environ['MLX_ELM_FAST'])")])
    nbclient.NotebookClient(nb, km=km, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute(cleanup_kc=True)
    lines = "".join(o.get("text", "") for o in nb.cells[0].outputs).split()
    assert Path(lines[0]).resolve() == Path(sys.executable).resolve()
    assert Path(lines[1]).resolve() == (ROOT / "mlx_elm" / "__init__.py").resolve()
    assert lines[2] == "1"
