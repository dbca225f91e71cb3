"""Hostile or careless training input (issue 11, classes 8 and 10): one line each, no hang, no debris.

Each case is built here; each used to end in a traceback, a hang, or a torn resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlx_elm.errors import TrainingError
from mlx_elm.train.data import MAX_LINE_BYTES, read_jsonl

GOOD = b'{"text": "the sky is blue"}\n'
BAD_RECORDS = {
    "latin1": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8"),
    "lone_surrogate": (b'{"text": "a\\ud800b"}\n', "unpaired surrogate"),
    "deep_json": (b'{"text": "x", "y": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested too deeply"),
    "5000_digits": (b'{"text": "x", "n": ' + b"7" * 5000 + b"}\n", "number too long"),
    "huge_line": (b'{"text": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}\n', "longer than"),
    "not_an_object": (b"[1, 2, 3]\n", "expected a JSON object"),
    "binary": (bytes(range(128, 256)) + b"\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_is_one_line_naming_file_and_line(tmp_path, name):
    data, needle = BAD_RECORDS[name]
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + data)
    t0 = time.perf_counter()
    with pytest.raises(TrainingError, match=needle) as e:
        read_jsonl(path)
    assert time.perf_counter() - t0 < 10  # the 10 MB line used to take 15 s and 1.9 GB
    assert "\n" not in str(e.value) and "line 2" in str(e.value)


def test_a_folder_or_a_fifo_named_train_jsonl_is_refused_without_hanging(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").mkdir()
    with pytest.raises(TrainingError, match="not a regular file"):
        read_jsonl(tmp_path / "a" / "train.jsonl")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(error=_catch(read_jsonl, fifo)), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO hung")
    assert isinstance(result["error"], TrainingError) and "not a regular file" in str(result["error"])


def _catch(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects what came out
        return e
    return None


# --- checkpoints and debris (class 10) ---------------------------------------------------------


def _lora(cli, model, data, out, *extra):
    return cli("lora", "--model", model, "--data", data, "--adapter-path", out, "--iters", "4", "--batch-size", "4",
               "--save-every", "2", "--steps-per-eval", "0", "--learning-rate", "3e-3", *extra)


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory, spm_model_path):
    from mlx_elm.train.tiny import make_tiny_openelm, write_text_data

    root = tmp_path_factory.mktemp("hostile_lora")
    return make_tiny_openelm(root / "model", spm_model_path), write_text_data(root / "data", n_train=16, n_valid=0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(cli, lora_inputs, tmp_path):
    model, data = lora_inputs
    out = tmp_path / "ad"
    assert _lora(cli, model, data, out).code == 0
    ck = out / "checkpoints"
    assert [p.name for p in sorted(ck.iterdir())] == ["step_0000002", "step_0000004"]
    (ck / "step_0000004" / "weights.safetensors").write_bytes(b"\x00" * 7)  # torn by a crash
    (ck / "step_abc").mkdir()  # not ours: ignored, not a traceback
    res = _lora(cli, model, data, out, "--resume")
    assert res.code == 0, res.stderr
    assert "step_0000004 is damaged" in res.stderr and "trying the previous checkpoint" in res.stderr


@pytest.mark.parametrize("damage", ["empty_state", "string_step", "missing_weights"])
def test_every_damaged_checkpoint_is_one_line(cli, lora_inputs, tmp_path, damage):
    model, data = lora_inputs
    out = tmp_path / "ad"
    assert _lora(cli, model, data, out).code == 0
    for step in (out / "checkpoints").iterdir():
        if damage == "empty_state":
            (step / "state.json").write_text("")
        elif damage == "string_step":
            state = json.loads((step / "state.json").read_text())
            (step / "state.json").write_text(json.dumps(dict(state, step="six")))
        else:
            (step / "weights.safetensors").unlink()
    res = _lora(cli, model, data, out, "--resume")
    assert res.code == 1 and "every checkpoint" in res.error_lines[-1] and "Traceback" not in res.stderr


def test_debris_of_a_killed_writer_is_swept_and_a_live_writers_is_kept(cli, lora_inputs, tmp_path):
    model, data = lora_inputs
    out = tmp_path / "ad"
    ck = out / "checkpoints"
    ck.mkdir(parents=True)
    dead = ck / f".step_0000006.tmp-{_dead_pid()}-0123abcd"
    live = ck / f".step_0000008.tmp-{os.getppid()}-0123abcd"
    for d in (dead, live):
        d.mkdir()
        (d / "weights.safetensors").write_bytes(b"partial")
    adapter_tmp = out / f".adapters.safetensors.tmp-{_dead_pid()}-89abcdef.tmp.safetensors"
    adapter_tmp.write_bytes(b"partial")
    assert _lora(cli, model, data, out).code == 0
    assert not dead.exists() and live.exists() and not adapter_tmp.exists()


def test_a_refused_run_leaves_no_adapter_folder(cli, lora_inputs, tmp_path):
    model, data = lora_inputs
    res = cli("lora", "--model", model, "--data", data, "--adapter-path", tmp_path / "ad", "--batch-size", "999")
    errors = [line for line in res.error_lines if line.startswith("error:")]
    assert res.code == 1 and len(errors) == 1 and "--batch-size" in errors[0]
    assert not (tmp_path / "ad").exists()


def test_convert_force_onto_a_file_is_refused_not_replaced(cli, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    res = cli("convert", tmp_path / "missing.pt", target, "--force")
    assert res.code == 1 and len(res.error_lines) == 1
    assert target.read_text() == "keep me" and not list(tmp_path.glob(".a_file*"))


def test_killed_conversion_debris_is_removed_by_the_next_run(tmp_path):
    """A conversion killed with SIGKILL leaves its temporary folder; the next one removes it."""
    from mlx_elm.atomic import atomic_folder

    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mlx_elm.atomic import atomic_folder\n"
        f"with atomic_folder({str(out)!r}) as tmp:\n"
        "    (tmp / 'partial').write_text('x'); print(tmp, flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    tmp = Path(child.stdout.readline().strip())
    assert tmp.exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert tmp.exists()  # kill -9: nobody cleaned up
    with atomic_folder(out) as new:
        (new / "done").write_text("y")
    assert not tmp.exists() and (out / "done").exists() and not (out / "partial").exists()
    shutil.rmtree(out)
