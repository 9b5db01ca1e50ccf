import json

import pytest

from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.eval.efficiency import model_bytes, parameter_count
from lilliput.jobs.shrink import EvalSpec, ShrinkJob, build_config, load_recipe, run_shrink
from lilliput.train.distill import DistillConfig

TINY_RECIPE = """
name = "tiny"
[eval]
passages = 3
window = 64
tasks = []
limit = 1
decode_tokens = 4
decode_repeats = 2
[[stages]]
kind = "prune"
method = "magnitude"
sparsity = 0.5
[[stages]]
kind = "quantize"
method = "rtn"
bits = 8
"""


def test_recipe_parses_and_rejects_unknown_fields(tmp_path):
    good = tmp_path / "r.toml"
    good.write_text(TINY_RECIPE)
    r = load_recipe(good)
    assert r.name == "tiny" and len(r.stages) == 2 and r.eval.window == 64 and r.eval.tasks == ()
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_RECIPE.replace("[[stages]]\nkind = \"prune\"", "[[stages]]\nkind = \"frobnicate\"", 1))
    with pytest.raises(ValueError, match="frobnicate"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="unknown field"):
        build_config(EvalSpec, {"passages": 1, "bogus": 2}, "eval")
    heal = build_config(DistillConfig, {"max_minutes": 5, "lr": 3e-4, "seq_len": 64}, "distill stage")
    assert (heal.seq_len, heal.train.lr, heal.train.max_minutes, heal.train.max_steps) == (64, 3e-4, 5, None)
    assert heal.train.warmup_steps == DistillConfig().train.warmup_steps  # the distill default, not TrainConfig's
    (tmp_path / "broken.toml").write_text("name = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_recipe(tmp_path / "broken.toml")


def test_shrink_runs_every_stage_and_writes_a_loadable_model(tiny_model, byte_tokenizer, tmp_path):
    src = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "src")
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    out = run_shrink(ShrinkJob(model=str(src), recipe=str(recipe), out=str(tmp_path / "out")), log=lambda s: None)
    run = json.loads((out / "run.json").read_text())
    assert [r["stage"] for r in run["stages"]] == ["input", "1. prune magnitude", "2. quantize rtn"]
    assert run["stages"][-1]["bytes"] < run["stages"][0]["bytes"]
    assert run["label"] == "tiny + magnitude 50% + int8 RTN"  # the source folder's name, then each stage
    assert {r["parameters"] for r in run["stages"]} == {parameter_count(tiny_model)}  # pruned/int8: same weights
    # decode speed: the input and the result only, timed in alternation in one run
    assert [r.get("decode_tok_s") is not None for r in run["stages"]] == [True, False, True]
    assert run["decode"]["input"]["n"] == run["decode"]["result"]["n"] == 2
    assert run["stages"][0]["decode_tok_s"] == round(run["decode"]["input"]["median"], 2)
    assert "| stage |" in (out / "README.md").read_text()
    model, _ = load_model(str(out))
    assert model_bytes(model) == run["stages"][-1]["bytes"]


def test_every_shipped_recipe_loads_and_its_stages_build():
    from pathlib import Path

    from lilliput.compress.quantize import METHODS
    from lilliput.jobs.prune import PruneJob

    shipped = sorted((Path(__file__).resolve().parents[1] / "lilliput" / "recipes").glob("*.toml"))
    assert "smollm2-gptq-int4" in {p.stem for p in shipped}
    for path in shipped:
        for table in load_recipe(path).stages:
            table = dict(table)
            kind = table.pop("kind")
            cls = {"prune": PruneJob, "distill": DistillConfig}.get(kind) or METHODS[table.pop("method", "rtn")]
            build_config(cls, table, f"{path.name} {kind}")


def test_recipe_model_is_built_once_per_inputs_then_loaded(tiny_model, byte_tokenizer, tmp_path):
    import torch

    from lilliput.jobs.shrink import recipe_model

    src = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "src")
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE)
    cache, logs = tmp_path / "cache", []
    first, _, made = recipe_model(str(recipe), str(src), cache, log=logs.append)
    again, _, hit = recipe_model(str(recipe), str(src), cache, log=logs.append)
    assert made["built_in_this_run"] and not hit["built_in_this_run"] and made["key"] == hit["key"]
    assert len([m for m in logs if m.startswith("building")]) == 1 and len(list(cache.iterdir())) == 1
    assert made["label"] == "tiny + magnitude 50% + int8 RTN" and made["stages"][1]["method"] == "rtn"
    assert model_bytes(first) == model_bytes(again) < model_bytes(tiny_model)
    x = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(first(x), again(x))
    recipe.write_text(TINY_RECIPE.replace("sparsity = 0.5", "sparsity = 0.25"))  # another input: another build
    assert recipe_model(str(recipe), str(src), cache, log=logs.append)[2]["key"] != made["key"]
    assert len(list(cache.iterdir())) == 2
