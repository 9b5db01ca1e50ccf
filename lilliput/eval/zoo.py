"""Specimens of every model family: tiny random instances that transformers builds from its own
config classes (no download), with each family's quirks switched on, and the real shapes of the
smallest public members for speed measurements.

`hf_model(name)` returns the transformers model with random weights larger than its initializer's
(peaked next-token distributions, so a wrong layer shows in the logits) and with biases and norm
weights randomised too (a dropped bias or norm would be invisible at their initial values).
`to_lilliput(hf)` converts it through the same mapping a Hugging Face folder goes through.
"""

from __future__ import annotations

from typing import Any

import torch

from lilliput.core import families
from lilliput.core.model import GPT

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 8
"""Sliding window of the tiny specimens: shorter than the parity tests' sequences."""

TINY: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (transformers config class, its arguments)
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-yarn": ("LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                        "original_max_position_embeddings": 16})),
    "llama-linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                          "factor": 2.0})),
    "llama-dynamic": ("LlamaConfig", dict(max_position_embeddings=32, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0})),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                                            "factor": 8.0}})),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", dict(max_position_embeddings=128, original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0]})),
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=4, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64, num_key_value_heads=4)),
}
"""Tiny specimens: 4 layers (Gemma 3: 6, its five-local-one-global pattern), width 64, vocabulary 256,
each family's quirks on as its public members set them (llama3 and the other rope scalings, biases,
qk-norm, sliding windows of 8, LongRoPE with partial rotary, NoPE every fourth layer, Qwen3-MoE's
renormalised top-k and OLMoE's raw one, with its multi-head attention)."""

FAMILY_OF = {"llama3": "llama", "llama-yarn": "llama", "llama-linear": "llama", "llama-dynamic": "llama",
             "gemma3": "gemma3_text"}

REAL: dict[str, tuple[str, dict[str, Any]]] = {
    # the smallest public members' config.json fields (random weights): speed at real shapes
    "qwen3-0.6b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "gemma-3-270m": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                              num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                              max_position_embeddings=32768,
                                              layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                                         rms_norm_eps=1e-5, rope_parameters={
                                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "smollm3-3b-12l": ("SmolLM3Config", dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                                             num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                             max_position_embeddings=65536, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0})),
}
"""Real shapes: Qwen3-0.6B, Gemma-3-270M, Llama-3.2-1B, Qwen2.5-0.5B and SmolLM3-3B with 12 of its 36
layers (memory and time on a 2-core machine)."""


def hf_config(name: str, table: dict = TINY):
    import transformers

    cls, kw = table[name]
    args = {**_BASE, **kw} if table is TINY else {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **kw}
    return getattr(transformers, cls)(**args)


@torch.no_grad()
def hf_model(name: str, seed: int = 0, table: dict = TINY, std: float = 0.15):
    """A random transformers model of specimen `name` in fp32 eval mode."""
    import transformers

    cfg = hf_config(name, table)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gemma = cfg.model_type.startswith("gemma")
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in pname:
            p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
        elif "embed" in pname or "lm_head" in pname:
            p.copy_((0.5 if gemma else 1.0) * noise)  # Gemma scales its embeddings up by sqrt(dim) itself
        else:
            p.copy_(std * noise)
    return model


def to_lilliput(hf, name: str = "specimen") -> GPT:
    """The transformers model's weights as a lilliput GPT (the Hugging Face folder mapping)."""
    config = families.config_from_hf(hf.config.to_dict(), name=name)
    sd = families.from_hf_state_dict({k: v.detach().clone() for k, v in hf.state_dict().items()}, config)
    return GPT.from_state_dict(config, sd).eval()


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens through its own cache. Not `generate`: its min_new_tokens bans
    EOS (lilliput's ignore_eos goes on past it), and for Phi-3 it re-prefills the whole sequence
    with the long LongRoPE factors when a sequence crosses the original context, where lilliput
    (like vLLM and transformers' own cached forward) keeps the keys already cached."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def prompt_ids(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    """(batch, n) random token ids of the tiny vocabulary (above the special ids 0-2)."""
    return torch.randint(3, _BASE["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def byte_bpe():
    """A byte-level BPE of 100 tokens (printable ASCII, a newline, 3 merges, 2 specials): fits the
    specimens' 256 ids (exports pad the vocabulary) and, unlike the byte tokenizer, has the merges
    GGUF needs."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

    from lilliput.core.tokenizer import Tokenizer, bytes_to_unicode

    enc = bytes_to_unicode()
    alphabet = [enc[b] for b in range(32, 127)] + [enc[10]]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, eos_id=len(vocab) + 1)
