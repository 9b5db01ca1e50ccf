"""Building and loading the C kernels: compile csrc/*.c with the system compiler into a cache keyed
by sources, header, flags, compiler and CPU, open the library with ctypes and check its ABI.

`load()` never raises for an environment problem: a missing compiler or a failed build gives one
warning and a reason string, and every caller then takes its torch path. A library whose structs
disagree with the ctypes mirror (abi.py) is a bug in lilliput, not an environment problem: that
raises `abi.AbiMismatch`.

``LILLIPUT_NO_KERNEL=1`` forces the torch paths; ``LILLIPUT_CACHE`` moves the build cache
(kernels go to ``$LILLIPUT_CACHE/kernels``, default ``~/.cache/lilliput/kernels``).
``LILLIPUT_ISA=avx2`` builds for this CPU without AVX-512, AVX-VNNI and AMX (the kernels an AVX2
machine runs, tested and benchmarked on any newer one); results files record it (`isa()`).
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
from dataclasses import dataclass
from pathlib import Path

from lilliput.infer.kernels import abi

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))
"""Compiled together into one library: the GEMV kernel and its thread pool (gemv.c), the quantized
kernels (qgemv*.c), the fused decode step built on them (llama_step.c, its recurrent mixers in
mamba_step.c and mlstm_step.c) and the ABI table (abi.c)."""
HEADERS = tuple(sorted(CSRC.glob("*.h")))
"""lilliput.h (the interface), the quantized kernels' private qgemv.h and the fused step's private
step.h: part of the cache key."""
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f", "-mno-avxvnni", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")}
"""What ``LILLIPUT_ISA`` adds to FLAGS: native (the default) lets -march=native choose."""

_LOCK = threading.Lock()


@dataclass(frozen=True)
class Kernel:
    """A loaded build of the kernels, its ABI checked against the mirror."""

    path: Path
    """The shared library on disk."""
    lanes: int
    """fp32 lanes per vector the build uses (16 = AVX-512, 8 = AVX2, 4 = portable)."""
    built: bool
    """True when this process compiled it, False when it came from the cache."""
    build_s: float
    """Compile time in seconds (0.0 when loaded from the cache)."""
    fn: ctypes._CFuncPtr  # gemv_packed(const gemv_args_t *) -> int
    lib: ctypes.CDLL


def cache_dir() -> Path:
    """Where built kernels live: ``$LILLIPUT_CACHE/kernels`` or ``~/.cache/lilliput/kernels``."""
    root = os.environ.get("LILLIPUT_CACHE") or "~/.cache/lilliput"
    return Path(root).expanduser() / "kernels"


def isa() -> str:
    """The instruction-set choice of this process's build: ``LILLIPUT_ISA`` (native or avx2)."""
    name = os.environ.get("LILLIPUT_ISA", "").strip().lower() or "native"
    if name not in ISA_FLAGS:
        raise ValueError(f"LILLIPUT_ISA={name!r}: expected one of {', '.join(ISA_FLAGS)}")
    return name


def find_compiler() -> str | None:
    """The system C compiler (``$CC``, then ``cc``, ``gcc``, ``clang``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def cpu_has(*flags: str) -> bool:
    """Whether this CPU reports any of `flags` in /proc/cpuinfo (False where it cannot be read)."""
    return any(f" {f} " in f" {line} " for line in _cpu_signature().splitlines() if line.startswith(("flags", "Features"))
               for f in flags)


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
    """Hash of everything that changes the binary: sources, headers, flags, compiler version, CPU."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    h = hashlib.sha256()
    for part in (*(src.read_bytes() for src in (*SOURCES, *HEADERS)), " ".join(FLAGS + ISA_FLAGS[isa()]).encode(),
                 compiler.encode(), "".join(version).encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def build(compiler: str, dest: Path, extra_flags: tuple[str, ...] = ()) -> float:
    """Compiles ``SOURCES`` to ``dest`` atomically (tmp file + rename); returns seconds.

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
            [compiler, *FLAGS, *ISA_FLAGS[isa()], *extra_flags, f"-I{CSRC}", "-o", tmp, *map(str, SOURCES), "-lm"],
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


def open_library(path: Path, built: bool = False, build_s: float = 0.0) -> Kernel:
    """Loads a built library, binds its prototypes and checks its ABI (raises `abi.AbiMismatch`)."""
    lib = ctypes.CDLL(str(path))
    abi.check(lib, path)
    abi.bind(lib)
    return Kernel(path=path, lanes=lib.gemv_lanes(), built=built, build_s=build_s, fn=lib.gemv_packed, lib=lib)


@functools.cache
def load() -> Kernel | str:
    """The kernels, built or taken from the cache on first call; a reason string if unavailable.

    A missing compiler or failed build gives one warning and the torch path; an ABI mismatch raises.
    """
    if os.environ.get("LILLIPUT_NO_KERNEL", "") not in ("", "0"):
        return "disabled by LILLIPUT_NO_KERNEL"
    with _LOCK:
        try:
            missing = [str(src) for src in SOURCES if not src.is_file()]
            if missing or not SOURCES:
                raise RuntimeError(f"kernel source {missing[0] if missing else CSRC / '*.c'} is missing")
            compiler = find_compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC or install gcc)")
            path = cache_dir() / f"lilliput-{build_key(compiler)}.so"
            built, build_s = False, 0.0
            if not path.is_file():
                build_s, built = build(compiler, path), True
            ctypes.CDLL(str(path))  # a library that does not load: an environment problem
        except Exception as e:  # any failure means: use torch
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"lilliput C kernels unavailable, using torch ({reason})", RuntimeWarning, stacklevel=3)
            return reason
        return open_library(path, built, build_s)


def available() -> bool:
    """True when the C kernels run (builds them on first call)."""
    return isinstance(load(), Kernel)


def unavailable_reason() -> str:
    """Why the kernels are not used; empty string when they are."""
    k = load()
    return "" if isinstance(k, Kernel) else k
