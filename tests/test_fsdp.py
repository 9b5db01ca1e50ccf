"""FSDP at world size 2 (gloo, CPU) equals one process training on the two ranks' batches joined."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream():
    return torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0)).repeat(80)


def _cfg(**kw):
    return TrainConfig(**{**dict(lr=1e-2, muon_lr=0.05, warmup_steps=0, max_steps=1, grad_clip=None, progress=False,
                                 optimizer="muon"), **kw})


def _model():
    torch.manual_seed(0)
    return GPT(preset("tiny"))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 16), _cfg(parallel="fsdp"))
        trainer.fit()  # one step; the gradients stay in .grad
        grads = {n: _full(p.grad).clone() for n, p in trainer.objective.named_parameters()}
        params = {n: _full(p.detach()).clone() for n, p in trainer.objective.named_parameters()}
        state = trainer.state_dict()  # collective: gathers whole tensors
        torch.save({"grads": grads, "params": params, "state": state["objective"]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_two_ranks_equal_one_process_on_the_joined_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    data = WindowBatches(_stream(), 2, 16)
    joined = {"idx": torch.cat([data(0)["idx"], data(1)["idx"]])}  # rank r reads batch r at step 0
    ref = Trainer(LanguageModeling(_model()), lambda i: joined, _cfg())
    ref.fit()
    for name, p in ref.objective.named_parameters():
        torch.testing.assert_close(r0["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)  # averaged, not summed
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(r1["params"][name], r0["params"][name])
    for name, v in ref.objective.state_dict().items():
        torch.testing.assert_close(r0["state"][name], v, rtol=1e-4, atol=1e-5, msg=name)
