"""Model configuration: one frozen dataclass, the single source of defaults, help and saved JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


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
        if isinstance(self.layer_mixers, list):
            object.__setattr__(self, "layer_mixers", tuple(self.layer_mixers))
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

    def mixer_at(self, layer: int) -> str:
        """The sequence mixer of layer `layer`."""
        return self.layer_mixers[layer % len(self.layer_mixers)] if self.layer_mixers else self.mixer

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

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face LlamaConfig fields (for export and parity tests)."""
        if self.mixer != "attention" or self.ffn != "swiglu" or set(self.layer_mixers) - {"attention"}:
            raise ValueError(f"only attention+swiglu models map to Llama, not {self.mixer}+{self.ffn}")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.hd,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> "ModelConfig":
        """Read a Hugging Face Llama-family config.json."""
        if hf.get("model_type") == "qwen2":  # Qwen2Attention always has biased q/k/v projections
            raise ValueError("a Qwen2 model's attention has biases (self_attn.q_proj.bias, k_proj.bias, "
                             "v_proj.bias): lilliput supports only bias-free Llama-style attention")
        if hf.get("model_type") not in ("llama", "mistral", None):
            raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama-style model lilliput can load")
        biased = [key for key in ("attention_bias", "mlp_bias") if hf.get(key)]
        if biased:
            raise ValueError(f"config.json sets {' and '.join(biased)}: lilliput supports only bias-free "
                             "Llama-style attention and MLPs")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
        if kind not in ("default", None):
            raise ValueError(f"rope scaling {kind!r} is not supported yet")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim if head_dim not in (None, hf["hidden_size"] // n_heads) else None,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            name=name,
        )


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
