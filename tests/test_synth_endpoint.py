"""`lilliput synth --teacher http://...`: a teacher behind an OpenAI-compatible server, here `lilliput serve`
on a tiny model, bound to a free loopback port."""

import json

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.data.ledger import Ledger
from lilliput.infer.engine import EngineConfig
from lilliput.jobs.synth import SynthJob, run_synth
from lilliput.serve.app import ServeConfig, Server

KEY = "sk-synth-test"


def tiny():
    torch.manual_seed(0)
    return GPT(preset("tiny")).eval(), ByteTokenizer()


@pytest.fixture(scope="module")
def server():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ServeConfig(port=0, api_key=KEY, engine=EngineConfig(max_batch=4))
    s = Server(cfg, tiny, name="tiny-teacher").start(wait_loaded=True)
    yield s
    s.stop()
    torch.set_num_threads(n)


def test_a_served_teacher_writes_documents_recorded_like_a_local_one(tmp_path, server):
    topics = tmp_path / "topics.txt"
    topics.write_text("atoms\nverbs\nRome\n")
    job = SynthJob(teacher=server.url, teacher_api_key=KEY, topics=str(topics), tokens=60, max_new_tokens=20,
                   max_batch=3, quality=False, out=str(tmp_path / "out"), ledger=str(tmp_path / "l.sqlite"))
    out = run_synth(job, log=None)
    run = json.loads((out / "run.json").read_text())
    m = run["metrics"]
    assert 60 <= m["teacher_tokens"] <= 60 + 3 * 20 and m["answers"] >= 3
    assert run["teacher"]["label"] == f"tiny-teacher @ {server.url}/v1" and KEY not in json.dumps(run)
    kept = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert len(kept) == m["kept"] >= 1
    with Ledger.open(tmp_path / "l.sqlite", create=False) as led:
        rows = led.documents()
        assert len(rows) == m["documents"] and {r["origin"] for r in rows} == {"synthetic"}
        doc = led.get(kept[0]["id"])
        gen = doc["generator"]
        assert gen["model"] == f"served:tiny-teacher @ {server.url}/v1" and gen["watermark_key_id"] is None
        assert gen["sampling"] == {"max_tokens": 20, "temperature": 0.8, "top_k": 50, "repetition_penalty": 1.1}
        assert gen["seed"] == kept[0]["seed"] and json.loads(gen["prompt"])[-1]["role"] == "user"
        assert doc["tokens"] == kept[0]["teacher_tokens"] <= 20
        assert {d["filter"] for r in rows for d in led.get(r["id"])["decisions"]} <= {"curate", "exact_dedup",
                                                                                     "near_dedup"}


def test_served_teacher_errors_are_one_line(tmp_path, server, capsys):
    from lilliput.cli import main

    with pytest.raises(ValueError, match="cannot be watermarked"):
        SynthJob(teacher=server.url, watermark="k")
    base = ["synth", "--tokens", "8", "--out", str(tmp_path / "o"), "--ledger", str(tmp_path / "l.sqlite")]
    assert main([*base, "--teacher", server.url, "--teacher-api-key", "wrong"]) == 2
    assert "answered 401" in capsys.readouterr().err
    assert main([*base, "--teacher", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and len(err.strip().splitlines()) == 1
