"""Measure `mlx-elm convert` on a random OpenELM-270M-shaped checkpoint, and the safe reader vs torch.load.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python examples/bench_convert.py --workdir /tmp/bench
    python examples/bench_convert.py --fast --workdir /tmp/bench-fast   # a 4-layer model in seconds (what the test runs)

Writes a corenet ``.pt`` (32128-row vocabulary, fp32) and an HF folder (fp32 safetensors), converts
each in a fresh subprocess (so peak memory is per conversion), then times reading the ``.pt`` with
the safe reader and with ``torch.load(weights_only=True)``. Deletes everything it wrote unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_sources(work: Path, fast: bool = False) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from convert.schema import expected_shapes
    from mlx_elm.models.openelm import preset

    args = preset("OpenELM-270M")
    if fast:  # the same layout, small enough to write and convert in seconds
        args = preset("OpenELM-270M", num_transformer_layers=4, model_dim=256, head_dim=32, vocab_size=512)
    rows = 640 if fast else 32128  # corenet pads the vocabulary; the converter trims it
    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name == "transformer.token_embeddings.weight":
            shape = (rows, shape[1])
        weights[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02)
    pt = work / "openelm-270m-corenet.pt"
    torch.save({k.removeprefix("transformer."): v for k, v in weights.items()}, pt)
    hf = work / "openelm-270m-hf"
    hf.mkdir()
    weights["transformer.token_embeddings.weight"] = weights["transformer.token_embeddings.weight"][: args.vocab_size].clone()
    save_file(weights, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(args.to_dict()))
    return pt, hf


CHILD = """
import sys, json
sys.path.insert(0, {root!r})
from convert import convert
r = convert({src!r}, {out!r}, dtype={dtype!r}, quantize={q}, progress=False)
print(json.dumps(dict(seconds=r.seconds, peak=r.peak_memory_bytes, bytes=r.bytes_written, params=r.parameters,
                      summary=r.summary())))
"""

READ = """
import sys, time, json
sys.path.insert(0, {root!r})
which = {which!r}
if which.startswith("safe"):
    import numpy as np
    from convert.safe_pickle import load_arrays
else:
    import torch
t = time.perf_counter()  # imports excluded: only the read is timed
if which == "safe-mmap":  # numpy views on the memory-mapped file
    sd = load_arrays({pt!r})
elif which == "safe-copy":  # every tensor copied into memory, like torch.load
    sd = {{k: np.array(v, copy=True) for k, v in load_arrays({pt!r}).items()}}
elif which == "torch-mmap":
    sd = torch.load({pt!r}, weights_only=True, map_location="cpu", mmap=True)
else:
    sd = torch.load({pt!r}, weights_only=True, map_location="cpu")
seconds = time.perf_counter() - t
n = sum(v.nbytes if hasattr(v, "nbytes") else v.numel() * v.element_size() for v in sd.values())
print(json.dumps(dict(seconds=seconds, bytes=n)))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-elm-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--fast", action="store_true", help="a 4-layer, 256-wide model (seconds; what the test runs)")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=False)
    try:
        t = time.perf_counter()
        pt, hf = make_sources(a.workdir, a.fast)
        print(f"sources written in {time.perf_counter() - t:.1f}s: {pt.stat().st_size / 1e9:.2f} GB .pt, "
              f"{(hf / 'model.safetensors').stat().st_size / 1e9:.2f} GB safetensors")
        for label, src in (("corenet .pt", pt), ("HF safetensors", hf)):
            for dtype, q in (("bfloat16", False), ("bfloat16", True)):
                out = a.workdir / f"out-{src.stem}-{dtype}-{q}"
                r = run(CHILD.format(root=str(ROOT), src=str(src), out=str(out), dtype=dtype, q=q))
                print(f"{label:15s} -> {dtype}{' 4-bit' if q else ''}: {r['seconds']:.1f}s, peak RSS "
                      f"{r['peak'] / 2**30:.2f} GiB, wrote {r['bytes'] / 2**20:.0f} MiB")
                shutil.rmtree(out)
        times = {}
        for which in ("safe-mmap", "safe-copy", "torch", "torch-mmap"):
            runs = [run(READ.format(root=str(ROOT), which=which, pt=str(pt))) for _ in range(a.repeats)]
            times[which] = min(r["seconds"] for r in runs)
            print(f"read all tensors of the .pt with {which:10s}: best of {a.repeats} {times[which]:.3f}s "
                  f"({runs[0]['bytes'] / 2**30:.2f} GiB)")
        print(f"copy into memory: safe reader / torch.load time ratio {times['safe-copy'] / times['torch']:.2f}; "
              f"memory-mapped: {times['safe-mmap'] / times['torch-mmap']:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
