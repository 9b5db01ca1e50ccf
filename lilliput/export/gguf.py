"""GGUF for llama.cpp, Ollama and LM Studio, written with the `gguf` package's `GGUFWriter`.

The file is what llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) writes: the Llama
tensor names, the `llama.*` hyperparameters, q/k rows permuted to llama.cpp's interleaved rotary
order (the inverse of `checkpoint._unpermute`), and the tokenizer (`gpt2` model, pre-tokenizer
name, tokens, token types, merges, special ids, `add_bos_token`) with the chat template.

Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (`gguf.quants`). Integer codes lilliput already holds are
copied, not re-rounded: int4 groups (32, 64 or 128 columns: whole Q4_1 blocks) become Q4_1 blocks
with d = scale and m = -zero * scale (m rounded to fp16, the only change); int8 rows become Q8_0
blocks with d = the row's scale in fp16. Norms stay F32. With a 4-bit type the token embedding
(and the output layer, unless it is int4 on Q4_1's grid) is Q8_0, as lilliput's int4 models keep
the output layer int8. A matrix whose width is not a multiple of 32 falls back to F16, as in
llama.cpp's converter; `written["fallback_f16"]` lists those.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lilliput.export.target import FORMATS, ExportFormat, export
from lilliput.export.weights import (Weight, agreement, llama_weights, output_is_tied, probe_ids, require,
                                     source_logits, weight_bits)

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")
TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q4_0": 0.5, "Q4_1": 0.5}
"""Largest mean KL (nats) of the probe's next-token distributions, export vs the source model as lilliput runs
it. SmolLM2-135M (float, from its Q4_1 GGUF): F32 0, Q8_0 0.0018, Q4_1 0 (its own grid), Q4_0 0.30 (a second
rounding onto a symmetric grid)."""
BLOCK = 32

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """Hugging Face Llama name -> llama.cpp tensor name."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{_LAYER[rest.removesuffix('.weight')]}.weight"


def permute_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns Hugging Face rotate-half q/k rows into llama.cpp's interleaved pairs."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


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


def write_gguf(model, tokenizer, path: Path, type: str, source=None) -> dict:
    """Write the GGUF file at `path` (no check; `export_gguf` is the checked entry point)."""
    import gguf

    from lilliput.export.vocab import as_bpe, gguf_vocab

    c = model.config
    vocab = gguf_vocab(tokenizer, c.vocab_size)  # fails before the file is opened
    tok = as_bpe(tokenizer)
    w = gguf.GGUFWriter(path, "llama")
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
    w.add_rope_dimension_count(c.hd)
    if c.hd != c.dim // c.n_heads:
        w.add_key_length(c.hd)
        w.add_value_length(c.hd)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{type}" if type != "F32" else "ALL_F32"))
    if type in QUANTIZED:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    types: dict[str, int] = {}
    fallback = []
    for name, t in llama_weights(model).items():
        gname = gguf_name(name)
        if isinstance(t, torch.Tensor) and t.dim() == 1:  # norms: F32 always
            w.add_tensor(gname, t.numpy().astype(np.float32))
            types["F32"] = types.get("F32", 0) + 1
            continue
        weight = Weight(0, value=t) if isinstance(t, torch.Tensor) else t
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.n_heads if gname.endswith("attn_q.weight") else c.n_kv_heads
            weight = weight.permute_rows(permute_order(weight.shape[0], heads))
        want = type
        if gname in ("token_embd.weight", "output.weight") and type in ("Q4_0", "Q4_1"):
            want = "Q4_1" if type == "Q4_1" and weight.bits == 4 else "Q8_0"
        data, raw, got = encode(weight, want)
        if got != want:
            fallback.append(gname)
        w.add_tensor(gname, data, raw_dtype=raw)
        types[got] = types.get(got, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": types, "fallback_f16": fallback, "pre_tokenizer": vocab.pre,
            "tied_output": output_is_tied(model)}


def check_gguf(model, tokenizer, path: Path, type: str) -> dict:
    """Read the file back with lilliput's GGUF reader: same shape, same tokenizer, logits within tolerance."""
    from lilliput.core.checkpoint import read_gguf
    from lilliput.core.model import GPT
    from lilliput.core.tokenizer import Tokenizer
    from lilliput.export.target import ExportCheckError
    from lilliput.export.vocab import as_bpe

    f, config, sd = read_gguf(path)
    c = model.config
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hd", "ffn_dim", "max_seq_len"):
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
    runtime="llama.cpp, Ollama, LM Studio"))


def export_gguf(model, tokenizer, path: Path | str, type: str | None = None, force: bool = False,
                check: bool = True) -> Path:
    """Write a checked GGUF of `model` at `path` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1); returns the path."""
    return export(model, tokenizer, "gguf", path, type, force=force, check=check).path
