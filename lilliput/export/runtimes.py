"""Exports run in their own runtimes, behind the interface lilliput's evaluation uses.

`OnnxModel` (ONNX Runtime) and `LlamaCppModel` (llama.cpp through llama-cpp-python) are
`nn.Module`s whose `forward(idx)` returns logits (B, T, V) and which carry `.config`, so
`lilliput.eval.perplexity` scores them with the same windows and the same tokens as a lilliput
model; `greedy(ids, n)` decodes at batch 1 and reports tokens/s of the decode steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lilliput.core import families
from lilliput.core.config import ModelConfig

MODEL_FILE = "model.onnx"
"""The graph's file in an ONNX export folder (its weights beside it in MODEL_FILE + ".data")."""


class _Runtime(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # evaluation reads the device from it

    def forward(self, idx: torch.Tensor, **_) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V) float32, one row at a time from an empty cache."""
        return torch.stack([torch.from_numpy(self.logits(row.tolist())) for row in idx.cpu()])

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError


class OnnxModel(_Runtime):
    """An ONNX export folder in an ONNX Runtime CPU session."""

    def __init__(self, folder: Path | str, threads: int | None = None):
        import onnxruntime as ort


        folder = Path(folder)
        super().__init__(families.config_from_hf(json.loads((folder / "config.json").read_text()), name=folder.name))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        self.load_seconds = time.perf_counter() - t0

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        c = self.config
        shape = (batch, c.n_kv_heads, 0, c.hd)
        return {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32) for i in range(c.n_layers)
                for k in ("key", "value")}

    def run(self, ids: list[list[int]], past: dict[str, np.ndarray] | None = None):
        """(logits (B, T, V), present as the next call's past)."""
        feed = {"input_ids": np.asarray(ids, np.int64), **(past or self.empty_past(len(ids)))}
        out = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        return out[0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.run([ids])[0][0]

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens after `ids`, and decode tokens/s (steps after the first token)."""
        logits, past = self.run([ids])
        out = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            logits, past = self.run([[out[-1]]], past)
            out.append(int(logits[0, -1].argmax()))
        return out, (n - 1) / (time.perf_counter() - t0)


class LlamaCppModel(_Runtime):
    """A GGUF file in llama.cpp (llama-cpp-python), every position's logits kept."""

    def __init__(self, path: Path | str, threads: int = 2, n_ctx: int = 1024, llama_cpp=None):
        from lilliput.core.checkpoint import _gguf_config
        from lilliput.core.gguf_file import GGUFFile

        if llama_cpp is None:
            import llama_cpp
        f = GGUFFile(path)
        super().__init__(_gguf_config(f.metadata, set(f.tensors), Path(path).stem))
        f.close()
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=min(512, n_ctx), logits_all=True, verbose=False)
        self.load_seconds = time.perf_counter() - t0

    def tokenize(self, text: str, bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        self.llm.reset()
        self.llm.eval(ids)
        out = [int(np.argmax(self.llm.scores[len(ids) - 1]))]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
        return out, (n - 1) / (time.perf_counter() - t0)


class TransformersModel(_Runtime):
    """A Hugging Face folder in transformers' `AutoModelForCausalLM` (float32, CPU)."""

    def __init__(self, folder: Path | str, threads: int | None = None):
        import transformers

        folder = Path(folder)
        super().__init__(families.config_from_hf(json.loads((folder / "config.json").read_text()), name=folder.name))
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                    dtype=torch.float32).eval()
        self.load_seconds = time.perf_counter() - t0

    def forward(self, idx: torch.Tensor, **_) -> torch.Tensor:
        with torch.inference_mode():
            return self.hf(idx).logits.float()

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        with torch.inference_mode():
            out = self.hf(torch.tensor([ids]), use_cache=True)
            past, toks = out.past_key_values, [int(out.logits[0, -1].argmax())]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = self.hf(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                toks.append(int(out.logits[0, -1].argmax()))
        return toks, (n - 1) / (time.perf_counter() - t0)
