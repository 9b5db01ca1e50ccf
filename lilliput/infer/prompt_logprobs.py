"""Log-probabilities of a prompt's own tokens: what an OpenAI completions request with `echo` and
`logprobs` returns for its prompt. lm-evaluation-harness's `local-completions` scores multiple-choice
answers this way (and `lilliput.eval.tasks.endpoint_loglikelihoods` does too).

One forward of the torch modules over the whole prompt, as `lilliput.eval.tasks.loglikelihoods`
scores in process, so a served model's scores equal the in-process ones (not the engine's decode
path, whose fp16 cache and C kernels round differently).
"""

from __future__ import annotations

import torch

CHUNK = 256
"""Positions whose (position, vocabulary) log-probabilities are held at once."""


def prompt_logprobs(model, ids: list[int], top: int = 0) -> list[dict]:
    """Records of ids[1:], each under the tokens before it, in the sampler's shape
    ({"token", "logprob", "top": [(id, logprob)] of the `top` likeliest}); the first token has none."""
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    out: list[dict] = []
    with torch.inference_mode():
        h = model.features(torch.tensor([ids[:-1]], device=device))[0]  # (T - 1, C)
        target = torch.tensor(ids[1:], device=device)
        for s in range(0, len(target), CHUNK):
            logp = torch.log_softmax(model.logits(h[s:s + CHUNK]).float(), -1)  # (c, V)
            lp = logp.gather(1, target[s:s + CHUNK, None])[:, 0].tolist()
            best = torch.topk(logp, min(top, logp.shape[-1])) if top else None
            for i, tok in enumerate(target[s:s + CHUNK].tolist()):
                alts = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
                out.append({"token": tok, "logprob": lp[i], "top": alts})
    return out
