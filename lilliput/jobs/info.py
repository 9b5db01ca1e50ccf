"""`lilliput info`: what a model is (family, config, parameters, tokenizer, whether the fused C step runs it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.families import describe
from lilliput.core.options import flag, nested
from lilliput.eval.efficiency import active_parameter_count, parameter_count
from lilliput.infer.fused import fast_path_reason


@dataclass(frozen=True)
class InfoJob:
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_info(job: InfoJob) -> None:
    model, tok = job.load.load()
    c = model.config
    why = fast_path_reason(model)
    param = next(model.parameters())
    info = {"model": job.load.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)", "family": describe(c),
            "fast path": f"no: {why}" if why else "yes (the fused C step)", "config": c.to_dict(),
            "parameters": parameter_count(model), "active_parameters": active_parameter_count(model),
            "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device),
            "load_seconds": round(model.load_seconds, 3),
            "tokenizer": {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                          "chat_template": tok.chat_template is not None}}
    if job.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v}")
