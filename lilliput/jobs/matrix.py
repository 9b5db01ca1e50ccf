"""Every capability on every family: the capability x family matrix, run on the tiny specimens.

`matrix(specimens, capabilities)` runs each capability on each `zoo.TINY` specimen and returns the
table: each cell {"status": "ok", ...its figures}, {"status": "refused", "reason": one line} (the
library refused the family's variant by name) or {"status": "failed", "reason": ...} (it ran and
the result was wrong, or it crashed). Every "ok" is a checked result, not only a run:

| capability | checked |
|---|---|
| rtn-int8, rtn-int4 | SQNR of the logits against the float model above 25 dB (int8), 8 dB (int4); 5 dB less for MoE |
| gptq, awq | int4 logit MSE on the calibration sequences at most RTN's x 1.05 (GPTQ), x 1.1 (AWQ) |
| wanda, sparsegpt | 50% sparsity reached, logits finite, KL to the dense model at most magnitude pruning's x 1.25 |
| structured | a no-op prune is exact; fewer heads, KV heads, channels, width and layers: logits of the right shape, finite |
| lora | a few steps lower the loss; the merged model equals the adapter forward |
| qlora | LoRA on the int8 model: a few steps lower the loss; the merge runs |
| distill | a few steps of a 2-layer same-family student lower the KD loss |
| distill-vocab | a student with another vocabulary is refused in one line naming the tokenizer |
| export-hf | transformers loads the folder (AutoModelForCausalLM) with logits equal (mean KL) |
| export-onnx | ONNX Runtime's logits equal lilliput's (mean KL), cached decode too |
| serve | the server answers a chat completion rendered with the family's chat template |
| speculative | greedy output with an int8 draft (a 2-layer copy where int8 refuses) equals the target's |

The test (tests/test_matrix.py) runs it cell by cell; bench/matrix.py writes the whole table to
bench/results/matrix.json, from which the README's table is generated.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval import zoo

SEQ, SAMPLES = 32, 8
"""Calibration and probe windows: 8 sequences of 32 tokens (past the specimens' sliding window of 8)."""

CHAT_TEMPLATES = {
    # the families' chat formats, reduced to their turn markers (their hub templates add tool calls etc.)
    "llama": ("{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}"),
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "gemma": ("<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "phi3": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "olmo": ("{{ '<|endoftext|>' }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
FAMILY_CHAT = {"llama": "llama", "mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml", "qwen3_moe": "chatml",
               "smollm3": "chatml", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3", "olmo2": "olmo",
               "olmoe": "olmo"}
"""Family -> its chat format (a key of CHAT_TEMPLATES)."""


@dataclass
class Specimen:
    name: str
    hf: object  # the transformers model
    model: GPT  # lilliput's conversion of it (float32, eval)
    tokenizer: ByteTokenizer  # bytes, with the family's chat template
    calibration: torch.Tensor  # (SAMPLES, SEQ) ids
    probe: torch.Tensor  # (SAMPLES, SEQ) held-out ids

    @property
    def family(self) -> str:
        return self.model.config.family

    def copy(self) -> GPT:
        return copy.deepcopy(self.model)


def specimen(name: str) -> Specimen:
    """The tiny transformers specimen `name`, converted, with calibration and probe windows."""
    hf = zoo.hf_model(name)
    model = zoo.to_lilliput(hf, name=name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2 * SAMPLES, SEQ), generator=g)
    tok = ByteTokenizer(chat_template=CHAT_TEMPLATES[FAMILY_CHAT[model.config.family]])
    return Specimen(name, hf, model, tok, ids[:SAMPLES], ids[SAMPLES:])


# --- measures ------------------------------------------------------------------------------------

@torch.no_grad()
def logits_of(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float()


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """10 log10 |ref|^2 / |ref - got|^2."""
    noise = (ref - got).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def mean_kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(ref || got) of next-token distributions (nats)."""
    return float(F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


def _mse(ref, got) -> float:
    return float((ref - got).pow(2).mean())


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


class CheckFailed(Exception):
    """A capability ran but its result is wrong."""


# --- capabilities --------------------------------------------------------------------------------

def _rtn(bits: int):
    def run(s: Specimen) -> dict:
        from lilliput.compress.quantize import RTNConfig, quantize_

        ref = logits_of(s.model, s.probe)
        q = quantize_(s.copy(), RTNConfig(bits=bits, group_size=32))
        db = sqnr_db(ref, logits_of(q, s.probe))
        # a MoE router's top-k flips on a few tokens under rounding, each flip a jump in those logits
        bound = (25.0 if bits == 8 else 8.0) - (5.0 if s.model.config.ffn == "moe" else 0.0)
        _check(db >= bound, f"int{bits} logits SQNR {db:.1f} dB < {bound} dB")
        return {"sqnr_db": round(db, 1)}
    return run


def _calibrated(method: str):
    def run(s: Specimen) -> dict:
        from lilliput.compress.quantize import AWQConfig, GPTQConfig, RTNConfig, quantize_

        ref = logits_of(s.model, s.calibration)
        rtn = _mse(ref, logits_of(quantize_(s.copy(), RTNConfig(bits=4, group_size=32)), s.calibration))
        cfg = GPTQConfig(bits=4, group_size=32) if method == "gptq" else AWQConfig(bits=4, group_size=32, grid=10)
        err = _mse(ref, logits_of(quantize_(s.copy(), cfg, calibration=s.calibration), s.calibration))
        bound = 1.05 if method == "gptq" else 1.1  # AWQ's search is per layer (alpha 0 is RTN), not end to end
        _check(err <= bound * rtn, f"{method} int4 logit MSE {err:.3g} > RTN's {rtn:.3g} x {bound}")
        return {"mse_vs_rtn": round(err / rtn, 3)}
    return run


def _pruned(method: str):
    def run(s: Specimen) -> dict:
        from lilliput.compress.prune import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_, sparsity_of

        ref = logits_of(s.model, s.probe)
        cfg = WandaConfig(sparsity=0.5) if method == "wanda" else SparseGPTConfig(sparsity=0.5, blocksize=32)
        m = prune_(s.copy(), cfg, batches=s.calibration)
        got = logits_of(m, s.probe)
        sp = sum(sparsity_of(m).values()) / len(sparsity_of(m))
        _check(abs(sp - 0.5) < 0.02, f"sparsity {sp:.3f}, asked 0.5")
        _check(bool(torch.isfinite(got).all()), "non-finite logits")
        kl = mean_kl(ref, got)
        base = mean_kl(ref, logits_of(prune_(s.copy(), MagnitudeConfig(sparsity=0.5)), s.probe))
        _check(kl <= 1.25 * base + 1e-3, f"KL to the dense model {kl:.3g} > magnitude pruning's {base:.3g} x 1.25")
        return {"sparsity": round(sp, 3), "kl_vs_magnitude": round(kl / base, 3)}
    return run


def _structured(s: Specimen) -> dict:
    from lilliput.compress.structured import StructuredConfig, structured_prune

    c = s.model.config
    same = structured_prune(s.model, StructuredConfig(refit=False), batches=s.calibration)
    noop = float((logits_of(same, s.probe) - logits_of(s.model, s.probe)).abs().max())
    _check(noop < 1e-4, f"keeping every head, channel and layer changed the logits by {noop:.3g}")
    cfg = StructuredConfig(n_layers=c.n_layers - 1, n_kv_heads=c.n_kv_heads // 2, n_heads=c.n_heads // 2,
                           ffn_dim=c.ffn_dim * 3 // 4, dim=c.dim - 8)
    m = structured_prune(s.model, cfg, batches=s.calibration)
    got = logits_of(m, s.probe)
    _check(got.shape == (SAMPLES, SEQ, c.vocab_size) and bool(torch.isfinite(got).all()), "bad logits")
    kl = mean_kl(logits_of(s.model, s.probe), got)
    return {"params_kept": round(m.num_params() / s.model.num_params(), 3), "kl": round(kl, 3),
            "noop_max_diff": noop}


def _train_steps(model, loss_fn: Callable[[], torch.Tensor], steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    first = last = None
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        last = float(loss_fn())
    return first, last


def _ce(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def _lora(quantized: bool):
    def run(s: Specimen) -> dict:
        from lilliput.compress.quantize import RTNConfig, quantize_
        from lilliput.train.lora import LoRAConfig, add_lora_, merge_lora_

        m = s.copy()
        if quantized:
            quantize_(m, RTNConfig(bits=8))
        add_lora_(m, LoRAConfig(rank=4))
        m.train()
        first, last = _train_steps(m, lambda: _ce(m, s.calibration))
        _check(last < first, f"loss did not fall ({first:.3f} -> {last:.3f})")
        m.eval()
        adapted = logits_of(m, s.probe)
        merge_lora_(m)
        merged = logits_of(m, s.probe)
        out = {"loss_before": round(first, 3), "loss_after": round(last, 3)}
        if quantized:
            out["merge_relative_error"] = round(m.lora_merge["relative_error"], 3)
        else:
            diff = float((adapted - merged).abs().max())
            _check(diff < 1e-3, f"merged logits differ from the adapter forward by {diff:.3g}")
            out["merge_max_diff"] = diff
        return out
    return run


def _fewer_layers(c, n: int):
    """The family's config with its first n layers (their sliding / NoPE kinds kept)."""
    return c.replace(n_layers=n, sliding_layers=tuple(i for i in c.sliding_layers if i < n),
                     nope_layers=tuple(i for i in c.nope_layers if i < n))


def _distill(s: Specimen) -> dict:
    from lilliput.train.distill import DistillConfig, Distillation, check_same_tokenizer

    torch.manual_seed(0)
    student = GPT(_fewer_layers(s.model.config, 2)).train()
    check_same_tokenizer(s.model, student, s.tokenizer)
    obj = Distillation(student, s.model, DistillConfig(alpha=1.0))
    first, last = _train_steps(student, lambda: obj({"idx": s.calibration})[0], steps=10, lr=3e-3)
    _check(last < first, f"KD loss did not fall ({first:.3f} -> {last:.3f})")
    return {"kd_before": round(first, 3), "kd_after": round(last, 3)}


def _distill_vocab(s: Specimen) -> dict:
    from lilliput.train.distill import check_same_tokenizer

    student = GPT(_fewer_layers(s.model.config, 2).replace(vocab_size=s.model.config.vocab_size // 2))
    try:
        check_same_tokenizer(s.model, student, s.tokenizer)
    except ValueError as e:
        msg = str(e)
        _check("\n" not in msg and "share a tokenizer" in msg, f"unclear error: {msg!r}")
        return {"error": msg.split(":")[0]}
    raise CheckFailed("a student with another vocabulary was accepted")


def _export(fmt: str):
    def run(s: Specimen) -> dict:
        from lilliput.export import export

        with tempfile.TemporaryDirectory() as tmp:
            r = export(s.model, s.tokenizer, fmt, Path(tmp) / "out", "float32")
        return {"mean_kl": r.check["mean_kl"], "top1": r.check["top1_agreement"]}
    return run


def _serve(s: Specimen) -> dict:
    import http.client
    from urllib.parse import urlparse

    from lilliput.infer.engine import EngineConfig
    from lilliput.serve.app import ServeConfig, Server

    # quantize=False: the specimen's model is shared by the other cells (the int8 cells test quantization)
    cfg = ServeConfig(port=0, engine=EngineConfig(max_batch=2), quantize=False)
    server = Server(cfg, lambda: (s.model, s.tokenizer), name=s.name).start(wait_loaded=True, timeout=60)
    messages = [{"role": "user", "content": "hi"}]
    try:
        u = urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        body = json.dumps({"model": s.name, "messages": messages, "max_tokens": 4, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
        conn.close()
    finally:
        server.stop()
    if resp.status == 400:  # the server's own one-line refusal (e.g. a prompt past a tiny context)
        raise ValueError(reply["error"]["message"])
    _check(resp.status == 200, f"HTTP {resp.status}: {reply}")
    prompt = s.tokenizer.encode(s.tokenizer.apply_chat_template(messages))
    got = reply["usage"]["prompt_tokens"]
    _check(got == len(prompt), f"the server's prompt has {got} tokens, the family template {len(prompt)}")
    return {"template": FAMILY_CHAT[s.family], "prompt_tokens": got,
            "completion_tokens": reply["usage"]["completion_tokens"]}


def _speculative(s: Specimen) -> dict:
    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.infer.engine import Engine
    from lilliput.infer.sequence import GenerationConfig
    from lilliput.infer.speculative import DraftModel, SpeculationConfig, SpeculativeDecoder

    try:
        draft, kind = quantize_(s.copy(), RTNConfig(bits=8)), "int8 copy"
    except ValueError:  # a family int8 cannot take yet (its quantize cells say why): a 2-layer copy drafts
        c = _fewer_layers(s.model.config, 2)
        sd = {k: v for k, v in s.model.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < 2}
        draft, kind = GPT.from_state_dict(c, sd).eval(), "2-layer copy"
    prompt = s.probe[0, :8].tolist()
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    plain = Engine(s.model, s.tokenizer).generate([prompt], cfg)[0].output
    engine = Engine(s.model, s.tokenizer)
    dec = SpeculativeDecoder(engine, DraftModel(draft, engine), SpeculationConfig(k=3, adaptive=False))
    got = dec.generate(prompt, cfg).output
    _check(got == plain, "speculative greedy output differs from the target's")
    return {"draft": kind, "acceptance_rate": round(dec.stats.acceptance_rate, 3)}


CAPABILITIES: dict[str, Callable[[Specimen], dict]] = {
    "rtn-int8": _rtn(8), "rtn-int4": _rtn(4), "gptq": _calibrated("gptq"), "awq": _calibrated("awq"),
    "wanda": _pruned("wanda"), "sparsegpt": _pruned("sparsegpt"), "structured": _structured,
    "lora": _lora(False), "qlora": _lora(True), "distill": _distill, "distill-vocab": _distill_vocab,
    "export-hf": _export("hf"), "export-onnx": _export("onnx"), "serve": _serve, "speculative": _speculative,
}


def cell(s: Specimen, capability: str) -> dict:
    """One cell: {"status": "ok", figures..., "seconds"} or {"status": "refused" | "failed", "reason"}."""
    from lilliput.export.target import ExportCheckError

    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **CAPABILITIES[capability](s)}
    except (CheckFailed, ExportCheckError) as e:
        out = {"status": "failed", "reason": str(e)}
    except ValueError as e:  # the library's one-line refusal of a variant it cannot handle
        out = {"status": "refused", "reason": str(e).splitlines()[0] if str(e) else type(e).__name__}
    except Exception as e:  # noqa: BLE001  a crash is a failed cell, reported, not hidden
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def matrix(specimens: list[str] | None = None, capabilities: list[str] | None = None) -> dict:
    """{specimen: {"family", capability: cell}} over the tiny specimens (all by default)."""
    table = {}
    for name in specimens or list(zoo.TINY):
        s = specimen(name)
        table[name] = {"family": s.family, **{c: cell(s, c) for c in capabilities or list(CAPABILITIES)}}
    return table


def markdown(table: dict) -> str:
    """The table as Markdown: ok cells show their headline figure, refused ones their reason as a footnote."""
    caps = [c for c in CAPABILITIES if any(c in row for row in table.values())]
    lines = ["| specimen (family) | " + " | ".join(caps) + " |", "|---|" + "---|" * len(caps)]
    notes: list[str] = []
    for name, row in table.items():
        cells = []
        for c in caps:
            v = row.get(c, {})
            if v.get("status") == "ok":
                cells.append("ok")
            elif v.get("status") == "refused":
                if v["reason"] not in notes:
                    notes.append(v["reason"])
                cells.append(f"refused [{notes.index(v['reason']) + 1}]")
            else:
                cells.append(v.get("status", "-"))
        lines.append(f"| {name} ({row['family']}) | " + " | ".join(cells) + " |")
    lines += [""] + [f"- [{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(lines)

