"""The model's matrices as the export formats need them: split into Llama's q/k/v and gate/up,
float or as integer codes on their grid, and the checks every writer shares.

A `Weight` is one (N, K) matrix as lilliput stores it: float, int8 per row (symmetric) or int4 per
group (asymmetric, W = (q - zero) * scale; zero an integer on lilliput's grid, any float on the
min/max grid `minmax_int4` fits for export). Writers that have a matching integer format copy the
codes (GGUF Q4_1 and Q8_0, ONNX MatMulNBits); the others dequantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lilliput.compress.qlinear import Int4Linear, Int8Linear, QuantLinear, int8_scale, quantize_int8
from lilliput.core.model import GPT
from lilliput.export.target import ExportCheckError


@dataclass(frozen=True)
class Weight:
    """One matrix (N, K): `value` when float; else `codes` with `scale` (and `zero`) per group."""

    bits: int  # 0 (float), 8 or 4
    value: torch.Tensor | None = None  # (N, K) float32
    codes: torch.Tensor | None = None  # (N, K) int8 in [-127, 127] (bits 8) or uint8 in [0, 15] (bits 4)
    scale: torch.Tensor | None = None  # (N, K / group) float32
    zero: torch.Tensor | None = None  # (N, K / group) float32 (bits 4 only): integers in [0, 15] on lilliput's grid
    group: int = 0  # columns per scale (K for int8)

    @property
    def shape(self) -> tuple[int, int]:
        t = self.value if self.bits == 0 else self.codes
        return tuple(t.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        if self.bits == 0:
            return self.value
        s = self.scale.repeat_interleave(self.group, dim=1)
        if self.bits == 8:
            return self.codes.float() * s
        return (self.codes.float() - self.zero.repeat_interleave(self.group, dim=1)) * s

    def rows(self, start: int, stop: int) -> "Weight":
        """Rows [start, stop): quantization is per row, so the slice keeps its grid."""
        pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Weight(self.bits, pick(self.value), pick(self.codes), pick(self.scale), pick(self.zero), self.group)

    def permute_rows(self, order: torch.Tensor) -> "Weight":
        pick = lambda t: None if t is None else t[order]  # noqa: E731
        return Weight(self.bits, pick(self.value), pick(self.codes), pick(self.scale), pick(self.zero), self.group)


def weight_of(module: nn.Module) -> Weight:
    """The matrix of a linear layer, float or quantized."""
    if isinstance(module, Int8Linear):
        s = module.scale.view(torch.float32).float()[:, None]  # (N, 1)
        return Weight(8, codes=module.codes().clone(), scale=s, group=module.in_features)
    if isinstance(module, Int4Linear):
        return Weight(4, codes=module.codes(), scale=module.scales(), zero=module.zeros().float(),
                      group=module.group_size)
    if isinstance(module, QuantLinear):
        return Weight(0, value=module.dequantize(torch.float32))
    return Weight(0, value=module.weight.detach().float())


def minmax_int4(w: torch.Tensor, group: int) -> Weight:
    """w (N, K) on the asymmetric min/max grid of each block of `group` columns, zero points kept in float:
    scale = (max - min) / 15 and zero = -min / scale, so codes 0 and 15 land on the block's min and max.

    A GGUF Q4_1 block (w = d * q + m, q in 0..15, both ends used) is on this grid exactly (scale d, zero
    -m/d), which integer zero points cannot express: re-quantizing a Q4_1-origin model this way is
    lossless by construction, so its quality must be judged on float models."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)  # (N, blocks, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))  # a constant block: codes 0, zero -lo
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Weight(4, codes=codes.reshape(n, k), scale=scale, zero=-lo / scale, group=group)


def blockwise_int8(w: torch.Tensor, group: int) -> Weight:
    """w (N, K) on a symmetric int8 grid per block of `group` columns: scale = max |w| / 127. A GGUF Q8_0
    block (32 columns, w = d * q) is on it exactly."""
    n, k = w.shape
    g = w.detach().float().reshape(n * (k // group), group)
    scale = int8_scale(g)  # (N * blocks, 1)
    codes = quantize_int8(g, scale).to(torch.int8).reshape(n, k)
    return Weight(8, codes=codes, scale=scale.reshape(n, k // group), group=group)


def output_is_tied(model: GPT) -> bool:
    """True when the output layer is the token embedding itself (a quantized output layer is its own copy)."""
    return isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight


def hf_weights(model: GPT) -> dict[str, Weight | torch.Tensor]:
    """The model's family's Hugging Face names -> Weight (matrices) or float32 tensor (norms, biases,
    embedding, MoE router), through `families.to_hf_state_dict` (the one mapping loading uses too).

    q and k rows are in Hugging Face's rotate-half order, as lilliput stores them; `lm_head.weight`
    is present only when the output layer is not the token embedding.
    """
    from lilliput.core import families

    # each matrix goes through the mapping as a range of row ids, so a fused q|k|v or gate|up split
    # by the family comes back as the row range of its part; every other tensor goes through as is
    matrices: dict[str, Weight] = {}
    sd: dict[str, torch.Tensor] = {}
    start = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            w = weight_of(m)
            matrices[name] = w
            sd[name + ".weight"] = torch.arange(start, start + w.shape[0])
            start += w.shape[0]
    for name, t in model.state_dict().items():
        if name not in sd and not isinstance(model.get_submodule(name.rsplit(".", 1)[0]), QuantLinear):
            sd[name] = t.detach().float()
    owner = {}
    for name, w in matrices.items():
        first = int(sd[name + ".weight"][0])
        owner[first] = (name, first)
    bounds = sorted(owner)
    out: dict[str, Weight | torch.Tensor] = {}
    for hf_name, t in families.to_hf_state_dict(sd, model.config).items():
        if t.dtype != torch.int64:
            out[hf_name] = t
            continue
        lo, hi = int(t[0]), int(t[-1]) + 1
        name, first = owner[bounds[_last_at_most(bounds, lo)]]
        out[hf_name] = matrices[name].rows(lo - first, hi - first)
    if output_is_tied(model):
        out.pop("lm_head.weight", None)
    return out


def _last_at_most(sorted_values: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_right(sorted_values, x) - 1


llama_weights = hf_weights
"""The Llama name of `hf_weights` (GGUF's writer reads it)."""


def weight_bits(model: GPT) -> int:
    """The bit-width of most of the model's block matrices: 0 (float), 8 or 4."""
    bits = [weight_of(m).bits for n, m in model.named_modules()
            if n.startswith("layers.") and (isinstance(m, (nn.Linear, QuantLinear)))]
    return max(set(bits), key=bits.count) if bits else 0


def int4_group(model: GPT) -> int | None:
    groups = [m.group_size for m in model.modules() if isinstance(m, Int4Linear)]
    return max(set(groups), key=groups.count) if groups else None


def float_copy(model: GPT) -> GPT:
    """A float32 GPT with the same weights, quantized layers dequantized (the source is untouched).

    A quantized output layer is a copy of the embedding on its grid, so the copy unties them."""
    tied = output_is_tied(model)
    config = model.config if tied or not model.config.tie_embeddings else model.config.replace(tie_embeddings=False)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = m.dequantize(torch.float32)
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if not isinstance(model.get_submodule(owner), QuantLinear):
            state[name] = t.detach().float().cpu().clone()
    if tied:
        state.pop("lm_head.weight", None)
    return GPT.from_state_dict(config, state).eval()


# --- the self-check every writer runs ----------------------------------------------------------------

PROBE_TEXT = ("The little ship sailed past the lighthouse at dawn, and the sailors sang of home. "
              "1 + 2 = 3. <|im_start|>user\nWhat is 7 x 6?<|im_end|>\n")


def probe_ids(tokenizer, vocab_size: int, n: int = 48) -> list[int]:
    """A fixed prompt of up to n ids, every id a valid row of the model."""
    ids = [i for i in tokenizer.encode(PROBE_TEXT, bos=False) if i < vocab_size][:n]
    return ids if len(ids) >= 2 else list(range(min(n, vocab_size)))


def source_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """(T, V) float32 logits of the source model, as lilliput runs it."""
    param = next(model.parameters())
    with torch.inference_mode():
        return model(torch.tensor([ids], device=param.device))[0].float().cpu()


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """How close two (T, V) logit tensors are: max |diff|, relative L2 error, top-1 agreement, mean KL."""
    ref, got = ref.float(), got.float()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit_diff": float((ref - got).abs().max()),
            "relative_error": float((ref - got).norm() / ref.norm().clamp(min=1e-12)),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "mean_kl": float(kl.sum(-1).mean()), "tokens": ref.shape[0]}


def require(report: dict, tolerance: float, what: str) -> dict:
    """Raise ExportCheckError unless the mean KL divergence of the next-token distributions (source || export)
    is within the type's tolerance. A wiring error (a wrong q/k order, a swapped gate and up) costs nats;
    rounding costs thousandths."""
    report = {**report, "tolerance_mean_kl": tolerance}
    if not report["mean_kl"] <= tolerance:
        raise ExportCheckError(f"{what} disagrees with the source model: mean KL {report['mean_kl']:.3g} nats > "
                               f"{tolerance:g} on the probe; the export was not kept")
    return report
