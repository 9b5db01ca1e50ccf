"""LoRA (Hu et al. 2021): low-rank adapters on frozen layers, trained alone, saved alone, merged.

`add_lora_(model, LoRAConfig(...))` wraps every target layer in a `LoRALinear` and freezes
everything else, so only the adapters get gradients:

    y = base(x) + (alpha / rank) * dropout(x) @ A.T @ B.T      # A (rank, in), B (out, rank); B = 0 at first

The wrapper is generic: the base is any module with `in_features` and `out_features` whose
forward maps (..., in) -> (..., out). A float `nn.Linear` and compress's int8 / int4 layers are
adapted the same way, which is QLoRA: the base stays quantized and frozen, and gradients flow
through it to the adapters of the layers below.

Merging folds B @ A into the base. How depends on the base's type, and the rules are a registry
keyed by type (looked up along the class's MRO), so train never names a higher layer: the rule for
`nn.Linear` lives here (exact: W += scaling * B @ A); compress registers the rule for its quantized
layers (`compress/qlora.py`, imported by `lilliput.compress` itself, so the rule exists whenever such a
layer does). A rule returns the merged module and the largest deviation of its effective weight
from W + scaling * B @ A: 0 for float bases, the rounding error when a quantized base is
re-quantized. Layer names are the model's own attribute names: attention's fused q|k|v
projection is `wqkv` (one adapter whose B spans q, k and v), SwiGLU's fused gate|up is
`w_gate_up`.

Adapters are saved alone (`adapter_model.safetensors` + `adapter_config.json` naming the base
model's fingerprint) and loaded onto the same base with `load_adapters_`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lilliput.core.record import read_json, write_json
from lilliput.core.registry import Registry

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "lilliput-lora"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    """Rank r of each adapter (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: tuple[str, ...] = ("wqkv", "wo", "w_gate_up", "w_down")
    """Attribute names of the layers to adapt (the last part of the module name): the fused
    q|k|v projection, attention output, fused gate|up and down projections of every block."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets is empty: name at least one layer, e.g. wqkv,wo")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update (scaling * B @ A)."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        device = next(iter(base.state_dict().values())).device
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=device))  # identity at start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def delta(self) -> torch.Tensor:
        """The update to the base weight: scaling * B @ A, (out, in) fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()  # (..., r)
        return y + (self.scaling * (h @ self.lora_B.t())).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling}"


# --- attaching --------------------------------------------------------------------------------------

def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: adapter} of every LoRA layer of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora_(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every layer named in `cfg.targets` in a LoRALinear, freeze all other parameters; returns
    the model. The config is kept as `model.lora` (what `save_adapters` writes)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora_) before adding new ones")
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    found, names = [], set()
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "in_features", None), int) or not isinstance(getattr(m, "out_features", None), int):
            continue
        leaf = name.rpartition(".")[2]
        names.add(leaf)
        if leaf in cfg.targets:
            if any(shared[id(p)] > 1 for p in m.parameters(recurse=False)):
                raise ValueError(f"{name} shares its weight with another layer (tied embeddings): an adapter "
                                 "there could not be merged; leave it out of targets")
            found.append((name, m))
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets {', '.join(missing)} name no layer of this model; its layers are: "
                         f"{', '.join(sorted(names)) or 'none'}")
    model.requires_grad_(False)
    for name, m in found:
        _set_module(model, name, LoRALinear(m, cfg))
    model.lora = cfg
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that get gradients (the adapters' A and B after add_lora_)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- merging ----------------------------------------------------------------------------------------

MergeRule = Callable[[nn.Module, torch.Tensor, bool], tuple[nn.Module, "torch.Tensor | None"]]
MERGE_RULES: Registry[MergeRule] = Registry("LoRA merge rule")
"""Base layer type -> rule(base, delta (out, in) fp32, dequantize) -> (merged module, error), error
being the merged effective weight minus (W + delta), (out, in), or None when the merge is exact."""


def register_merge_rule(cls: type) -> Callable[[MergeRule], MergeRule]:
    """Decorator: how to fold an update into a base of type `cls` (and its subclasses)."""
    return MERGE_RULES.register(cls)


def merge_rule(base: nn.Module) -> MergeRule:
    for cls in type(base).__mro__:
        if cls in MERGE_RULES:
            return MERGE_RULES[cls]
    raise ValueError(f"no LoRA merge rule for {type(base).__name__}: register one with "
                     "lilliput.train.lora.register_merge_rule, or keep the adapters unmerged")


@register_merge_rule(nn.Linear)
def _merge_linear(base: nn.Linear, delta: torch.Tensor, dequantize: bool) -> tuple[nn.Module, None]:
    with torch.no_grad():
        base.weight += delta.to(base.weight.dtype)
    return base, None


def merge_lora_(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base and unwrap it; returns the model (its parameters stay frozen).

    Float bases merge exactly. A quantized base is re-quantized on a grid refitted to W + B @ A,
    which rounds the update; `dequantize=True` turns it into a float layer instead (exact, larger).
    `model.lora_merge` records {"layers", "max_abs_error", "relative_error"}: the largest deviation
    of a merged weight from W + scaling * B @ A, and the Frobenius norm of all deviations over that
    of all updates (0: the update survived whole; 1: it is lost in rounding)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    max_err, err_sq, delta_sq = 0.0, 0.0, 0.0
    for name, m in layers.items():
        delta = m.delta().detach()
        merged, err = merge_rule(m.base)(m.base, delta, dequantize)
        _set_module(model, name, merged)
        if err is not None:
            max_err = max(max_err, float(err.abs().max()))
            err_sq += float(err.double().pow(2).sum())
        delta_sq += float(delta.double().pow(2).sum())
    model.lora_merge = {"layers": len(layers), "dequantize": dequantize, "max_abs_error": max_err,
                        "relative_error": math.sqrt(err_sq / delta_sq) if delta_sq else 0.0}
    if hasattr(model, "lora"):
        del model.lora
    return model


# --- saving and loading adapters alone --------------------------------------------------------------

def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under the names it had before add_lora_ (adapters left out)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        out[k.replace(".base.", ".")] = v
    return out


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the base model (data.ledger.model_fingerprint of its tensors, adapters left out)."""
    from lilliput.data.ledger import model_fingerprint

    class _Base:  # model_fingerprint reads state_dict() only
        def state_dict(self):
            return base_state_dict(model)

    return model_fingerprint(_Base())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)} of every adapter, on CPU."""
    return {f"{n}.lora_{w}": getattr(m, f"lora_{w}").detach().cpu().contiguous()
            for n, m in lora_layers(model).items() for w in "AB"}


def save_adapters(model: nn.Module, folder: Path | str, base: str | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write the adapters alone: adapter_model.safetensors and adapter_config.json (the LoRA
    config, the adapted layers and the base's fingerprint, computed when `base` is not given)."""
    from safetensors.torch import save_file

    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(folder / ADAPTER_CONFIG, {"format": FORMAT, "lora": dataclasses.asdict(model.lora),
                                         "base_model": base or base_fingerprint(model),
                                         "layers": sorted(lora_layers(model)), **(extra or {})})
    return folder


def read_adapter_config(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    cfg = read_json(path, "not a LoRA adapter folder")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lilliput LoRA adapter config (format {cfg.get('format')!r})")
    return cfg


def load_adapters_(model: nn.Module, folder: Path | str, check_base: bool = True) -> nn.Module:
    """Attach the adapters saved in `folder` to `model` (the base they were trained on); returns it.

    With `check_base`, a model whose fingerprint differs from the one recorded is refused."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(folder)
    if check_base and (fp := base_fingerprint(model)) != cfg["base_model"]:
        raise ValueError(f"the adapters in {folder} were trained on base {cfg['base_model']}, this model is {fp}: "
                         "load the same base model (same dtype and quantization)")
    lora = cfg["lora"]
    add_lora_(model, LoRAConfig(**{**lora, "targets": tuple(lora["targets"])}))
    if sorted(lora_layers(model)) != sorted(cfg["layers"]):
        raise ValueError(f"the adapters in {folder} adapt other layers than this model has: not its base")
    state = load_file(Path(folder) / ADAPTER_WEIGHTS)
    with torch.no_grad():
        for n, m in lora_layers(model).items():
            for w in "AB":
                p, t = getattr(m, f"lora_{w}"), state[f"{n}.lora_{w}"]
                if t.shape != p.shape:
                    raise ValueError(f"{n}.lora_{w} is {tuple(t.shape)} in {folder}, the model expects {tuple(p.shape)}")
                p.copy_(t)
    return model
