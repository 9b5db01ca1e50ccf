"""The kernels as torch functions: batch-1..8 matrix-vector products, any linear layer through its
descriptor, RMSNorm, greedy argmax, and the kernels' thread pool.

Decode at small batch is a chain of ``x @ W.T`` with a handful of rows in ``x``: memory bound, and
torch's ``F.linear`` leaves bandwidth on the table there (notably on the wide output layer).
``linear`` runs the C GEMV (csrc/gemv.c). Anything it does not handle (no compiler, non-CPU
tensors, other dtypes, more than 8 rows, autograd) goes to ``torch.nn.functional.linear`` with the
same result.

Threading policy: the kernels own their own pthread pool (no OpenMP, so no second runtime beside
torch's bundled libgomp; default size: every CPU in the affinity mask; ``set_threads``). Idle
workers spin ~1 ms after each call (yielding the core after 50 us) and then sleep, so back-to-back
decode GEMVs with torch ops between them keep the pool hot. torch's OpenMP workers also spin after
each *parallel* torch op, and then the two pools fight over the cores. The decode loop should
therefore run torch single-threaded (``decode_threads()``, i.e. ``torch.set_num_threads(1)``) and
let the kernels own the cores. Measured on 2 Zen 3 cores (bench/gemv.py, fp32 step with real SDPA
over a 512-token cache): torch 1 thread + kernel 2 threads 34 ms/step; torch 2 + kernel 2 42 ms;
torch alone 52 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lilliput.infer.kernels import abi, build
from lilliput.infer.kernels.build import Kernel

MAX_ROWS = 8
"""Most rows of x `linear` takes per call; more go to torch (compute bound by then)."""

_DTYPE_CODE = {torch.float32: abi.DType.F32, torch.bfloat16: abi.DType.BF16}
# (x dtype, w dtype) -> gemv_args_t.code dtype bits (x | w << 4 | y << 8); y has x's dtype
_CODES = {(xd, wd): int(xc | wc << 4 | xc << 8)
          for xd, xc in _DTYPE_CODE.items() for wd, wc in _DTYPE_CODE.items()}
_ARGS = threading.local()  # per thread: a gemv_args_t and a pointer to it

DOT_ISAS = {0: "scalar C", 1: "AVX2 (maddubs)", 2: "AVX-VNNI (vpdpbusd, 256-bit)",
            3: "AVX-512 VNNI (vpdpbusd, 256-bit)", 4: "AVX-512 VNNI (vpdpbusd, 512-bit)"}
"""qgemv_isa() codes: the instructions of the int8/int4 integer dot products."""


def describe() -> dict:
    """What this machine's build of the kernels uses (for results files): fp32 lanes, the integer
    dot products' instructions, the int8 layout and the cache dtype the fused step can keep."""
    k = build.load()
    if not isinstance(k, Kernel):
        return {"available": False, "reason": k}
    rows, rows4 = k.lib.qgemv_int8_pack(), k.lib.qgemv_int4_pack()
    return {"available": True, "isa": build.isa(), "gemv_fp32_lanes": k.lanes, "int8_int4_dot": DOT_ISAS.get(k.lib.qgemv_isa()),
            "int8_layout": f"batch: groups of {rows} rows x 4 columns" if rows else "row-major",
            "int4_layout": f"batch: groups of {rows4} rows x 4 columns" if rows4 else "row-major",
            "fp16_kv_cache": bool(k.lib.llama_step_kv_f16(64)), "fused_step": True}


def int4_batch_rows() -> int:
    """Weight rows per group of the int4 batch layout this build runs (`Kind.INT4_BATCH`); 0: none."""
    k = build.load()
    return k.lib.qgemv_int4_pack() if isinstance(k, Kernel) else 0


def int8_batch_rows() -> int:
    """Weight rows per group of the int8 batch layout this build runs (`Kind.INT8_BATCH`); 0: none."""
    k = build.load()
    return k.lib.qgemv_int8_pack() if isinstance(k, Kernel) else 0


def set_threads(n: int) -> None:
    """Threads the kernels use per call, caller included (``n <= 0``: all CPUs in affinity)."""
    k = build.load()
    if isinstance(k, Kernel):
        k.lib.gemv_set_threads(int(n))


def get_threads() -> int:
    """Threads the kernels use per call (1 when they are unavailable)."""
    k = build.load()
    return k.lib.gemv_get_threads() if isinstance(k, Kernel) else 1


def set_spin_us(us: int) -> None:
    """How long idle kernel workers spin before sleeping (default 1000 us)."""
    k = build.load()
    if isinstance(k, Kernel):
        k.lib.gemv_set_spin_us(int(us))


@contextlib.contextmanager
def decode_threads() -> Iterator[None]:
    """Runs torch single-threaded inside the block so the kernels' pool owns the cores."""
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
    kernel = build.load()
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
        a, ref = _ARGS.a, _ARGS.ref
    except AttributeError:
        a = _ARGS.a = abi.GemvArgs()
        ref = _ARGS.ref = ctypes.pointer(a)
    a.x = x.data_ptr()
    a.w = w.data_ptr()
    a.y = out.data_ptr()
    a.code = code | rows << 16
    a.n = n
    a.k = k
    if kernel.fn(ref) != 0:
        raise RuntimeError(f"gemv kernel rejected x {tuple(shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    return out


def run(desc: abi.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """y (rows, N) fp32 = x (rows, K) W^T through a layer's descriptor (any `abi.Kind`, any number of
    rows); None where the kernels are unavailable (the caller uses torch). The tensors `desc` points
    at must stay alive for the call."""
    kernel = build.load()
    if kernel.__class__ is not Kernel:
        return None
    x = x.to(torch.float32).contiguous()
    rows = x.shape[0]
    y = torch.empty(rows, desc.n)
    rc = kernel.lib.linear_run(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), rows)
    if rc != 0:
        raise RuntimeError(f"linear_run rejected a {abi.Kind(desc.kind).name} layer of (N, K) = "
                           f"({desc.n}, {desc.k}), group {desc.group} (code {rc})")
    return y


def argmax(logits: torch.Tensor) -> list[int]:
    """Greedy tokens of logits (B, V): torch.argmax's indices (the first on ties), in C for fp32 CPU."""
    kernel = build.load()
    if kernel.__class__ is not Kernel or logits.dtype != torch.float32 or not logits.is_cpu \
            or logits.dim() != 2 or not logits.is_contiguous() or logits.requires_grad:
        return logits.argmax(-1).tolist()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    kernel.lib.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
    return out.tolist()


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """fp32 RMSNorm over the last dim in C; None where the kernel does not apply (caller uses torch)."""
    kernel = build.load()
    if kernel.__class__ is not Kernel or x.dtype != torch.float32 or w.dtype != torch.float32 \
            or not (x.is_cpu and x.is_contiguous()) or torch.is_grad_enabled():
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernel.lib.rmsnorm_f32(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out
