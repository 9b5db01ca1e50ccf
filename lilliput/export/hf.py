"""Hugging Face folders for transformers, vLLM and TGI: model.safetensors, config.json,
generation_config.json, tokenizer.json + tokenizer_config.json, and a model card (README.md).

Quantized models are dequantized on export (types float32, float16, bfloat16): lilliput's int8
(symmetric per row) and int4 (asymmetric per group, fp16 scales, uint8 zeros) would need a
quantization format with its own kernels in transformers (GPTQ/AWQ/compressed-tensors packages),
which plain `from_pretrained` does not read; the float folder loads anywhere, and vLLM quantizes
at load time with `--quantization fp8` or similar when asked. A quantized output layer of a tied
model is its own copy of the embedding on its grid, so such folders have an untied `lm_head`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lilliput.core import families
from lilliput.export.target import FORMATS, ExportFormat, export
from lilliput.export.weights import agreement, llama_weights, output_is_tied, probe_ids, require, source_logits

TYPES = ("float32", "float16", "bfloat16")
TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
"""Largest mean KL (nats) of transformers' next-token distributions on the probe vs lilliput's."""
CHAT_PROBE = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is 7 x 6?"},
              {"role": "assistant", "content": "42."}, {"role": "user", "content": "And 6 x 9?"}]


def default_type(model) -> str:
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def hf_config(model, type: str, tokenizer) -> dict:
    """config.json: LlamaConfig fields, untied when the output layer is its own (quantized) copy."""
    cfg = families.hf_config(model.config)
    cfg["tie_word_embeddings"] = output_is_tied(model)
    cfg["torch_dtype"] = type
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("pad_token_id", tokenizer.pad_id)):
        if value is not None:
            cfg[key] = value
    return cfg


def generation_config(tokenizer) -> dict:
    eos = sorted(tokenizer.eos_ids)
    cfg = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": tokenizer.pad_id}
    return {k: v for k, v in cfg.items() if v is not None}


def write_hf(model, tokenizer, path: Path, type: str, source: Path | str | None = None) -> dict:
    from safetensors.torch import save_file

    from lilliput.core.record import write_json
    from lilliput.export.vocab import as_bpe

    tok = as_bpe(tokenizer)
    path.mkdir(parents=True)
    dtype = getattr(torch, type)
    state = {name: (t if isinstance(t, torch.Tensor) else t.dequantize()).to(dtype).contiguous()
             for name, t in llama_weights(model).items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    write_json(path / "config.json", hf_config(model, type, tok))
    write_json(path / "generation_config.json", generation_config(tok))
    tok.save(path)
    (path / "README.md").write_text(model_card(model, source, "hf", type))
    return {"tensors": len(state), "dequantized": any(not isinstance(t, torch.Tensor) and t.bits
                                                      for t in llama_weights(model).values())}


def check_hf(model, tokenizer, path: Path, type: str) -> dict:
    """Load the folder with transformers, offline: logits within tolerance, same tokens, same chat prompt."""
    import transformers

    from lilliput.export.target import ExportCheckError
    from lilliput.export.vocab import as_bpe

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok = as_bpe(tokenizer)
    ids = probe_ids(tokenizer, model.config.vocab_size)
    text = tok.decode(ids)
    if hf_tok(text, add_special_tokens=False)["input_ids"] != tok.encode(text, bos=False):
        raise ExportCheckError("transformers' tokenizer encodes the probe text differently from lilliput's")
    chat_same = None
    if tok.chat_template:
        ours = tok.apply_chat_template(CHAT_PROBE)
        theirs = hf_tok.apply_chat_template(CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        if ours != theirs:
            raise ExportCheckError("transformers renders the chat template differently from lilliput")
        chat_same = True
    with torch.inference_mode():
        got = hf(torch.tensor([ids])).logits[0].float()
    report = require(agreement(source_logits(model, ids), got), TOLERANCE[type], f"the {type} Hugging Face folder")
    return {**report, "chat_template_same": chat_same}


# --- model card ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_card(model, source: Path | str | None, format: str, type: str) -> str:
    """README.md: what the model is, how it was shrunk (with the figures measured then), how to run it.

    The shrink stages come from the source folder's run.json (a `lilliput shrink` run's table of
    stages, or the metrics of quantize / prune / distill) and config.json's quantization section."""
    c = model.config
    folder = Path(source) if source is not None and Path(source).is_dir() else None
    run = _read_json(folder / "run.json") if folder else {}
    cfg = _read_json(folder / "config.json") if folder else {}
    lines = [f"# {c.name}: a lilliput model, exported to {format} ({type})", "",
             f"A Llama-architecture decoder: {c.n_layers} layers, width {c.dim}, {c.n_heads} query heads / "
             f"{c.n_kv_heads} KV heads of {c.hd}, MLP {c.ffn_dim}, vocabulary {c.vocab_size}, context {c.max_seq_len}; "
             f"{model.num_params() / 1e6:.1f}M parameters. Source: `{source or 'the embedded SmolLM2-135M-Instruct'}`.", ""]
    lines += ["## How it was shrunk", ""]
    if run:
        from lilliput.eval.report import stage_table  # a shrink run's stages, else the run's own metrics

        head, cells = stage_table([(c.name, run)])
        lines += [f"`{run.get('command')}` (git {str(run.get('git_sha'))[:10]}, {run.get('created')}):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  *("| " + " | ".join(str(x) for x in row) + " |" for row in cells), ""]
    else:
        lines += ["No run.json beside the source model: no shrink stages recorded.", ""]
    if cfg.get("quantization"):
        q = {k: v for k, v in cfg["quantization"].items() if k != "layers"}
        lines += [f"Quantized in lilliput ({json.dumps(q, default=str)}); "
                  f"{'dequantized to ' + type + ' here' if format == 'hf' else 'written as ' + type}.", ""]
    lines += ["## Run it", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained('PATH')", "model = AutoModelForCausalLM.from_pretrained('PATH')",
              "```", "", "vLLM: `vllm serve PATH`; lilliput: `lilliput generate PROMPT --model PATH`.", ""]
    return "\n".join(lines)


FORMATS.register("hf")(ExportFormat(
    name="hf", types=TYPES, writes_folder=True, write=write_hf, check=check_hf, default_type=default_type,
    runtime="transformers, vLLM, TGI"))


def export_hf(model, tokenizer, path: Path | str, type: str | None = None, force: bool = False,
              check: bool = True, source: Path | str | None = None) -> Path:
    """Write a checked Hugging Face folder of `model` at `path`; returns the path."""
    return export(model, tokenizer, "hf", path, type, force=force, check=check, source=source).path
