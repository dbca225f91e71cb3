"""Fuzzing the GGUF reader of the embedded default: a project error or success, never a traceback,
a signal or a hang, and never a broken model published to the cache.

The tests run the validator on every mutant in one worker process that reports case by case (a
crash there is seen and the worker restarted), then hand each accepted mutant to ``mx.load``, and
take a sample through the whole default-model build into a temporary cache.

The whole campaign (every structure-aware mutant through a full build, one process each, with a
later run on the resulting cache), the figures quoted in the issue:

    PYTHONPATH=$PWD python tests/test_fuzz_gguf.py --full [--code-root OLD_CHECKOUT] [--out FILE]
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixtures import (  # noqa: E402
    BUILD_WORKER, LATER_RUN_WORKER, Mutant, Outcome, byte_flip_mutants, real_gguf_path, run_worker,
    structure_mutants, walk, worker_env,
)

EMBEDDED_FOLDER = "SmolLM2-135M-Instruct-v1"
BYTE_FLIPS = int(os.environ.get("MLX_ELM_FUZZ_FLIPS", "60"))  # seeded; raise it for a longer run
CASE_TIMEOUT = 60.0

# Reads the original once, then for each case index from argv[3]: applies the mutant in memory,
# validates it, and hands an accepted one to mx.load from a scratch file. "START i" before a case
# and "DONE i [kind, detail]" after it let the parent see which case a crash or hang belongs to.
VALIDATE_WORKER = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from gguf_fixtures import Mutant
from mlx_elm.errors import MlxElmError
from mlx_elm.gguf import validate_gguf_bytes
shared = bytearray(Path(sys.argv[1]).read_bytes())  # patched in place and restored: no copies
cases = json.loads(Path(sys.argv[2]).read_text())
scratch = Path(sys.argv[5])
for i in range(int(sys.argv[3]), len(cases)):
    c = cases[i]
    m = Mutant(c["name"], [(o, bytes.fromhex(h)) for o, h in c["patches"]], c["truncate"])
    print(f"START {i}", flush=True)
    saved = [(o, bytes(shared[o:o + len(d)])) for o, d in m.patches]
    try:
        buf = m.apply(shared) if m.truncate is not None else m.apply_in_place(shared)
        validate_gguf_bytes(buf, "mutant.gguf")
        scratch.write_bytes(buf)
        import mlx.core as mx
        weights = mx.load(str(scratch))
        result = ["accepted", f"{len(weights)} arrays"]
    except MlxElmError as e:
        result = ["refused", str(e)]
    except BaseException as e:
        result = ["traceback", f"{type(e).__name__}: {str(e)[:300]}"]
    finally:
        for o, d in saved:
            shared[o:o + len(d)] = d
    print(f"DONE {i} " + json.dumps(result), flush=True)
'''


def _encode(mutants: List[Mutant]) -> List[dict]:
    return [{"name": m.name, "patches": [(o, d.hex()) for o, d in m.patches], "truncate": m.truncate}
            for m in mutants]


def _pump(stream, lines: "queue.Queue[Optional[str]]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_validator_cases(mutants: List[Mutant], original: Path, workdir: Path,
                        timeout: float = CASE_TIMEOUT) -> List[Outcome]:
    """Every mutant through the validator (and accepted ones through ``mx.load``) in one worker,
    restarted after a crash or a hang, so one bad case cannot hide the others."""
    cases = workdir / "cases.json"
    cases.write_text(json.dumps(_encode(mutants)))
    results: Dict[int, Outcome] = {}
    start = 0
    while start < len(mutants):
        proc = subprocess.Popen(
            [sys.executable, "-c", VALIDATE_WORKER, str(original), str(cases), str(start),
             str(Path(__file__).resolve().parent), str(workdir / "scratch.gguf")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(workdir), env=worker_env())
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, t0 = None, time.monotonic()
        while True:
            try:
                line = lines.get(timeout=max(0.1, timeout - (time.monotonic() - t0)))
            except queue.Empty:
                proc.kill()
                results[current if current is not None else start] = Outcome("hang", f"> {timeout} s")
                break
            if line is None:
                proc.wait()
                if current is not None:
                    results[current] = Outcome("crash", f"signal {-proc.returncode}"
                                               if proc.returncode < 0 else f"exit {proc.returncode}",
                                               proc.stderr.read()[-2000:])
                break
            if line.startswith("START "):
                current, t0 = int(line.split()[1]), time.monotonic()
            elif line.startswith("DONE "):
                _, i, rest = line.split(" ", 2)
                kind, detail = json.loads(rest)
                results[int(i)] = Outcome(kind, detail, seconds=time.monotonic() - t0)
                current = None
        proc.wait()
        start = max(results) + 1 if results else start + 1
    return [results.get(i, Outcome("crash", "never ran")) for i in range(len(mutants))]


def build_case(mutant: Mutant, original: bytes, original_path: Path, workdir: Path,
               env: Optional[dict] = None, later: bool = True, timeout: float = 300) -> Outcome:
    """A full default-model build from the mutant into a fresh cache; an accepted one is then used
    by a later run (with the intact wheel file), which must work: a broken cache is a failure."""
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)
    path = workdir / "mutant.gguf"
    path.write_bytes(mutant.apply(original))
    try:
        out = run_worker(BUILD_WORKER, [str(path), str(home)], timeout, env)
        published = (home / "models" / EMBEDDED_FOLDER).exists()
        if out.kind == "refused" and published:
            out.kind = "refused but published"
        if out.kind == "accepted" and later:
            run = run_worker(LATER_RUN_WORKER, [str(original_path), str(home)], timeout, env)
            out.detail = f"later run: {run.kind}: {run.detail}"
            if run.kind != "ok":
                out.kind = "published broken"
        return out
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)


def one_line_and_escaped(message: str) -> bool:
    return message.isprintable() and "\n" not in message


# ------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def layout():
    path = real_gguf_path()
    return path, walk(path.read_bytes())


@pytest.fixture(scope="module")
def validator_run(layout, tmp_path_factory):
    """The intact file, every structure mutant and the seeded byte flips through one worker
    (one interpreter start-up and one read of the 98 MB file for all of them)."""
    path, lay = layout
    seed = int(os.environ.get("MLX_ELM_FUZZ_SEED", "11"))
    groups = {"intact": [Mutant("intact")], "structure": structure_mutants(lay),
              "flips": byte_flip_mutants(lay, BYTE_FLIPS, seed=seed)}
    everything = [m for ms in groups.values() for m in ms]
    outcomes = iter(run_validator_cases(everything, path, tmp_path_factory.mktemp("fuzz")))
    return {name: (ms, [next(outcomes) for _ in ms]) for name, ms in groups.items()}


@pytest.fixture(scope="module")
def structure_outcomes(validator_run):
    return validator_run["structure"]


def _check(mutants: List[Mutant], outcomes: List[Outcome]) -> Counter:
    bad = [(m.name, o) for m, o in zip(mutants, outcomes) if o.kind not in ("refused", "accepted")]
    assert not bad, f"{len(bad)} cases neither refused nor accepted, e.g. {bad[:3]}"
    noisy = [(m.name, o.detail) for m, o in zip(mutants, outcomes)
             if o.kind == "refused" and not one_line_and_escaped(o.detail)]
    assert not noisy, f"refusals that are not one escaped line: {noisy[:3]}"
    return Counter(o.kind for o in outcomes)


@pytest.mark.slow
def test_structure_mutants_are_refused_or_load_cleanly(structure_outcomes):
    mutants, outcomes = structure_outcomes
    counts = _check(mutants, outcomes)
    kinds = {m.name: o.kind for m, o in zip(mutants, outcomes)}
    # what the audit saw crash, raise, or get cached
    for name in ("tensor count 0 (zero tensors)", "embedding_length stored as float 576.0",
                 "llama.embedding_length retyped 4->6", "tensor count +1", "metadata count -1",
                 "string general.architecture length 1", "tensor middle ndim 3",
                 "llama.attention.head_count = 0", "tensor middle type 0->1"):
        assert kinds[name] == "refused", name
    assert counts["refused"] >= len(mutants) - 5, counts


@pytest.mark.slow
def test_random_header_byte_flips_are_refused_or_load_cleanly(validator_run):
    _check(*validator_run["flips"])


@pytest.mark.slow
def test_the_intact_file_passes_the_validator(validator_run):
    [outcome] = validator_run["intact"][1]
    assert outcome.kind == "accepted", outcome


@pytest.mark.slow
def test_accepted_mutants_are_harmless_and_refused_ones_leave_no_cache(structure_outcomes, layout, tmp_path):
    """Every mutant the validator lets through goes through the whole build and a later run that
    must still answer; a sample of refused ones must leave the cache empty."""
    path, _ = layout
    mutants, outcomes = structure_outcomes
    accepted = [m for m, o in zip(mutants, outcomes) if o.kind == "accepted"]
    refused = [m for m in mutants if m.name in ("tensor count 0 (zero tensors)",
                                                 "llama.embedding_length retyped 4->6")]
    original = path.read_bytes()
    for m in accepted + refused:
        out = build_case(m, original, path, tmp_path)
        assert out.kind in ("refused", "accepted"), (m.name, out)
        if out.kind == "accepted":
            assert "Paris" in out.detail, (m.name, out.detail)
        else:
            assert m in refused and one_line_and_escaped(out.detail), (m.name, out.detail)


# ------------------------------------------------------------------------------- campaign

def main(argv: List[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every structure mutant through a full build")
    p.add_argument("--code-root", help="PYTHONPATH for the workers (an older checkout)")
    p.add_argument("--limit", type=int, default=0, help="only the first N mutants")
    p.add_argument("--byte-flips", type=int, default=0, help="also N seeded random byte flips")
    p.add_argument("--out", help="write one JSON line per case here")
    args = p.parse_args(argv)
    from mlx_elm.platform import maybe_reexec_with_fast_blas

    maybe_reexec_with_fast_blas()
    path = real_gguf_path()
    original = path.read_bytes()
    lay = walk(original)
    mutants = structure_mutants(lay) + byte_flip_mutants(lay, args.byte_flips, seed=11)
    mutants = mutants[: args.limit] if args.limit else mutants
    env = worker_env(args.code_root)
    out = open(args.out, "w") if args.out else None
    counts: Counter = Counter()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gguf-campaign-") as tmp:
        work = Path(tmp)
        if args.full:
            ref = build_case(Mutant("intact"), original, path, work, env)
            print(f"intact file: {ref.kind} ({ref.detail})", flush=True)
            outcomes = []
            for i, m in enumerate(mutants):
                o = build_case(m, original, path, work, env)
                if o.kind == "accepted" and o.detail != ref.detail:
                    o.kind = "accepted, output differs"
                outcomes.append(o)
                print(f"[{i + 1}/{len(mutants)}] {o.kind:>16}  {m.name}  {o.detail[:150]!r}", flush=True)
        else:
            outcomes = run_validator_cases(mutants, path, work)
        for m, o in zip(mutants, outcomes):
            counts[o.kind] += 1
            if out:
                out.write(json.dumps({"name": m.name, "kind": o.kind, "detail": o.detail}) + "\n")
    print(f"{len(mutants)} cases in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
