"""GGUF models: llama.cpp's architectures, metadata keys and tensor names for each family, read into
a `ModelConfig` and a lilliput state dict. `lilliput.export.gguf` writes through the same tables.

Each llama.cpp architecture is an `Arch`: the family it reads as and the conventions of llama.cpp's
converter (convert_hf_to_gguf.py) and runtime (llama-model.cpp) for it:

| arch | family | what the file does differently from Hugging Face |
|---|---|---|
| llama, smollm3 | llama, smollm3 | q/k rows permuted to interleaved rotary pairs; Llama 3 rope as a `rope_freqs` tensor; SmolLM3: no rotary on every 4th layer (hard-coded) |
| qwen2, qwen3, qwen3moe | qwen2, qwen3, qwen3_moe | experts stacked (E, N, K); Qwen3-MoE renormalises its top-k (hard-coded) |
| gemma2, gemma3 | gemma2, gemma3_text | norms stored as 1 + w; sliding layers every other (gemma2) or 5 of 6 (gemma3) with a local rope base of 10000 (hard-coded); attention scale 1/sqrt(head_dim) |
| phi3 | phi3 | fused `attn_qkv` and `ffn_up` (gate then up); LongRoPE factors as `rope_factors_{long,short}` |
| olmo2, olmoe | olmo2, olmoe | post-norms only (olmo2), qk-norm over the projection; OLMoE's top-k not renormalised |

A GGUF of any other architecture is refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lilliput.core.config import ModelConfig
from lilliput.core.registry import Registry


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture (`general.architecture`) and its conventions."""

    name: str
    family: str
    """The lilliput family (core.families) a file of this architecture reads as."""
    interleaved: bool = False
    """llama.cpp's "norm" rotary (adjacent pairs): its converter permutes q/k rows (Llama's order);
    False for the "neox" archs, which rotate halves as Hugging Face does."""
    norm_shift: float = 0.0
    """Norm weights are stored as w + norm_shift (Gemma: 1 + w, llama.cpp's norms have no offset)."""
    fused: bool = False
    """q|k|v in one `attn_qkv` and gate|up in one `ffn_up` (Phi-3)."""
    qk_norm: str | None = None
    """The qk-norm llama.cpp applies ("head", "proj") or None."""
    pre_norms: bool = True
    post_norms: bool = False
    act: str = "silu"
    moe: bool = False
    moe_norm_topk: bool = True
    """MoE: whether llama.cpp renormalises the top-k probabilities (hard-coded per arch)."""
    biases: tuple[str, ...] = ()
    """Which of "attn" (q/k/v), "attn_out", "mlp" biases llama.cpp loads for this arch."""
    swa_period: int | None = None
    """Sliding layers are those with layer % period < period - 1 (llama.cpp's set_swa_pattern), or every
    layer with period 1; None: llama.cpp has no sliding window for this arch."""
    rope_kinds: tuple[str, ...] = ("linear", "yarn")
    """Rotary scalings llama.cpp computes for this arch (besides none)."""
    nope_period: int | None = None
    """No rotary on layers with (layer + 1) % period == 0 (SmolLM3: 4, hard-coded)."""

    def sliding_layers(self, n_layers: int) -> tuple[int, ...]:
        p = self.swa_period
        return () if p is None else tuple(i for i in range(n_layers) if p == 1 or i % p < p - 1)

    def nope_layers(self, n_layers: int) -> tuple[int, ...]:
        p = self.nope_period
        return () if p is None else tuple(i for i in range(n_layers) if (i + 1) % p == 0)


ARCHS: Registry[Arch] = Registry("GGUF architecture")
for _arch in (
    Arch("llama", "llama", interleaved=True, biases=("attn", "attn_out", "mlp"), rope_kinds=("linear", "yarn", "llama3")),
    Arch("smollm3", "smollm3", interleaved=True, rope_kinds=("linear", "yarn", "llama3"), nope_period=4),
    Arch("qwen2", "qwen2", biases=("attn",)),
    Arch("qwen3", "qwen3", qk_norm="head"),
    Arch("qwen3moe", "qwen3_moe", qk_norm="head", moe=True, moe_norm_topk=True),
    Arch("gemma2", "gemma2", norm_shift=1.0, post_norms=True, act="gelu_tanh", swa_period=2),
    Arch("gemma3", "gemma3_text", norm_shift=1.0, post_norms=True, act="gelu_tanh", qk_norm="head", swa_period=6),
    Arch("phi3", "phi3", fused=True, swa_period=1, rope_kinds=("linear", "yarn", "longrope")),
    Arch("olmo2", "olmo2", qk_norm="proj", pre_norms=False, post_norms=True, swa_period=4),
    Arch("olmoe", "olmoe", qk_norm="proj", moe=True, moe_norm_topk=False),
):
    ARCHS.register(_arch.name)(_arch)

GEMMA3_LOCAL_THETA = 10000.0
"""llama.cpp's rope base of Gemma 3's sliding layers (hard-coded, unscaled)."""
GGUF_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hd", "ffn_dim", "max_seq_len", "norm_eps",
               "rope_theta", "tie_embeddings", "ffn", "moe_experts", "moe_top_k", "moe_norm_topk", "family",
               "attn_bias", "attn_out_bias", "mlp_bias", "qk_norm", "norm_offset", "pre_norms", "post_norms", "act",
               "emb_scale", "attn_scale", "attn_softcap", "final_softcap", "sliding_window", "sliding_layers",
               "rope_scaling", "rope_local_theta", "rot_dim", "nope_layers")
"""The ModelConfig fields a GGUF carries (everything that changes the logits)."""


def gemma_attn_scale(arch: str, c: ModelConfig) -> float:
    """llama.cpp's Gemma attention scale: 1/sqrt(head_dim), or 1/sqrt(dim / heads) for the 27B
    models, which it recognises by their layer count."""
    big = {"gemma2": 46, "gemma3": 62}[arch] == c.n_layers
    return (c.dim / c.n_heads) ** -0.5 if big else c.hd ** -0.5


# --- tensor names --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One lilliput tensor and the GGUF tensors whose rows make it (q|k|v, gate|up)."""

    ours: str
    theirs: tuple[str, ...]
    expert: int | None = None
    """The expert's index in stacked (E, N, K) GGUF tensors, for MoE experts."""


def tensor_table(c: ModelConfig, arch: Arch) -> list[Entry]:
    """Every lilliput tensor of a model of config `c` with its llama.cpp names."""
    out = [Entry("tok_emb.weight", ("token_embd.weight",))]
    for i in range(c.n_layers):
        b, q = f"blk.{i}.", f"layers.{i}."
        qkv = ("attn_qkv",) if arch.fused else ("attn_q", "attn_k", "attn_v")
        if c.pre_norms:
            out.append(Entry(q + "attn_norm.weight", (b + "attn_norm.weight",)))
        out.append(Entry(q + "mixer.wqkv.weight", tuple(f"{b}{n}.weight" for n in qkv)))
        if c.attn_bias:
            out.append(Entry(q + "mixer.wqkv.bias", tuple(f"{b}{n}.bias" for n in qkv)))
        if c.qk_norm:
            out += [Entry(q + "mixer.q_norm.weight", (b + "attn_q_norm.weight",)),
                    Entry(q + "mixer.k_norm.weight", (b + "attn_k_norm.weight",))]
        out.append(Entry(q + "mixer.wo.weight", (b + "attn_output.weight",)))
        if c.attn_out_bias:
            out.append(Entry(q + "mixer.wo.bias", (b + "attn_output.bias",)))
        if c.post_norms:
            out.append(Entry(q + "attn_post_norm.weight", (b + "post_attention_norm.weight",)))
        if c.pre_norms:
            out.append(Entry(q + "ffn_norm.weight", (b + "ffn_norm.weight",)))
        if c.ffn == "moe":
            out.append(Entry(q + "ffn.router", (b + "ffn_gate_inp.weight",)))
            for e in range(c.moe_experts):
                x = f"{q}ffn.experts.{e}."
                out += [Entry(x + "w_gate_up.weight", (b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight"), e),
                        Entry(x + "w_down.weight", (b + "ffn_down_exps.weight",), e)]
        else:
            gate_up = ("ffn_up",) if arch.fused else ("ffn_gate", "ffn_up")
            out += [Entry(q + "ffn.w_gate_up.weight", tuple(f"{b}{n}.weight" for n in gate_up)),
                    Entry(q + "ffn.w_down.weight", (b + "ffn_down.weight",))]
            if c.mlp_bias:
                out += [Entry(q + "ffn.w_gate_up.bias", tuple(f"{b}{n}.bias" for n in gate_up)),
                        Entry(q + "ffn.w_down.bias", (b + "ffn_down.bias",))]
        if c.post_norms:
            out.append(Entry(q + "ffn_post_norm.weight", (b + "post_ffw_norm.weight",)))
    out.append(Entry("norm.weight", ("output_norm.weight",)))
    if not c.tie_embeddings:
        out.append(Entry("lm_head.weight", ("output.weight",)))
    return out


def split_sizes(c: ModelConfig, entry: Entry) -> list[int]:
    """Rows of each GGUF part of a fused lilliput tensor."""
    if len(entry.theirs) == 1:
        return []
    if ".wqkv." in entry.ours:
        return [c.n_heads * c.hd, c.n_kv_heads * c.hd, c.n_kv_heads * c.hd]
    return [c.ffn_dim, c.ffn_dim]


def is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("norm.weight")


def permute_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns Hugging Face rotate-half q/k rows into llama.cpp's interleaved pairs."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time reordering of q/k rows (interleaved -> rotate-half RoPE)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(c: ModelConfig, gguf_name: str) -> int | None:
    """Heads of a q or k tensor that an interleaved arch stores permuted, else None."""
    kind = gguf_name.split(".")[-2]
    return {"attn_q": c.n_heads, "attn_k": c.n_kv_heads}.get(kind)


# --- rope scalings stored as tensors -------------------------------------------------------------

def llama3_factors(c: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` of a Llama 3 rope: each frequency's divisor (1 to factor)."""
    from lilliput.core.rope import Rotary

    base = Rotary(c.rot_dim, c.rope_theta)
    scaled = Rotary(c.rot_dim, c.rope_theta, c.rope_scaling)
    return base.inv_freq(1)[0] / scaled.inv_freq(1)[0]


def _llama3_scaling(c: ModelConfig, factors: torch.Tensor) -> dict[str, Any]:
    """The Llama 3 parameters whose divisors are `factors` (low 1 and high 4, as every Llama 3 has;
    the original context from a frequency in the smoothed band)."""
    factor = _f32(float(factors.max()))
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.rot_dim, 2).double() / c.rot_dim))
    wavelen = 2 * math.pi / inv
    candidates = [8192, 4096, 2048, 16384, 131072]
    for r, w in zip(factors.double().tolist(), wavelen.tolist()):
        if 1.0 < r < factor:  # smooth = (orig / wavelen - low) / (high - low); 1/r = (1 - smooth)/factor + smooth
            smooth = (1 / r - 1 / factor) / (1 - 1 / factor)
            candidates.insert(0, round((3 * smooth + 1) * w))
    for orig in candidates:
        s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": orig}
        if torch.allclose(llama3_factors(c.replace(rope_scaling=s)), factors.float(), rtol=1e-5, atol=0):
            return s
    raise ValueError("the GGUF's rope_freqs do not follow Llama 3's rope scaling; lilliput cannot run them")


def _f32(x: float | None) -> float | None:
    """A float32 value (GGUF stores floats so) as the shortest decimal that round-trips: 1e-05, not
    9.999999747378752e-06."""
    return None if x is None else float(str(np.float32(x)))


# --- metadata -> ModelConfig ---------------------------------------------------------------------

def _uniform(value, what: str):
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"the GGUF's {what} differs between layers ({sorted(set(value))}); lilliput's layers "
                             "are uniform")
        return value[0]
    return value


def gguf_config(meta: dict[str, Any], tensor_names, name: str,
                tensor: Callable[[str], torch.Tensor] | None = None) -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes. `tensor` reads the rope tensors (Llama 3's
    `rope_freqs`, Phi-3's LongRoPE factors); without it those scalings are left out."""
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHS:
        raise ValueError(f"GGUF architecture {arch_name!r} is not supported; lilliput reads {', '.join(ARCHS.keys())}")
    arch = ARCHS[arch_name]
    a = f"{arch_name}."
    get = lambda key, default=None: meta.get(a + key, default)  # noqa: E731
    names = set(tensor_names)
    n_layers, dim = get("block_count"), get("embedding_length")
    n_heads = _uniform(get("attention.head_count"), "head count")
    if n_layers is None or dim is None or n_heads is None:
        raise KeyError(f"{a}block_count, embedding_length and attention.head_count")
    hd = get("attention.key_length", dim // n_heads)
    rot = get("rope.dimension_count", hd)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise KeyError(f"{a}vocab_size")
    ffn_dim = get("expert_feed_forward_length") if arch.moe else None
    ffn_dim = ffn_dim or _uniform(get("feed_forward_length"), "feed-forward width")
    if ffn_dim is None:
        raise KeyError(f"{a}feed_forward_length")
    fields: dict[str, Any] = dict(
        name=name, family=arch.family, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=_uniform(get("attention.head_count_kv", n_heads), "kv head count"),
        head_dim=hd if hd != dim // n_heads else None, ffn_dim=ffn_dim,
        max_seq_len=get("context_length", 2048), norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in names,
        rotary_dim=rot if rot != hd else None, act=arch.act, qk_norm=arch.qk_norm, pre_norms=arch.pre_norms,
        post_norms=arch.post_norms, norm_offset=arch.norm_shift,
        attn_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        attn_out_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_down.bias" in names, nope_layers=arch.nope_layers(n_layers),
    )
    if arch.moe:
        fields.update(ffn="moe", moe_experts=get("expert_count"), moe_top_k=get("expert_used_count"),
                      moe_norm_topk=arch.moe_norm_topk)
    if arch.name.startswith("gemma"):
        c0 = ModelConfig(**fields)
        fields.update(emb_scale=float(dim) ** 0.5, attn_scale=gemma_attn_scale(arch.name, c0),
                      final_softcap=_f32(get("final_logit_softcapping") or None),
                      attn_softcap=_f32(get("attn_logit_softcapping") or None) if arch.name == "gemma2" else None)
    window = get("attention.sliding_window", 4096 if arch.name == "gemma2" else None)
    if window and arch.swa_period:
        pattern = get("attention.sliding_window_pattern")
        layers = tuple(i for i, s in enumerate(pattern) if s) if isinstance(pattern, list) \
            else arch.sliding_layers(n_layers)
        if layers:
            fields.update(sliding_window=int(window), sliding_layers=layers)
            if arch.name == "gemma3":
                fields["rope_local_theta"] = _f32(get("rope.freq_base_swa", GEMMA3_LOCAL_THETA))
    fields["rope_scaling"] = _rope_scaling(meta, a, names, ModelConfig(**fields), tensor)
    return ModelConfig(**fields)


def _rope_scaling(meta, a: str, names: set[str], c: ModelConfig, tensor) -> dict[str, Any] | None:
    kind = meta.get(a + "rope.scaling.type")
    factor = meta.get(a + "rope.scaling.factor") or meta.get(a + "rope.scale_linear")
    orig = meta.get(a + "rope.scaling.original_context_length")
    if tensor is not None and "rope_freqs.weight" in names:
        return _llama3_scaling(c, tensor("rope_freqs.weight"))
    if tensor is not None and "rope_factors_long.weight" in names:
        orig = orig or c.max_seq_len
        return {"rope_type": "longrope", "short_factor": [_f32(x) for x in tensor("rope_factors_short.weight").tolist()],
                "long_factor": [_f32(x) for x in tensor("rope_factors_long.weight").tolist()],
                "original_max_position_embeddings": orig, "factor": c.max_seq_len / orig}
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        s = {"rope_type": "yarn", "factor": _f32(factor), "original_max_position_embeddings": orig or c.max_seq_len}
        for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if a + "rope.scaling." + key in meta:
                s[ours] = _f32(meta[a + "rope.scaling." + key])
        return s
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported (linear, yarn, Llama 3 and LongRoPE are)")


# --- reading -------------------------------------------------------------------------------------

def read_gguf(path: Path | str):
    """Open a GGUF of any supported architecture and dequantize every tensor to float32:
    (GGUFFile, config, lilliput state dict)."""
    from lilliput.core.gguf_file import GGUFFile

    path = Path(path)
    f = GGUFFile(path)
    try:
        config = gguf_config(f.metadata, f.tensors, name=path.stem, tensor=f.tensor)
    except KeyError as e:
        raise ValueError(f"{path} lacks GGUF metadata {e}") from None
    arch = ARCHS[f.metadata["general.architecture"]]
    cache: dict[str, torch.Tensor] = {}

    def part(gname: str, expert: int | None) -> torch.Tensor:
        if gname not in cache:
            t = f.tensor(gname)
            heads = qk_heads(config, gname) if arch.interleaved else None
            if heads is not None:
                t = unpermute(t, heads)
            cache[gname] = t - arch.norm_shift if is_norm(gname) and arch.norm_shift else t
        t = cache[gname]
        return t if expert is None else t[expert]

    sd: dict[str, torch.Tensor] = {}
    try:
        for entry in tensor_table(config, arch):
            parts = [part(n, entry.expert) for n in entry.theirs]
            sd[entry.ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    except KeyError as e:
        raise ValueError(f"{path} lacks tensor {e}: not a complete {arch.name} GGUF") from None
    return f, config, sd
