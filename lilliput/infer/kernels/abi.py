"""The ctypes mirror of csrc/lilliput.h: its enums, its structs and the prototypes Python calls.

The header is the one owner of the interface; this module restates it for ctypes (Python cannot
read a C header) and `check(lib)` proves the restatement right when the library loads: it compares
the size of every struct, the offset of every field and the value of every enum constant with the
table the compiled library reports (`ll_abi_layout()`, csrc/abi.c), both ways, and raises one
`AbiMismatch` naming every difference. A field added to the header and not here (or here and not
there) therefore fails at load, never as a wrong number at run time.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from pathlib import Path

i64, f64, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Kind(IntEnum):
    """ll_kind: what a linear layer's weight is (formats in lilliput.h)."""

    F32 = 0
    BF16 = 1
    INT8 = 2
    INT4 = 3
    INT8_BATCH = 4
    INT4_BATCH = 5


class Variant(IntEnum):
    """ll_variant: the arithmetic of a quantized layer."""

    AUTO = 0
    WIDEN = 1
    DOT = 2


class Act(IntEnum):
    """ll_act: the gate's activation of the gated feed-forward."""

    SILU = 0
    GELU_TANH = 1


class QkNorm(IntEnum):
    """ll_qk_norm: where queries and keys are RMS-normed."""

    NONE = 0
    HEAD = 1
    PROJ = 2


class Mixer(IntEnum):
    """ll_mixer: a layer's sequence mixer."""

    ATTENTION = 0
    MAMBA = 1
    MLSTM = 2


class DType(IntEnum):
    """ll_dtype: element types of gemv()'s operands."""

    F32 = 0
    BF16 = 1


ENUMS: dict[str, tuple[type[IntEnum], str]] = {
    "ll_kind": (Kind, "LL_KIND_"), "ll_variant": (Variant, "LL_VARIANT_"), "ll_dtype": (DType, "LL_DT_"),
    "ll_act": (Act, "LL_ACT_"), "ll_qk_norm": (QkNorm, "LL_QK_NORM_"), "ll_mixer": (Mixer, "LL_MIXER_")}
"""C enum name -> (its mirror, the prefix of its constants' C names)."""


class Linear(ctypes.Structure):
    """linear_t: one linear layer. Made by `descriptor.make` / `descriptor.for_module` only."""

    _c_name_ = "linear_t"
    _fields_ = [("kind", i64), ("weight", vp), ("scale", vp), ("zero", vp), ("bias", vp), ("n", i64),
                ("k", i64), ("group", i64), ("variant", i64)]


class GemvArgs(ctypes.Structure):
    """gemv_args_t: gemv_packed()'s arguments."""

    _c_name_ = "gemv_args_t"
    _fields_ = [("x", vp), ("w", vp), ("y", vp), ("code", i64), ("n", i64), ("k", i64)]


class Moe(ctypes.Structure):
    """moe_t: a layer's mixture-of-experts feed-forward (router NULL: dense)."""

    _c_name_ = "moe_t"
    _fields_ = [("router", vp), ("gate_up", vp), ("down", vp)]


class Mamba(ctypes.Structure):
    """mamba_t: a Mamba-2 mixer, its parameters and its per-row states."""

    _c_name_ = "mamba_t"
    _fields_ = [("in_proj", Linear), ("out_proj", Linear), ("conv_w", vp), ("conv_b", vp), ("dt_bias", vp), ("A", vp),
                ("D", vp), ("norm", vp), ("state_ssm", vp), ("state_conv", vp), ("snap_ssm", vp), ("snap_conv", vp)]


class Mlstm(ctypes.Structure):
    """mlstm_t: an mLSTM mixer, its parameters and its per-row states."""

    _c_name_ = "mlstm_t"
    _fields_ = [("w_in", Linear), ("w_out", Linear), ("gate_bias", vp), ("norm", vp), ("state_c", vp),
                ("state_n", vp), ("state_m", vp), ("snap_c", vp), ("snap_n", vp), ("snap_m", vp)]


class Layer(ctypes.Structure):
    """layer_t: one layer of the fused step."""

    _c_name_ = "layer_t"
    _fields_ = [("mixer", i64), ("attn_norm", vp), ("attn_post_norm", vp), ("ffn_norm", vp), ("ffn_post_norm", vp),
                ("q_norm", vp), ("k_norm", vp), ("rope", i64), ("window", i64), ("k_cache", vp), ("v_cache", vp),
                ("wqkv", Linear), ("wo", Linear), ("w_gate_up", Linear), ("w_down", Linear), ("moe", Moe),
                ("mamba", Mamba), ("mlstm", Mlstm)]


class Step(ctypes.Structure):
    """step_args_t: the fused step's arguments."""

    _c_name_ = "step_args_t"
    _fields_ = [("n_layers", i64), ("dim", i64), ("n_heads", i64), ("n_kv_heads", i64), ("head_dim", i64),
                ("ffn_dim", i64), ("vocab", i64), ("max_len", i64), ("kv_f16", i64), ("eps", f64),
                ("act", i64), ("qk_norm", i64), ("attn_scale", f64), ("attn_softcap", f64),
                ("final_softcap", f64), ("rot_dim", i64), ("n_experts", i64), ("top_k", i64), ("norm_topk", i64),
                ("ssm_heads", i64), ("ssm_head_dim", i64), ("ssm_state", i64), ("ssm_conv", i64), ("n_snap", i64),
                ("n_tok", i64), ("rows", vp), ("pos", vp), ("n_out", i64), ("out_idx", vp), ("x", vp),
                ("logits", vp), ("cos", vp), ("sin", vp), ("scratch", vp), ("final_norm", vp),
                ("lm_head", Linear), ("layers", vp)]


class AbiEntry(ctypes.Structure):
    """ll_abi_entry_t: one row of ll_abi_layout()."""

    _c_name_ = "ll_abi_entry_t"
    _fields_ = [("name", ctypes.c_char_p), ("value", i64)]


STRUCTS: tuple[type[ctypes.Structure], ...] = (Linear, GemvArgs, Moe, Mamba, Mlstm, Layer, Step, AbiEntry)

_int, _P = ctypes.c_int, ctypes.POINTER
PROTOTYPES: dict[str, tuple[object, tuple | None]] = {
    "gemv_lanes": (_int, ()),
    "gemv_set_threads": (None, (_int,)),
    "gemv_get_threads": (_int, ()),
    "gemv_set_spin_us": (None, (ctypes.c_long,)),
    # no argtypes: ctypes passes the pointer as is and skips per-argument conversion (~1 us a call)
    "gemv_packed": (_int, None),
    "argmax_rows": (_int, (vp, i64, i64, vp)),
    "rmsnorm_f32": (_int, (vp, vp, vp, i64, i64, f64)),
    "linear_run": (_int, (_P(Linear), vp, vp, i64)),
    "qlinear_run_rows": (_int, (_P(Linear), vp, vp, i64)),
    "qgemv_int8_pack": (_int, ()),
    "qgemv_int4_pack": (_int, ()),
    "qgemv_avx2": (_int, ()),
    "qgemv_isa": (_int, ()),
    "llama_step_max_tokens": (_int, ()),
    "llama_step_kv_f16": (_int, (i64,)),
    "step_scratch_floats": (i64, (_P(Step), i64)),
    "llama_step": (_int, (_P(Step),)),
    "ll_abi_layout": (_P(AbiEntry), (_P(i64),)),
}
"""The exported functions Python calls: name -> (restype, argtypes). The C side calls the rest."""


class AbiMismatch(RuntimeError):
    """The ctypes mirror and the compiled header disagree: a bug in lilliput, never a fallback."""


def bind(lib: ctypes.CDLL) -> None:
    """Sets the result and argument types of every function in `PROTOTYPES` on `lib`."""
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes


def mirror_layout(structs=None, enums=None) -> dict[str, int]:
    """The table `ll_abi_layout()` should hold, computed from the ctypes side (default: this module's
    `STRUCTS` and `ENUMS`)."""
    structs, enums = STRUCTS if structs is None else structs, ENUMS if enums is None else enums
    out = {}
    for cls in structs:
        out[cls._c_name_] = ctypes.sizeof(cls)
        for name, _ in cls._fields_:
            out[f"{cls._c_name_}.{name}"] = getattr(cls, name).offset
    for c_name, (enum, prefix) in enums.items():
        for member in enum:
            out[f"{c_name}.{prefix}{member.name}"] = int(member)
    return out


def c_layout(lib: ctypes.CDLL) -> dict[str, int]:
    """The table the compiled library reports: struct sizes, field offsets, enum values."""
    count = i64()
    fn = lib.ll_abi_layout
    fn.restype, fn.argtypes = ctypes.POINTER(AbiEntry), (ctypes.POINTER(i64),)
    rows = fn(ctypes.byref(count))
    return {rows[i].name.decode(): int(rows[i].value) for i in range(count.value)}


def check(lib: ctypes.CDLL, path: Path | str = "the kernel library", structs=None, enums=None) -> None:
    """Raises `AbiMismatch` listing every difference between the mirror and the library's header."""
    enums = ENUMS if enums is None else enums
    c, py = c_layout(lib), mirror_layout(structs, enums)
    problems = []
    for name in sorted(c.keys() | py.keys()):
        what = "size" if "." not in name else "value" if name.split(".")[0] in enums else "offset"
        if name not in py:
            problems.append(f"{name}: C {what} {c[name]}, missing from the mirror")
        elif name not in c:
            problems.append(f"{name}: mirror {what} {py[name]}, missing from lilliput.h / ll_abi_layout()")
        elif c[name] != py[name]:
            problems.append(f"{name}: C {what} {c[name]}, mirror {py[name]}")
    if problems:
        raise AbiMismatch(
            f"the ctypes mirror (lilliput/infer/kernels/abi.py) disagrees with csrc/lilliput.h as compiled in {path}: "
            + "; ".join(problems) + ". Make abi.py, lilliput.h and csrc/abi.c's table say the same thing.")
