"""Everything that depends on the OS or the MLX backend lives here, and only here.

On Linux the ``mlx[cpu]`` wheel links a slow reference BLAS; preloading OpenBLAS makes matmuls
tens of times faster with the same results. On macOS (Accelerate / Metal) nothing is needed.

A fast BLAS has to export the standard symbols (``sgemm_``, ``cblas_sgemm``) to stand in for the
wheel's. Debian/Ubuntu's ``libopenblas0-pthread`` does. From PyPI, ``scipy-openblas32/64`` (x86-64
and arm64, no system libraries) prefix every symbol with ``scipy_``, so MLX cannot use them; Intel's
``mkl`` wheel (x86-64 only, ~230 MB) exports the standard ones and is used when installed (with its
sequential threading layer, which needs no OpenMP runtime).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

OPT_OUT_ENV = "MLX_ELM_NO_BLAS_PRELOAD"
REEXEC_MARK = "MLX_ELM_BLAS_REEXEC"
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def find_openblas() -> Optional[str]:
    """Path of an installed OpenBLAS that can stand in for the reference BLAS, if any."""
    override = os.environ.get("MLX_ELM_OPENBLAS")
    for path in ((override,) if override else ()) + OPENBLAS_CANDIDATES:
        if path and os.path.exists(path):
            return path
    return None


def find_pip_mkl() -> Optional[str]:
    """``libmkl_rt`` of a pip-installed ``mkl`` wheel (x86-64 Linux), if any."""
    if not sys.platform.startswith("linux"):
        return None
    for root in {sys.prefix, sys.base_prefix, os.path.expanduser("~/.local")}:
        found = sorted(glob.glob(os.path.join(root, "lib", "libmkl_rt.so.*")))
        if found:
            return found[-1]
    return None


def find_fast_blas() -> Optional[str]:
    """The library to preload: a system OpenBLAS first, else a pip-installed MKL."""
    return find_openblas() or find_pip_mkl()


def _blas_env(blas: str, env: dict) -> dict:
    env = dict(env)
    env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD", "")) if p)
    if "mkl_rt" in os.path.basename(blas):
        lib = os.path.dirname(blas)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (lib, env.get("LD_LIBRARY_PATH", "")) if p)
        env.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
    return env


def wheel_links_reference_blas() -> bool:
    """True when MLX is the Linux CPU wheel that bundles the reference BLAS."""
    if not sys.platform.startswith("linux"):
        return False
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(list(spec.submodule_search_locations)[0]).parent
    return bool(glob.glob(str(site / "mlx_cpu.libs" / "libblas*.so*")))


def _preloaded(path: str) -> bool:
    return path in os.environ.get("LD_PRELOAD", "").split(":")


def would_reexec() -> bool:
    """True when :func:`maybe_reexec_with_fast_blas` would re-execute this process."""
    if os.environ.get(OPT_OUT_ENV) or os.environ.get(REEXEC_MARK):
        return False
    if not wheel_links_reference_blas():
        return False
    blas = find_fast_blas()
    return blas is not None and not _preloaded(blas)


def maybe_reexec_with_fast_blas() -> None:
    """Re-execute this process once with OpenBLAS in ``LD_PRELOAD`` when that makes MLX faster.

    Set ``MLX_ELM_NO_BLAS_PRELOAD=1`` to opt out. A marker variable prevents loops.
    """
    if not would_reexec():
        return
    env = _blas_env(find_fast_blas(), os.environ)
    env[REEXEC_MARK] = "1"
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # keep running with the slow BLAS rather than fail


SLOW_BLAS_HINT = (
    "note: MLX is using the slow reference BLAS bundled with its Linux wheel (prefill is ~25-40x slower); "
    "install OpenBLAS and mlx-elm will use it: sudo apt-get install libopenblas0-pthread "
    f"(without root on x86-64: pip install mkl; silence with {OPT_OUT_ENV}=1)")
_HINT_MARK = "slow-blas-hint-shown"


def slow_blas_in_use() -> bool:
    """True on Linux when MLX will run on the wheel's reference BLAS (no OpenBLAS preloaded)."""
    if not wheel_links_reference_blas():
        return False
    blas = find_fast_blas()
    return blas is None or not _preloaded(blas)


def warn_if_slow_blas(stream=None) -> bool:
    """Print :data:`SLOW_BLAS_HINT` once per cache home when the fast path is missing; returns
    whether it printed. Opting out of the preload (``MLX_ELM_NO_BLAS_PRELOAD``) also silences it."""
    if os.environ.get(OPT_OUT_ENV) or not slow_blas_in_use():
        return False
    mark = cache_home() / _HINT_MARK
    if mark.exists():
        return False
    print(SLOW_BLAS_HINT, file=stream or sys.stderr)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("shown\n")
    except OSError:
        pass  # an unwritable cache only means the hint shows again next time
    return True


def loaded_blas() -> str:
    """Which BLAS library this process has mapped (Linux), else the platform default."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() or "mkl_rt" in line}
    preloaded = [os.path.realpath(p) for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    fast = [lib for lib in sorted(libs) if lib in preloaded]
    if fast:
        name = "MKL" if "mkl" in os.path.basename(fast[0]) else "OpenBLAS"
        return f"{name}, preloaded ({fast[0]})"
    if any("mlx_cpu.libs" in lib for lib in libs):
        return "reference BLAS bundled with the mlx-cpu wheel (slow)"
    return ", ".join(sorted(libs)) or "none loaded"


@dataclass
class DoctorReport:
    mlx_version: str
    mlx_lm_version: str
    backend: str
    device: str
    blas: str
    system_memory_gb: float
    device_memory_gb: Optional[float]
    advice: list

    def lines(self) -> list:
        d = asdict(self)
        advice = d.pop("advice")
        out = [f"{k.replace('_', ' '):>18}: {v}" for k, v in d.items() if v is not None]
        return out + [f"{'advice':>18}: {a}" for a in advice]


def backend_name() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def is_cpu_backend() -> bool:
    """True when MLX computes on the CPU (quantized and half-precision matmuls are slow there)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu or backend_name() == "cpu"


MOE_DISPATCH_ENV = "MLX_ELM_MOE_DISPATCH"
MOE_DISPATCHES = ("gather", "blocked")
# Blocked dispatch pads every expert to whole blocks of >= 8 rows, so it only pays off when there
# are enough assignments per expert; below that (decode, short prompts) the per-assignment gather
# is cheaper. Measured by ``mlx-elm bench moe`` (docs/moe.md).
MOE_BLOCKED_MIN_ROWS_PER_EXPERT = 16


def expert_dispatch(num_assignments: int, num_experts: int) -> str:
    """How MoE layers run their experts on this backend: ``"gather"`` or ``"blocked"``.

    ``gather``: mlx-lm's switch layers, one ``gather_mm`` row per (token, expert) assignment,
    sorted by expert for large counts; fastest on Metal, where the kernel batches rows per expert.
    ``blocked``: assignments sorted by expert and padded into fixed-size blocks of one expert each,
    so every block is a real matrix product; the same numbers, and 2-4x faster on the CPU backend,
    whose ``gather_mm`` multiplies row by row (``mlx-elm bench moe``). Set
    ``MLX_ELM_MOE_DISPATCH=gather|blocked`` to force one.
    """
    forced = os.environ.get(MOE_DISPATCH_ENV, "").strip().lower()
    if forced in MOE_DISPATCHES:
        return forced
    if not is_cpu_backend() or num_assignments < MOE_BLOCKED_MIN_ROWS_PER_EXPERT * num_experts:
        return "gather"
    return "blocked"


def doctor() -> DoctorReport:
    """Backend, device, BLAS and memory facts a user needs when asking why something is slow."""
    import mlx.core as mx
    import mlx_lm

    backend = backend_name()
    device_mem = None
    try:
        info = mx.device_info()
        device_mem = round(info.get("memory_size", 0) / 2**30, 1) or None
    except Exception:
        pass
    try:
        sys_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        sys_mem = float("nan")
    blas = loaded_blas()
    advice = []
    if wheel_links_reference_blas() and not blas.startswith(("OpenBLAS", "MKL")):
        if find_fast_blas():
            advice.append(f"a fast BLAS is installed but not preloaded; unset {OPT_OUT_ENV}")
        else:
            advice.append(SLOW_BLAS_HINT.removeprefix("note: "))
    if backend == "cpu":
        advice.append("CPU backend: 16-bit and quantized matmuls are slow here; "
                      "mlx-elm uses float32 dense weights on CPU")
    return DoctorReport(
        mlx_version=mx.__version__,
        mlx_lm_version=getattr(mlx_lm, "__version__", "unknown"),
        backend=backend,
        device=str(mx.default_device()),
        blas=blas,
        system_memory_gb=round(sys_mem, 1),
        device_memory_gb=device_mem,
        advice=advice,
    )


ESPEAK_LIB_ENV = "MLX_ELM_ESPEAK_LIBRARY"
ESPEAK_DATA_ENV = "MLX_ELM_ESPEAK_DATA"


def espeak_paths() -> tuple[str, str]:
    """``(shared library, data folder)`` of eSpeak NG, from the ``espeakng-loader`` wheel.

    The wheel ships ``libespeak-ng`` (``.so`` on Linux, ``.dylib`` on macOS) and its voice data, so
    neither apt nor brew is needed. ``MLX_ELM_ESPEAK_LIBRARY`` / ``MLX_ELM_ESPEAK_DATA`` override
    either path (a system install, a custom build). Raises ``SpeechError`` naming the fix.
    """
    from mlx_elm.errors import SpeechError

    lib, data = os.environ.get(ESPEAK_LIB_ENV), os.environ.get(ESPEAK_DATA_ENV)
    if not (lib and data):
        try:
            import espeakng_loader
        except ImportError as e:
            raise SpeechError("speech needs eSpeak NG; run `pip install espeakng-loader` "
                              f"(or set {ESPEAK_LIB_ENV} and {ESPEAK_DATA_ENV})") from e
        lib = lib or espeakng_loader.get_library_path()
        try:
            data = data or espeakng_loader.get_data_path()
        except RuntimeError as e:
            raise SpeechError(f"the espeakng-loader wheel has no voice data ({e}); reinstall it") from e
    if not os.path.exists(lib):
        raise SpeechError(f"eSpeak NG library {lib} does not exist; reinstall espeakng-loader or fix {ESPEAK_LIB_ENV}")
    if not os.path.isdir(data):
        raise SpeechError(f"eSpeak NG data folder {data} does not exist; reinstall espeakng-loader or fix {ESPEAK_DATA_ENV}")
    return lib, data


def cache_home() -> Path:
    """Where mlx-elm keeps converted models (``MLX_ELM_HOME`` overrides)."""
    root = os.environ.get("MLX_ELM_HOME")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-elm"
