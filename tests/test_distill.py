import dataclasses
import json

import numpy as np
import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.data.corpus import Document
from lilliput.jobs.distill import DistillJob
from lilliput.train.distill import (
    DistillConfig, Distillation, build_student, check_same_tokenizer, distill,
    init_embedding_from_teacher_, tokenizer_fingerprint,
)
from lilliput.train.logit_cache import CachedBatches, LogitCache, build_logit_cache
from lilliput.train.loop import TrainConfig
from lilliput.train.losses import forward_kl


pytestmark = pytest.mark.usefixtures("one_thread")


DOCS = [Document(id="t/a", source="t", title="a", text="the cat sat on the mat. " * 40),
        Document(id="t/b", source="t", title="b", text="a dog ran in the fog! " * 40)]


def _teacher():
    torch.manual_seed(1)
    t = GPT(preset("tiny").replace(dim=48, n_layers=2, tie_embeddings=False)).eval()
    with torch.no_grad():
        t.lm_head.weight.mul_(40)  # a peaked, opinionated teacher: KD starts far from 0
    return t


def _student():
    torch.manual_seed(2)
    return GPT(preset("tiny"))


def _cfg(**kw):
    """A tiny DistillConfig; TrainConfig's fields among `kw` go to its train config."""
    train, own = dict(max_steps=4, lr=3e-3, warmup_steps=1, progress=False), dict(seq_len=16, batch_size=2)
    for name, value in kw.items():
        (train if name in TrainConfig.__dataclass_fields__ else own)[name] = value
    return DistillConfig(train=TrainConfig(**train), **own)


def _kd(teacher, student, tok):
    idx = torch.tensor([tok.encode("the cat sat on the mat. a dog ran in the fog")])
    with torch.no_grad():
        return forward_kl(student(idx), teacher(idx)).item()


def test_logits_mode_lowers_kd(byte_tokenizer, tmp_path):
    t, s = _teacher(), _student()
    before = _kd(t, s, byte_tokenizer)
    out = distill(t, s, byte_tokenizer, _cfg(max_steps=15, lr=1e-2, out=str(tmp_path)), documents=DOCS)
    assert _kd(t, out, byte_tokenizer) < 0.8 * before
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["distill"]["loss"] == "fkl" and run["steps"] == 15
    assert all(p.requires_grad is False for p in t.parameters())


def test_a_token_stream_trains_as_its_documents(byte_tokenizer):
    from lilliput.train.data import token_stream

    t = _teacher()
    a = distill(t, _student(), byte_tokenizer, _cfg(max_steps=3), documents=DOCS)
    b = distill(t, _student(), byte_tokenizer, _cfg(max_steps=3), stream=token_stream(byte_tokenizer, DOCS))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="not both"):
        distill(t, _student(), byte_tokenizer, _cfg(max_steps=1), documents=DOCS, stream=token_stream(byte_tokenizer, DOCS))


@pytest.mark.parametrize("loss", ["rkl", "jsd", "tvd"])
def test_each_loss_runs(byte_tokenizer, loss):
    t, s = _teacher(), _student()
    before = _kd(t, s, byte_tokenizer)
    distill(t, s, byte_tokenizer, _cfg(loss=loss, max_steps=8, beta=0.3), documents=DOCS)
    assert _kd(t, s, byte_tokenizer) < before


def test_topk_cache_mode(byte_tokenizer, tmp_path):
    t, s = _teacher(), _student()
    before = _kd(t, s, byte_tokenizer)
    cfg = _cfg(top_k=8, max_steps=10, cache_dir=str(tmp_path / "cache"))
    distill(t, s, byte_tokenizer, cfg, documents=DOCS)
    assert _kd(t, s, byte_tokenizer) < before
    cache = LogitCache(tmp_path / "cache")
    assert len(cache) == 10 * 2 and cache.k == 8
    assert cache.bytes_per_token() == 8 * 4 + 8 * 2
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["tokenizer"] == tokenizer_fingerprint(byte_tokenizer)


def test_logit_cache_round_trip(tmp_path):
    t = _teacher()
    windows = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(0))
    cache = build_logit_cache(t, windows, tmp_path, k=4, batch_size=2, progress=False)
    tokens, top = cache[[3, 1]]
    assert torch.equal(tokens, windows[[1, 3]])  # rows come back sorted
    ref = torch.log_softmax(t(windows[[1, 3], :-1]), -1).topk(4, -1)
    assert torch.equal(top.ids, ref.indices)
    torch.testing.assert_close(top.logprobs, ref.values, atol=2e-2, rtol=1e-3)  # fp16 storage
    assert isinstance(cache.ids, np.memmap)
    again = build_logit_cache(t, windows, tmp_path, k=4, progress=False)  # reused, not rebuilt
    assert again.meta == cache.meta
    src = CachedBatches(cache, 2, seed=0)
    seen = [tuple(src(i)["idx"][:, 0].tolist()) for i in range(2)]
    assert len(set(sum(seen, ()))) == 4  # an epoch visits distinct rows


def test_feature_mode_trains_projection(byte_tokenizer):
    t, s = _teacher(), _student()
    cfg = _cfg(mode="feature", max_steps=6)
    obj = Distillation(s, t, cfg)
    assert obj.projection.weight.shape == (48, 32)
    batch = {"idx": torch.tensor([byte_tokenizer.encode("the cat sat on the mat")])}
    loss, metrics = obj(batch)
    loss.backward()
    assert obj.projection.weight.grad.abs().sum() > 0 and metrics["feature_mse"] > 0
    assert "teacher" not in dict(obj.named_modules()) and not any(k.startswith("teacher") for k in obj.state_dict())
    distill(t, s, byte_tokenizer, cfg, documents=DOCS)


def test_context_mode_teacher_sees_prompt(byte_tokenizer):
    t, s = _teacher(), _student()
    cfg = _cfg(mode="context", system_prompt="Be brief.")
    obj = Distillation(s, t, cfg, byte_tokenizer)
    assert obj.prefix.tolist() == byte_tokenizer.encode("Be brief.\n\n")
    distill(t, s, byte_tokenizer, cfg, documents=DOCS)
    with pytest.raises(ValueError, match="system_prompt"):
        DistillConfig(mode="context")


def test_sequence_and_on_policy_modes(byte_tokenizer):
    t, s = _teacher(), _student()
    for mode in ("sequence", "on-policy"):
        cfg = _cfg(mode=mode, max_steps=3, prompt_len=4, gen_len=6, lmbda=0.5)
        s = distill(t, s, byte_tokenizer, cfg, documents=DOCS)
        assert s.last_summary["steps"] == 3
    assert s.last_summary["tokens"] == 3 * 2 * 17  # on-policy counts the window tokens
    obj = Distillation(s, t, _cfg(mode="on-policy", prompt_len=4, gen_len=6, lmbda=1.0), byte_tokenizer)
    loss, metrics = obj({"idx": torch.randint(0, 256, (2, 17)), "seed": 0})
    assert metrics["on_policy"] == 1.0 and torch.isfinite(loss)
    obj = Distillation(s, t, _cfg(mode="sequence", prompt_len=4, gen_len=6), byte_tokenizer)
    loss, metrics = obj({"idx": torch.randint(0, 256, (2, 17)), "seed": 3})
    assert torch.isfinite(loss) and metrics["ce"] > 0


def test_tokenizer_mismatch_raises(byte_tokenizer):
    t = _teacher()
    other = GPT(preset("tiny").replace(vocab_size=300))
    with pytest.raises(ValueError, match="share a tokenizer: vocab sizes differ"):
        check_same_tokenizer(t, other, byte_tokenizer)

    class Shifted:
        vocab_size = 256

        def encode(self, text, bos=None):
            return [(b + 1) % 256 for b in text.encode()]

    with pytest.raises(ValueError, match="encode the same probe text differently"):
        check_same_tokenizer(t, _student(), byte_tokenizer, Shifted())
    check_same_tokenizer(t, _student(), byte_tokenizer, byte_tokenizer)


def test_build_student_and_embedding_init(tmp_path):
    t = GPT(preset("tiny").replace(vocab_size=300, dim=64))
    s, tok = build_student("tiny", t)
    assert tok is None and s.config.vocab_size == 300 and s.config.dim == 32
    init_embedding_from_teacher_(s, t)
    e_t, e_s = t.tok_emb.weight, s.tok_emb.weight
    assert e_s.std().item() == pytest.approx(e_t.std().item(), rel=1e-4)
    # the projection keeps the leading structure: token-token similarities correlate
    g_t, g_s = (e_t @ e_t.T).flatten(), (e_s @ e_s.T).flatten()
    assert torch.corrcoef(torch.stack([g_t, g_s]))[0, 1] > 0.5
    s2, _ = build_student({**preset("tiny").to_dict(), "n_layers": 1}, t)
    assert s2.config.n_layers == 1
    with pytest.raises(ValueError, match="neither a preset"):
        build_student("no-such-model", t)


def test_config_validation():
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillConfig(loss="kl")
    with pytest.raises(ValueError, match="mode must be one of"):
        DistillConfig(mode="magic")
    with pytest.raises(ValueError, match="top_k"):
        DistillConfig(top_k=8, mode="feature")
    job = DistillJob(student="tiny", out="x")
    assert dataclasses.asdict(job)["config"]["loss"] == "fkl"


@pytest.mark.slow
def test_real_teacher_lowers_kd(smollm, tmp_path):
    teacher, tok = smollm
    torch.manual_seed(0)
    student = GPT(preset("tiny").replace(vocab_size=teacher.config.vocab_size, dim=64, n_heads=4))
    init_embedding_from_teacher_(student, teacher)
    docs = [Document(id="t/a", source="t", title="a", text="The king walked into the hall and spoke to his people. " * 30)]
    idx = torch.tensor([tok.encode("The king walked into the hall and spoke to his people.")])
    with torch.no_grad():
        t_logits = teacher(idx)
        before = forward_kl(student(idx), t_logits).item()
    cfg = DistillConfig(seq_len=32, batch_size=2, train=TrainConfig(max_steps=8, lr=5e-3, warmup_steps=1, progress=False))
    distill(teacher, student, tok, cfg, documents=docs)
    with torch.no_grad():
        after = forward_kl(student(idx), t_logits).item()
    assert after < 0.8 * before


def test_run_distill_job(byte_tokenizer, tmp_path, monkeypatch):
    from lilliput.core.checkpoint import load_model, save_checkpoint
    from lilliput.train import distill as distill_module
    from lilliput.jobs.distill import run_distill

    monkeypatch.setattr(distill_module, "default_documents", lambda: DOCS)
    teacher_dir = save_checkpoint(_teacher(), byte_tokenizer, tmp_path / "teacher")
    job = DistillJob(student="tiny", teacher=str(teacher_dir), out=str(tmp_path / "student"), device="cpu",
                     config=_cfg(max_steps=3), eval_passages=2)
    out = run_distill(job)
    run = json.loads((out / "run.json").read_text())
    ppl = run["heldout_perplexity"]
    assert set(ppl) == {"teacher", "student_before", "student_after"} and all(v > 1 for v in ppl.values())
    assert run["train"]["steps"] == 3 and (out / "train_log.jsonl").is_file()
    model, tok = load_model(out, device="cpu")
    assert model.config.dim == 32 and tok.vocab_size == 256


def test_moe_student_adds_its_aux_loss(byte_tokenizer):
    torch.manual_seed(2)
    s = GPT(preset("moe-tiny"))
    obj = Distillation(s, _teacher(), _cfg(alpha=0.5), byte_tokenizer)
    loss, metrics = obj({"idx": torch.randint(0, 256, (2, 17)), "seed": 0})
    assert metrics["moe_aux"] > 0 and sum(metrics[f"moe_load_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert loss.detach().item() == pytest.approx(float(0.5 * metrics["kd"] + 0.5 * metrics["ce"] + metrics["moe_aux"]), rel=1e-5)
