import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches
from lilliput.train.muon import Muon, muon_param_groups, newton_schulz

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (256, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_pushes_singular_values_near_one(shape, dtype):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g, dtype=dtype)
    assert out.shape == g.shape and out.dtype == g.dtype
    s = torch.linalg.svdvals(out)
    # observed over 20 seeds: [0.67, 1.14]; the quintic's fixed band is about [0.7, 1.2]
    assert 0.6 < s.min() and s.max() < 1.2
    # it keeps the singular vectors: U V^T of g, up to the band
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_param_groups_put_exactly_the_hidden_matrices_under_muon():
    for name in ("tiny", "mamba-tiny", "moe-tiny"):
        model = GPT(preset(name).replace(tie_embeddings=False))
        groups = muon_param_groups(model, muon_lr=0.02, adam_lr=1e-3)
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
        expected = {n for n, p in model.named_parameters() if p.dim() == 2 and n not in ("tok_emb.weight", "lm_head.weight")
                    and not n.endswith(("conv_weight", "ffn.router"))}  # a conv kernel, a router: not hidden maps
        assert muon == expected and len(muon) >= 8
        adam = [names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]]
        assert {"tok_emb.weight", "lm_head.weight", "norm.weight"} <= set(adam)
        assert len(muon) + len(adam) == len(list(model.parameters()))


def test_muon_update_is_scaled_orthogonalized_nesterov_momentum():
    w = torch.nn.Parameter(torch.zeros(8, 4))
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.1, momentum=0.9)
    g = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    w.grad = g.clone()
    opt.step()
    # first step: buffer = 0.1 g, Nesterov update = g.lerp(buffer, 0.9) = 0.19 g; scale sqrt(8 / 4)
    torch.testing.assert_close(w.detach(), -0.1 * newton_schulz(0.19 * g) * 2 ** 0.5)


def _stream():
    return torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0)).repeat(80)


def _trainer(**kw):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**dict(optimizer="muon", lr=3e-3, warmup_steps=2, max_steps=6, progress=False), **kw})
    return Trainer(LanguageModeling(GPT(preset("tiny"))), WindowBatches(_stream(), 4, 32, seed=1), cfg)


def test_tiny_model_loss_falls_with_muon():
    trainer = _trainer(max_steps=15)
    first = trainer.train_step()["loss"]
    assert isinstance(trainer.optimizer, Muon)
    assert trainer.fit()["final"]["loss"] < 0.85 * first  # 5.51 -> 4.43


def test_muon_state_resumes_exactly(tmp_path):
    straight = _trainer()
    straight.fit()
    first = _trainer()
    first.fit(until=3)
    first.save(tmp_path / "state.pt")
    second = _trainer().load(tmp_path / "state.pt")
    assert second.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()
    second.fit()
    for (name, a), b in zip(straight.objective.state_dict().items(), second.objective.state_dict().values()):
        assert torch.equal(a, b), name
