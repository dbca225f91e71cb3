"""What the CRC-32 check costs: the same ~1 GB checkpoint read and converted with and without it.

    PYTHONPATH=. python tests/crc_cost.py --pt /tmp/bench/openelm-270m-corenet.pt --repeats 3 [--baseline DIR]

Without --pt it first writes a random OpenELM-270M-shaped corenet .pt (fp32, 1.09 GB) exactly as
``examples/bench_convert.py`` does. Each measurement is a fresh process, the variants (CRC, no
CRC) in turn so that a busy machine slows both alike; the best wall time and the best CPU time of
--repeats are reported.
``--baseline DIR`` adds a fourth variant: another checkout (e.g. the code before the CRC check).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys, time, json, resource
sys.path.insert(0, {root!r})
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
"""

READ = PRELUDE + """
from convert.safe_pickle import load_arrays
t, c = time.perf_counter(), cpu()
sd = load_arrays({pt!r}{kw})
print(json.dumps(dict(seconds=time.perf_counter() - t, cpu=cpu() - c)))
"""

CONVERT = PRELUDE + """
from convert import convert, lora, quantize, schema, writer  # imports outside the timed part
import mlx.core, tqdm, mlx_elm.models.openelm
t, c = time.perf_counter(), cpu()
r = convert({pt!r}, {out!r}, dtype="bfloat16", progress=False{kw})
print(json.dumps(dict(seconds=time.perf_counter() - t, cpu=cpu() - c)))
"""


ALONE = PRELUDE + """
from convert.safe_pickle import _TorchArchive
archive = _TorchArchive(__import__("pathlib").Path({pt!r}), True)
entries = [i for i in archive.zip.entries.values() if "/data/" in i.filename]
best = 1e9
for _ in range({repeats}):  # the first pass also pages the file in
    archive.zip._crcs.clear()
    t = time.perf_counter()
    for info in entries:
        archive.zip.storage(info)
    best = min(best, time.perf_counter() - t)
print(json.dumps(dict(seconds=best, bytes=sum(i.file_size for i in entries))))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pt", type=Path, help="an existing checkpoint (default: write the 270M-shaped one)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mlx-elm-crc-cost")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout to time alongside (its default options)")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    try:
        pt = a.pt
        if pt is None:
            sys.path.insert(0, str(ROOT / "examples"))
            from bench_convert import make_sources

            pt, _ = make_sources(a.workdir)
        print(f"{pt}: {pt.stat().st_size / 1e9:.2f} GB")
        alone = run(ALONE.format(root=str(ROOT), pt=str(pt), repeats=a.repeats + 1))
        print(f"the check alone (every storage entry's CRC-32, one process): best of {a.repeats + 1} passes "
              f"{alone['seconds']:.2f}s for {alone['bytes'] / 1e9:.2f} GB ({alone['bytes'] / 1e9 / alone['seconds']:.2f} "
              "GB/s)")
        variants = {"CRC (default)": (ROOT, True), "--no-check-crc": (ROOT, False)}
        if a.baseline:
            variants[f"baseline {a.baseline}"] = (a.baseline, None)
        for label, code in (("read every tensor (load_arrays)", READ), ("convert to bf16", CONVERT)):
            runs = {v: [] for v in variants}
            for i in range(a.repeats):
                for v, (root, crc) in variants.items():
                    out = a.workdir / f"out-{i}"
                    kw = "" if crc is None else f", check_crc={crc}"
                    runs[v].append(run(code.format(root=str(root), pt=str(pt), kw=kw, out=str(out))))
                    shutil.rmtree(out, ignore_errors=True)
            print(f"{label}, best of {a.repeats} (wall s / CPU s):")
            base = min(r["seconds"] for r in runs["--no-check-crc"])
            for v, rs in runs.items():
                wall, cpu = min(r["seconds"] for r in rs), min(r["cpu"] for r in rs)
                print(f"  {v:28s} {wall:6.2f} / {cpu:6.2f}   wall {wall - base:+.2f}s vs --no-check-crc; all walls "
                      f"{[round(r['seconds'], 2) for r in rs]}")
    finally:
        if a.pt is None:
            shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
