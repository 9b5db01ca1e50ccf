"""Model families as data: each maps its Hugging Face config and tensor names onto the one block of
`core/model.py`, and back.

A family is a `Family` registered under its Hugging Face `model_type`. `config_from_hf(hf)` reads
a config.json into a `ModelConfig` whose switches (biases, qk-norm, post-norms, GeGLU, soft-caps,
sliding layers, partial or no rotary, rope scaling, embedding scale) say what the family does;
`from_hf_state_dict` / `to_hf_state_dict` rename (and fuse or split) the tensors; `hf_config`
writes config.json back. Variants lilliput cannot run are refused by name in one line.

| family | what differs from Llama |
|---|---|
| llama, mistral | rope scaling (llama3, linear, dynamic, yarn); Mistral's sliding window on every layer |
| qwen2 | q/k/v biases |
| qwen3, qwen3_moe | per-head qk-norm; Qwen3-MoE: top-k experts, probabilities not renormalised |
| gemma2, gemma3_text | sqrt(dim) embedding scale, (1 + w) norms, GeGLU, four norms per block, sliding layers with their own rope base, soft-caps (Gemma 2), qk-norm (Gemma 3) |
| phi3 | fused qkv_proj and gate_up_proj, partial rotary, LongRoPE |
| olmo2, olmoe | norms after attention and MLP outputs (OLMo 2), qk-norm over the whole projection |
| smollm3 | no rotary on every fourth layer |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.registry import Registry


@dataclass(frozen=True)
class Family:
    model_type: str
    """Hugging Face `model_type` (the registry key)."""
    architecture: str
    """Hugging Face `architectures[0]`."""
    gguf_arch: str
    """llama.cpp's `general.architecture`."""
    switches: Callable[[dict[str, Any]], dict[str, Any]]
    """config.json -> the ModelConfig fields that differ from a Llama's."""
    norms: tuple[tuple[str, str], ...] = (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"))
    """(lilliput block norm, Hugging Face layer norm) pairs."""
    fused: bool = False
    """Phi-3: q|k|v and gate|up are stored fused, as lilliput stores them."""


FAMILIES: Registry[Family] = Registry("model family")
_GEMMA_NORMS = (("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"), ("ffn_post_norm", "post_feedforward_layernorm"))
_OLMO2_NORMS = (("attn_post_norm", "post_attention_layernorm"), ("ffn_post_norm", "post_feedforward_layernorm"))


def _family(model_type: str, architecture: str, gguf_arch: str, **kw) -> Callable:
    def add(switches):
        FAMILIES.register(model_type)(Family(model_type, architecture, gguf_arch, switches, **kw))
        return switches
    return add


# --- reading config.json ----------------------------------------------------------------------

def _rope_params(hf: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The rope dict of a config, in either transformers 5's `rope_parameters` (flat or per layer
    type) or the older `rope_theta` + `rope_scaling` form."""
    rp = hf.get("rope_parameters") or {}
    if layer_type is not None and layer_type in rp:
        rp = rp[layer_type] or {}
    elif any(isinstance(v, dict) for v in rp.values()):
        rp = rp.get("full_attention") or {}
    scaling = hf.get("rope_scaling") or {}
    out = {**scaling, **rp}
    out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if "partial_rotary_factor" in hf:
        out.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return out


def _scaling(hf: dict[str, Any], rp: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict of ModelConfig, completed with what its formula needs."""
    kind = rp["rope_type"]
    if kind in ("default", None):
        return None
    s = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    s["rope_type"] = kind
    top = hf.get("max_position_embeddings", 2048)
    if kind in ("yarn", "longrope", "llama3"):
        s.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings", top))
    if kind == "dynamic":
        s["max_position_embeddings"] = top
    if kind == "longrope" and not s.get("factor"):
        s["factor"] = top / s["original_max_position_embeddings"]
    if kind == "yarn" and s.get("factor") is None:
        s["factor"] = top / s["original_max_position_embeddings"]
    return s


def _sliding(hf: dict[str, Any], n_layers: int, every_layer: bool) -> dict[str, Any]:
    """sliding_window / sliding_layers from `layer_types` (or every layer: Mistral, Phi-3)."""
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False and not every_layer:
        return {}
    types = hf.get("layer_types")
    if types:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif every_layer:
        layers = tuple(range(n_layers))
    else:
        return {}
    return {"sliding_window": window, "sliding_layers": layers} if window and layers else {}


def config_from_hf(hf: dict[str, Any], name: str = "custom") -> ModelConfig:
    """A Hugging Face config.json (any registered family) as a ModelConfig."""
    model_type = hf.get("model_type") or "llama"
    if model_type == "gemma3":
        raise ValueError("model_type 'gemma3' is Gemma 3's image-text model: lilliput runs the text models "
                         "(model_type 'gemma3_text', e.g. gemma-3-270m and gemma-3-1b)")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a family lilliput can load; "
                         f"known: {', '.join(sorted(FAMILIES.keys()))}")
    fam = FAMILIES[model_type]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if act not in acts:
        raise ValueError(f"{model_type}: activation {act!r} is not supported (silu or gelu_pytorch_tanh)")
    n_heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    rp = _rope_params(hf)
    head_dim = hf.get("head_dim") or dim // n_heads
    factor = rp.get("partial_rotary_factor", 1.0)
    fields = dict(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim if head_dim != dim // n_heads else None,
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(rp["rope_theta"]),
        rope_scaling=_scaling(hf, rp), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        act=acts[act], family=model_type, name=name,
        rotary_dim=int(head_dim * factor) if factor != 1.0 else None,
    )
    fields.update(fam.switches(hf))
    if (fields["rope_scaling"] or {}).get("rope_type") == "dynamic":  # NTK scaling exists to run past it
        fields["max_seq_len"] = int(fields["max_seq_len"] * fields["rope_scaling"]["factor"])
    return ModelConfig(**fields)


@_family("llama", "LlamaForCausalLM", "llama")
def _llama(hf):
    return {"attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": bool(hf.get("attention_bias")),
            "mlp_bias": bool(hf.get("mlp_bias"))}


@_family("mistral", "MistralForCausalLM", "llama")
def _mistral(hf):
    return _sliding(hf, hf["num_hidden_layers"], every_layer=True)


@_family("qwen2", "Qwen2ForCausalLM", "qwen2")
def _qwen2(hf):
    return {"attn_bias": True, **_sliding(hf, hf["num_hidden_layers"], every_layer=False)}


@_family("qwen3", "Qwen3ForCausalLM", "qwen3")
def _qwen3(hf):
    bias = bool(hf.get("attention_bias"))
    return {"qk_norm": "head", "attn_bias": bias, "attn_out_bias": bias,
            **_sliding(hf, hf["num_hidden_layers"], every_layer=False)}


def _gemma(hf, qk_norm):
    local = _rope_params(hf, "sliding_attention")
    bias = bool(hf.get("attention_bias"))
    out = {"emb_scale": float(hf["hidden_size"]) ** 0.5, "norm_offset": 1.0, "post_norms": True,
           "qk_norm": qk_norm, "attn_bias": bias, "attn_out_bias": bias,
           "attn_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
           "attn_softcap": hf.get("attn_logit_softcapping"), "final_softcap": hf.get("final_logit_softcapping"),
           **_sliding(hf, hf["num_hidden_layers"], every_layer=False)}
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{hf['model_type']}: bidirectional attention (an embedding model) is not supported")
    per_type = isinstance((hf.get("rope_parameters") or {}).get("sliding_attention"), dict)
    if "rope_local_base_freq" in hf or per_type:
        theta = hf.get("rope_local_base_freq", local.get("rope_theta"))
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{hf['model_type']}: scaled rope on sliding layers is not supported")
        out["rope_local_theta"] = float(theta)
    return out


@_family("gemma2", "Gemma2ForCausalLM", "gemma2", norms=_GEMMA_NORMS)
def _gemma2(hf):
    return _gemma(hf, None)


@_family("gemma3_text", "Gemma3ForCausalLM", "gemma3", norms=_GEMMA_NORMS)
def _gemma3(hf):
    return _gemma(hf, "head")


@_family("phi3", "Phi3ForCausalLM", "phi3", fused=True)
def _phi3(hf):
    return _sliding(hf, hf["num_hidden_layers"], every_layer=True)


@_family("olmo2", "Olmo2ForCausalLM", "olmo2", norms=_OLMO2_NORMS)
def _olmo2(hf):
    return {"qk_norm": "proj", "pre_norms": False, "post_norms": True,
            "attn_bias": bool(hf.get("attention_bias")), "attn_out_bias": bool(hf.get("attention_bias"))}


@_family("smollm3", "SmolLM3ForCausalLM", "smollm3")
def _smollm3(hf):
    flags = hf.get("no_rope_layers")
    n = hf["num_hidden_layers"]
    if not flags:
        every = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % every != 0) for i in range(n)]
    bias = bool(hf.get("attention_bias"))
    return {"nope_layers": tuple(i for i, use in enumerate(flags) if not use), "attn_bias": bias,
            "attn_out_bias": bias, "mlp_bias": bool(hf.get("mlp_bias")), **_sliding(hf, n, every_layer=False)}


def _moe(hf):
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    return {"ffn": "moe", "moe_experts": experts, "moe_top_k": hf["num_experts_per_tok"],
            "moe_norm_topk": bool(hf.get("norm_topk_prob", False)),
            "ffn_dim": hf.get("moe_intermediate_size") or hf["intermediate_size"]}


@_family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe")
def _qwen3_moe(hf):
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("qwen3_moe: dense layers between MoE layers (mlp_only_layers, decoder_sparse_step) "
                         "are not supported; every layer must be MoE")
    return {**_qwen3(hf), **_moe(hf)}


@_family("olmoe", "OlmoeForCausalLM", "olmoe")
def _olmoe(hf):
    if hf.get("clip_qkv"):
        raise ValueError("olmoe: clip_qkv is not supported")
    return {"qk_norm": "proj", **_moe(hf)}


# --- writing config.json ----------------------------------------------------------------------

def hf_config(c: ModelConfig) -> dict[str, Any]:
    """The config.json of the model's family (fields transformers' config class reads)."""
    if c.mixer != "attention" or set(c.layer_mixers) - {"attention"} or c.ffn not in ("swiglu", "moe"):
        raise ValueError(f"only attention models map to a Hugging Face family, not {c.mixer}+{c.ffn}")
    if c.family not in FAMILIES:
        raise ValueError(f"model family {c.family!r} has no Hugging Face mapping")
    fam = FAMILIES[c.family]
    if (c.ffn == "moe") != (c.family in ("qwen3_moe", "olmoe")):
        raise ValueError(f"a {c.ffn} feed-forward does not fit the {c.family} family")
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, **(c.rope_scaling or {"rope_type": "default"})}
    if c.rotary_dim is not None:
        rope["partial_rotary_factor"] = c.rotary_dim / c.hd
    top = rope.pop("max_position_embeddings", None)  # dynamic NTK: the context it was trained for
    hf: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": c.family, "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.hd,
        "max_position_embeddings": top or c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings, "rope_parameters": rope,
        "attention_bias": c.attn_bias, "mlp_bias": c.mlp_bias,
    }
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[c.act]
    hf["hidden_activation" if c.family.startswith("gemma") else "hidden_act"] = act
    if c.sliding_window:
        hf["sliding_window"] = c.sliding_window
        hf["layer_types"] = ["sliding_attention" if i in c.sliding_layers else "full_attention"
                             for i in range(c.n_layers)]
        hf["use_sliding_window"] = True
    if c.family.startswith("gemma"):
        scalar = (c.attn_scale or c.hd ** -0.5) ** -2
        hf["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
        hf["attn_logit_softcapping"], hf["final_logit_softcapping"] = c.attn_softcap, c.final_softcap
        if c.rope_local_theta is not None:
            hf["rope_parameters"] = {"full_attention": rope,
                                     "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}}
    if c.family == "phi3":
        hf["original_max_position_embeddings"] = (c.rope_scaling or {}).get("original_max_position_embeddings",
                                                                             c.max_seq_len)
    if c.family == "smollm3":
        hf["no_rope_layers"] = [int(i not in c.nope_layers) for i in range(c.n_layers)]
    if c.ffn == "moe":
        hf.update({"num_experts": c.moe_experts, "num_experts_per_tok": c.moe_top_k,
                   "norm_topk_prob": c.moe_norm_topk, "moe_intermediate_size": c.ffn_dim})
    return hf


# --- tensors ----------------------------------------------------------------------------------

_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers that older transformers versions saved; lilliput recomputes them from the config."""


def _per_expert(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors (E, 2I, C) and (E, C, I) as the hub's per-expert names."""
    out = {}
    for k, v in hf.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", k)
        if m is None:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = v[e]
            else:
                gate, up = v[e].chunk(2, dim=0)
                out[f"{m.group(1)}.{e}.gate_proj.weight"], out[f"{m.group(1)}.{e}.up_proj.weight"] = gate, up
    return out


def _layer_names(c: ModelConfig, i: int) -> list[tuple[str, list[str]]]:
    """(lilliput name, the Hugging Face names concatenated into it) for layer i."""
    fam, p, q = FAMILIES[c.family], f"model.layers.{i}.", f"layers.{i}."
    out = [(f"{q}{ours}.weight", [f"{p}{theirs}.weight"]) for ours, theirs in fam.norms
           if (ours in ("attn_norm", "ffn_norm") and c.pre_norms) or (ours.endswith("post_norm") and c.post_norms)]
    a = f"{p}self_attn."
    qkv = [f"{a}qkv_proj"] if fam.fused else [f"{a}{n}_proj" for n in "qkv"]
    out.append((f"{q}mixer.wqkv.weight", [n + ".weight" for n in qkv]))
    if c.attn_bias:
        out.append((f"{q}mixer.wqkv.bias", [n + ".bias" for n in qkv]))
    out.append((f"{q}mixer.wo.weight", [f"{a}o_proj.weight"]))
    if c.attn_out_bias:
        out.append((f"{q}mixer.wo.bias", [f"{a}o_proj.bias"]))
    if c.qk_norm:
        out += [(f"{q}mixer.q_norm.weight", [f"{a}q_norm.weight"]), (f"{q}mixer.k_norm.weight", [f"{a}k_norm.weight"])]
    mlps = [(f"{q}ffn.", f"{p}mlp.")]
    if c.ffn == "moe":
        out.append((f"{q}ffn.router", [f"{p}mlp.gate.weight"]))
        mlps = [(f"{q}ffn.experts.{e}.", f"{p}mlp.experts.{e}.") for e in range(c.moe_experts)]
    for ours, theirs in mlps:
        gate_up = [f"{theirs}gate_up_proj"] if fam.fused else [f"{theirs}gate_proj", f"{theirs}up_proj"]
        out.append((f"{ours}w_gate_up.weight", [n + ".weight" for n in gate_up]))
        out.append((f"{ours}w_down.weight", [f"{theirs}down_proj.weight"]))
        if c.mlp_bias:
            out.append((f"{ours}w_gate_up.bias", [n + ".bias" for n in gate_up]))
            out.append((f"{ours}w_down.bias", [f"{theirs}down_proj.bias"]))
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> lilliput names, fusing q|k|v and gate|up. A tensor this mapping does not
    use is refused, not dropped: a silent wrong model is worse than an error."""
    hf = _per_expert(hf)
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"the Hugging Face weights lack {name}: not a complete {config.family} checkpoint "
                             "for its config.json")
        used.add(name)
        return hf[name]

    sd = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not config.tie_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")  # a saved copy of the tied embedding: transformers ignores it too
    for i in range(config.n_layers):
        for ours, theirs in _layer_names(config, i):
            parts = [take(n) for n in theirs]
            sd[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    unused = [k for k in hf if k not in used and not k.endswith(_HF_IGNORED_SUFFIXES)]
    if unused:
        kinds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", k) for k in unused))  # one entry per layer pattern
        raise ValueError(f"the Hugging Face weights hold {len(unused)} tensors lilliput cannot use "
                         f"({', '.join(kinds[:6])}): not a {config.family} model as its config.json describes")
    return sd


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig,
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """lilliput names -> Hugging Face names (the hub's per-expert names, or transformers 5's fused
    expert tensors with `fused_experts`)."""
    c = config
    hf = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd["tok_emb.weight"]}
    q, kv = c.n_heads * c.hd, c.n_kv_heads * c.hd
    for i in range(c.n_layers):
        for ours, theirs in _layer_names(c, i):
            t = sd[ours]
            if len(theirs) == 1:
                hf[theirs[0]] = t
            else:
                sizes = [q, kv, kv] if len(theirs) == 3 else [c.ffn_dim, c.ffn_dim]
                hf.update(zip(theirs, t.split(sizes)))
    if fused_experts and c.ffn == "moe":
        for i in range(c.n_layers):
            p = f"model.layers.{i}.mlp.experts."
            E = range(c.moe_experts)
            hf[p + "gate_up_proj"] = torch.stack([torch.cat([hf.pop(f"{p}{e}.gate_proj.weight"),
                                                             hf.pop(f"{p}{e}.up_proj.weight")]) for e in E])
            hf[p + "down_proj"] = torch.stack([hf.pop(f"{p}{e}.down_proj.weight") for e in E])
    return {k: v.contiguous() for k, v in hf.items()}


def describe(c: ModelConfig) -> str:
    """One line of what the family's switches do in this model (for `lilliput info`)."""
    parts = [c.family]
    if c.attn_bias or c.attn_out_bias or c.mlp_bias:
        parts.append("biases")
    if c.qk_norm:
        parts.append(f"qk-norm ({c.qk_norm})")
    if c.post_norms:
        parts.append("post-norms" if not c.pre_norms else "pre+post norms")
    if c.act != "silu":
        parts.append("GeGLU")
    if c.sliding_window:
        parts.append(f"sliding window {c.sliding_window} on {len(c.sliding_layers)}/{c.n_layers} layers")
    if c.rope_scaling:
        parts.append(f"rope {c.rope_scaling['rope_type']}")
    if c.rotary_dim:
        parts.append(f"partial rotary {c.rotary_dim}/{c.hd}")
    if c.nope_layers:
        parts.append(f"{len(c.nope_layers)} NoPE layers")
    if c.attn_softcap or c.final_softcap:
        parts.append("soft-capping")
    if c.ffn == "moe":
        parts.append(f"MoE {c.moe_top_k}/{c.moe_experts}")
    return ", ".join(parts)

