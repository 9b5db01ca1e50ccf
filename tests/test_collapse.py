import dataclasses
import json
import pytest

import lilliput.train.collapse_gpt as collapse_gpt
from lilliput.cli import main
from lilliput.data.corpus import sample_documents
from lilliput.data.ledger import Ledger
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.train.collapse import chunks_of, curves, growth, run_lab, samplings, seed_growth, split_chunks, words
from lilliput.train.collapse_gpt import (QUICK, CollapseConfig, GPTLearner, budget_tokens, chains, lab_tokenizer, layout,
                                         tasks, train_documents, work)
from lilliput.train.collapse_study import run_tasks
from lilliput.train.collapse_toys import BigramLearner, gaussian_chain, gaussian_study


def test_gaussian_variance_shrinks_under_replace_not_under_accumulate():
    g = gaussian_study(samples=50, generations=50, seeds=20)
    replace, accumulate = g["replace"]["variance_mean"], g["accumulate"]["variance_mean"]
    assert replace[0] == accumulate[0] == pytest.approx(0.9374, abs=1e-4)  # generation 0: the same human draws
    assert replace[-1] == pytest.approx(0.1718, abs=1e-3)  # E[var] = 0.98^49 ~ 0.37 of the start; this draw: lower
    assert g["replace"]["variance_median"][-1] < 0.15
    assert accumulate[-1] == pytest.approx(0.8916, abs=1e-3)
    assert min(g["fraction"]["variance_mean"]) > 0.8
    assert gaussian_chain("replace", 50, 5, seed=3) == gaussian_chain("replace", 50, 5, seed=3)  # seeded
    with pytest.raises(ValueError, match="policy"):
        gaussian_chain("keep", 50, 5, seed=0)


@pytest.fixture(scope="module")
def bigram_lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    train, held = split_chunks(chunks_of(sample_documents(), 30, "words"), 80, 60)
    learner = BigramLearner([t for _, _, t in train], [t for _, _, t in held], doc_words=30)
    runs = run_lab(learner, train, [t for _, _, t in held], tmp, generations=5, policies=("replace", "accumulate"),
                   sampling=samplings(("pure",), 0.9), seeds=1)
    return curves(runs), tmp, train


def test_bigram_tail_coverage_falls_and_perplexity_rises_under_replace(bigram_lab):
    c, _, _ = bigram_lab
    replace, accumulate = c["pure"]["replace"], c["pure"]["accumulate"]
    tail = replace["tail_coverage"]["mean"]
    assert tail[-1] < 0.75 * tail[0]
    assert all(b <= a + 0.01 for a, b in zip(tail, tail[1:]))  # falls generation after generation
    assert growth(replace) > 1.3 and growth(replace) > growth(accumulate)
    assert accumulate["tail_coverage"]["mean"][-1] > tail[-1]
    assert replace["human_share"]["mean"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert accumulate["human_share"]["mean"][1:] == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5])


def test_ledger_records_every_document_with_generation_and_parents(bigram_lab):
    _, tmp, train = bigram_lab
    with Ledger.open(tmp / "pure-replace-seed0.sqlite", create=False) as ledger:
        rows = ledger.documents()
        assert len(rows) == len(train) * 6  # human + 5 generations written (the last one's too)
        by_gen = {}
        for r in rows:
            by_gen.setdefault(r["generation"], []).append(r)
        assert sorted(by_gen) == [0, 1, 2, 3, 4, 5] and {len(v) for v in by_gen.values()} == {len(train)}
        assert {r["origin"] for r in by_gen[0]} == {"human"} and by_gen[0][0]["source"] in {"shakespeare", "milton",
                                                                                           "austen", "bible", "sotu"}
        for g in range(1, 6):
            doc = ledger.get(by_gen[g][0]["id"])
            assert doc["origin"] == "synthetic" and doc["generator"]["seed"] is not None
            assert doc["generator"]["sampling"] == {"temperature": 1.0, "top_p": None}
            assert doc["generator"]["model"].startswith("bigram:")
            parent = ledger.get(doc["parents"][0])  # under replace: written from the previous generation
            assert parent["generation"] == g - 1
        sel = ledger.select()  # accumulate: everything
        assert len(sel.ids) == len(rows)


def test_words_and_config_errors():
    assert words("Don't STOP, now!") == ["don", "'", "t", "stop", ",", "now", "!"]
    with pytest.raises(ValueError, match="prompt_tokens"):
        CollapseConfig(prompt_tokens=200)
    with pytest.raises(ValueError, match="samplings"):
        samplings(("greedy",), 0.9)
    with pytest.raises(ValueError, match="vocab_size"):
        CollapseConfig(vocab_size=200)
    with pytest.raises(ValueError, match="seq_len"):  # a document must fit the window
        GPTLearner(QUICK, ByteTokenizer(), ["held out"], new_tokens=QUICK.seq_len)


def test_seed_growth_is_the_mean_of_each_seeds_ratio():
    chains_ = [[{"perplexity": 10.0, "tail_coverage": 0.0}, {"perplexity": 12.0, "tail_coverage": 0.1}],
               [{"perplexity": 20.0, "tail_coverage": 0.2}, {"perplexity": 20.0, "tail_coverage": 0.1}]]
    g = seed_growth(chains_)
    assert g["runs"] == [1.2, 1.0] and g["mean"] == pytest.approx(1.1) and g["std"] == pytest.approx(0.1)
    assert (g["min"], g["max"], g["n"]) == (1.0, 1.2, 2)
    tail = seed_growth(chains_, "tail_coverage")  # a figure that starts at 0 has no ratio
    assert tail["runs"] == [None, 0.5] and (tail["mean"], tail["n"]) == (0.5, 1)


def test_budget_rules_share_replace_and_split_accumulate():
    t, d = QUICK.train.max_tokens, QUICK.documents
    assert CollapseConfig().budgets == ("tokens", "epochs")
    assert budget_tokens(QUICK, "accumulate", "epochs") == [t, 2 * t, 3 * t]  # generation g: (g+1) x generation 0
    assert budget_tokens(QUICK, "accumulate", "tokens") == [t, t, t]  # equal compute
    assert budget_tokens(QUICK, "fraction", "epochs") == [t, 2 * t, 2 * t]  # half human: twice the human set
    assert budget_tokens(QUICK, "replace", "epochs") == budget_tokens(QUICK, "replace", "tokens") == [t, t, t]
    assert [train_documents(QUICK, "accumulate", g) for g in range(4)] == [d, 2 * d, 3 * d, 4 * d]
    assert chains(QUICK) == [("replace", ("tokens", "epochs")), ("accumulate", ("tokens",)),
                             ("accumulate", ("epochs",)), ("fraction", ("tokens",)), ("fraction", ("epochs",))]
    five = dataclasses.replace(QUICK, generations=5, seeds=2, policies=("replace", "accumulate"), control_factor=None)
    w = work(five, new_tokens=10)
    assert w["models"] == 2 * (1 + 3 * 4) and w["chains_per_seed"] == 3
    assert w["train_tokens"] == 2 * t * (1 + 4 + 4 + (2 + 3 + 4 + 5))  # generation 0 shared, replace run once
    N, M = five.documents, five.metric_documents  # every generation writes N, the last only M
    assert w["documents_written"] == 2 * (N + 3 * (3 * N + M)) + 2 * five.watermark_documents
    assert w["tokens_written"] == 10 * w["documents_written"]
    assert work(dataclasses.replace(five, control_factor=2.0))["train_tokens"] == w["train_tokens"] + 2 * t


def test_tasks_start_generation_zero_first_and_the_layout_waits_for_it():
    cfg = dataclasses.replace(QUICK, seeds=2, policies=("replace", "accumulate"), workers=2)
    order = tasks(cfg)
    assert order[:2] == [("first", "0"), ("first", "1")] and order[-1] == ("control",)
    assert order[2] == ("chain", "0", "pure", "accumulate", "epochs")  # the longest chain first
    seconds = {t: 10.0 if t[0] == "first" else 30.0 if t[0] == "chain" else 5.0 for t in order}
    # two workers: both generation 0s (10 s), then 6 chains of 30 s three deep, then the control
    assert layout(cfg, seconds) == 10 + 3 * 30 + 5
    assert layout(dataclasses.replace(cfg, workers=1), seconds) == sum(seconds.values())


def test_gpt_learner_trains_for_the_budget_of_its_training_set(monkeypatch):
    seen = []

    class Budget:  # stands in for the Trainer: records the budget, trains nothing
        def __init__(self, objective, data, cfg, evaluate=None):
            seen.append(cfg.max_tokens)

        def fit(self):
            return {}

    monkeypatch.setattr(collapse_gpt, "Trainer", Budget)
    piece = "x" * QUICK.doc_bytes
    for budget in ("epochs", "tokens"):
        learner = GPTLearner(QUICK, ByteTokenizer(), ["held out"], new_tokens=8, budget=budget)
        for g in range(3):  # accumulate's training sets: the human one and g generations as large
            learner.fit([piece] * QUICK.documents * (g + 1), seed=g)
    t = QUICK.train.max_tokens
    assert seen == [t, 2 * t, 3 * t, t, t, t]


def test_bad_budget_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="budget must be one of tokens, epochs, got steps"):
        CollapseConfig(budgets=("steps",))
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--budgets", "steps"]) == 2
    assert "budget must be one of" in capsys.readouterr().err


def test_quick_real_run_writes_the_json_fields(tmp_path, capsys):
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--samplings", "pure,top_p",
                 "--gaussian-generations", "10", "--threads", "1"]) == 0
    r = json.loads((tmp_path / "collapse.json").read_text())
    assert (tmp_path / "collapse.png").stat().st_size > 10_000
    for k in ("replace_ppl_growth", "accumulate_ppl_growth", "fraction_ppl_growth"):
        assert r[k] > 0
    assert r["headline_budget"] == "tokens" and r["headline_sampling"] == "pure"
    assert r["replace_ppl_growth"] == r["ppl_growth"]["pure"]["replace"] == r["equal_compute"]["replace_ppl_growth"]
    for key, budget in (("equal_compute", "tokens"), ("equal_passes", "epochs")):
        s = r[key]
        assert s["budget"] == budget and s["seeds"] == QUICK.seeds
        for p in ("replace", "accumulate"):
            band = s["ppl_growth"][p]
            assert band["mean"] == s[f"{p}_ppl_growth"] and len(band["runs"]) == QUICK.seeds
            assert {"std", "min", "max"} <= set(band) and set(s["tail_coverage_ratio"][p]) >= {"runs"}
        assert set(s["ppl_growth_by_sampling"]) == {"pure", "top_p"}
    t = QUICK.train.max_tokens  # replace is one chain under both rules; accumulate trains longer under epochs
    assert r["equal_compute"]["train_tokens"]["accumulate"] == [t, t, t]
    assert r["equal_passes"]["train_tokens"]["accumulate"] == [t, 2 * t, 3 * t]
    assert r["equal_compute"]["same_chain_as"]["replace"] == ["epochs"]
    assert r["equal_compute"]["ppl_growth"]["replace"] == r["equal_passes"]["ppl_growth"]["replace"]
    curve = r["gpt"]["curves"]["tokens"]["top_p"]["replace"]
    assert curve["generation"] == list(range(QUICK.generations))
    for m in ("perplexity", "tail_coverage", "tail_coverage_2", "distinct_1", "distinct_2", "distinct_3",
              "unigram_entropy", "unigram_kl"):
        assert len(curve[m]["mean"]) == QUICK.generations and len(curve[m]["runs"]) == QUICK.seeds
    g0 = r["gpt"]["generation0"]
    assert len(g0["curve"]["tokens"]) == len(g0["curve"]["perplexity"]["mean"]) >= QUICK.curve_points
    assert g0["curve"]["perplexity"]["mean"][-1] == r["gpt"]["curves"]["tokens"]["pure"]["replace"]["perplexity"][
        "mean"][0]  # the last point of generation 0's curve is its perplexity
    assert g0["control"]["train_tokens"] == 2 * t and g0["control"]["ratio"] > 0
    assert r["gpt"]["tokenizer"]["vocab_size"] == QUICK.vocab_size and r["gpt"]["human"]["documents"] == QUICK.documents
    assert r["shows"] and r["does_not_show"]
    w = r["watermark"]
    assert w["synthetic"] == w["human"] == QUICK.watermark_documents
    assert w["true_positives"] + w["false_negatives"] == w["synthetic"]
    with Ledger.open(w["ledger"], create=False) as ledger:  # routed by the detector's verdict
        assert sum(d["origin"] == "synthetic" for d in ledger.documents()) == w["true_positives"] + w["false_positives"]
    assert r["gaussian"]["generations"] == 10 and r["work"]["models"] == 1 + 2 * 5 * 2 + 1
    assert r["work"]["train_tokens"] == t + 2 * (2 * t + 2 * t + 5 * t + 2 * t + 4 * t) + 2 * t  # 2 samplings
    with Ledger.open(tmp_path / "ledgers" / "gpt" / "pure-replace-tokens-epochs-seed0.sqlite", create=False) as ledger:
        by_gen = {}
        for d in ledger.documents():
            by_gen[d["generation"]] = by_gen.get(d["generation"], 0) + 1
    N, M = QUICK.documents, QUICK.metric_documents  # the last generation writes only what is measured
    assert by_gen == {0: N, 1: N, 2: N, 3: M}
    assert "replace_ppl_growth" in capsys.readouterr().out


def test_worker_processes_give_the_same_chains_as_one_process(tmp_path):
    cfg = dataclasses.replace(QUICK, generations=2, policies=("replace",), budgets=("tokens",), control_factor=None)
    train, held = split_chunks(chunks_of(sample_documents(), cfg.doc_bytes), cfg.documents, cfg.heldout_documents)
    shared = {"cfg": cfg, "tokenizer": lab_tokenizer(cfg, [t for _, _, t in train]), "human": train,
              "heldout": [t for _, _, t in held], "new_tokens": 12, "device": "cpu", "ledgers": str(tmp_path / "one")}
    here = run_tasks(cfg, shared)
    two = dataclasses.replace(cfg, workers=2)  # spawned processes
    there = run_tasks(two, shared | {"cfg": two, "ledgers": str(tmp_path / "two")})
    assert [e.text for e in here[("first", "0")]["first"]["pure"]] == [e.text for e in there[("first", "0")]["first"]["pure"]]
    key = ("chain", "0", "pure", "replace", "tokens")
    assert [m["perplexity"] for m in here[key]["curve"]] == [m["perplexity"] for m in there[key]["curve"]]


def test_cli_bad_policy_is_one_line(tmp_path, capsys):
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--policies", "replace,keep"]) == 2
    assert "policy must be one of" in capsys.readouterr().err
