import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: a repeated random "sentence" of 50 bytes with noise
    base = torch.randint(0, 256, (50,), generator=g)
    return base.repeat(n // 50)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny"))


def _cfg(**kw):
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_files_written(tmp_path):
    model = _model()
    trainer = Trainer(LanguageModeling(model), WindowBatches(_stream(), 4, 32), _cfg(max_steps=12, out=str(tmp_path)))
    first = trainer.train_step()["loss"]
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 33
    assert summary["final"]["loss"] < 0.9 * first  # a memorisable stream: loss falls fast
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens", "seconds"} <= set(rows[-1]) and rows[-1]["step"] == 12
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["command"] == "train" and run["steps"] == 12
    assert (tmp_path / "trainer_state.pt").is_file()


def test_schedule_warmup_and_cosine():
    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 8),
                      _cfg(max_steps=12, warmup_steps=2, min_lr_ratio=0.1))
    f = [trainer.lr_factor(s) for s in range(12)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # cosine decreases
    assert trainer.lr_factor(12) == pytest.approx(0.1)


def test_token_budget_sets_steps():
    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 7), _cfg(max_steps=None, max_tokens=100))
    assert trainer.tokens_per_step == 16 and trainer.total_steps == 7
    assert trainer.fit()["tokens"] == 112


def test_exact_resume(tmp_path):
    data = WindowBatches(_stream(), 3, 16, seed=1)
    cfg = _cfg(max_steps=6, grad_accum=2)
    straight = Trainer(LanguageModeling(_model()), data, cfg)
    straight.fit()

    first = Trainer(LanguageModeling(_model()), data, cfg)
    first.fit(until=3)
    first.save(tmp_path / "state.pt")
    torch.manual_seed(123)  # disturb the RNG: resume must restore it
    second = Trainer(LanguageModeling(_model(seed=99)), data, cfg).load(tmp_path / "state.pt")
    assert second.step == 3
    second.fit()
    for (name, a), b in zip(straight.objective.state_dict().items(), second.objective.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.tokens == straight.tokens


def test_bf16_autocast_trains():
    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 16), _cfg(max_steps=3, bf16=True))
    out = trainer.fit()
    assert math.isfinite(out["final"]["loss"]) and out["steps"] == 3
    assert next(trainer.objective.parameters()).dtype == torch.float32


def test_config_errors():
    with pytest.raises(ValueError, match="budget"):
        TrainConfig()
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(max_steps=1, grad_accum=0)
    with pytest.raises(FileNotFoundError, match="no trainer state"):
        Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 8), _cfg()).load("/nonexistent/state.pt")


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        trainer = Trainer(LanguageModeling(_model(seed=rank)), WindowBatches(_stream(), 2, 16), _cfg(max_steps=3, grad_accum=2))
        first_batch = trainer.data(rank)["idx"]
        trainer.fit()
        flat = torch.cat([p.detach().flatten() for p in trainer.objective.parameters()])
        torch.save({"flat": flat, "batch": first_batch, "tokens": trainer.tokens}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_stay_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0["batch"], r1["batch"])  # each rank reads its own shard
    assert torch.equal(r0["flat"], r1["flat"])  # DDP broadcast + all-reduce keep weights identical
    assert r0["tokens"] == 3 * 2 * 2 * 2 * 17  # steps * accum * ranks * batch * (seq_len + 1)
    # and training moved them away from the (rank-0) initialisation
    assert not torch.equal(r0["flat"], torch.cat([p.flatten() for p in _model(seed=0).parameters()]))


def test_moe_model_trains_with_its_aux_loss_and_logs_expert_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("moe-tiny"))
    trainer = Trainer(LanguageModeling(model), WindowBatches(_stream(), 2, 16), _cfg(max_steps=3, out=str(tmp_path)))
    metrics = trainer.train_step()
    assert metrics["loss"] == pytest.approx(metrics["ce"] + metrics["moe_aux"])
    assert sum(metrics[f"moe_load_{e}"] for e in range(4)) == pytest.approx(1.0) and metrics["moe_dropped"] == 0
    trainer.fit()
    row = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"moe_aux", "moe_load_0", "moe_dropped"} <= set(row)


def test_wsd_schedule_exact_values():
    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 8),
                      _cfg(max_steps=20, warmup_steps=4, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1))
    f = [trainer.lr_factor(s) for s in range(21)]
    assert f[0] == pytest.approx(0.2) and f[3] == pytest.approx(0.8)  # warmup (s + 1) / 5
    assert f[4:16] == [1.0] * 12  # stable until the last 25% (5 steps)
    assert f[15] == 1.0 and f[16] == pytest.approx(1 - 0.9 / 5) and f[18] == pytest.approx(1 - 0.9 * 3 / 5)
    assert f[20] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        _cfg(schedule="linear")


def test_time_budget_schedule_follows_the_clock():
    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 8),
                      _cfg(max_steps=None, max_minutes=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.5))
    for seconds, factor in ((0.0, 1.0), (30.0, 1.0), (45.0, 0.55), (60.0, 0.1)):
        trainer.seconds = seconds
        assert trainer.lr_factor(5) == pytest.approx(factor)


def test_evaluate_runs_every_n_steps_and_at_the_end(tmp_path):
    calls = []

    def evaluate(module):
        calls.append(module.training)
        return {"val_loss": torch.tensor(1.5)}

    trainer = Trainer(LanguageModeling(_model()), WindowBatches(_stream(), 2, 8),
                      _cfg(max_steps=5, eval_every=2, out=str(tmp_path)), evaluate=evaluate)
    summary = trainer.fit()
    assert calls == [False, False, False] and summary["val_loss"] == 1.5  # steps 2, 4 and the end (5)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
    assert json.loads((tmp_path / "run.json").read_text())["val_loss"] == 1.5


def test_cli_train_from_scratch_then_load(tmp_path, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import load_model

    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat. " * 40)
    out = tmp_path / "run"
    assert main(["train", "--preset", "dense-tiny", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--eval-batches", "2",
                 "--optimizer", "muon", "--schedule", "wsd", "--no-progress", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["tokens"] == 3 * 2 * 17 and math.isfinite(printed["val_loss"])
    model, tok = load_model(str(out), device="cpu")
    assert model.config.vocab_size == 256 and model.config.max_seq_len == 16 and tok.vocab_size == 256
    run = json.loads((out / "run.json").read_text())
    assert run["val_loss"] == printed["val_loss"] and run["job"]["config"]["optimizer"] == "muon"
    assert main(["train", "--preset", "smollm2-135m", "--out", str(out), "--steps", "1"]) == 2  # not from scratch
    assert main(["train", "--preset", "dense-tiny", "--out", str(out)]) == 2  # no budget
