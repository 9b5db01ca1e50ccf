"""The README is a guide and its measured tables are generated: they agree with bench/results/*.json."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


readme = _script("readme")
rerun = _script("rerun")


def test_pages_agree_with_results():
    assert readme.stale() == [], "run python bench/readme.py after changing bench/results or a page"


def test_a_changed_result_makes_its_page_stale(tmp_path):
    root = tmp_path / "repo"
    for page in (*readme.PAGES, readme.BENCH_README):
        if (ROOT / page).is_file():
            (root / page).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / page, root / page)
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    assert readme.stale(root, results) == []
    engine = json.loads((results / "engine.json").read_text())
    engine["int8_batch8_vs_batch1"] = 9.87
    (results / "engine.json").write_text(json.dumps(engine))
    assert readme.stale(root, results) == ["docs/run.md", "bench/README.md"]


def test_every_block_names_a_table():
    for page in readme.PAGES:
        text = (ROOT / page).read_text()
        for name in re.findall(r"<!-- bench:([\w-]+) begin", text):
            assert name in readme.TABLES, f"{page}: unknown table {name}"


def test_readme_is_a_guide():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:20])
    for family in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2",
                   "olmoe", "smollm3", "Mamba", "xLSTM", "MoE"):
        assert family in first_screen, family
    for word in ("make demo", "make test", "lilliput shrink", "lilliput eval", "lilliput serve", "lilliput export",
                 "docs/data.md", "bench/README.md", "[Curate]"):
        assert word in text, word
    assert "../" not in text and "cli.py" not in text  # nothing outside the repository, no stale files
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_results_steps_cover_every_script():
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("readme_")} - {"readme", "rerun", "harness"}
    assert scripts == {s.name for s in rerun.SCRIPTS}
    assert rerun.estimate() > 60
    with pytest.raises(SystemExit):
        rerun.select("nope", None)
    assert [s.name for s in rerun.select(None, "collapse")] == ["collapse"]
