"""Quantized linear layers: int8 per output channel (symmetric) and int4 per group (asymmetric).

Both keep packed integer codes as buffers (what the checkpoint stores) and run two ways:
- up to `KERNEL_ROWS` rows of x on CPU (decode, drafts, prompt chunks): the C kernels of
  `lilliput.infer.kernels` (int8 x in blocks of 32, integer dot products), through the same library
  and thread pool as the fp32 GEMV; the fused step runs them through the descriptor that
  `kernel_desc()` asks `kernels.descriptor.make` for. int8
  codes are repacked in place into the kernels' batch layout where the build has it (Int8Linear);
- anything else (long evaluation batches, autograd, other devices, no C compiler): dequantize to
  x's dtype and `F.linear`, the same numbers up to float rounding (and int8 activations).

int4 layout (shared with the kernel): each block of 32 columns of a row is 16 bytes, byte j
holding column j in its low nibble and column j + 16 in its high nibble. Scales are fp16 (int4) or
fp32 (int8), kept as their int16 / int32 bits so that `model.to(dtype)` leaves them alone;
zeros are uint8 in [0, 15]. A layer quantized from a biased `nn.Linear` keeps its bias in float
(`bias`, (N,); None without), added by the kernels and by the torch path alike.

Both register with core as layer kinds `int8` and `int4` (`lilliput.core.layers`): a checkpoint
records each layer's kind and `spec()`, and core rebuilds it with `from_spec()` before loading.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.layers import register_layer
from lilliput.infer.kernels import Kind, Variant, descriptor, ops

GROUP_SIZES = (128, 64, 32)
"""int4 group sizes the kernels run, largest first."""
VARIANTS = {"auto": Variant.AUTO, "widen": Variant.WIDEN, "dot": Variant.DOT}
BATCH_KIND = {Kind.INT8: Kind.INT8_BATCH, Kind.INT4: Kind.INT4_BATCH}
"""A row-major kind -> its batch layout (`kernel_desc()` repacks into it where the build has it)."""
"""Kernel paths: auto (the measured fastest: dot), widen (int -> fp32, FMA), dot (int8 x, integer dot)."""
BLOCK = 32  # columns per int4 packing block
KERNEL_ROWS = 256
"""Most rows of x sent to the C kernels (8 per pass over the weights); beyond, dequantize + F.linear.
Measured on 2 Xeon cores, a (3072, 576) layer at 64 rows: int8 kernel 4.9 ms vs 33.6 ms dequantizing,
int4 3.2 vs 75 ms (the dequantization, not the product, is what costs)."""


# --- codes <-> weights (pure functions) -----------------------------------------------------------

def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scale of w (N, K): (N, 1), amax / 127 (never 0)."""
    return (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-10)


def int4_params(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max grid of w (N, K) per group of columns: scale (fp16-exact), zero, each (N, K/group)."""
    g = w.float().reshape(w.shape[0], -1, group)  # (N, ng, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()  # the kernel reads fp16 scales
    zero = (-lo / scale).round().clamp(0, 15)
    return scale, zero


def expand(params: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group (N, ng) -> per-column (N, ng * group)."""
    return params.repeat_interleave(group, dim=1)


def quantize_int4(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] for w (N, K') with per-column scale and zero (N, K') or (N, 1)."""
    return (w / scale + zero).round().clamp(0, 15)


def quantize_int8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes in [-127, 127] for w (N, K') with per-row scale (N, 1)."""
    return (w / scale).round().clamp(-127, 127)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15], K % 32 == 0 -> uint8 (N, K/2) in the kernel's block order."""
    n, k = q.shape
    b = q.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(n, k // 2)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> codes (N, K) uint8, the inverse of pack_int4."""
    n, h = p.shape
    b = p.reshape(n, h // 16, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).reshape(n, 2 * h)


# --- modules ---------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """Common part of the quantized layers: kernel dispatch and the torch fallback."""

    kind: Kind
    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel_variant = "auto"  # not saved: a runtime choice (bench/quantize.py compares them)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.packed = 0  # rows per group of the kernels' batch layout; 0 = row-major (a runtime layout, not saved)
        self.register_state_dict_post_hook(_row_major_state)
        self.register_load_state_dict_pre_hook(_load_into_layout)

    def row_major(self) -> dict[str, torch.Tensor]:
        """The code buffers as a checkpoint stores them (row-major), whatever the layout in memory."""
        raise NotImplementedError

    def in_layout(self, buffers: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """Row-major code buffers in the batch layout of `rows` rows per group (0: row-major)."""
        raise NotImplementedError

    def pack_(self, rows: int) -> "QuantLinear":
        """Store the codes in the kernels' batch layout of `rows` rows per group (0: row-major), in place."""
        if rows != self.packed:
            for name, t in self.in_layout(self.row_major(), rows).items():
                setattr(self, name, t)
            self.packed = rows
        return self

    def _layout_rows(self) -> int:
        """Rows per group of the batch layout this build runs for this layer; 0: row-major."""
        return 0

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias = bias.detach().float().reshape(self.out_features).clone()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _tensors(self) -> dict:
        """The descriptor's tensors and group: weight, scale and (int4) zero, group."""
        raise NotImplementedError

    def kernel_desc(self) -> "descriptor.Linear | None":
        """This layer's descriptor for the C kernels (`kernels.descriptor.make`); None off CPU. Where
        the build has a batch layout for this kind, the codes are first repacked into it in place."""
        if self.qweight.device.type != "cpu":
            return None
        rows = self._layout_rows() if self.kernel_variant == "auto" else 0
        self.pack_(rows)
        desc = descriptor.make(self.kind, n=self.out_features, k=self.in_features, bias=self.bias,
                               variant=VARIANTS[self.kernel_variant], **self._tensors())
        if self.packed:
            desc.kind = BATCH_KIND[self.kind]
            desc.group = desc.group or self.packed  # int8: rows per group; int4 keeps its column group
        return desc

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(N, K): the float weight these codes stand for (what a parameter count counts)."""
        return self.out_features, self.in_features

    def spec(self) -> dict:
        """What config.json records for this layer (enough to rebuild it empty)."""
        spec = {"bits": self.bits, "in_features": self.in_features, "out_features": self.out_features}
        return {**spec, "bias": True} if self.bias is not None else spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if 0 < rows <= KERNEL_ROWS and x.is_cpu and not (torch.is_grad_enabled() and x.requires_grad):
            y = self._kernel(x, rows)
            if y is not None:
                return y
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _kernel(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        desc = self.kernel_desc()
        y = None if desc is None else ops.run(desc, x.reshape(rows, self.in_features))
        return None if y is None else y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


@register_layer("int8")
class Int8Linear(QuantLinear):
    """W (N, K) = qweight (int8, [-127, 127]) * scale (N,) fp32 (kept as int32 bits).

    For the C kernels of a machine with AVX2, `kernel_desc()` repacks the codes in place into the
    batch layout (`pack_`: groups of 16 rows with AVX-512 VNNI, 8 with AVX2, 4 columns of each row
    side by side, + 128;
    see kernels/csrc/qgemv_int8.c, `Kind.INT8_BATCH`), which reads the same bytes per token and runs batches and prompt
    chunks ~2x faster. The module still behaves as row-major everywhere else: `codes()`,
    `dequantize()` and the state dict (a checkpoint stores row-major codes, and loading row-major
    codes into a packed module repacks them)."""

    kind, bits = Kind.INT8, 8

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32).view(torch.int32))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Codes (N, K) in [-127, 127], per-row scale (N,) or (N, 1) and an optional float bias (N,)."""
        m = cls(q.shape[1], q.shape[0])
        m._set_bias(bias)
        m.qweight.copy_(q.to(torch.int8))
        m.scale.copy_(scale.reshape(-1).float().view(torch.int32))
        return m

    @classmethod
    def from_spec(cls, spec: dict) -> "Int8Linear":
        return cls(spec["in_features"], spec["out_features"], spec.get("bias", False))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Round-to-nearest int8 of an nn.Linear, its bias kept in float."""
        w = linear.weight.detach().float()
        scale = int8_scale(w)
        return cls.from_codes(quantize_int8(w, scale), scale, linear.bias)

    def codes(self) -> torch.Tensor:
        """The codes (N, K) int8, row-major, whatever the layout in memory."""
        return unpack_int8(self.qweight, self.packed) if self.packed else self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes().float() * self.scale.view(torch.float32)[:, None]).to(dtype)

    def row_major(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.codes()}

    def in_layout(self, buffers: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        q = buffers["qweight"]
        return {"qweight": pack_int8(q, rows) if rows else q.contiguous()}

    def _layout_rows(self) -> int:
        rows = ops.int8_batch_rows()
        ok = rows and not (self.out_features % rows or self.in_features % BLOCK) and self.qweight.is_cpu
        return rows if ok else 0

    def _tensors(self) -> dict:
        return {"weight": self.qweight, "scale": self.scale}


def pack_int8(q: torch.Tensor, rows: int) -> torch.Tensor:
    """Codes (N, K) int8 -> uint8 (N / rows, K / 4, rows, 4) of q + 128: the kernels' batch layout."""
    n, k = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.reshape(n // rows, rows, k // 4, 4).transpose(1, 2).contiguous()


def unpack_int8(p: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of pack_int8: codes (N, K) int8."""
    g, k4 = p.shape[0], p.shape[1]
    return (p.transpose(1, 2).reshape(g * rows, k4 * 4).to(torch.int16) - 128).to(torch.int8)


def pack_int4_batch(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] -> uint8 (N / 8, K / 32, 4, 32): the kernels' int4 batch layout (per
    block of 32 columns, chunk p holds columns 8p..8p+3 of the group's 8 rows in its low nibbles and
    8p+4..8p+7 in its high nibbles, row i at bytes 4i..4i+3)."""
    n, k = q.shape
    t = q.to(torch.uint8).reshape(n // 8, 8, k // 32, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    return (t[:, :, :, 0] | (t[:, :, :, 1] << 4)).reshape(n // 8, k // 32, 4, 32).contiguous()


def unpack_int4_batch(p: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_batch: codes (N, K) uint8."""
    g, nb = p.shape[0], p.shape[1]
    b = p.reshape(g, nb, 4, 8, 4)
    t = torch.stack((b & 15, b >> 4), dim=3)  # (g, nb, 4, 2, 8, 4)
    return t.permute(0, 4, 1, 2, 3, 5).reshape(g * 8, nb * 32)


def group_rows(params: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row group parameters (N, ng) -> (N / rows, ng, rows), the batch layouts' order."""
    n, ng = params.shape
    return params.reshape(n // rows, rows, ng).transpose(1, 2).contiguous()


def ungroup_rows(params: torch.Tensor) -> torch.Tensor:
    """The inverse of group_rows: (N, ng)."""
    g, ng, rows = params.shape
    return params.transpose(1, 2).reshape(g * rows, ng)


def _row_major_state(module: QuantLinear, state: dict, prefix: str, local_metadata) -> None:
    if module.packed:
        state.update({prefix + name: t for name, t in module.row_major().items()})


def _load_into_layout(module: QuantLinear, state: dict, prefix: str, *args) -> None:
    """Row-major codes loaded into a module in a batch layout: repacked (a checkpoint stores row-major)."""
    names = list(module.row_major())
    if module.packed and all(prefix + n in state for n in names) and \
            state[prefix + "qweight"].shape != module.qweight.shape:
        row_major = {n: state[prefix + n] for n in names}
        state.update({prefix + n: t for n, t in module.in_layout(row_major, module.packed).items()})


@register_layer("int4")
class Int4Linear(QuantLinear):
    """W (N, K) = (codes - zero) * scale per group of `group_size` columns; codes packed 2 a byte."""

    kind, bits = Kind.INT4, 4

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES} and divide in_features="
                             f"{in_features}, got {group_size}")
        self.group_size = group_size
        ng = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, ng, dtype=torch.int16))  # fp16 bits
        self.register_buffer("zero", torch.zeros(out_features, ng, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> "Int4Linear":
        """Codes (N, K) in [0, 15]; scale and zero (N, K/group_size); an optional float bias (N,)."""
        m = cls(q.shape[1], q.shape[0], group_size)
        m._set_bias(bias)
        m.qweight.copy_(pack_int4(q))
        m.scale.copy_(scale.half().view(torch.int16))
        m.zero.copy_(zero.to(torch.uint8))
        return m

    @classmethod
    def from_spec(cls, spec: dict) -> "Int4Linear":
        return cls(spec["in_features"], spec["out_features"], spec["group_size"], spec.get("bias", False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        """Round-to-nearest int4 (min/max grid per group) of an nn.Linear, its bias kept in float."""
        w = linear.weight.detach().float()
        scale, zero = int4_params(w, group_size)
        q = quantize_int4(w, expand(scale, group_size), expand(zero, group_size))
        return cls.from_codes(q, scale, zero, group_size, linear.bias)

    def codes(self) -> torch.Tensor:
        """The codes (N, K) uint8 in [0, 15], whatever the layout in memory."""
        return unpack_int4_batch(self.qweight) if self.packed else unpack_int4(self.qweight)

    def scales(self) -> torch.Tensor:
        """Per-group scales (N, K / group_size) as fp32."""
        return (ungroup_rows(self.scale) if self.packed else self.scale).view(torch.float16).float()

    def zeros(self) -> torch.Tensor:
        """Per-group zero points (N, K / group_size) uint8."""
        return ungroup_rows(self.zero) if self.packed else self.zero

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.codes().float()  # (N, K)
        s = expand(self.scales(), self.group_size)
        z = expand(self.zeros().float(), self.group_size)
        return ((q - z) * s).to(dtype)

    def row_major(self) -> dict[str, torch.Tensor]:
        if not self.packed:
            return {"qweight": self.qweight, "scale": self.scale, "zero": self.zero}
        return {"qweight": pack_int4(self.codes()), "scale": ungroup_rows(self.scale), "zero": ungroup_rows(self.zero)}

    def in_layout(self, buffers: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        if not rows:
            return {name: t.contiguous() for name, t in buffers.items()}
        return {"qweight": pack_int4_batch(unpack_int4(buffers["qweight"])),
                "scale": group_rows(buffers["scale"], rows), "zero": group_rows(buffers["zero"], rows)}

    def _layout_rows(self) -> int:
        rows = ops.int4_batch_rows()
        return rows if rows and not self.out_features % rows and self.qweight.is_cpu else 0

    def _tensors(self) -> dict:
        return {"weight": self.qweight, "scale": self.scale, "zero": self.zero, "group": self.group_size}

    def spec(self) -> dict:
        return {**super().spec(), "group_size": self.group_size}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
