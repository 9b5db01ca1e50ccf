import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lilliput.data.watermark import Detector, Watermark, WatermarkConfig, binomial_sf, key_id


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_green_list_is_keyed_seeded_by_context_and_gamma_sized():
    wm = Watermark("key")
    a = wm.green_mask([1, 2, 3], 50_000)
    assert abs(a.float().mean().item() - 0.25) < 0.01
    assert torch.equal(a, wm.green_mask([9, 3], 50_000))  # context width 1: only the last token seeds it
    assert not torch.equal(a, wm.green_mask([4], 50_000))
    assert not torch.equal(a, Watermark("other key").green_mask([3], 50_000))
    wide = Watermark("key", WatermarkConfig(context_width=2))
    assert not torch.equal(wide.green_mask([1, 3], 50_000), wide.green_mask([2, 3], 50_000))
    assert key_id("key") == key_id("key") != key_id("other key") and "key" not in key_id("key")


def test_processor_adds_delta_to_green_tokens_only():
    wm = Watermark("key", WatermarkConfig(delta=2.0))
    logits = torch.randn(256)
    logits[7] = float("-inf")
    out = wm([5, 6], 1, logits.clone())
    green = wm.green_mask([6], 256)
    torch.testing.assert_close(out[green & torch.isfinite(logits)], logits[green & torch.isfinite(logits)] + 2.0)
    torch.testing.assert_close(out[~green], logits[~green])
    assert torch.equal(wm([], 0, logits.clone()), logits)  # no context: untouched


def test_engine_generations_are_detected_and_plain_ones_are_not(tiny_model, byte_tokenizer, one_thread):
    from lilliput.infer.engine import Engine, EngineConfig
    from lilliput.infer.sequence import GenerationConfig

    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=4, max_len=240))
    wm, det = Watermark("secret"), Detector("secret")
    prompts = [f"prompt {i}: " for i in range(4)]
    marked = [engine.add(p, GenerationConfig(max_new_tokens=200, temperature=1.0, seed=i), processors=[wm])
              for i, p in enumerate(prompts)]
    plain = [engine.add(p, GenerationConfig(max_new_tokens=200, temperature=1.0, seed=i))
             for i, p in enumerate(prompts)]
    engine.run()
    for seq in marked:
        d = det.detect(seq.tokens, prompt_len=len(seq.prompt))
        assert d.watermarked and d.z > 8 and d.p_value < 1e-12 and d.tokens == 200
        assert not Detector("wrong key").detect(seq.tokens, len(seq.prompt)).watermarked
    for seq in plain:
        assert not det.detect(seq.tokens, prompt_len=len(seq.prompt)).watermarked


def _human_windows(n: int, length: int) -> list[list[int]]:
    from lilliput.data.corpus import sample_documents

    ids = list("\n\n".join(d.text for d in sample_documents()).encode("utf-8"))
    step = (len(ids) - length) // n
    return [ids[i * step:i * step + length] for i in range(n)]


def test_z_on_human_text_is_standard_normal_and_repeats_would_inflate_it():
    # byte tokens: many repeated bigrams ("th", "e "). One key's z on windows of one language are
    # correlated (common bigrams share a colour), so the null distribution is drawn over many keys.
    windows = _human_windows(4, 300)
    zs = np.array([Detector(f"key {k}").detect(w).z for k in range(300) for w in windows])
    assert abs(zs.mean()) < 0.12 and 0.9 < zs.std() < 1.1
    assert 0.03 < (zs > 1.645).mean() < 0.07  # the one-sided 5% tail
    raw = np.array([Detector(f"key {k}", WatermarkConfig(ignore_repeated=False)).detect(w).z
                    for k in range(300) for w in windows])
    assert raw.std() > 1.5 * zs.std()  # counting a repeated pair's colour again and again


@pytest.mark.parametrize("n, g", [(25, 13), (50, 0), (100, 25), (200, 90), (30, 30), (1, 1)])
def test_p_value_is_the_exact_binomial_tail(n, g):
    gamma = Fraction(1, 4)
    exact = sum(math.comb(n, k) * gamma ** k * (1 - gamma) ** (n - k) for k in range(g, n + 1))
    p = Detector("k").score(g, n).p_value
    assert p == pytest.approx(float(exact), rel=1e-9, abs=1e-300)


def test_normal_approximation_understates_p_on_short_texts():
    d = Detector("k").score(13, 25)  # z = 3.12: the normal tail says 9e-4
    assert d.p_value > 3 * _normal_sf(d.z)


def test_threshold_and_the_false_positive_rate_it_implies():
    det = Detector("k", WatermarkConfig(z_threshold=4.0))
    n = 200
    k = next(g for g in range(n + 1) if det.score(g, n).watermarked)  # fewest green tokens called watermarked
    assert det.score(k, n).z >= 4.0 > det.score(k - 1, n).z
    assert det.score(k, n).fpr == pytest.approx(binomial_sf(k, n, 0.25))
    assert det.score(k, n).fpr == det.score(0, n).fpr  # it depends on n only
    assert det.score(k, n).p_value <= det.score(k, n).fpr < det.score(k - 1, n).p_value


def test_prompt_is_never_scored_and_short_texts_are_insufficient():
    det = Detector("k")
    rng = np.random.default_rng(0)
    out = rng.integers(0, 256, 100).tolist()
    a = det.detect([1, 2, 3, 4] + out, prompt_len=4)
    b = det.detect([9, 9, 9, 4] + out, prompt_len=4)  # only the last prompt token (the context) matters
    assert (a.tokens_scored, a.green, a.tokens) == (b.tokens_scored, b.green, 100)
    short = det.score(24, 24)
    assert short.verdict == "insufficient evidence" and not short.watermarked and short.z > 4
    assert det.detect([]).tokens_scored == 0


def test_cli_generate_watermark_then_detect(tmp_path, tiny_model, byte_tokenizer, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint

    ckpt = str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))
    assert main(["generate", "Once upon", "--model", ckpt, "--max-new-tokens", "150", "--temperature", "1.0",
                 "--seed", "3", "--watermark", "k3y", "--no-stream"]) == 0
    text = capsys.readouterr().out[:-1]  # generate prints the text and a newline
    path = tmp_path / "out.txt"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    assert main(["watermark", "detect", str(path), "--key", "k3y", "--model", ckpt, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["watermarked"] is True and got["z"] > 4 and {"p_value", "tokens_scored"} <= set(got)
    assert main(["watermark", "detect", str(path), "--key", "other", "--model", ckpt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["watermarked"] is False


@pytest.mark.slow
def test_smollm2_z_on_human_text_and_a_watermarked_generation(smollm, one_thread):
    from lilliput.data.corpus import sample_documents
    from lilliput.infer.generate import GenerationConfig, generate

    model, tok = smollm
    ids = tok.encode("\n\n".join(d.text for d in sample_documents()), bos=False)
    windows = [ids[i:i + 200] for i in range(0, len(ids) - 200, len(ids) // 6)][:6]
    zs = np.array([Detector(f"key {k}").detect(w).z for k in range(150) for w in windows])
    assert abs(zs.mean()) < 0.12 and 0.9 < zs.std() < 1.1
    g = generate(model, tok, ["The old lighthouse keeper"], GenerationConfig(max_new_tokens=60, temperature=1.0, seed=0,
                                                                          ignore_eos=True),
                 processors=[Watermark("k")])[0]
    assert Detector("k").detect_text(g.text, tok).z > 4  # after decoding and tokenizing again
    assert not Detector("other").detect_text(g.text, tok).watermarked
