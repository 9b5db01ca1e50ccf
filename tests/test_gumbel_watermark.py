import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from lilliput.data.gumbel_watermark import (GumbelConfig, GumbelDetector, GumbelWatermark, gamma_sf,
                                            repeated_context)


def _ks(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of a sample from Uniform(0, 1)."""
    p = np.sort(p)
    i = np.arange(1, len(p) + 1)
    return float(max((i / len(p) - p).max(), (p - (i - 1) / len(p)).max()))


def _simulate(wm: GumbelWatermark, steps: int, vocab: int, seed: int, prompt: list[int], top_k: int | None = None):
    """Text drawn by the watermark from a synthetic model: each step's distribution is a fresh
    softmax of scaled Gaussians (entropy ~3 nats over 1,000 tokens), optionally top-k filtered."""
    rng, chance = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    ids, marked = list(prompt), 0
    for _ in range(steps):
        logits = 2.5 * torch.randn(vocab, generator=rng)
        if top_k is not None:
            logits[logits < torch.topk(logits, top_k).values[-1]] = float("-inf")
        marked += not repeated_context(ids, len(prompt), wm.cfg.context_width)
        ids.append(wm.draw(ids, len(prompt), logits.softmax(-1), chance))
    return ids, marked


@pytest.mark.parametrize("n, s", [(1, 0.5), (1, 7.0), (5, 3.0), (25, 40.0), (200, 230.0), (200, 300.0),
                                  (1000, 900.0), (200, 600.0)])
def test_gamma_survival_is_exact(n, s):
    # against e^{-s} times the Poisson sum in exact rational arithmetic, compared in log space
    # (the last case is ~1e-81: the log-space sum keeps the far tail)
    from fractions import Fraction

    terms, t = Fraction(0), Fraction(1)
    for k in range(n):
        terms += t
        t = t * Fraction(s) / (k + 1)
    want = -s + math.log(terms.numerator) - math.log(terms.denominator)
    got = gamma_sf(n, s)
    assert 0 < got <= 1 and math.log(got) == pytest.approx(want, rel=1e-12, abs=1e-12)
    if n == 1:
        assert got == pytest.approx(math.exp(-s), rel=1e-14)
    assert gamma_sf(n, 0.0) == 1.0 and gamma_sf(0, 3.0) == 1.0
    assert gamma_sf(n, s * 1.01) < got < gamma_sf(n + 1, s)


def test_p_values_on_random_text_are_uniform():
    # H0: text that never saw the key, one key for all (a vocabulary of SmolLM2's size, so that
    # texts share few (context, token) pairs and their p-values are independent draws)
    rng = np.random.default_rng(0)
    det = GumbelDetector("k")
    ps = np.array([det.detect(rng.integers(0, 50_000, 200).tolist()).p_value for _ in range(3000)])
    assert _ks(ps) < 0.03  # the 1% critical value at n = 3,000 is 0.030
    assert 0.005 <= (ps <= 0.01).mean() <= 0.016
    assert (ps <= 1e-3).sum() <= 9  # expected 3


def test_p_values_on_repetitive_human_text_are_uniform_over_keys():
    # byte tokens of English: one previous byte is the context, so most contexts repeat; scoring
    # them again would inflate the score (the same r again and again)
    from lilliput.data.corpus import sample_documents

    ids = list("\n\n".join(d.text for d in sample_documents()).encode("utf-8"))
    windows = [ids[i * 997:i * 997 + 300] for i in range(4)]
    ps = np.array([GumbelDetector(f"key {k}").detect(w).p_value for k in range(400) for w in windows])
    assert _ks(ps) < 0.04  # n = 1,600: the 1% critical value is 0.041


def test_draw_is_an_exact_sample_over_keys():
    p = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01, 0.0])  # the last token is filtered out
    n = 10_000
    draws = np.array([GumbelWatermark(f"key {k}").draw([3], 0, p, None) for k in range(n)])
    counts = np.bincount(draws, minlength=9)
    assert counts[8] == 0
    expected = p[:8].double().numpy() * n
    chi2 = float(((counts[:8] - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # df 7: P(chi2 > 24.3) = 0.001


def test_draw_is_deterministic_given_key_and_context_and_keyed():
    p = torch.full((1000,), 1e-3)
    wm = GumbelWatermark("k")
    a = wm.draw([5, 6, 7], 1, p, None)
    assert a == wm.draw([1, 9, 7], 1, p, None)  # context width 1: only the last token matters
    picks = {GumbelWatermark(f"k{i}").draw([5, 6, 7], 1, p, None) for i in range(20)}
    assert len(picks) > 15


def test_repeated_contexts_are_drawn_plainly_and_not_scored():
    wm = GumbelWatermark("k")
    ids, marked = _simulate(wm, 300, 40, seed=1, prompt=[1, 2])  # 40 tokens: contexts repeat within 300 steps
    det = GumbelDetector("k")
    assert det.token_scores(ids, prompt_len=2).shape[0] == marked < 60
    assert det.detect(ids, prompt_len=2).tokens == 300


def test_draw_over_the_support_is_the_full_vocabulary_race():
    # the draw scores only tokens of probability > 0; the race over all V keys picks the same token
    wm, chance = GumbelWatermark("k"), torch.Generator().manual_seed(0)
    rng = torch.Generator().manual_seed(3)
    for step in range(200):
        logits = 2.0 * torch.randn(500, generator=rng)
        if step % 2:
            logits[logits < torch.topk(logits, 7).values[-1]] = float("-inf")
        probs, ids = logits.softmax(-1), [step % 11, 400 + step]
        p = probs.double().numpy()
        with np.errstate(divide="ignore"):
            race = np.where(p > 0, wm.exponentials(ids, 500) / np.where(p > 0, p, 1.0), np.inf)
        assert wm.draw(ids, 1, probs, chance) == int(np.argmin(race))


@pytest.mark.parametrize("h", [1, 2, 3])
def test_repeated_context_matches_its_definition(h):
    rng = np.random.default_rng(h)
    for _ in range(300):
        ids, prompt_len = rng.integers(0, 4, size=int(rng.integers(h, 30))).tolist(), int(rng.integers(0, 6))
        naive = any(ids[t - h:t] == ids[-h:] for t in range(max(prompt_len, h), len(ids)))
        assert repeated_context(ids, prompt_len, h) == naive


def test_watermarked_text_is_detected_and_survives_substitution():
    wm, det = GumbelWatermark("secret"), GumbelDetector("secret")
    rng = np.random.default_rng(0)
    for seed in range(4):
        ids, _ = _simulate(wm, 200, 1000, seed, prompt=[7])
        d = det.detect(ids, prompt_len=1)
        assert d.watermarked and d.p_value < 1e-30 and d.mean_score > 2.5
        assert not GumbelDetector("other").detect(ids, prompt_len=1).watermarked
        last = d.p_value
        for rate in (0.1, 0.2, 0.3):
            out = np.array(ids[1:])
            hit = rng.choice(len(out), int(rate * len(out)), replace=False)
            out[hit] = rng.integers(0, 1000, len(hit))
            p = det.detect([7] + out.tolist(), prompt_len=1).p_value
            assert p < 1e-6 and p > last  # weaker with each substitution rate, still far past the threshold
            last = p


def test_top_k_filtered_tokens_are_never_drawn():
    wm = GumbelWatermark("k")
    ids, _ = _simulate(wm, 100, 1000, seed=3, prompt=[0], top_k=5)
    rng = torch.Generator().manual_seed(3)
    for t in range(1, 101):  # replay the same synthetic distributions
        logits = 2.5 * torch.randn(1000, generator=rng)
        assert ids[t] in torch.topk(logits, 5).indices.tolist()


def test_engine_samples_through_the_drawer(tiny_model, byte_tokenizer, one_thread):
    from lilliput.infer.engine import Engine, EngineConfig
    from lilliput.infer.sequence import GenerationConfig

    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=4, max_len=240))
    wm, det = GumbelWatermark("secret"), GumbelDetector("secret")
    cfg = GenerationConfig(max_new_tokens=200, temperature=1.0, top_k=64)
    marked = [engine.add(f"prompt {i}: ", dataclasses.replace(cfg, seed=i), processors=[wm]) for i in range(3)]
    plain = [engine.add(f"prompt {i}: ", dataclasses.replace(cfg, seed=i)) for i in range(3)]
    engine.run()
    for seq in marked:
        d = det.detect(seq.tokens, prompt_len=len(seq.prompt))
        assert d.watermarked and d.p_value < 1e-8 and d.tokens == 200
    for seq in plain:
        assert not det.detect(seq.tokens, prompt_len=len(seq.prompt)).watermarked
    with pytest.raises(ValueError, match="temperature > 0"):
        engine.add("x", GenerationConfig(max_new_tokens=4), processors=[wm])
    with pytest.raises(ValueError, match="keep one"):
        engine.add("x", cfg, processors=[wm, GumbelWatermark("other")])


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="context_width"):
        GumbelConfig(context_width=0)
    with pytest.raises(ValueError, match="fpr"):
        GumbelConfig(fpr=0.0)
    with pytest.raises(ValueError, match="key is empty"):
        GumbelWatermark("")
    short = GumbelDetector("k").score(40.0, 10)
    assert short.verdict == "insufficient evidence" and not short.watermarked and short.p_value < 1e-6


def test_cli_generate_gumbel_then_detect(tmp_path, tiny_model, byte_tokenizer, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint

    ckpt = str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))
    assert main(["generate", "Once upon", "--model", ckpt, "--max-new-tokens", "150", "--temperature", "1.0",
                 "--seed", "3", "--watermark", "k3y", "--watermark-scheme", "gumbel", "--no-stream"]) == 0
    text = capsys.readouterr().out[:-1]
    path = tmp_path / "out.txt"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    detect = ["watermark", "detect", str(path), "--model", ckpt, "--scheme", "gumbel", "--json"]
    assert main(detect + ["--key", "k3y"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["watermarked"] is True and got["p_value"] < 1e-4 and got["tokens_scored"] > 25
    assert main(detect + ["--key", "other"]) == 0
    assert json.loads(capsys.readouterr().out)["watermarked"] is False
    assert main(["watermark", "detect", str(path), "--model", ckpt, "--key", "k3y", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["watermarked"] is False  # the green-list detector sees nothing


def test_cli_refuses_the_other_schemes_settings(tmp_path, tiny_model, byte_tokenizer, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint

    ckpt = str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))
    path = tmp_path / "t.txt"
    path.write_text("some text to score")
    base = ["watermark", "detect", str(path), "--model", ckpt, "--key", "k"]
    assert main(base + ["--scheme", "gumbel", "--gamma", "0.5"]) != 0
    assert "--gamma is a green-list setting" in capsys.readouterr().err
    assert main(base + ["--fpr", "0.01"]) != 0
    assert "--fpr is a gumbel setting" in capsys.readouterr().err
    assert main(["generate", "Once", "--model", ckpt, "--max-new-tokens", "4", "--temperature", "0",
                 "--watermark", "k", "--watermark-scheme", "gumbel", "--no-stream"]) != 0
    assert "temperature" in capsys.readouterr().err
