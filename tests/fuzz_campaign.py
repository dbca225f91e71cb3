"""Tally how the converter meets hostile checkpoints: seeded cases for each audit class of issue 11.

    PYTHONPATH=. python tests/fuzz_campaign.py                 # this checkout
    PYTHONPATH=. python tests/fuzz_campaign.py --code /tmp/old  # the same cases against other code

Every case runs in a worker process that imports the code under ``--code`` (so the same cases can
be run before and after a fix), with its address space limited and a per-case timeout. Outcomes:

- refused: an ``MlxElmError`` whose message is one printable line
- bad-message: an ``MlxElmError`` whose message spans lines or carries raw control bytes
- accepted: read (or converted) without error, values identical to the valid file's
- accepted-changed: an in-place edit of the valid file read without error, with other values (silent corruption)
- traceback: any other exception; hang: over the timeout; crash: the worker died (a signal)
- memory: MemoryError under the address-space limit, or more than 512 MiB of RSS growth
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_checkpoints as H  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEMORY_GROWTH = 512 << 20
# families that edit the bytes of the valid file in place (CRCs left as they were): reading other
# values from one of these is silent corruption. The others build a new, self-consistent file.
EDITED = {"random byte mutation", "zip header field", "bit flip in stored tensor bytes", "bit flip in data.pkl",
          "random bytes in the header"}

WORKER = r"""
import hashlib, json, os, re, resource, shutil, sys, tempfile, traceback
import numpy as np
import mlx.core as mx
import convert
from convert.safe_pickle import load_arrays
from convert.safetensors_reader import read_safetensors
from mlx_elm.errors import MlxElmError

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + int(os.environ["FUZZ_AS_EXTRA"]), hard))

def digest(obj):
    # iterative and once per shared object: a deep or memo-shared result must not hang the worker
    h, seen, todo = hashlib.sha256(), {}, [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            h.update(b"@%d" % seen[id(o)]); continue
        seen[id(o)] = len(seen)
        if isinstance(o, np.ndarray):
            h.update(str((o.dtype, o.shape)).encode()); h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, dict):
            h.update(b"{%d" % len(o)); todo.extend(x for kv in reversed(list(o.items())) for x in reversed(kv))
        elif isinstance(o, (list, tuple)):
            h.update(type(o).__name__.encode() + b"%d" % len(o)); todo.extend(reversed(o))
        elif isinstance(o, (set, frozenset)):
            h.update(type(o).__name__.encode() + repr(sorted(map(repr, o)))[:1000].encode())
        else:
            h.update(type(o).__name__.encode() + repr(o)[:1000].encode())
    return h.hexdigest()

def run(kind, path):
    if kind == "pt-read":
        return digest(load_arrays(path))
    if kind == "st-read":
        return digest({k: v.load() for k, v in read_safetensors(path).items()})
    out = tempfile.mkdtemp(prefix="fuzz-out-")
    try:
        convert.convert(path, os.path.join(out, "m"), dtype="float32", progress=False)
        files = sorted(p for p in os.listdir(os.path.join(out, "m")) if p.endswith(".safetensors"))
        return digest([open(os.path.join(out, "m", p), "rb").read() for p in files])
    finally:
        shutil.rmtree(out, ignore_errors=True)

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmHWM")
    try:
        res = {"outcome": "accepted", "digest": run(req["kind"], req["path"])}
    except MlxElmError as e:
        msg = str(e)
        ok = "\n" not in msg and "\r" not in msg and msg.isprintable()
        res = {"outcome": "refused" if ok else "bad-message", "detail": ascii(msg[:300])}
    except MemoryError:
        res = {"outcome": "memory", "detail": "MemoryError"}
    except BaseException as e:
        res = {"outcome": "traceback", "detail": ascii(f"{type(e).__name__}: {str(e)[:200]}")}
    res["rss_growth"] = status("VmHWM") - base
    print(json.dumps(res), flush=True)
"""


class Worker:
    """One long-lived worker; replaced after a hang or a crash."""

    def __init__(self, code: Path, extra_as: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(code), FUZZ_AS_EXTRA=str(extra_as), MLX_ELM_NO_BLAS_PRELOAD="1")
        self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, text=True, cwd=tempfile.gettempdir())
        assert json.loads(self.p.stdout.readline())["ready"]

    def run(self, kind: str, path: str, timeout: float) -> dict:
        self.p.stdin.write(json.dumps({"kind": kind, "path": path}) + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return {"outcome": "hang"}
        line = self.p.stdout.readline()
        if not line:
            code = self.p.wait()
            return {"outcome": "crash", "detail": f"worker exit {code}"}
        return json.loads(line)

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()


# --- the cases -------------------------------------------------------------------------------------

Case = Tuple[str, str, str, bytes]  # (class, label, kind, file bytes)


def _pt_cases_malformed(rng: random.Random, n: int) -> Iterator[Case]:
    base = H.checkpoint(H.small_arrays())
    for i in range(n):
        yield "1 malformed archive", "random byte mutation", "pt-read", H.mutate_bytes(base, rng)
    for i in range(n * 2 // 3):
        yield "1 malformed archive", "zip header field", "pt-read", H.mutate_zip_field(base, rng)
    entries = H.state_dict_entries(H.small_arrays())
    pkl = entries[0].data
    for i in range(n * 2 // 3):
        yield "1 malformed archive", "pickle opcode mutation", "pt-read", H.with_pickle(entries, H.mutate_pickle(pkl, rng))


def _tensor_file(size, stride, offset=0, numel=None, name="w", dtype=np.float32, n_store=24) -> bytes:
    store = np.arange(n_store, dtype=dtype)
    node = H.tensor_node("0", H.STORAGE[np.dtype(dtype).name], n_store if numel is None else numel, size, stride, offset)
    entries = H.pickle_entries(H.dumps(H.ODict(((name, node),))))
    return H.torch_zip(entries + [H.Entry("archive/data/0", store.tobytes())])


def _openelm_file(change) -> bytes:
    arrays = H.tiny_openelm_arrays()
    change(arrays)
    return H.checkpoint(arrays)


def _schema_changes() -> Iterator[Tuple[str, callable]]:
    def put(k, v):
        return lambda a: a.__setitem__(k, v)

    def pop(k):
        return lambda a: a.pop(k)

    z = np.zeros
    yield "layer name not a number", put("layers.x.attn_norm.weight", z(64, np.float32))
    yield "layer name empty index", put("layers.", z(64, np.float32))
    yield "layer name no index", put("layers", z(64, np.float32))
    yield "layer index negative", put("layers.-1.attn_norm.weight", z(64, np.float32))
    yield "layer index unicode digit", put("layers.\u0663.attn_norm.weight", z(64, np.float32))
    yield "layer index huge", put("layers.99999999999.attn_norm.weight", z(64, np.float32))
    yield "layer index leading zero", put("layers.01.attn_norm.weight", z(64, np.float32))
    yield "q_norm scalar", put("layers.0.attn.q_norm.weight", np.float32(1.0) * np.ones((), np.float32))
    yield "q_norm zero head dim", put("layers.0.attn.q_norm.weight", z(0, np.float32))
    yield "q_norm head dim 7", put("layers.0.attn.q_norm.weight", z(7, np.float32))
    yield "q_norm head dim 2-D", put("layers.0.attn.q_norm.weight", z((16, 2), np.float32))
    yield "q_norm head dim 64", put("layers.0.attn.q_norm.weight", z(64, np.float32))
    yield "negative kv heads", put("layers.0.attn.qkv_proj.weight", z((16, 64), np.float32))
    yield "zero query heads", put("layers.0.attn.out_proj.weight", z((64, 0), np.float32))
    yield "qkv scalar", put("layers.0.attn.qkv_proj.weight", np.ones((), np.float32))
    yield "qkv 1-D", put("layers.0.attn.qkv_proj.weight", z(96, np.float32))
    yield "out_proj 1-D", put("layers.0.attn.out_proj.weight", z(64, np.float32))
    yield "proj_2 zero width", put("layers.1.ffn.proj_2.weight", z((64, 0), np.float32))
    yield "proj_2 odd width", put("layers.1.ffn.proj_2.weight", z((64, 13), np.float32))
    yield "embedding scalar", put("token_embeddings.weight", np.ones((), np.float32))
    yield "embedding 1-D", put("token_embeddings.weight", z(32, np.float32))
    yield "embedding zero width", put("token_embeddings.weight", z((32, 0), np.float32))
    yield "embedding zero rows", put("token_embeddings.weight", z((0, 64), np.float32))
    yield "embedding 3-D", put("token_embeddings.weight", z((2, 32, 64), np.float32))
    yield "no q_norm", pop("layers.0.attn.q_norm.weight")
    yield "no layers", lambda a: [a.pop(k) for k in list(a) if k.startswith("layers.")]
    yield "lora on 1-D base", lambda a: a.update({"norm.lora_A.x.weight": z((2, 64), np.float32),
                                                   "norm.lora_B.x.weight": z((64, 2), np.float32)})
    yield "lora scalar A", lambda a: a.update({"layers.0.ffn.proj_2.lora_A.x.weight": np.ones((), np.float32),
                                               "layers.0.ffn.proj_2.lora_B.x.weight": z((64, 2), np.float32)})
    yield "lora rank 0", lambda a: a.update({"layers.0.ffn.proj_2.lora_A.x.weight": z((0, 128), np.float32),
                                             "layers.0.ffn.proj_2.lora_B.x.weight": z((64, 0), np.float32)})
    yield "int8 weights", put("layers.0.attn_norm.weight", z(64, np.int8))


def _cases_metadata(rng: random.Random, n: int) -> Iterator[Case]:
    c = "2 lying metadata"
    entries = H.state_dict_entries(H.small_arrays())
    pkl = entries[0].data
    ints = [(p, q) for o, _, p, q in H.op_spans(pkl) if o.name in ("BININT1", "BININT2", "BININT")]
    for i in range(n):
        pos, end = rng.choice(ints)
        mutated = pkl[:pos] + H._int(rng.choice(H.HOSTILE_INTS)) + pkl[end:]
        yield c, "hostile int in the pickle", "pt-read", H.with_pickle(entries, mutated)
    yield c, "tensor metadata: stride 2**62 on a size-1 dim", "pt-read", _tensor_file((1, 4), (2**62, 1))
    yield c, "tensor metadata: stride 2**62 on a size-1 dim (3-D)", "pt-read", _tensor_file((2, 1, 3), (3, 2**62, 1))
    yield c, "tensor metadata: stride 2**63-1 on a size-1 dim", "pt-read", _tensor_file((1,), (2**63 - 1,))
    yield c, "tensor metadata: stride 2**64 on a size-1 dim", "pt-read", _tensor_file((1, 2), (2**64, 1))
    yield c, "tensor metadata: negative stride", "pt-read", _tensor_file((2, 3), (-3, 1))
    yield c, "tensor metadata: negative size", "pt-read", _tensor_file((-2, 3), (3, 1))
    yield c, "tensor metadata: size 2**62 x 0", "pt-read", _tensor_file((2**62, 0), (1, 1))
    yield c, "tensor metadata: size 0 x 2**64", "pt-read", _tensor_file((0, 2**64), (1, 1))
    yield c, "tensor metadata: offset 2**62", "pt-read", _tensor_file((2,), (1,), offset=2**62)
    yield c, "tensor metadata: offset -1", "pt-read", _tensor_file((2,), (1,), offset=-1)
    yield c, "tensor metadata: numel -1", "pt-read", _tensor_file((2,), (1,), numel=-1)
    yield c, "tensor metadata: numel 2**62", "pt-read", _tensor_file((2,), (1,), numel=2**62)
    yield c, "tensor metadata: 65 dims", "pt-read", _tensor_file((1,) * 65, (1,) * 65)
    yield c, "tensor metadata: 33 dims", "pt-read", _tensor_file((1,) * 33, (1,) * 33)
    yield c, "tensor metadata: bool as size", "pt-read", _tensor_file((True, 3), (3, 1))
    for label, change in _schema_changes():
        yield c, "schema: " + label, "convert", _openelm_file(change)
    for label, shape in (("negative head dim", [-16]), ("negative model dim", None), ("float dim", [16.5]),
                         ("bool dim", [True]), ("string dim", ["16"]), ("huge dim", [2**70])):
        arrays = {"transformer." + k: v for k, v in H.tiny_openelm_arrays().items()}
        header, data = H.safetensors_file(arrays)
        if shape is None:
            header["transformer.token_embeddings.weight"]["shape"] = [-32, -64]
        else:
            header["transformer.layers.0.attn.q_norm.weight"]["shape"] = shape
        yield c, "safetensors schema: " + label, "convert", H.safetensors_bytes(header, data)


def _cases_hangs() -> Iterator[Case]:
    c = "3 hangs"
    w = np.arange(6, dtype=np.float32)
    t = H.tensor_node("0", "FloatStorage", 6, (6,), (1,))
    for depth in (40, 100):
        bomb = H.hash_bomb(depth)
        yield c, f"hash bomb depth {depth}: dict key", "pt-read", H.hostile_pickle_file({"w": t, bomb: 1}, {"w": w})
        yield c, f"hash bomb depth {depth}: OrderedDict key", "pt-read", \
            H.hostile_pickle_file(H.ODict((("w", t), (bomb, 1))), {"w": w})
        yield c, f"hash bomb depth {depth}: set()", "pt-read", \
            H.hostile_pickle_file({"w": t, "s": H.Reduce(H.Global("builtins", "set"), ([bomb],))}, {"w": w})
        yield c, f"hash bomb depth {depth}: frozenset opcode", "pt-read", \
            H.hostile_pickle_file({"w": t, "s": H.Raw(b"\x80\x04(" + bomb.data + b"\x91")}, {"w": w})
        yield c, f"hash bomb depth {depth}: in a persistent id", "pt-read", \
            H.hostile_pickle_file({"w": H.PersId(("storage", bomb))}, {"w": w})
        yield c, f"hash bomb depth {depth}: as a value", "pt-read", H.hostile_pickle_file({"w": t, "v": bomb}, {"w": w})
        yield c, f"hash bomb depth {depth}: as a state_dict key", "convert", \
            H.hostile_pickle_file({"w": t, bomb: t}, {"w": w})
    for depth in (10**5, 3 * 10**5):
        yield c, f"tuple nested {depth} deep: dict key", "pt-read", H.hostile_pickle_file({H.deep_tuple(depth): 1})
        yield c, f"tuple nested {depth} deep: value", "pt-read", H.hostile_pickle_file({"v": H.deep_tuple(depth)})
    yield c, "list nested 10**5 deep", "pt-read", H.hostile_pickle_file({"v": H.Raw(b"]" + b"(]" * 10**5 + b"e" * 10**5)})
    yield c, "10 MB global name", "pt-read", H.hostile_pickle_file({"w": H.Global("os", "x" * 10**7)})
    yield c, "10 MB persistent id", "pt-read", H.hostile_pickle_file({"w": H.PersId("x" * 10**7)})


def _cases_memory() -> Iterator[Case]:
    c = "4 memory amplification"
    emb = H.tensor_node("0", "FloatStorage", 1024, (2**21, 1024), (0, 1))
    yield c, "stride-0 embedding declaring 8 GiB", "pt-read", \
        H.hostile_pickle_file(H.ODict((("token_embeddings.weight", emb),)), {"e": np.zeros(1024, np.float32)})
    arrays = H.tiny_openelm_arrays()
    sd = []
    for i, (k, a) in enumerate(arrays.items()):
        if k == "token_embeddings.weight":
            sd.append((k, H.tensor_node(str(i), "FloatStorage", 64, (2**21, 64), (0, 1))))
        else:
            sd.append((k, H.tensor_node(str(i), "FloatStorage", a.size, a.shape, H.contiguous_strides(a.shape))))
    stores = [H.Entry(f"archive/data/{i}", (a.reshape(-1)[:64] if k == "token_embeddings.weight" else a).tobytes())
              for i, (k, a) in enumerate(arrays.items())]
    yield c, "OpenELM with a stride-0 512 MiB embedding", "convert", \
        H.torch_zip(H.pickle_entries(H.dumps(H.ODict(tuple(sd)))) + stores)
    many = tuple((f"t{i}", H.tensor_node("0", "FloatStorage", 16, (2**22, 16), (0, 1))) for i in range(64))
    yield c, "64 stride-0 tensors of 256 MiB over one storage", "pt-read", \
        H.hostile_pickle_file(H.ODict(many), {"e": np.zeros(16, np.float32)})
    for gib in (1,):
        blob, crc = H.deflated_zeros(gib << 30)
        node = H.tensor_node("0", "FloatStorage", (gib << 30) // 4, ((gib << 30) // 4,), (1,))
        entries = H.pickle_entries(H.dumps(H.ODict((("w", node),))))
        entries.append(H.Entry("archive/data/0", blob, method=8, crc=crc, usize=gib << 30, raw=True))
        yield c, f"deflated {gib} GiB storage", "pt-read", H.torch_zip(entries)
    blob, crc = H.deflated_zeros(256 << 20)
    entries = H.pickle_entries(b"")
    entries[0] = H.Entry("archive/data.pkl", blob, method=8, crc=crc, usize=256 << 20, raw=True)
    yield c, "deflated 256 MiB data.pkl", "pt-read", H.torch_zip(entries)
    blob, crc = H.deflated_zeros(2 << 30)
    entries = H.pickle_entries(H.dumps({"a": 1}))
    entries[1] = H.Entry("archive/byteorder", blob, method=8, crc=crc, usize=2 << 30, raw=True)
    yield c, "deflated 2 GiB byteorder entry", "pt-read", H.torch_zip(entries)
    good = H.checkpoint(H.small_arrays())
    big = bytearray(good)
    for f in H.zip_fields(good):
        if f.what in ("central.csize", "central.usize"):
            big[f.offset: f.offset + 4] = (2**32 - 1).to_bytes(4, "little")
    yield c, "every entry claims 4 GiB", "pt-read", bytes(big)
    eocd = bytearray(good)
    cd = [f for f in H.zip_fields(good) if f.what == "eocd.cd_size"][0]
    eocd[cd.offset: cd.offset + 4] = (2**32 - 1).to_bytes(4, "little")
    yield c, "central directory claims 4 GiB", "pt-read", bytes(eocd)
    yield c, "BINBYTES8 of 2**40 bytes", "pt-read", H.hostile_pickle_file({"b": H.Raw(b"\x8e" + (2**40).to_bytes(8, "little"))})
    yield c, "BINUNICODE8 of 2**40 bytes", "pt-read", H.hostile_pickle_file({"b": H.Raw(b"\x8d" + (2**40).to_bytes(8, "little"))})
    yield c, "LONG4 of 2**31-1 bytes", "pt-read", H.hostile_pickle_file({"b": H.Raw(b"\x8b" + (2**31 - 1).to_bytes(4, "little"))})
    yield c, "storage numel 2**40 on a short entry", "pt-read", _tensor_file((4,), (1,), numel=2**40)


def _cases_crc(rng: random.Random, n: int) -> Iterator[Case]:
    base = H.checkpoint(H.small_arrays())
    ranges = H.storage_ranges(base)
    for i in range(n):
        start, end = rng.choice(ranges)
        b = bytearray(base)
        k = rng.randrange(start, end)
        b[k] ^= 1 << rng.randrange(8)
        yield "5 silent corruption", "bit flip in stored tensor bytes", "pt-read", bytes(b)
    entries = H.state_dict_entries(H.small_arrays())
    for i in range(n // 4):
        pkl = bytearray(entries[0].data)
        k = rng.randrange(2, len(pkl) - 1)
        pkl[k] ^= 1 << rng.randrange(8)
        wrong = [H.Entry(e.name, bytes(pkl), crc=H.zlib.crc32(e.data)) if e.name.endswith("data.pkl") else e
                 for e in entries]
        yield "5 silent corruption", "bit flip in data.pkl", "pt-read", H.torch_zip(wrong)


def _cases_messages() -> Iterator[Case]:
    c = "6 messages"
    t = H.tensor_node("0", "FloatStorage", 6, (6,), (1,))
    w = {"w": np.arange(6, dtype=np.float32)}
    for s in ("\x1b[2J\x1b[31mpwned", "two\nlines", "bell\x07", "rtl\u202eevil", "nul\x00", "cr\rover"):
        yield c, f"global module {ascii(s)}", "pt-read", H.hostile_pickle_file({"w": H.Global(s, "x")})
        yield c, f"global name {ascii(s)}", "pt-read", H.hostile_pickle_file({"w": H.Global("os", s)})
        yield c, f"persistent id {ascii(s)}", "pt-read", H.hostile_pickle_file({"w": H.PersId(s)})
        missing = H.tensor_node(s, "FloatStorage", 6, (6,), (1,))
        yield c, f"missing storage key {ascii(s)}", "pt-read", H.hostile_pickle_file({"w": missing}, w)
        yield c, f"state_dict key {ascii(s)}", "convert", _openelm_file(lambda a, s=s: a.__setitem__(s, np.zeros(3, np.float32)))
        yield c, f"non-tensor entry {ascii(s)}", "convert", H.hostile_pickle_file({"w": t, s: 1}, w)
        yield c, f"lora adapter name {ascii(s)}", "convert", _openelm_file(
            lambda a, s=s: a.update({f"layers.0.ffn.proj_2.lora_A.{s}.weight": np.zeros((2, 128), np.float32)}))
        yield c, f"pickle STRING {ascii(s)}", "pt-read", H.hostile_pickle_file({"w": H.Raw(b"S" + s.encode() + b"\n")})
        header, data = H.safetensors_file({s: np.zeros(3, np.float32)})
        header[s]["dtype"] = "Q8"
        yield c, f"safetensors name {ascii(s)}", "st-read", H.safetensors_bytes(header, data)
        header, data = H.safetensors_file({"transformer.x" + s: np.zeros(3, np.float32)})
        yield c, f"safetensors unknown tensor {ascii(s)}", "convert", H.safetensors_bytes(header, data)


def _cases_safetensors(rng: random.Random, n: int) -> Iterator[Case]:
    c = "7 safetensors header"
    header, data = H.safetensors_file(H.small_arrays())
    base = H.safetensors_bytes(header, data)
    hlen = int.from_bytes(base[:8], "little") + 8
    for i in range(n):
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(hlen)] = rng.randrange(256)
        yield c, "random bytes in the header", "st-read", bytes(b)
    for i in range(n // 2):
        yield c, "random byte mutation", "st-read", H.mutate_bytes(base, rng)

    def lie(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return H.safetensors_bytes(h, data)

    yield c, "structured: header length 2**64-1", "st-read", H.safetensors_bytes(header, data, header_len=2**64 - 1)
    yield c, "structured: header length 0", "st-read", H.safetensors_bytes(header, data, header_len=0)
    yield c, "structured: header is a list", "st-read", H.safetensors_bytes([1, 2], data)
    yield c, "structured: header is a number", "st-read", H.safetensors_bytes(7, data)
    yield c, "structured: header not UTF-8", "st-read", H.safetensors_bytes(b"{\"\xff\": 1}", data)
    yield c, "structured: header nested 100k deep", "st-read", H.safetensors_bytes(b"[" * 100000 + b"]" * 100000, data)
    huge = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    yield c, "structured: header with a 5000-digit int", "st-read", H.safetensors_bytes(huge, data)
    yield c, "structured: entry is a list", "st-read", lie(lambda h: h.__setitem__("w", [1]))
    yield c, "structured: entry is a string", "st-read", lie(lambda h: h.__setitem__("w", "F32"))
    yield c, "structured: dtype a list", "st-read", lie(lambda h: h["w"].__setitem__("dtype", ["F32"]))
    yield c, "structured: dtype unknown", "st-read", lie(lambda h: h["w"].__setitem__("dtype", "F8_E4M3"))
    for shape in ([-4, -6], [4.5, 6], [True, 24], ["4", "6"], [2**32, 2**32], [2**64, 0], [0, 2**70], None, 5, [[4], 6]):
        yield c, f"structured: shape {shape}", "st-read", lie(lambda h, s=shape: h["w"].__setitem__("shape", s))
    for off in ([96, 0], [-4, 92], [0, 2**64], [2**63, 2**63 + 96], [0], [0, 96, 1], "0-96", [0.0, 96.0], None,
                [True, 97], [4, 100]):
        yield c, f"structured: data_offsets {off}", "st-read", lie(lambda h, o=off: h["w"].__setitem__("data_offsets", o))
    yield c, "structured: overlapping ranges", "st-read", lie(lambda h: h["b"].__setitem__("data_offsets", [0, 12]))
    yield c, "structured: 1000 tensors on one range", "st-read", lie(lambda h: h.update(
        {f"x{i}": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]} for i in range(1000)}))
    yield c, "structured: metadata not a dict", "st-read", lie(lambda h: h.__setitem__("__metadata__", [1]))


def cases(seed: int, scale: float) -> List[Case]:
    rng = random.Random(seed)
    n = lambda k: max(1, int(k * scale))  # noqa: E731
    out: List[Case] = []
    out += _pt_cases_malformed(rng, n(300))
    out += _cases_metadata(rng, n(150))
    out += _cases_hangs()
    out += _cases_memory()
    out += _cases_crc(rng, n(100))
    out += _cases_messages()
    out += _cases_safetensors(rng, n(200))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose convert/ and mlx_elm/ are tested")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the number of random mutations")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--extra-as", type=int, default=3 << 30, help="address space a case may add (bytes)")
    ap.add_argument("--only", default="", help="run only classes whose name contains this")
    ap.add_argument("--json", type=Path, help="write every case's outcome here")
    ap.add_argument("--show", default="traceback,hang,crash,memory,bad-message,accepted-changed",
                    help="outcomes whose cases are listed")
    a = ap.parse_args()
    todo = [c for c in cases(a.seed, a.scale) if a.only in c[0]]
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-campaign-"))
    worker = Worker(a.code, a.extra_as)
    baseline: Dict[str, str] = {}
    for kind, data in (("pt-read", H.checkpoint(H.small_arrays())),
                       ("st-read", H.safetensors_bytes(*H.safetensors_file(H.small_arrays()))),
                       ("convert", H.checkpoint(H.tiny_openelm_arrays()))):
        p = tmp / f"base-{kind}"
        p.write_bytes(data)
        r = worker.run(kind, str(p), 60)
        assert r["outcome"] == "accepted", r
        baseline[kind] = r["digest"]
    tally: Dict[Tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    rows, start = [], time.perf_counter()
    for i, (cls, label, kind, data) in enumerate(todo):
        p = tmp / f"case-{i}{'.safetensors' if kind.startswith('st') or data[8:9] == b'{' else '.pt'}"
        p.write_bytes(data)
        r = worker.run(kind, str(p), a.timeout)
        if r["outcome"] in ("hang", "crash"):
            worker = Worker(a.code, a.extra_as)
        outcome = r["outcome"]
        if outcome == "accepted" and label in EDITED and r["digest"] != baseline[kind]:
            outcome = "accepted-changed"
        if r.get("rss_growth", 0) > MEMORY_GROWTH and outcome != "memory":
            outcome, r["detail"] = "memory", f"{outcome}, RSS grew {r['rss_growth'] / 2**20:.0f} MiB"
        p.unlink()
        sub = label.split(":")[0] if cls[0] in "1257" else "all"
        tally[(cls, sub)][outcome] += 1
        rows.append({"class": cls, "label": label, "kind": kind, "size": len(data), "outcome": outcome,
                     "detail": r.get("detail", ""), "rss_growth": r.get("rss_growth")})
        if outcome in a.show.split(","):
            print(f"  [{cls}] {label} ({len(data)} B): {outcome} {r.get('detail', '')[:160]}", flush=True)
    worker.kill()
    outcomes = ("refused", "bad-message", "accepted", "accepted-changed", "traceback", "hang", "crash", "memory")
    print(f"\n{len(todo)} cases in {time.perf_counter() - start:.0f}s against {a.code} (seed {a.seed})")
    print(f"{'class / family':58s} " + " ".join(f"{o[:9]:>9s}" for o in outcomes))
    for (cls, sub), cnt in sorted(tally.items()):
        name = cls if sub == "all" else f"{cls}: {sub}"
        print(f"{name[:58]:58s} " + " ".join(f"{cnt[o]:9d}" for o in outcomes))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
