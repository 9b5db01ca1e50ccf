"""Model configuration: one frozen dataclass, the single source of defaults, help and saved JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("silu", "gelu_tanh")
"""Gate activations of the gated feed-forward."""
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
"""Rotary scalings lilliput computes (lilliput.core.rope)."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder. Mixers and feed-forwards are looked up by name in registries."""

    vocab_size: int = 256
    """Number of token ids."""
    dim: int = 32
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    ffn_dim: int = 64
    """Hidden width of the feed-forward block."""
    max_seq_len: int = 256
    """Longest sequence the model is asked to handle (RoPE tables and KV caches are sized by it)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    tie_embeddings: bool = True
    """Share the token embedding with the output layer."""
    mixer: str = "attention"
    """Sequence mixer of each block (a key of lilliput.core.model.MIXERS)."""
    layer_mixers: tuple[str, ...] = ()
    """Per-layer mixers as a pattern repeated over the layers (e.g. ("mamba", "mamba", "mamba",
    "attention") for attention every 4th layer); empty means every layer uses `mixer`."""
    ffn: str = "swiglu"
    """Feed-forward of each block (a key of lilliput.core.model.FFNS)."""
    ssm_state: int = 16
    """Mamba: width N of each head's state (and of B and C)."""
    ssm_expand: int = 2
    """Mamba: inner width as a multiple of dim."""
    ssm_head_dim: int = 16
    """Mamba: width of one SSD head; must divide ssm_expand * dim."""
    ssm_conv: int = 4
    """Mamba: width of the causal depthwise convolution."""
    ssm_chunk: int = 64
    """Mamba: tokens per chunk of the matrix-multiply (SSD) form used for training and prefill."""
    mlstm_chunk: int = 64
    """mLSTM: tokens per chunk of the chunkwise form (heads and widths are n_heads and head_dim)."""
    moe_experts: int = 8
    """MoE: number of expert feed-forwards (each a SwiGLU of width ffn_dim)."""
    moe_top_k: int = 2
    """MoE: experts each token is routed to."""
    moe_capacity: float | None = None
    """MoE: capacity factor (an expert takes at most capacity * tokens * top_k / experts tokens per
    forward; the rest are dropped and counted); None means dropless."""
    moe_balance_coef: float = 0.01
    """MoE: weight of the Switch load-balancing loss in `moe_aux_loss`."""
    moe_z_coef: float = 0.001
    """MoE: weight of the router z-loss (mean squared log-sum-exp of the router logits)."""
    moe_norm_topk: bool = True
    """MoE: renormalise the top-k router probabilities to sum to 1 (with k > 1); Qwen3-MoE and OLMoE
    checkpoints that set norm_topk_prob false weight experts by their raw softmax probabilities."""
    family: str = "llama"
    """The architecture family the weights follow (a key of lilliput.core.families.FAMILIES):
    decides the Hugging Face and GGUF names on load and export, never the math, which the
    switches below spell out."""
    attn_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    attn_out_bias: bool = False
    """A bias on the attention output projection (Llama's attention_bias sets both)."""
    mlp_bias: bool = False
    """Biases on the feed-forward projections."""
    qk_norm: str | None = None
    """RMSNorm of queries and keys before rotary: "head" over each head (Qwen3, Gemma 3), "proj" over
    the whole projection (OLMo 2, OLMoE); None: off."""
    norm_offset: float = 0.0
    """Every RMSNorm multiplies by (norm_offset + weight): 1.0 for Gemma, whose weights are stored
    around zero."""
    pre_norms: bool = True
    """RMSNorm of the residual stream before attention and before the feed-forward."""
    post_norms: bool = False
    """RMSNorm of the attention and feed-forward outputs before they join the residual (Gemma 2/3,
    OLMo 2)."""
    act: str = "silu"
    """The gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with tanh GELU, Gemma)."""
    emb_scale: float | None = None
    """Embeddings are multiplied by this (Gemma: sqrt(dim)); None: 1."""
    attn_scale: float | None = None
    """Softmax scale of attention scores; None: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar^-0.5)."""
    attn_softcap: float | None = None
    """Attention scores become cap * tanh(score / cap) (Gemma 2); None: off."""
    final_softcap: float | None = None
    """Logits become cap * tanh(logit / cap) (Gemma 2); None: off."""
    sliding_window: int | None = None
    """Keys a query sees in a sliding-window layer: its own position and the window - 1 before it."""
    sliding_layers: tuple[int, ...] = ()
    """Layers that use the sliding window (Gemma: five of six; Mistral: all); the rest see every key."""
    rope_scaling: dict[str, Any] | None = None
    """Rotary scaling as Hugging Face writes it: {"rope_type": "linear" | "dynamic" | "yarn" |
    "longrope" | "llama3", ...its parameters}; None: plain rotary."""
    rope_local_theta: float | None = None
    """Rotary base of the sliding-window layers (Gemma 3); None: rope_theta."""
    rotary_dim: int | None = None
    """Partial rotary: only the first rotary_dim values of each head rotate (Phi-3); None: all."""
    nope_layers: tuple[int, ...] = ()
    """Layers without rotary position embedding (SmolLM3: every fourth)."""
    name: str = "custom"
    """A label for reports."""

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim}) unless head_dim is set")
        for field in ("layer_mixers", "sliding_layers", "nope_layers"):
            if isinstance(getattr(self, field), list):  # JSON gives lists
                object.__setattr__(self, field, tuple(getattr(self, field)))
        for field in ("ssm_state", "ssm_expand", "ssm_head_dim", "ssm_conv", "ssm_chunk", "mlstm_chunk",
                      "moe_experts", "moe_top_k"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if (self.ssm_expand * self.dim) % self.ssm_head_dim:
            raise ValueError(f"ssm_head_dim ({self.ssm_head_dim}) must divide ssm_expand * dim "
                             f"({self.ssm_expand * self.dim})")
        if self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be at most moe_experts ({self.moe_experts})")
        if self.moe_capacity is not None and self.moe_capacity <= 0:
            raise ValueError(f"moe_capacity must be positive or None (dropless), got {self.moe_capacity}")
        if self.hd % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.hd}")
        if self.qk_norm not in (None, "head", "proj"):
            raise ValueError(f"qk_norm must be 'head', 'proj' or None, got {self.qk_norm!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.hd and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.hd}], got {self.rotary_dim}")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("sliding_layers needs a sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        for field in ("sliding_layers", "nope_layers"):
            bad = [i for i in getattr(self, field) if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"{field} names layers {bad} outside 0..{self.n_layers - 1}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope scaling {kind!r} is not supported; lilliput runs {', '.join(ROPE_TYPES)}")

    def mixer_at(self, layer: int) -> str:
        """The sequence mixer of layer `layer`."""
        return self.layer_mixers[layer % len(self.layer_mixers)] if self.layer_mixers else self.mixer

    @property
    def rot_dim(self) -> int:
        """Values of each head that rotate."""
        return self.rotary_dim if self.rotary_dim is not None else self.hd

    @property
    def hd(self) -> int:
        """Resolved head width."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        if "layer_mixers" in d:  # JSON gives a list
            d = {**d, "layer_mixers": tuple(d["layer_mixers"])}
        return cls(**d)


_ARENA = dict(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16384, ssm_head_dim=32)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny"),
    "dense-tiny": ModelConfig(name="dense-tiny"),
    # tiny non-Llama models for tests: the same widths as "tiny"
    "mamba-tiny": ModelConfig(name="mamba-tiny", mixer="mamba", ssm_chunk=8),
    "xlstm-tiny": ModelConfig(name="xlstm-tiny", mixer="mlstm", mlstm_chunk=8),
    "moe-tiny": ModelConfig(name="moe-tiny", ffn="moe", moe_experts=4, moe_top_k=2),
    "hybrid-tiny": ModelConfig(name="hybrid-tiny", n_layers=4, layer_mixers=("mamba", "mamba", "mamba", "attention"),
                               ssm_chunk=8),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        ffn_dim=1536, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0,
    ),
    # the arena (`lilliput arena`): byte-level models of ~0.82M parameters, matched within 5% (tests/test_arena.py);
    # dim 128, 4 layers, the feed-forward width absorbing each mixer's size; max_seq_len 16384 so decode can be
    # timed at 8192 tokens of context (training uses 256-token windows)
    "dense-arena": ModelConfig(name="dense-arena", **_ARENA, ffn_dim=384),
    "mamba-arena": ModelConfig(name="mamba-arena", **_ARENA, mixer="mamba", ffn_dim=240),
    "xlstm-arena": ModelConfig(name="xlstm-arena", **_ARENA, mixer="mlstm", ffn_dim=288),
    "moe-arena": ModelConfig(name="moe-arena", **_ARENA, ffn="moe", ffn_dim=96, moe_experts=4, moe_top_k=2),
    "moe-arena-active": ModelConfig(name="moe-arena-active", **_ARENA, ffn="moe", ffn_dim=192, moe_experts=4,
                                    moe_top_k=2),
    "hybrid-arena": ModelConfig(name="hybrid-arena", **_ARENA, layer_mixers=("mamba", "mamba", "mamba", "attention"),
                                ffn_dim=280),
    # a small student for distillation studies (SmolLM2 vocabulary): 17.3M parameters, 12.6M of them embedding
    "student-20m": ModelConfig(
        name="student-20m", vocab_size=49152, dim=256, n_layers=6, n_heads=4, n_kv_heads=2,
        ffn_dim=768, max_seq_len=2048, rope_theta=100000.0,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
