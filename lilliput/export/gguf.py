"""GGUF for llama.cpp, Ollama and LM Studio, written with the `gguf` package's `GGUFWriter`.

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for the model's family:
its architecture (`core.gguf.ARCHS`: llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3, olmo2,
olmoe, smollm3), the `{arch}.*` hyperparameters, its tensor names (`core.gguf.tensor_table`), q/k
rows permuted where llama.cpp rotates adjacent pairs (llama, smollm3), Gemma's norms as 1 + w,
experts stacked, Llama 3 and LongRoPE scalings as tensors, and the tokenizer (`gpt2` byte-level BPE
with its pre-tokenizer name, or `llama` SentencePiece with scores) with the chat template. A switch
llama.cpp hard-codes otherwise (Gemma 3's sliding pattern and local rope base, SmolLM3's NoPE
period, Qwen3-MoE's renormalised top-k, ...) is refused in one line before anything is written.

Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (`gguf.quants`). Integer codes lilliput already holds are
copied, not re-rounded: int4 groups (32, 64 or 128 columns: whole Q4_1 blocks) become Q4_1 blocks
with d = scale and m = -zero * scale (m rounded to fp16, the only change); int8 rows become Q8_0
blocks with d = the row's scale in fp16. Norms, biases and MoE routers stay F32. With a 4-bit type
the token embedding (and the output layer, unless it is int4 on Q4_1's grid) is Q8_0, as lilliput's
int4 models keep the output layer int8. A matrix whose width is not a multiple of 32 falls back to
F16, as in llama.cpp's converter; `written["fallback_f16"]` lists those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lilliput.core import families
from lilliput.core.gguf import (ARCHS, GEMMA3_LOCAL_THETA, GGUF_FIELDS, Arch, gemma_attn_scale, is_norm,
                                llama3_factors, permute_order, qk_heads, split_sizes, tensor_table)
from lilliput.export.target import FORMATS, ExportFormat, export
from lilliput.export.weights import (Weight, agreement, output_is_tied, probe_ids, require, source_logits,
                                     weight_bits, weight_of)

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q4_0": 0.5, "Q4_1": 0.5}
"""Largest mean KL (nats) of the probe's next-token distributions, export vs the source model as lilliput runs
it. SmolLM2-135M (float, from its Q4_1 GGUF): F32 0, Q8_0 0.0018, Q4_1 0 (its own grid), Q4_0 0.30 (a second
rounding onto a symmetric grid)."""
BLOCK = 32

def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.half().numpy().view(np.uint8).reshape(*x.shape[:-1], -1)


def q8_0_from_int8(w: Weight) -> np.ndarray:
    """Q8_0 blocks (N, K/32 * 34) holding lilliput's int8 codes and the row's scale as each block's d."""
    n, k = w.shape
    d = _fp16_bytes(w.scale.expand(n, k // BLOCK)[..., None])  # (N, nb, 2)
    qs = w.codes.reshape(n, k // BLOCK, BLOCK).numpy().view(np.uint8)  # (N, nb, 32)
    return np.concatenate([d, qs], axis=-1).reshape(n, -1)


def q4_1_from_int4(w: Weight) -> np.ndarray:
    """Q4_1 blocks (N, K/32 * 20): d = scale, m = -zero * scale, codes in ggml's order (lilliput's too)."""
    n, k = w.shape
    per = w.group // BLOCK  # Q4_1 blocks per lilliput group
    scale = w.scale.repeat_interleave(per, dim=1)  # (N, nb)
    zero = w.zero.repeat_interleave(per, dim=1)
    d = _fp16_bytes(scale[..., None])  # (N, nb, 2)
    m = _fp16_bytes((-zero * scale)[..., None])
    b = w.codes.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    qs = (b[..., :16] | (b[..., 16:] << 4)).numpy()  # (N, nb, 16): byte j = col j low, col j+16 high
    return np.concatenate([d, m, qs], axis=-1).reshape(n, -1)


def encode(w: Weight, type: str):
    """(array, raw ggml type or None, type written) of one matrix."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[type]
    if type in QUANTIZED and w.shape[1] % BLOCK:
        type, qtype = "F16", gguf.GGMLQuantizationType.F16  # llama.cpp's converter falls back the same way
    if type == "Q8_0" and w.bits == 8:
        return q8_0_from_int8(w), qtype, type
    if type == "Q4_1" and w.bits == 4:
        return q4_1_from_int4(w), qtype, type
    x = w.dequantize().numpy()
    if type == "F32":
        return np.ascontiguousarray(x, dtype=np.float32), None, type
    if type == "F16":
        return x.astype(np.float16), None, type
    return quantize(np.ascontiguousarray(x, dtype=np.float32), qtype), qtype, type


def default_type(model) -> str:
    bits = weight_bits(model)
    if bits:
        return {8: "Q8_0", 4: "Q4_1"}[bits]
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def gguf_arch(config) -> Arch:
    """The llama.cpp architecture of the model's family; one line when llama.cpp cannot run the model as
    lilliput does (a switch llama.cpp's arch lacks or hard-codes otherwise)."""
    c = config
    if c.family not in families.FAMILIES or families.FAMILIES[c.family].gguf_arch not in ARCHS:
        raise ValueError(f"model family {c.family!r} has no llama.cpp architecture lilliput writes; "
                         "export with --format hf or onnx")
    arch = ARCHS[families.FAMILIES[c.family].gguf_arch]
    why = _unexpressed(c, arch)
    if why:
        raise ValueError(f"llama.cpp's {arch.name} architecture cannot express this {c.family} model: {why}; "
                         "export with --format hf or onnx")
    return arch


def expresses(model) -> None:
    """One line naming what llama.cpp cannot run: a layer that is not attention with a SwiGLU/GeGLU or
    MoE feed-forward, or a switch of the family its architecture lacks (`gguf_arch`)."""
    from lilliput.core.model import GPT, Attention, SwiGLU
    from lilliput.core.moe import MoE

    if not isinstance(model, GPT):
        raise ValueError(f"gguf export takes a lilliput GPT, got {type(model).__name__}")
    for i, block in enumerate(model.layers):
        if not isinstance(block.mixer, Attention):
            raise ValueError(f"layer {i} has mixer {type(block.mixer).__name__} ({model.config.mixer!r}): llama.cpp "
                             "runs attention blocks only; export to lilliput's own checkpoint instead")
        if not isinstance(block.ffn, (SwiGLU, MoE)):
            raise ValueError(f"layer {i} has feed-forward {type(block.ffn).__name__} ({model.config.ffn!r}): "
                             "llama.cpp runs gated or MoE feed-forwards only; export to lilliput's own checkpoint")
    gguf_arch(model.config)


def _unexpressed(c, arch: Arch) -> str | None:
    """What llama.cpp would compute differently from lilliput, or None."""
    n = c.n_layers
    gemma = arch.name.startswith("gemma")
    if c.mixer != "attention" or set(c.layer_mixers) - {"attention"}:
        return f"{c.mixer} layers"
    if (c.ffn == "moe") != arch.moe:
        return f"a {c.ffn} feed-forward"
    checks = [
        (c.act != arch.act, f"{c.act} activation"),
        (c.qk_norm != arch.qk_norm, f"qk-norm {c.qk_norm}"),
        ((c.pre_norms, c.post_norms) != (arch.pre_norms, arch.post_norms), "a different set of block norms"),
        (c.norm_offset != arch.norm_shift, f"norm offset {c.norm_offset}"),
        (c.attn_bias and "attn" not in arch.biases, "q/k/v biases"),
        (c.attn_out_bias and "attn_out" not in arch.biases, "an attention output bias"),
        (c.mlp_bias and "mlp" not in arch.biases, "feed-forward biases"),
        (c.emb_scale != (float(c.dim) ** 0.5 if gemma else None), f"embedding scale {c.emb_scale}"),
        (c.attn_scale is not None and (not gemma or not np.isclose(c.attn_scale, gemma_attn_scale(arch.name, c))),
         f"attention scale {c.attn_scale} (llama.cpp: 1/sqrt(head_dim))"),
        (c.attn_softcap is not None and arch.name != "gemma2", "attention soft-capping"),
        (c.final_softcap is not None and not gemma, "final logit soft-capping"),
        (c.nope_layers != arch.nope_layers(n), f"NoPE layers {list(c.nope_layers)} (llama.cpp: "
                                              f"{list(arch.nope_layers(n))})"),
        (c.rotary_dim is not None and arch.name != "phi3", "partial rotary"),
        (c.ffn == "moe" and c.moe_norm_topk != arch.moe_norm_topk and c.moe_top_k > 1,
         f"moe_norm_topk={c.moe_norm_topk} (llama.cpp: {arch.moe_norm_topk})"),
        (c.ffn == "moe" and c.moe_capacity is not None, "an expert capacity limit"),
        # llama.cpp's olmoe sizes the key norm by n_embd: the multi-head attention OLMoE ships with
        (arch.name == "olmoe" and c.n_kv_heads != c.n_heads, "grouped-query attention (llama.cpp's olmoe: "
                                                            "as many key/value heads as query heads)"),
    ]
    if c.sliding_window:
        want = arch.sliding_layers(n)
        checks.append((not want, "a sliding window"))
        checks.append((bool(want) and c.sliding_layers != want and arch.name != "olmo2",
                       f"sliding layers {list(c.sliding_layers)} (llama.cpp: {list(want)})"))
    local = c.rope_local_theta if c.sliding_layers else None
    checks.append((local not in (None, GEMMA3_LOCAL_THETA) or (local is not None and arch.name != "gemma3"),
                   f"rope base {local} on sliding layers (llama.cpp: {GEMMA3_LOCAL_THETA:g}, unscaled)"))
    checks.append((arch.name == "gemma3" and bool(c.sliding_layers) and local is None and
                   (c.rope_theta != GEMMA3_LOCAL_THETA or c.rope_scaling is not None),
                   "sliding layers sharing the global rope (llama.cpp: base 10000, unscaled)"))
    s = c.rope_scaling or {}
    kind = s.get("rope_type")
    checks.append((kind is not None and kind not in arch.rope_kinds, f"{kind} rope scaling"))
    checks.append((kind == "yarn" and bool({"attention_factor", "mscale", "mscale_all_dim"} & set(s)),
                   "a YaRN attention factor"))
    checks.append((kind == "longrope" and s.get("attention_factor") is not None, "a LongRoPE attention factor"))
    return next((why for bad, why in checks if bad), None)


PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
"""llama.cpp's vocabulary loader looks these up by text in any model whose general.name contains "phi3" or
"phi-3" (to set their strip attributes), and fails the load when one is missing."""


def _check_phi3_name(name: str, tok) -> None:
    lowered = name.lower()
    if "phi3" in lowered or "phi-3" in lowered:
        missing = [t for t in PHI3_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"llama.cpp will not load a model named {name!r} whose vocabulary lacks {missing} "
                             "(it patches Phi-3's tokens by name): rename the model or export --format hf")


def _add_metadata(w, c, arch: Arch, model) -> None:
    import gguf

    w.add_name(c.name)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.rot_dim)
    if c.hd != c.dim // c.n_heads or arch.name.startswith("gemma"):
        w.add_key_length(c.hd)
        w.add_value_length(c.hd)
    if c.ffn == "moe":
        w.add_expert_count(c.moe_experts)
        w.add_expert_used_count(c.moe_top_k)
        w.add_expert_feed_forward_length(c.ffn_dim)
    if c.attn_softcap is not None:
        w.add_attn_logit_softcapping(c.attn_softcap)
    if c.final_softcap is not None:
        w.add_final_logit_softcapping(c.final_softcap)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
        if arch.name == "olmo2":  # llama.cpp's converter writes Olmo 3's pattern; its runtime uses period 4
            w.add_sliding_window_pattern([i in c.sliding_layers for i in range(c.n_layers)])
    s = c.rope_scaling or {}
    kind = s.get("rope_type")
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(s["factor"])
    if kind in ("yarn", "longrope"):
        w.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            if s.get(key) is not None:
                getattr(w, f"add_rope_scaling_yarn_{key}")(s[key])
    if kind == "longrope":  # llama.cpp scales cos and sin by it, as transformers does
        factor, orig = s["factor"], s["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(1.0 if factor <= 1 else float(np.sqrt(1 + np.log(factor) / np.log(orig))))
    for t in (("rope_freqs.weight", llama3_factors(c)),) if kind == "llama3" else \
            (("rope_factors_long.weight", torch.tensor(s["long_factor"])),
             ("rope_factors_short.weight", torch.tensor(s["short_factor"]))) if kind == "longrope" else ():
        w.add_tensor(t[0], t[1].float().numpy())


def _source(model, ours: str):
    """lilliput tensor `ours` as a Weight (a matrix, possibly quantized) or a float32 tensor (norms,
    biases and MoE routers, which stay F32)."""
    owner, _, leaf = ours.rpartition(".")
    module = model.get_submodule(owner)
    if leaf != "weight" or is_norm(ours):
        return getattr(module, leaf).detach().float()
    if owner == "tok_emb":
        return Weight(0, value=module.weight.detach().float())
    return weight_of(module)


def _pieces(model, c, arch: Arch, entry) -> list:
    """The GGUF parts of one lilliput tensor, rows split and permuted, norms shifted."""
    src = _source(model, entry.ours)
    sizes = split_sizes(c, entry)
    bounds = np.cumsum([0, *sizes]) if sizes else [0, src.shape[0]]
    out = []
    for name, lo, hi in zip(entry.theirs, bounds[:-1], bounds[1:]):
        t = src.rows(lo, hi) if isinstance(src, Weight) else src[lo:hi]
        heads = qk_heads(c, name) if arch.interleaved else None
        if heads is not None:
            order = permute_order(hi - lo, heads)
            t = t.permute_rows(order) if isinstance(t, Weight) else t[order]
        if is_norm(name) and arch.norm_shift:
            t = t + arch.norm_shift
        out.append(t)
    return out


def write_gguf(model, tokenizer, path: Path, type: str, source=None) -> dict:
    """Write the GGUF file at `path` (no check; `export_gguf` is the checked entry point)."""
    import gguf

    from lilliput.export.vocab import as_bpe, gguf_vocab

    c = model.config.replace(tie_embeddings=output_is_tied(model))
    arch = gguf_arch(c)
    vocab = gguf_vocab(tokenizer, c.vocab_size)  # fails before the file is opened
    tok = as_bpe(tokenizer)
    _check_phi3_name(c.name, tok)
    w = gguf.GGUFWriter(path, arch.name)
    _add_metadata(w, c, arch, model)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{type}" if type != "F32" else "ALL_F32"))
    if type in QUANTIZED:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(w)
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(bool(getattr(tok, "add_eos", False)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    types: dict[str, int] = {}
    fallback = []
    experts: dict[str, list] = {}  # stacked experts: name -> per-expert (data, raw, got)

    def put(gname: str, data, raw, got: str):
        w.add_tensor(gname, data, raw_dtype=raw)
        types[got] = types.get(got, 0) + 1

    for entry in tensor_table(c, arch):
        for gname, t in zip(entry.theirs, _pieces(model, c, arch, entry)):
            if isinstance(t, torch.Tensor):  # norms, biases, routers: F32 always
                data = (np.ascontiguousarray(t.numpy(), dtype=np.float32), None, "F32")
            else:
                want = type
                if gname in ("token_embd.weight", "output.weight") and type in ("Q4_0", "Q4_1"):
                    want = "Q4_1" if type == "Q4_1" and t.bits == 4 else "Q8_0"
                data = encode(t, want)
                if data[2] != want:
                    fallback.append(gname)
            if entry.expert is None:
                put(gname, *data)
            else:
                experts.setdefault(gname, []).append(data)
                if len(experts[gname]) == c.moe_experts:  # (E, N, K) as llama.cpp's converter stacks them
                    parts = experts.pop(gname)
                    put(gname, np.stack([p[0] for p in parts]), parts[0][1], parts[0][2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch.name, "tensor_types": types, "fallback_f16": sorted(set(fallback)),
            "tokenizer": vocab.model, "pre_tokenizer": vocab.pre, "tied_output": output_is_tied(model)}


def check_gguf(model, tokenizer, path: Path, type: str) -> dict:
    """Read the file back with lilliput's GGUF reader: the same config, tokenizer and chat template, logits
    within tolerance."""
    from lilliput.core.checkpoint import read_gguf
    from lilliput.core.model import GPT
    from lilliput.core.tokenizer import Tokenizer
    from lilliput.export.target import ExportCheckError
    from lilliput.export.vocab import as_bpe

    f, config, sd = read_gguf(path)
    c = model.config.replace(tie_embeddings=output_is_tied(model))
    for field in GGUF_FIELDS:
        if getattr(config, field) != getattr(c, field):
            raise ExportCheckError(f"the GGUF reads back with {field}={getattr(config, field)}, not {getattr(c, field)}")
    back = GPT.from_state_dict(config.replace(name=c.name), sd).eval()
    tok = Tokenizer.from_gguf(f.metadata)
    src = as_bpe(tokenizer)
    ids = probe_ids(tokenizer, c.vocab_size)
    if tok.encode(probe_text := src.decode(ids)) != src.encode(probe_text) or tok.chat_template != src.chat_template:
        raise ExportCheckError("the GGUF's tokenizer encodes the probe text differently from the model's tokenizer")
    f.close()
    ref = source_logits(model, ids)
    got = source_logits(back, ids)
    return require(agreement(ref, got), TOLERANCE[type], f"the {type} GGUF")


FORMATS.register("gguf")(ExportFormat(
    name="gguf", types=TYPES, writes_folder=False, write=write_gguf, check=check_gguf, default_type=default_type,
    runtime="llama.cpp, Ollama, LM Studio", expresses=expresses))


def export_gguf(model, tokenizer, path: Path | str, type: str | None = None, force: bool = False,
                check: bool = True) -> Path:
    """Write a checked GGUF of `model` at `path` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1); returns the path."""
    return export(model, tokenizer, "gguf", path, type, force=force, check=check).path
