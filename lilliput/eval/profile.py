"""Where decode time goes: a torch profiler trace of a few decode steps and a one-screen summary.

Two paths are profiled. On CPU at batch 1 the engine decodes with the fused C step (one C call
per token, lilliput/infer/fused.py), which the profiler sees as one opaque span; so the torch
module path (the one the engine runs for batches > 1) is profiled too, with every module
wrapped in a named span: `lilliput::linear` (the matmuls, GEMV kernel included),
`lilliput::attention` (the mixer minus its linears: RoPE, cache, SDPA), `lilliput::norm`,
`lilliput::ffn_act`, `lilliput::sample`, `lilliput::fused_step`. Each
event's self time goes to its nearest named span; time under no module span is Python and
dispatch overhead of the step (embedding lookup and the model's own glue included).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

WARMUP_STEPS = 2
CATEGORIES = ("linear", "attention", "norm", "ffn_act", "embedding", "sample", "fused_step", "overhead")


def _category(module: nn.Module, name: str) -> str | None:
    from lilliput.core.model import RMSNorm

    if isinstance(module, nn.Linear) or (hasattr(module, "kernel_desc") and hasattr(module, "spec")):
        return "linear"
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "mixer":
        return "attention"
    if leaf == "ffn":
        return "ffn_act"
    return None


def _annotate(model: nn.Module) -> list:
    """Wrap every categorized module's forward in a record_function span; returns hook handles."""
    handles = []
    for name, m in model.named_modules():
        cat = _category(m, name)
        if cat is None:
            continue

        def pre(mod, args, cat=cat):
            span = torch.profiler.record_function(f"lilliput::{cat}")
            span.__enter__()
            mod._lilliput_spans = getattr(mod, "_lilliput_spans", []) + [span]

        def post(mod, args, output):
            mod._lilliput_spans.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def breakdown(events) -> dict[str, float]:
    """Self time (ms) per category of the events under each `lilliput::decode_step` span."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for ev in events:
        cat, p, in_step = None, ev, False
        while p is not None:
            if p.name == "lilliput::decode_step":
                in_step = True
                break
            if cat is None and p.name.startswith("lilliput::"):
                cat = p.name.split("::", 1)[1]
            p = p.cpu_parent
        if not in_step:
            continue
        totals[cat if cat in totals else "overhead"] += ev.self_cpu_time_total / 1e3
    return totals


def _decode_steps(model, tok, prompt: list[int], steps: int, fused_path: bool, trace: Path) -> dict:
    from lilliput.infer import kernels
    from lilliput.infer.fastpath import accelerate_
    from lilliput.infer.fused import FusedStep

    accelerate_(model)
    total = len(prompt) + WARMUP_STEPS + steps + 1
    fused = FusedStep.for_model(model) if fused_path else None
    state = model.new_state(1, total, torch.device("cpu"), torch.float32)
    handles = [] if fused else _annotate(model)

    def step(token: int) -> torch.Tensor:  # (V,) logits of the next token
        if fused:
            return fused(state, [token], [0])[0]
        return model(torch.tensor([[token]]), state)[0, -1]

    try:
        with torch.inference_mode(), kernels.decode_threads():
            logits = model(torch.tensor([prompt]), state, last_only=True)[0, -1]
            for _ in range(WARMUP_STEPS):  # first calls pay for lazy setup: not what we profile
                logits = step(int(logits.argmax()))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    with torch.profiler.record_function("lilliput::decode_step"):
                        with torch.profiler.record_function("lilliput::sample"):
                            nxt = int(logits.argmax())
                        if fused:
                            with torch.profiler.record_function("lilliput::fused_step"):
                                logits = step(nxt)
                        else:
                            logits = step(nxt)
    finally:
        for h in handles:
            h.remove()
    prof.export_chrome_trace(str(trace))
    ms = breakdown(prof.events())
    step_ms = sum(ms.values()) / steps
    return {"path": "fused C step" if fused else "torch modules", "steps": steps, "trace": str(trace),
            "ms_per_step": step_ms, "ms_by_category_per_step": {k: v / steps for k, v in ms.items() if v},
            "share": {k: v / max(sum(ms.values()), 1e-12) for k, v in ms.items() if v}}


def summary_text(paths: list[dict]) -> str:
    lines = ["where decode time goes (batch 1, CPU, self time per decoded token)"]
    for p in paths:
        lines.append(f"\n{p['path']}: {p['ms_per_step']:.2f} ms/token over {p['steps']} steps  (trace: {p['trace']})")
        for k, v in sorted(p["ms_by_category_per_step"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<12} {v:8.3f} ms  {100 * p['share'][k]:5.1f}%  " + "#" * round(40 * p["share"][k]))
    lines.append("\nlinear = matmuls (GEMV kernel included); attention = mixer minus its linears; "
                 "overhead = Python + dispatch outside any module span; fused_step = one opaque C call per token")
    return "\n".join(lines)


def profile_decode(spec: str | None, out: Path | str, steps: int = 16, threads: int | None = None,
                   prompt_len: int = 64, model=None, tokenizer=None) -> dict:
    """Profile `steps` decode steps on both paths; writes profile_{fused,torch}.json (chrome traces)
    and profile.txt into `out`; returns the figures and the summary text."""
    from lilliput.core.checkpoint import load_model
    from lilliput.infer import kernels
    from lilliput.infer.fused import FusedStep

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
        kernels.set_threads(threads)
    if model is None:
        model, tokenizer = load_model(spec or None, device="cpu")
    prompt_len = max(1, min(prompt_len, model.config.max_seq_len - steps - WARMUP_STEPS - 2))
    text = "The quick brown fox jumps over the lazy dog. " * (prompt_len // 4 + 1)
    prompt = tokenizer.encode(text, bos=False)[:prompt_len]
    paths = []
    fused_available = FusedStep.for_model(model) is not None
    if fused_available:
        paths.append(_decode_steps(model, tokenizer, prompt, steps, True, out / "profile_fused.json"))
    paths.append(_decode_steps(model, tokenizer, prompt, steps, False, out / "profile_torch.json"))
    text = summary_text(paths)
    if not fused_available:
        text += "\n(the fused C step does not apply to this model or machine: only the torch path ran)"
    (out / "profile.txt").write_text(text + "\n")
    return {"paths": paths, "summary": text, "summary_file": str(out / "profile.txt")}
