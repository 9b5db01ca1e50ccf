"""Fast CPU matrix-vector products for batch-1..8 decode.

Decode at small batch is a chain of ``x @ W.T`` with a handful of rows in ``x``: memory
bound, and torch's ``F.linear`` leaves bandwidth on the table there (notably on the wide
output layer). ``linear`` runs a small C kernel (``csrc/gemv.c``) built on first use with
the system C compiler into a cache keyed by source, flags, compiler and CPU, and loaded
with ctypes. Anything it does not handle (no compiler, non-CPU tensors, other dtypes,
more than 8 rows, autograd) goes to ``torch.nn.functional.linear`` with the same result.

Threading policy: the kernel owns its own pthread pool (no OpenMP, so no second runtime
beside torch's bundled libgomp; default size: every CPU in the affinity mask;
``set_threads``). Idle workers spin ~1 ms after each call (yielding the core after 50 us)
and then sleep, so back-to-back decode GEMVs with torch ops between them keep the pool
hot. torch's OpenMP workers also spin after each *parallel* torch op, and then the two
pools fight over the cores. The decode loop should therefore run torch single-threaded
(``decode_threads()``, i.e. ``torch.set_num_threads(1)``) and let the kernel own the cores.
Measured on 2 Zen 3 cores (bench/gemv.py, fp32 step with real SDPA over a 512-token cache):
torch 1 thread + kernel 2 threads 34 ms/step; torch 2 + kernel 2 42 ms; torch alone 52 ms.

``LILLIPUT_NO_KERNEL=1`` forces the torch path; ``LILLIPUT_CACHE`` moves the build cache
(kernels go to ``$LILLIPUT_CACHE/kernels``, default ``~/.cache/lilliput/kernels``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
SOURCES = (SOURCE, SOURCE.with_name("llama_step.c"), SOURCE.with_name("qgemv.c"))
"""Compiled together into one library: the GEMV kernel, the fused decode step built on it and the
quantized kernels (qgemv.c, run by the step and by lilliput.compress.qlinear)."""
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
MAX_ROWS = 8
"""Most rows of x the kernel takes per call; more go to torch (compute bound by then)."""
ABI_VERSION = 2

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
# (x dtype, w dtype) -> gemv_packed dtype bits (x | w << 4 | y << 8); y has x's dtype
_CODES = {(xd, wd): xc | wc << 4 | xc << 8
          for xd, xc in _DTYPE_CODE.items() for wd, wc in _DTYPE_CODE.items()}
_LOCK = threading.Lock()
_ARGS = threading.local()  # per-thread int64[6] argument block for gemv_packed


@dataclass(frozen=True)
class Kernel:
    """A loaded build of ``csrc/gemv.c``."""

    path: Path
    """The shared library on disk."""
    lanes: int
    """fp32 lanes per vector the build uses (16 = AVX-512, 8 = AVX2, 4 = portable)."""
    built: bool
    """True when this process compiled it, False when it came from the cache."""
    build_s: float
    """Compile time in seconds (0.0 when loaded from the cache)."""
    fn: ctypes._CFuncPtr  # gemv_packed(int64[6] {x, w, y, codes, N, K}) -> int
    lib: ctypes.CDLL


def cache_dir() -> Path:
    """Where built kernels live: ``$LILLIPUT_CACHE/kernels`` or ``~/.cache/lilliput/kernels``."""
    root = os.environ.get("LILLIPUT_CACHE") or "~/.cache/lilliput"
    return Path(root).expanduser() / "kernels"


def find_compiler() -> str | None:
    """The system C compiler (``$CC``, then ``cc``, ``gcc``, ``clang``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = {"model name", "flags", "Features"}
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(keep)))


def build_key(compiler: str) -> str:
    """Hash of everything that changes the binary: source, flags, compiler version, CPU."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    h = hashlib.sha256()
    for part in (*(src.read_bytes() for src in SOURCES), " ".join(FLAGS).encode(), compiler.encode(),
                 "".join(version).encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def build(compiler: str, dest: Path, extra_flags: tuple[str, ...] = ()) -> float:
    """Compiles ``SOURCE`` to ``dest`` atomically (tmp file + rename); returns seconds.

    Two processes building at once each write their own tmp file; the last rename wins and
    both results are identical, so a reader never sees a half-written library.
    ``extra_flags`` (e.g. ``-DGEMV_LANES=16``) are for tests of other vector widths.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [compiler, *FLAGS, *extra_flags, "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed: {first}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return time.perf_counter() - t0


def _open(path: Path, built: bool, build_s: float) -> Kernel:
    lib = ctypes.CDLL(str(path))
    if lib.gemv_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.gemv_abi_version()}, expected {ABI_VERSION}")
    # gemv_packed(int64 a[6]) with no argtypes: ctypes passes the array by reference and
    # skips per-argument conversion (~0.2 us each), about 1 us saved per call.
    fn = lib.gemv_packed
    fn.restype = ctypes.c_int
    lib.gemv_set_threads.argtypes = (ctypes.c_int,)
    lib.gemv_set_spin_us.argtypes = (ctypes.c_long,)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.rmsnorm_f32.argtypes = (p, p, p, i64, i64, ctypes.c_double)
    lib.llama_step.restype = ctypes.c_int
    return Kernel(path=path, lanes=lib.gemv_lanes(), built=built, build_s=build_s, fn=fn, lib=lib)


@functools.cache
def load() -> Kernel | str:
    """The kernel, built or taken from the cache on first call; a reason string if unavailable.

    Never raises: a missing compiler or failed build gives one warning and the torch path.
    """
    if os.environ.get("LILLIPUT_NO_KERNEL", "") not in ("", "0"):
        return "disabled by LILLIPUT_NO_KERNEL"
    with _LOCK:
        try:
            missing = [str(src) for src in SOURCES if not src.is_file()]
            if missing:
                raise RuntimeError(f"kernel source {missing[0]} is missing")
            compiler = find_compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC or install gcc)")
            path = cache_dir() / f"gemv-{build_key(compiler)}.so"
            built, build_s = False, 0.0
            if not path.is_file():
                build_s, built = build(compiler, path), True
            return _open(path, built, build_s)
        except Exception as e:  # any failure means: use torch
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"lilliput gemv kernel unavailable, using torch F.linear ({reason})",
                          RuntimeWarning, stacklevel=3)
            return reason


def available() -> bool:
    """True when ``linear`` runs the C kernel (builds it on first call)."""
    return isinstance(load(), Kernel)


def unavailable_reason() -> str:
    """Why the kernel is not used; empty string when it is."""
    k = load()
    return "" if isinstance(k, Kernel) else k


KIND_INT8_BATCH = 4
"""Descriptor kind of int8 codes in the kernels' batch layout (csrc/qgemv.c): any number of rows of
x in one pass over the weights. compress/qlinear.py packs into it; the fused step looks for it."""

DOT_ISAS = {0: "scalar C", 1: "AVX2 (maddubs)", 2: "AVX-VNNI (vpdpbusd, 256-bit)",
            3: "AVX-512 VNNI (vpdpbusd, 256-bit)", 4: "AVX-512 VNNI (vpdpbusd, 512-bit)"}
"""qgemv_isa() codes: the instructions of the int8/int4 integer dot products."""


def describe() -> dict:
    """What this machine's build of the kernels uses (for results files): fp32 lanes, the integer
    dot products' instructions, the int8 layout and the cache dtype the fused step can keep."""
    k = load()
    if not isinstance(k, Kernel):
        return {"available": False, "reason": k}
    rows = k.lib.qgemv_int8_pack()
    return {"available": True, "gemv_fp32_lanes": k.lanes, "int8_int4_dot": DOT_ISAS.get(k.lib.qgemv_isa()),
            "int8_layout": f"batch: groups of {rows} rows x 4 columns" if rows else "row-major",
            "fp16_kv_cache": bool(k.lib.llama_step_kv_f16(ctypes.c_int64(64))), "fused_step": True}


def set_threads(n: int) -> None:
    """Threads the kernel uses per call, caller included (``n <= 0``: all CPUs in affinity)."""
    k = load()
    if isinstance(k, Kernel):
        k.lib.gemv_set_threads(int(n))


def get_threads() -> int:
    """Threads the kernel uses per call (1 when the kernel is unavailable)."""
    k = load()
    return k.lib.gemv_get_threads() if isinstance(k, Kernel) else 1


def set_spin_us(us: int) -> None:
    """How long idle kernel workers spin before sleeping (default 1000 us)."""
    k = load()
    if isinstance(k, Kernel):
        k.lib.gemv_set_spin_us(int(us))


@contextlib.contextmanager
def decode_threads() -> Iterator[None]:
    """Runs torch single-threaded inside the block so the kernel's pool owns the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fallback(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == w.dtype:
        y = F.linear(x, w)
    else:  # mixed precision: widen both, accumulate in fp32 like the kernel
        y = F.linear(x.float(), w.float()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` with x (..., K) holding at most 8 rows, w (N, K); result (..., N) in x.dtype.

    fp32 and bf16 in any mix (accumulation in fp32). ``out`` (contiguous, x.dtype, (..., N)
    with as many rows as x) receives the result. Falls back to ``F.linear`` where the kernel
    does not apply: no kernel, non-CPU tensors, other dtypes, more than 8 rows, a
    non-contiguous w, or autograd recording.
    """
    # The checks below are ordered and written for speed: this runs ~120 times per token.
    kernel = load()
    code = _CODES.get((x.dtype, w.dtype))
    if (
        code is None or kernel.__class__ is not Kernel
        or not (x.is_cpu and w.is_cpu) or w.dim() != 2 or x.dim() == 0
        or not w.is_contiguous()  # copying W per call would cost more than torch's strided read
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return _fallback(x, w, out)
    n, k = w.shape
    shape = x.shape
    if shape[-1] != k:
        raise ValueError(f"x has {shape[-1]} features but w is {tuple(w.shape)} (N, K): pass x (..., {k})")
    rows = x.numel() // k if k else 0
    if not 0 < rows <= MAX_ROWS:
        return _fallback(x, w, out)
    if not x.is_contiguous():
        x = x.contiguous()
    if out is None:  # positional sizes: torch parses them ~3x faster than a tuple
        out = x.new_empty(rows, n) if len(shape) == 2 else x.new_empty(*shape[:-1], n)
    elif not (out.dtype == x.dtype and out.is_cpu and out.is_contiguous()
              and out.numel() == rows * n and out.shape[-1] == n):
        raise ValueError(f"out must be a contiguous CPU {x.dtype} tensor of shape "
                         f"{(*shape[:-1], n)}, got {out.dtype} {tuple(out.shape)}")
    try:
        a = _ARGS.a
    except AttributeError:
        a = _ARGS.a = (ctypes.c_int64 * 6)()
    a[0] = x.data_ptr()
    a[1] = w.data_ptr()
    a[2] = out.data_ptr()
    a[3] = code | rows << 16
    a[4] = n
    a[5] = k
    if kernel.fn(a) != 0:
        raise RuntimeError(f"gemv kernel rejected x {tuple(shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    return out


def argmax(logits: torch.Tensor) -> list[int]:
    """Greedy tokens of logits (B, V): torch.argmax's indices (the first on ties), in C for fp32 CPU."""
    kernel = load()
    if kernel.__class__ is not Kernel or logits.dtype != torch.float32 or not logits.is_cpu \
            or logits.dim() != 2 or not logits.is_contiguous() or logits.requires_grad:
        return logits.argmax(-1).tolist()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    kernel.lib.argmax_rows(ctypes.c_void_p(logits.data_ptr()), ctypes.c_int64(logits.shape[0]),
                           ctypes.c_int64(logits.shape[1]), ctypes.c_void_p(out.data_ptr()))
    return out.tolist()


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """fp32 RMSNorm over the last dim in C; None where the kernel does not apply (caller uses torch)."""
    kernel = load()
    if kernel.__class__ is not Kernel or x.dtype != torch.float32 or w.dtype != torch.float32 \
            or not (x.is_cpu and x.is_contiguous()) or torch.is_grad_enabled():
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernel.lib.rmsnorm_f32(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out

