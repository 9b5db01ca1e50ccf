"""Runs the model over a decode state, and nothing else: the fused C step on CPU where it applies
(decode batches, verification, short prompt chunks), the torch modules everywhere else."""

from __future__ import annotations

import contextlib

import torch

from lilliput.core.model import GPT
from lilliput.infer import kernels
from lilliput.infer.fastpath import accelerate_
from lilliput.infer.fused import FusedStep, fast_path_reason

FUSED_EXTEND_MAX = 16
"""Longest run of one row's tokens sent to the fused step when its layers take 8 rows per pass
over the weights; longer prompt chunks go to torch, whose matrix-matrix products win once every
weight is used by that many rows. A step whose layers take any number of rows in one pass
(`FusedStep.one_pass`: int8 or int4 in the batch layout) runs every chunk, `max_tokens` at a time,
and so does a bf16 model on a CPU without bf16 arithmetic (no AVX-512 BF16 or AMX), where torch's
bf16 products are slower than the C step's (a 64-token prompt of SmolLM2 on 2 Zen 3 cores: torch
~12 s, the C step ~0.8 s)."""


class ModelRunner:
    def __init__(self, model: GPT, rows: int, max_len: int, kv_dtype: torch.dtype | None = None):
        self.model = model
        p = next(model.parameters())
        self.device = p.device
        cpu = self.device.type == "cpu"
        if cpu:
            accelerate_(model)
        self.fused = FusedStep.for_model(model) if cpu else None
        # bf16 weights where the CPU has no bf16 arithmetic: every prompt chunk runs in the C step
        self.bf16_in_c = cpu and p.dtype == torch.bfloat16 and not kernels.cpu_has("avx512_bf16", "amx_bf16")
        if kv_dtype is None:  # fp16 where the fused step keeps it, else the model's float dtype
            kv_dtype = torch.float16 if self.fused and self.fused.kv_f16 else \
                torch.float32 if self.fused else (p.dtype if p.is_floating_point() else torch.float32)
        if self.fused and kv_dtype not in ((torch.float32, torch.float16) if self.fused.kv_f16 else (torch.float32,)):
            self.fused = None  # a cache the C step cannot read: the torch modules run every step
        # why the torch modules run every step: one line for the caller to show once ("" when fused)
        if self.fused is not None:
            self.fused_reason = ""
        elif not cpu:
            self.fused_reason = f"the model is on {self.device.type}; the fused step runs on CPU"
        else:
            self.fused_reason = fast_path_reason(model) or f"the fused step cannot read a {kv_dtype} cache"
        # torch paths cast keys and values on read
        self.state = model.new_state(rows, max_len, self.device, kv_dtype)

    def _threads(self):
        """While the C step runs, torch stays single-threaded: the kernel's pool owns the cores."""
        return kernels.decode_threads() if self.fused else contextlib.nullcontext()

    @torch.inference_mode()
    def decode(self, tokens: list[int], rows: list[int]) -> torch.Tensor:
        """One token for each of several distinct rows -> logits (B, V) fp32."""
        if self.fused:
            out, T = [], self.fused.max_tokens
            with self._threads():
                for i in range(0, len(tokens), T):
                    out.append(self.fused(self.state, tokens[i:i + T], rows[i:i + T]).clone())
            return out[0] if len(out) == 1 else torch.cat(out)
        idx = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        return self.model(idx, self.state, rows=rows)[:, -1]

    def can_mix(self, longest: int) -> bool:
        """Whether `mixed` runs work whose longest run of one row's tokens is `longest` in the C step."""
        return self.fused is not None and (longest <= FUSED_EXTEND_MAX or self.fused.one_pass or self.bf16_in_c)

    @torch.inference_mode()
    def mixed(self, work: list[tuple[int, list[int], str]]) -> list[torch.Tensor | None]:
        """Several rows' tokens in as few fused calls as fit (`max_tokens` each): decode tokens and
        prompt chunks of one engine step share each pass over the weights. work: (row, tokens,
        logits) with logits "last" -> (V,), "all" -> (T, V), "none" -> None, per item. Check
        `can_mix` first."""
        flat, owner = [], {}  # (row, token) in order; index in flat -> (item, position in the item)
        for i, (row, toks, logits) in enumerate(work):
            keep = {"last": [len(toks) - 1] if toks else [], "all": range(len(toks)), "none": []}[logits]
            owner.update({len(flat) + k: (i, k) for k in keep})
            flat += [(row, t) for t in toks]
        rows_of: list[list[torch.Tensor]] = [[] for _ in work]
        P = self.fused.max_tokens
        with self._threads():
            for a in range(0, len(flat), P):
                piece = flat[a:a + P]
                out = [j - a for j in range(a, a + len(piece)) if j in owner]
                y = self.fused(self.state, [t for _, t in piece], [r for r, _ in piece], out)
                for k, j in enumerate(out):
                    rows_of[owner[a + j][0]].append(y[k].clone())
        return [None if logits == "none" or not got else got[-1] if logits == "last" else torch.stack(got)
                for (_, _, logits), got in zip(work, rows_of)]

    @torch.inference_mode()
    def extend(self, row: int, tokens: list[int], logits: str = "last") -> torch.Tensor | None:
        """Append several tokens to one row (a prompt chunk, or drafted tokens to verify).
        logits: "last" -> (V,), "all" -> (T, V), "none" -> None."""
        if self.can_mix(len(tokens)):
            return self.mixed([(row, tokens, logits)])[0]
        idx = torch.tensor([tokens], device=self.device)  # (1, T)
        h = self.model.features(idx, self.state, rows=[row])[0]  # (T, C)
        if logits == "none":
            return None
        return self.model.logits(h[-1] if logits == "last" else h)
