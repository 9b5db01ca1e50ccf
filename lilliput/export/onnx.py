"""ONNX for ONNX Runtime (the edge and mobile route): one graph for the whole decoder, KV cache in and out.

The graph is built node by node with `onnx.helper` from the model's own weights (no tracing):

    inputs   input_ids (B, T) int64; past_key_values.{i}.key / .value (B, n_kv_heads, P, head_dim)
    outputs  logits (B, T, vocab) float32; present.{i}.key / .value (B, n_kv_heads, P + T, head_dim)

Positions are P .. P+T-1 (no padding: batch rows share one length). The families' switches are in the
graph: q/k/v, output and MLP biases; qk-norm per head or over the projection; pre- and/or post-norms
and (1 + w) norms; GeGLU (tanh GELU); embedding scale, attention scale and soft-caps; sliding-window
layers; partial rotary and NoPE layers; rotary tables from lilliput's own (linear, yarn, llama3 scalings).
Refused by name: dynamic and LongRoPE scalings (their tables change with the sequence length) and MoE. RMSNorm is written as the
Pow/ReduceMean/Add/Sqrt/Div/Mul pattern ONNX Runtime fuses into SimplifiedLayerNormalization.

Types: float32 (MatMul), int8 and int4 (ONNX Runtime's `MatMulNBits`, com.microsoft).

- A model whose weights already have the type's bits keeps its grid: lilliput's codes map onto
  MatMulNBits exactly, so they are copied, not re-rounded (int4 groups are its blocks with their fp16
  scales and uint8 zeros; int8 rows are blocks sharing the row's scale with zero point 128).
- int8 of any other model is lilliput's RTN int8 of its float weights (as `RTNConfig(bits=8)`).
- int4 of any other model (float, or int8 dequantized) puts each block of `group` input columns (32
  unless asked) on its own min/max grid with a float zero point (`weights.minmax_int4`): scale =
  (max - min) / 15, zero = -min / scale. MatMulNBits takes float zero points, but ONNX Runtime 1.32
  runs them outside its packed kernels (measured on a 1536 x 576 layer, one row: 2.2 ms against
  0.05 ms, `accuracy_level` ignored), so the graph holds round(zero) as the kernel's uint8 zero point
  and adds the remainder as a per-block offset, x's block sums (B, T, K/group) @ offsets (K/group, N):
  (q - z) s = (q - round(z)) s + (round(z) - z) s. Exact, at one small MatMul per layer. A GGUF Q4_1
  block is on this grid (zero = -m/d), so a Q4_1-origin model (the embedded SmolLM2) exports
  losslessly by construction; what the grid costs shows on models trained in float. The output layer
  is int8 per block of 32 (symmetric, scale max|w|/127: GGUF Q8_0's grid), its own copy of a tied
  embedding, as lilliput's int4 keeps it: a float output layer would be most of each decode step.

MatMulNBits runs with `accuracy_level=4` (activations as int8 inside the product, as lilliput's own
int4 kernel does), the fast path on CPU.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lilliput.export.runtimes import MODEL_FILE
from lilliput.export.target import FORMATS, ExportFormat, export
from lilliput.export.weights import (Weight, agreement, int4_group, minmax_int4, output_is_tied, probe_ids, require,
                                     blockwise_int8, source_logits, weight_bits, weight_of)

TYPES = ("float32", "int8", "int4")
BITS = {"float32": 0, "int8": 8, "int4": 4}
TOLERANCE = {"float32": 1e-6, "int8": 0.05, "int4": 0.05}
"""Largest mean KL (nats) of ONNX Runtime's next-token distributions on the probe vs lilliput's on the same
weights (int8/int4: MatMulNBits rounds activations to int8 inside the product; SmolLM2-135M: int8 0.011,
int4 0.004, float32 0)."""
ACCURACY_LEVEL = 4
OPSET = 17


GROUPS = (16, 32, 64, 128, 256)
"""MatMulNBits block sizes (input columns per scale and zero point) an int4 export of a float model may use."""
GROUP = 32
"""The int4 block size when none is asked for (GGUF Q4_1's, and lilliput's finest int4 group)."""


def default_type(model) -> str:
    return {0: "float32", 8: "int8", 4: "int4"}[weight_bits(model)]


def check_group(group: int | None) -> None:
    if group is not None and group not in GROUPS:
        raise ValueError(f"int4 block size (--group) must be one of {', '.join(map(str, GROUPS))}, got {group}")


def block_group(k: int, requested: int, name: str) -> int:
    """The block size a layer of k input columns uses: `requested` if it divides k, else the largest smaller one."""
    for g in sorted(GROUPS, reverse=True):
        if g <= requested and k % g == 0:
            return g
    raise ValueError(f"{name} has {k} input features, not a multiple of 16: int4 cannot quantize it; "
                     f"export it as int8 or float32")


def prepared(model, type: str, group: int | None = None) -> tuple[nn.Module, dict[str, Weight]]:
    """(the model lilliput runs as the check's reference, the graph's matrices by module name where they are
    not `weight_of` that model's layers).

    `model` itself when its weights already have the type's bits (its grid is kept); else a float copy
    (float32), lilliput's RTN int8 of one (int8), or one whose block matrices hold their min/max int4 grid
    with float zero points, blocks of `group` columns (int4; see the module docstring)."""
    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.core.model import GPT
    from lilliput.export.weights import float_copy

    check_group(group)
    bits = BITS[type]
    if group is not None and bits != 4:
        raise ValueError(f"--group sets int4 block sizes; a {type} export has none: drop --group")
    if weight_bits(model) == bits and next(model.parameters()).dtype == torch.float32:
        if group is not None and int4_group(model) != group:
            raise ValueError(f"the model is already int4 in groups of {int4_group(model)}: its grid is exported as is; "
                             f"drop --group")
        return model, {}
    base = float_copy(model)
    if bits == 0:
        return base, {}
    if bits == 8:
        return quantize_(base, RTNConfig(bits=8)), {}
    if output_is_tied(base):  # the output layer becomes its own int8 copy, as lilliput's int4 keeps it
        state = {k: v.clone() for k, v in base.state_dict().items()}  # lm_head.weight: a copy of tok_emb's
        base = GPT.from_state_dict(base.config.replace(tie_embeddings=False), state).eval()
    grids: dict[str, Weight] = {}
    for name, m in base.named_modules():
        if not isinstance(m, nn.Linear) or not (name.startswith("layers.") or name == "lm_head"):
            continue
        k = m.weight.shape[1]
        grids[name] = (blockwise_int8(m.weight, block_group(k, GROUP, name)) if name == "lm_head" else
                       minmax_int4(m.weight, block_group(k, group or GROUP, name)))
        with torch.no_grad():
            m.weight.copy_(grids[name].dequantize())  # the reference runs the grid's weights in float
    return base, grids


# --- weights as initializers -------------------------------------------------------------------------

def _block_size(w: Weight) -> int:
    if w.bits == 4 or w.group < w.shape[1]:
        return w.group
    k = w.shape[1]  # int8: one scale per row, repeated over the largest block that divides K
    return next(b for b in (256, 128, 64, 32, 16) if k % b == 0)


def matmul_nbits_arrays(w: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(B packed (N, blocks, blob) uint8, scales (N, blocks) float32, zero points uint8, block size, offsets).

    offsets (N, blocks) float32 is None on an integer grid; with float zero points z the kernel holds
    round(z) and offsets = (round(z) - z) * scale is the rest of each block's dequantized value."""
    n, k = w.shape
    bs = _block_size(w)
    nb = k // bs
    offsets = None
    if w.bits == 8:
        packed = (w.codes.to(torch.int16) + 128).to(torch.uint8).reshape(n, nb, bs)
        scales = w.scale.expand(n, nb)  # (N, 1) per row, or (N, blocks) already
        zeros = torch.full((n, nb), 128, dtype=torch.uint8)
    else:
        c = w.codes.to(torch.uint8).reshape(n, nb, bs)
        packed = c[..., 0::2] | (c[..., 1::2] << 4)  # element 2j low nibble, 2j+1 high
        scales = w.scale
        zi = w.zero.round().clamp(0, 15)
        if not torch.equal(zi, w.zero):
            offsets = ((zi - w.zero) * w.scale).float().contiguous().numpy()
        z = zi.to(torch.uint8)
        if nb % 2:
            z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        zeros = z[:, 0::2] | (z[:, 1::2] << 4)
    return (packed.contiguous().numpy(), scales.float().contiguous().numpy(), zeros.contiguous().numpy(), bs, offsets)


class _Graph:
    """Accumulates nodes and initializers; every tensor name is unique."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def op(self, kind: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:
        outs = outputs if isinstance(outputs, list) else [self.name(hint or kind) for _ in range(outputs)]
        self.nodes.append(self.h.make_node(kind, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, w: Weight, hint: str) -> str:
        """x (..., K) @ W.T for W (N, K): MatMul on float weights, MatMulNBits on codes."""
        n, k = w.shape
        if w.bits == 0:
            return self.op("MatMul", [x, self.const(w.value.T.contiguous().numpy(), hint + ".weight")], hint)
        packed, scales, zeros, bs, offsets = matmul_nbits_arrays(w)
        ins = [x, self.const(packed, hint + ".qweight"), self.const(scales, hint + ".scales"),
               self.const(zeros, hint + ".zero_points")]
        y = self.op("MatMulNBits", ins, hint, domain="com.microsoft", K=k, N=n, bits=w.bits, block_size=bs,
                    accuracy_level=ACCURACY_LEVEL)
        if offsets is None:
            return y
        blocks = self.op("Reshape", [x, self.const(np.array([0, 0, k // bs, bs], np.int64))])  # (B, T, K/bs, bs)
        sums = self.op("ReduceSum", [blocks, self.const(np.array([-1], np.int64))], keepdims=0)  # (B, T, K/bs)
        return self.op("Add", [y, self.op("MatMul", [sums, self.const(offsets.T.copy(), hint + ".block_offsets")])],
                       hint)

    def rms_norm(self, x: str, weight: torch.Tensor, eps: float, hint: str) -> str:
        sq = self.op("Pow", [x, self.const(np.array(2.0, np.float32))])
        ms = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [ms, self.const(np.array(eps, np.float32))])])
        return self.op("Mul", [self.op("Div", [x, rms]), self.const(weight.detach().float().numpy(), hint)], hint)


def refuse(c) -> None:
    """One line naming a switch the graph cannot express: rotary tables that change with the sequence
    length (the graph holds one table), or MoE feed-forwards."""
    kind = (c.rope_scaling or {}).get("rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise ValueError(f"ONNX export of {c.family}: rope scaling {kind!r} picks its frequencies by the sequence "
                         "length, and the graph holds one rotary table; export --format hf instead")
    if c.ffn != "swiglu":
        raise ValueError(f"ONNX export of {c.family}: {c.ffn} feed-forwards are not in the graph builder; "
                         "export --format hf instead")


def build_graph(model, grids: dict[str, Weight] | None = None):
    """The ONNX ModelProto of `model` (its quantized layers as MatMulNBits, the rest float32); `grids` gives
    the matrices of the layers it names (by module name) instead of their own weights."""
    from onnx import TensorProto, helper

    grids = grids or {}
    refuse(model.config)
    weight = lambda name: grids[name] if name in grids else weight_of(model.get_submodule(name))  # noqa: E731
    c = model.config
    nh, nkv, hs = c.n_heads, c.n_kv_heads, c.hd
    g = _Graph()
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])]
    for i in range(c.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch", nkv, "past", hs]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", nkv, "total", hs]))

    # positions P .. P+T-1, each layer's rotary tables, and the additive masks (T, P+T): causal, and sliding
    past = g.op("Shape", ["past_key_values.0.key"], start=2, end=3)  # [P]
    seq = g.op("Shape", ["input_ids"], start=1, end=2)  # [T]
    total = g.op("Add", [past, seq])
    scalar = lambda t: g.op("Squeeze", [t, i64(0)])  # noqa: E731
    pos = g.op("Range", [scalar(past), scalar(total), g.const(np.array(1, np.int64))])  # (T,)
    keys = g.op("Range", [g.const(np.array(0, np.int64)), scalar(total), g.const(np.array(1, np.int64))])  # (S,)
    kq = g.op("Sub", [g.op("Unsqueeze", [pos, i64(1)]), g.op("Unsqueeze", [keys, i64(0)])])  # (T, S): q - k
    zero, neg = g.const(np.array(0.0, np.float32)), g.const(np.array(-1e30, np.float32))
    masks: dict[int | None, str] = {}

    def mask(window: int | None) -> str:  # keys with 0 <= q - k (< window)
        if window not in masks:
            seen = g.op("GreaterOrEqual", [kq, g.const(np.array(0, np.int64))])
            if window is not None:
                seen = g.op("And", [seen, g.op("Less", [kq, g.const(np.array(window, np.int64))])])
            masks[window] = g.op("Where", [seen, zero, neg])
        return masks[window]

    tables: dict[tuple, tuple[str, str]] = {}

    def rope(rotary) -> tuple[str, str]:  # (T, rot) cos and sin at the positions, from lilliput's own tables
        if rotary.key not in tables:
            cos_t, sin_t = rotary.tables(c.max_seq_len, "cpu")
            tables[rotary.key] = (g.op("Gather", [g.const(cos_t[:c.max_seq_len].numpy(), "rope_cos"), pos], axis=0),
                                  g.op("Gather", [g.const(sin_t[:c.max_seq_len].numpy(), "rope_sin"), pos], axis=0))
        return tables[rotary.key]

    def rotate(x: str, rotary) -> str:  # x (B, H, T, hs), rotate-half over its first rot values
        cos, sin = rope(rotary)
        rot = c.rot_dim
        if rot < hs:
            x, rest = g.op("Split", [x, i64(rot, hs - rot)], outputs=2, axis=-1)
        x1, x2 = g.op("Split", [x, i64(rot // 2, rot // 2)], outputs=2, axis=-1)
        turned = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        y = g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [turned, sin])])
        return y if rot == hs else g.op("Concat", [y, rest], axis=-1)

    def repeat_kv(x: str) -> str:  # (B, nkv, S, hs) -> (B, nh, S, hs), query head h reads kv head h // (nh/nkv)
        if nh == nkv:
            return x
        x = g.op("Expand", [g.op("Unsqueeze", [x, i64(2)]), i64(1, 1, nh // nkv, 1, 1)])
        return g.op("Reshape", [x, i64(0, nh, -1, hs)])

    def norm(x: str, module, hint: str) -> str:  # RMSNorm applying offset + weight
        return g.rms_norm(x, module.weight.detach().float() + module.offset, c.norm_eps, hint)

    def softcap(x: str, cap: float | None) -> str:
        if cap is None:
            return x
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, g.const(np.array(cap, np.float32))])]),
                            g.const(np.array(cap, np.float32))])

    def linear(x: str, name: str, hint: str) -> str:
        y = g.linear(x, weight(name), hint)
        bias = model.get_submodule(name).bias if hasattr(model.get_submodule(name), "bias") else None
        return y if bias is None else g.op("Add", [y, g.const(bias.detach().float().numpy(), hint + ".bias")])

    def act(x: str) -> str:
        if c.act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        f = lambda v: g.const(np.array(v, np.float32))  # noqa: E731  tanh GELU (opset 17 has no Gelu)
        inner = g.op("Mul", [f(math.sqrt(2 / math.pi)), g.op("Add", [x, g.op("Mul", [f(0.044715),
                                                                                     g.op("Pow", [x, f(3.0)])])])])
        return g.op("Mul", [g.op("Mul", [f(0.5), x]), g.op("Add", [f(1.0), g.op("Tanh", [inner])])])

    scale = c.attn_scale if c.attn_scale is not None else 1 / math.sqrt(hs)
    embed = g.const(model.tok_emb.weight.detach().float().numpy(), "embed_tokens")  # (V, C)
    x = g.op("Gather", [embed, "input_ids"], axis=0)  # (B, T, C)
    if c.emb_scale is not None:
        x = g.op("Mul", [x, g.const(np.array(c.emb_scale, np.float32), "emb_scale")])
    for i, block in enumerate(model.layers):
        p, mixer = f"layers.{i}", block.mixer
        h = norm(x, block.attn_norm, f"{p}.attn_norm") if c.pre_norms else x
        qkv = linear(h, f"{p}.mixer.wqkv", f"{p}.wqkv")  # (B, T, (nh+2nkv)*hs)
        if c.qk_norm == "proj":  # over the whole projection (OLMo 2)
            q, k, v = g.op("Split", [qkv, i64(nh * hs, nkv * hs, nkv * hs)], outputs=3, axis=-1)
            qkv = g.op("Concat", [norm(q, mixer.q_norm, f"{p}.q_norm"), norm(k, mixer.k_norm, f"{p}.k_norm"), v],
                       axis=-1)
        qkv = g.op("Transpose", [g.op("Reshape", [qkv, i64(0, 0, nh + 2 * nkv, hs)])], perm=[0, 2, 1, 3])
        q, k, v = g.op("Split", [qkv, i64(nh, nkv, nkv)], outputs=3, axis=1)  # (B, nh|nkv|nkv, T, hs)
        if c.qk_norm == "head":
            q, k = norm(q, mixer.q_norm, f"{p}.q_norm"), norm(k, mixer.k_norm, f"{p}.k_norm")
        if mixer.rotary is not None:
            q, k = rotate(q, mixer.rotary), rotate(k, mixer.rotary)
        k = g.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2)
        kt = g.op("Transpose", [repeat_kv(k)], perm=[0, 1, 3, 2])  # (B, nh, hs, S)
        scores = softcap(g.op("Mul", [g.op("MatMul", [q, kt]), g.const(np.array(scale, np.float32))]), c.attn_softcap)
        probs = g.op("Softmax", [g.op("Add", [scores, mask(mixer.window)])], axis=-1)  # (B, nh, T, S)
        y = g.op("Transpose", [g.op("MatMul", [probs, repeat_kv(v)])], perm=[0, 2, 1, 3])  # (B, T, nh, hs)
        y = linear(g.op("Reshape", [y, i64(0, 0, nh * hs)]), f"{p}.mixer.wo", f"{p}.wo")
        x = g.op("Add", [x, norm(y, block.attn_post_norm, f"{p}.attn_post_norm") if c.post_norms else y])
        h = norm(x, block.ffn_norm, f"{p}.ffn_norm") if c.pre_norms else x
        gate, up = g.op("Split", [linear(h, f"{p}.ffn.w_gate_up", f"{p}.w_gate_up"), i64(c.ffn_dim, c.ffn_dim)],
                        outputs=2, axis=-1)
        y = linear(g.op("Mul", [act(gate), up]), f"{p}.ffn.w_down", f"{p}.w_down")  # act(gate) * up
        x = g.op("Add", [x, norm(y, block.ffn_post_norm, f"{p}.ffn_post_norm") if c.post_norms else y])
    x = norm(x, model.norm, "norm")
    if output_is_tied(model):  # the embedding table read transposed: no second copy of it
        flat = g.op("Reshape", [x, i64(-1, c.dim)])
        logits = g.op("Gemm", [flat, embed], transB=1)  # (B*T, V)
        logits = g.op("Reshape", [logits, g.op("Concat", [g.op("Shape", [x], start=0, end=2), i64(c.vocab_size)],
                                                          axis=0)])
    else:
        logits = g.linear(x, weight("lm_head"), "lm_head")
    g.op("Identity", [softcap(logits, c.final_softcap)], outputs=["logits"])
    graph = helper.make_graph(g.nodes, c.name, inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="lilliput", ir_version=9)


def write_onnx(model, tokenizer, path: Path, type: str, source=None, group: int | None = None) -> dict:
    """A folder: model.onnx, config.json (Hugging Face Llama fields), tokenizer files. `group`: int4 block size
    of a model quantized for the export (None: 32)."""
    import onnx

    from lilliput.core.record import write_json
    from lilliput.export.hf import generation_config, hf_config
    from lilliput.export.vocab import as_bpe

    src, grids = prepared(model, type, group)
    proto = build_graph(src, grids)
    path.mkdir(parents=True)
    big = proto.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to a side file
    onnx.save_model(proto, path / MODEL_FILE, save_as_external_data=big, location=MODEL_FILE + ".data")
    tok = as_bpe(tokenizer)
    write_json(path / "config.json", hf_config(src, "float32", tok))
    write_json(path / "generation_config.json", generation_config(tok))
    tok.save(path)
    weights = {t.name for t in proto.graph.initializer}
    products = [n.op_type for n in proto.graph.node if n.op_type in ("MatMul", "MatMulNBits", "Gemm")
                and n.input[1] in weights]
    blocks = sorted({w.group for w in grids.values() if w.bits == 4})
    offsets = sum(".block_offsets_" in name for name in weights)  # the float zero points' remainders
    return {"matmul_nbits": products.count("MatMulNBits"),
            "matmul_float": len(products) - products.count("MatMulNBits") - offsets, "block_offsets": offsets,
            "requantized": src is not model and BITS[type] != 0, "accuracy_level": ACCURACY_LEVEL,
            "int4_grid": None if type != "int4" else "min/max, float zero points" if grids else "the model's own",
            "int4_block_sizes": blocks or None}


def check_onnx(model, tokenizer, path: Path, type: str, group: int | None = None) -> dict:
    """Run the folder in ONNX Runtime: prefill logits within tolerance of lilliput's on the same weights,
    and one cached decode step equal to the prefill's last position."""
    from lilliput.export.runtimes import OnnxModel
    from lilliput.export.target import ExportCheckError

    src, _ = prepared(model, type, group)
    ids = probe_ids(tokenizer, model.config.vocab_size)
    runner = OnnxModel(path, threads=None)
    full, _ = runner.run([ids])
    report = require(agreement(source_logits(src, ids), torch.from_numpy(full[0])), TOLERANCE[type],
                     f"the {type} ONNX graph")
    _, past = runner.run([ids[:-4]])  # the last 4 positions again, through the KV cache
    cached, _ = runner.run([ids[-4:]], past)
    step = agreement(torch.from_numpy(full[0, -4:]), torch.from_numpy(cached[0]))
    if not step["mean_kl"] <= TOLERANCE[type]:
        raise ExportCheckError(f"the ONNX graph's cached decode differs from its prefill (mean KL {step['mean_kl']:.3g})")
    return {**report, "cached_decode_max_abs_diff": step["max_abs_logit_diff"], "cached_decode_mean_kl": step["mean_kl"]}


ONNX = FORMATS.register("onnx")(ExportFormat(
    name="onnx", types=TYPES, writes_folder=True, write=write_onnx, check=check_onnx, default_type=default_type,
    runtime="ONNX Runtime"))


def onnx_format(group: int | None = None) -> ExportFormat:
    """The ONNX format with int4 blocks of `group` columns for a model quantized for the export."""
    check_group(group)
    return ONNX if group is None else replace(ONNX, write=partial(write_onnx, group=group),
                                              check=partial(check_onnx, group=group))


def export_onnx(model, tokenizer, path: Path | str, type: str | None = None, force: bool = False,
                check: bool = True, group: int | None = None) -> Path:
    """Write a checked ONNX folder of `model` at `path` (float32, int8 or int4); returns the path."""
    return export(model, tokenizer, onnx_format(group), path, type, force=force, check=check).path
