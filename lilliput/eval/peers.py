"""Peers that benchmarks compare against, installed on demand: llama.cpp through llama-cpp-python.

llama-cpp-python builds llama.cpp from source (~9 minutes on 2 cores). Its default is
`GGML_NATIVE=ON`, which on an Intel Xeon with AMX compiles ggml's AMX path; that path died with
SIGILL here (`tilezero` without a tile configuration: Linux must grant AMX to the process with
`arch_prctl(ARCH_REQ_XCOMP_PERM)` first). So the build is never native: the instruction sets this
CPU reports are switched on one by one (AVX2, FMA, F16C, AVX-512, VNNI) and AMX is off. The
options used are returned so that every result can record them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
BUILD_NOTE = "lilliput_cmake_args.txt"
BASE_CMAKE = ("-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
# ggml CMake option -> the /proc/cpuinfo flags it needs
ISA_OPTIONS = {
    "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",), "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"), "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_BF16": ("avx512_bf16",),
}


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def llama_cpp_cmake_args(flags: set[str] | None = None) -> list[str]:
    """CMake options for a llama.cpp build that uses what this CPU has, minus AMX."""
    flags = cpu_flags() if flags is None else flags
    isa = [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in ISA_OPTIONS.items()]
    return [*BASE_CMAKE, *isa]


def ensure_llama_cpp(install: bool = True):
    """Import llama_cpp, building the pinned llama-cpp-python first when absent (RuntimeError if that fails)."""
    if importlib.util.find_spec("llama_cpp") is None:
        if not install:
            raise RuntimeError("llama-cpp-python is not installed (--no-install given)")
        args = " ".join(llama_cpp_cmake_args())
        print(f"installing {LLAMA_CPP_PIN} (CPU build from source, several minutes): {args}", file=sys.stderr)
        env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PIN], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing {LLAMA_CPP_PIN} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
        importlib.invalidate_caches()
        mod = importlib.import_module("llama_cpp")
        (Path(mod.__file__).parent / BUILD_NOTE).write_text(args + "\n")
    return importlib.import_module("llama_cpp")


def llama_cpp_build_options(llama_cpp) -> str | None:
    """The CMake options the installed llama-cpp-python was built with, when this module built it."""
    note = Path(llama_cpp.__file__).parent / BUILD_NOTE
    return note.read_text().strip() if note.is_file() else None


if __name__ == "__main__":  # python -m lilliput.eval.peers: build the peer ahead of a benchmark
    print(ensure_llama_cpp().__version__)
