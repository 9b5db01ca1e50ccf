"""MoE feed-forward: routing, auxiliary losses, capacity, parameter counts."""

import pytest
import torch

from lilliput.core.config import ModelConfig, preset
from lilliput.core.model import GPT, SwiGLU
from lilliput.core.moe import MoE, expert_load, load_balancing_loss, moe_aux_loss, router_z_loss
from lilliput.eval.efficiency import active_parameter_count, parameter_count


def test_one_expert_top1_equals_the_dense_swiglu_it_was_copied_from():
    cfg = ModelConfig(ffn="moe", moe_experts=1, moe_top_k=1)
    torch.manual_seed(0)
    dense = SwiGLU(cfg).double()
    moe = MoE(cfg).double()
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 7, cfg.dim, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=0)
    assert moe.dropped == 0 and moe.load.tolist() == [14.0]


def test_top_k_output_is_the_weighted_sum_of_the_chosen_experts():
    cfg = ModelConfig(ffn="moe", moe_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    x = torch.randn(5, cfg.dim, dtype=torch.float64)
    probs = (x.float() @ moe.router.float().t()).softmax(-1)
    w, e = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack([sum(w[n, j].double() * moe.experts[int(e[n, j])](x[n]) for j in range(2)) for n in range(5)])
    torch.testing.assert_close(moe(x), ref, rtol=1e-6, atol=1e-9)
    assert moe.load.sum() == 10


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert load_balancing_loss(uniform, torch.arange(8)[:, None] % E) == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)) == pytest.approx(E)
    assert router_z_loss(torch.zeros(3, E)) == pytest.approx(torch.log(torch.tensor(4.0)) ** 2)


def test_capacity_drops_and_counts_tokens_dropless_does_not():
    cfg = ModelConfig(ffn="moe", moe_experts=4, moe_top_k=1, moe_capacity=0.5)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.zero_()
        moe.router[0] = 1.0  # every token with a positive feature sum prefers expert 0
    x = torch.randn(64, cfg.dim).abs()
    out = moe(x)
    cap = 8  # ceil(0.5 * 64 * 1 / 4)
    assert moe.load[0] == cap and moe.dropped == 64 - cap
    assert (out[cap:] == 0).all() and (out[:cap] != 0).any()  # dropped tokens get nothing from the FFN
    dropless = MoE(cfg.replace(moe_capacity=None))
    dropless.load_state_dict(moe.state_dict())
    dropless(x)
    assert dropless.dropped == 0 and dropless.load[0] == 64


def test_aux_loss_reaches_the_router_and_model_helpers_report():
    torch.manual_seed(0)
    model = GPT(preset("moe-tiny"))
    idx = torch.randint(0, 256, (2, 9))
    model(idx)
    aux = moe_aux_loss(model)
    assert aux.requires_grad and aux > 0
    aux.backward()
    assert model.layers[0].ffn.router.grad.abs().sum() > 0
    loads = expert_load(model)
    assert len(loads) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in loads)
    per_expert = 3 * 32 * 64
    assert parameter_count(model) == model.num_params()
    assert parameter_count(model) - active_parameter_count(model) == 2 * (4 - 2) * per_expert  # 2 layers, 2 idle experts
    assert moe_aux_loss(GPT(preset("tiny"))) == 0.0


def test_router_runs_in_float32_for_a_bfloat16_model():
    torch.manual_seed(0)
    moe = MoE(preset("moe-tiny")).to(torch.bfloat16)
    y = moe(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.aux_loss.dtype == torch.float32


def test_config_refuses_top_k_above_experts():
    with pytest.raises(ValueError, match="moe_top_k"):
        ModelConfig(ffn="moe", moe_experts=2, moe_top_k=3)
