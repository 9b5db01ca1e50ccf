"""CUDA paths: training, quantized models and structured pruning on a GPU give what the CPU gives.
Skipped where CUDA is absent (conftest.py); nothing in lilliput depends on a GPU."""

import copy

import pytest
import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.compress.structured import StructuredConfig, structured_prune
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer, WindowBatches

pytestmark = pytest.mark.gpu


def test_training_step_on_cuda_matches_cpu(tiny_model):
    stream = torch.randint(0, tiny_model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=3, progress=False)
    losses = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(tiny_model).to(device)
        trainer = Trainer(LanguageModeling(model), WindowBatches(stream, 4, 32, seed=0), cfg)
        losses[device] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert losses["cpu"][-1] < losses["cpu"][0]


def test_bf16_autocast_training_on_cuda(tiny_model):
    stream = torch.randint(0, tiny_model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=2, bf16=True, progress=False)
    trainer = Trainer(LanguageModeling(tiny_model.to("cuda")), WindowBatches(stream, 4, 32), cfg)
    out = [trainer.train_step()["loss"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(out)))
    assert next(tiny_model.parameters()).dtype == torch.float32  # autocast leaves the weights float32


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_quantized_model_on_cuda_matches_cpu(tiny_model, bits, group):
    model = quantize_(copy.deepcopy(tiny_model), RTNConfig(bits=bits, group_size=group))
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(idx)
        gpu = model.to("cuda")(idx.to("cuda")).cpu()
    assert torch.allclose(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_structured_prune_on_cuda_matches_cpu(tiny_model):
    cfg = StructuredConfig(n_heads=tiny_model.config.n_heads // 2, ffn_dim=tiny_model.config.ffn_dim // 2)
    batches = torch.randint(0, tiny_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    cpu = structured_prune(tiny_model, cfg, batches=batches)
    gpu = structured_prune(copy.deepcopy(tiny_model).to("cuda"), cfg, batches=batches)
    assert gpu.config == cpu.config
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert torch.allclose(a, b.cpu(), atol=1e-4), name
