"""The curation pipeline on a local Ray cluster (ray.init() on this machine, 2 CPUs) gives the local
executor's output: the same kept documents and the same verdicts. One test: Ray starts slowly."""

import dataclasses
import json

import pytest

from lilliput.data.corpus import sample_documents
from lilliput.data.curate import CurateConfig, curate
from lilliput.data.planted import passages, plant

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _kept(folder):
    return sorted(json.loads(line)["id"] + "\t" + json.loads(line)["text"]
                  for f in folder.glob("*.jsonl") for line in f.read_text().splitlines())


def test_ray_executor_gives_the_local_executor_s_output(tmp_path, local_ray):
    planted = plant(passages(sample_documents(), 16), seed=2)
    for k, part in enumerate((planted.docs[::2], planted.docs[1::2])):  # two files: a task each
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    # 6 hashes at near_recall 0.9: 3 MinHash bands, so 3 bucket tasks (each Ray task is an actor, a new process: ~5 s)
    cfg = CurateConfig(tasks=2, workers=2, mem_per_cpu_gb=0.25, minhash_hashes=6, near_recall=0.9)
    local = curate([tmp_path / "in"], tmp_path / "local", cfg)
    on_ray = curate([tmp_path / "in"], tmp_path / "ray", dataclasses.replace(cfg, executor="ray"))
    assert _kept(tmp_path / "ray") == _kept(tmp_path / "local") and len(_kept(tmp_path / "local")) >= 8
    assert sorted(on_ray.decisions) == sorted(local.decisions)
    assert {d[1] for d in local.removed()} >= {"exact_dedup", "near_dedup"}
