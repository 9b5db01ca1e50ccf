import math
from types import SimpleNamespace

import pytest
import torch

from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.perplexity import HELDOUT, HeldoutConfig, PerplexityConfig, _windows, heldout, heldout_perplexity, perplexity

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed."
)  # 236 bytes


class Bigram(torch.nn.Module):
    """logits[t] depend only on idx[t]: embedding -> linear, fixed seed."""

    def __init__(self, max_seq_len: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.emb = torch.nn.Embedding(256, 16)
        self.head = torch.nn.Linear(16, 256)

    def forward(self, idx):  # (B, T) -> (B, T, V)
        return self.head(self.emb(idx))


class HFWrapper(torch.nn.Module):
    """A transformers causal LM seen through the lilliput model interface."""

    def __init__(self, hf, max_seq_len: int):
        super().__init__()
        self.hf = hf
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, idx):
        return self.hf(idx).logits


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def guide_ppl(hf, ids: torch.Tensor, max_length: int, stride: int, count_fix: bool) -> tuple[float, int]:
    """The Hugging Face guide's loop, literally; `count_fix` counts the labels the loss averaged."""
    encodings = SimpleNamespace(input_ids=ids[None])
    seq_len = encodings.input_ids.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = hf(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        if count_fix:
            num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    return torch.exp(avg_nll).item(), n_tokens


def test_disjoint_windows_match_hf_guide(tiny_llama):
    ids = torch.tensor(ByteTokenizer().encode(TEXT))
    ref, n_ref = guide_ppl(tiny_llama, ids, max_length=64, stride=64, count_fix=False)
    got = perplexity(HFWrapper(tiny_llama, 128), ByteTokenizer(), TEXT, PerplexityConfig(window=64))
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert got["tokens"] == n_ref == len(ids) - 4  # 236 tokens, 4 windows, first of each unscored
    assert (got["windows"], got["window"], got["stride"]) == (4, 64, 64)


def test_sliding_windows_match_hf_guide(tiny_llama):
    ids = torch.tensor(ByteTokenizer().encode(TEXT))
    model = HFWrapper(tiny_llama, 128)
    ref, n_ref = guide_ppl(tiny_llama, ids, max_length=64, stride=24, count_fix=True)
    got = perplexity(model, ByteTokenizer(), TEXT, PerplexityConfig(window=64, stride=24, batch_size=3))
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert got["tokens"] == n_ref == len(ids) - 1  # every token after the first, once
    assert got["windows"] == 9  # starts 0, 24, ..., 192 (192 + 64 >= 236)
    # The literal guide undercounts one token per later window: same scored set, weights off a hair.
    literal, n_literal = guide_ppl(tiny_llama, ids, max_length=64, stride=24, count_fix=False)
    assert n_literal == n_ref - 8
    assert got["perplexity"] == pytest.approx(literal, rel=1e-3)


def test_window_plan():
    assert _windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert _windows(9, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # a 1-token last window scores nothing
    assert _windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert _windows(3, 8, 2) == [(0, 3, 2)]


def test_batching_and_bigram_closed_form():
    model, tok = Bigram(), ByteTokenizer()
    ids = torch.tensor(tok.encode(TEXT))
    logp = torch.log_softmax(model(ids[None])[0], -1)  # bigram: context-free
    nll = -logp[torch.arange(len(ids) - 1), ids[1:]].double().mean().item()
    one = perplexity(model, tok, TEXT, PerplexityConfig(window=32, stride=8))
    many = perplexity(model, tok, TEXT, PerplexityConfig(window=32, stride=8, batch_size=5))
    assert one["nll"] == pytest.approx(nll, rel=1e-6)
    assert many["nll"] == pytest.approx(nll, rel=1e-6)
    assert one["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_max_tokens_truncates():
    got = perplexity(Bigram(), ByteTokenizer(), TEXT, PerplexityConfig(window=16, max_tokens=40))
    assert (got["tokens"], got["windows"]) == (40 - 3, 3)


def test_heldout_perplexity_defaults_to_lambada_and_takes_text():
    from lilliput.eval.task_sets import lambada_passages

    model, tok = Bigram(), ByteTokenizer()
    passages = "\n\n".join(lambada_passages(3))
    want = perplexity(model, tok, passages, PerplexityConfig(window=64, max_tokens=300))["perplexity"]
    assert heldout_perplexity(model, tok, HeldoutConfig(passages=3), tokens=300) == pytest.approx(want, rel=1e-6)
    own = heldout_perplexity(model, tok, HeldoutConfig(window=32), text=TEXT)  # given text, every token of it
    assert own == pytest.approx(perplexity(model, tok, TEXT, PerplexityConfig(window=32))["perplexity"], rel=1e-6)
    assert own != pytest.approx(want, rel=1e-3)


def test_one_heldout_default_everywhere():
    from lilliput.eval.bench import BenchConfig
    from lilliput.jobs.distill import DistillJob
    from lilliput.jobs.prune import PruneJob
    from lilliput.jobs.quantize import QuantizeJob
    from lilliput.jobs.shrink import EvalSpec

    assert (BenchConfig().passages, BenchConfig().ppl_window) == (HELDOUT.passages, HELDOUT.window)
    assert (EvalSpec().passages, EvalSpec().window) == (HELDOUT.passages, HELDOUT.window)
    jobs = (QuantizeJob(), PruneJob(), DistillJob(student="tiny", out="x"))
    assert {j.eval_passages for j in jobs} == {HELDOUT.passages}
    got = heldout(Bigram(), ByteTokenizer(), HeldoutConfig(passages=2, window=64))
    assert got["passages"] == 2 and got["window"] == 64 and got["text"].startswith("LAMBADA")


@pytest.mark.parametrize(
    "cfg, text, match",
    [
        (PerplexityConfig(window=1), TEXT, "window must be >= 2"),
        (PerplexityConfig(window=8, stride=0), TEXT, "stride must be in"),
        (PerplexityConfig(window=8, stride=9), TEXT, "stride must be in"),
        (PerplexityConfig(window=128), TEXT, "max_seq_len=64"),
        (PerplexityConfig(window=8), "", "is empty"),
        (PerplexityConfig(window=8), "a", "at least 2 tokens"),
    ],
)
def test_bad_input_raises(cfg, text, match):
    with pytest.raises(ValueError, match=match):
        perplexity(Bigram(), ByteTokenizer(), text, cfg)


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm):
    """The embedded model's perplexity equals transformers' on the same weights (within 0.5%)."""
    from lilliput.core.checkpoint import to_transformers
    from lilliput.eval.tasks import lambada_passages

    model, tok = smollm
    text = "\n\n".join(lambada_passages(12))
    ours = perplexity(model, tok, text, PerplexityConfig(window=256))
    ids = torch.tensor(tok.encode(text))
    with torch.inference_mode():
        theirs, n = guide_ppl(to_transformers(model), ids, max_length=256, stride=256, count_fix=True)
    assert n == ours["tokens"]
    assert abs(ours["perplexity"] / theirs - 1) < 0.005
