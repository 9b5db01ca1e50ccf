import dataclasses
import json

import pytest

import lilliput.train.collapse_gpt as collapse_gpt
from lilliput.cli import main
from lilliput.data.corpus import sample_documents
from lilliput.data.ledger import Ledger
from lilliput.train.collapse import chunks_of, curves, growth, run_lab, samplings, split_chunks, words
from lilliput.train.collapse_gpt import QUICK, CollapseConfig, GPTLearner, train_documents, work
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
    with pytest.raises(ValueError, match="seq_len"):
        CollapseConfig(doc_bytes=200)
    with pytest.raises(ValueError, match="samplings"):
        samplings(("greedy",), 0.9)


def test_epochs_budget_grows_with_the_training_set_and_tokens_budget_does_not():
    t, d = QUICK.train.max_tokens, QUICK.documents
    assert QUICK.budget == CollapseConfig().budget == "epochs"
    per = work(QUICK)["train_tokens_per_generation"]
    assert per["accumulate"] == [t, 2 * t, 3 * t]  # generation g: (g+1) x generation 0, the same epochs
    assert per["replace"] == [t, t, t] and per["fraction"] == [t, 2 * t, 2 * t]  # half human: twice the human set
    assert [train_documents(QUICK, "accumulate", g) for g in range(4)] == [d, 2 * d, 3 * d, 4 * d]
    five = dataclasses.replace(QUICK, generations=5, seeds=2, samplings=("pure",))
    assert work(five)["train_tokens"] == 2 * t * (1 + (1 + 1 + 1 + 1) + (2 + 3 + 4 + 5) + (2 + 2 + 2 + 2))
    fixed = work(dataclasses.replace(five, budget="tokens"))
    assert all(v == [t] * 5 for v in fixed["train_tokens_per_generation"].values())
    assert fixed["train_tokens"] == fixed["models"] * t == 2 * 13 * t


def test_gpt_learner_trains_for_the_budget_of_its_training_set(monkeypatch):
    seen = []

    class Budget:  # stands in for the Trainer: records the budget, trains nothing
        def __init__(self, objective, data, cfg):
            seen.append(cfg.max_tokens)

        def fit(self):
            return {}

    monkeypatch.setattr(collapse_gpt, "Trainer", Budget)
    piece = "x" * QUICK.doc_bytes
    for budget in ("epochs", "tokens"):
        learner = GPTLearner(dataclasses.replace(QUICK, budget=budget), ["held out"])
        for g in range(3):  # accumulate's training sets: the human one and g generations as large
            learner.fit([piece] * QUICK.documents * (g + 1), seed=g)
    t = QUICK.train.max_tokens
    assert seen == [t, 2 * t, 3 * t, t, t, t]


def test_bad_budget_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="budget must be one of epochs, tokens, got 'steps'"):
        CollapseConfig(budget="steps")
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--budget", "steps"]) == 2
    assert "budget must be one of" in capsys.readouterr().err


def test_quick_real_run_writes_the_json_fields(tmp_path, capsys):
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--samplings", "pure,top_p",
                 "--gaussian-generations", "10", "--threads", "1"]) == 0
    r = json.loads((tmp_path / "collapse.json").read_text())
    assert (tmp_path / "collapse.png").stat().st_size > 10_000
    for k in ("replace_ppl_growth", "accumulate_ppl_growth", "fraction_ppl_growth"):
        assert r[k] > 0
    assert r["replace_ppl_growth"] == r["ppl_growth"]["pure"]["replace"]
    curve = r["gpt"]["curves"]["top_p"]["replace"]
    assert curve["generation"] == list(range(QUICK.generations))
    for m in ("perplexity", "tail_coverage", "distinct_1", "distinct_2", "distinct_3", "unigram_entropy", "unigram_kl"):
        assert len(curve[m]["mean"]) == QUICK.generations and len(curve[m]["runs"]) == QUICK.seeds
    w = r["watermark"]
    assert w["synthetic"] == w["human"] == QUICK.watermark_documents
    assert w["true_positives"] + w["false_negatives"] == w["synthetic"]
    with Ledger.open(w["ledger"], create=False) as ledger:  # routed by the detector's verdict
        assert sum(d["origin"] == "synthetic" for d in ledger.documents()) == w["true_positives"] + w["false_positives"]
    assert r["gaussian"]["generations"] == 10 and r["work"]["models"] == 1 + 2 * 3 * 2
    t = QUICK.train.max_tokens  # each generation's budget, from the documents the ledger selected
    assert r["config"]["budget"] == r["gpt"]["budget"] == "epochs"
    assert r["gpt"]["train_tokens"]["top_p"] == r["work"]["train_tokens_per_generation"] == {
        "replace": [t, t, t], "accumulate": [t, 2 * t, 3 * t], "fraction": [t, 2 * t, 2 * t]}
    assert r["work"]["train_tokens"] == t + 2 * (t + t) + 2 * (2 * t + 3 * t) + 2 * (2 * t + 2 * t)  # 2 samplings
    assert "replace_ppl_growth" in capsys.readouterr().out


def test_cli_bad_policy_is_one_line(tmp_path, capsys):
    assert main(["collapse", "--quick", "--out", str(tmp_path), "--policies", "replace,keep"]) == 2
    assert "policy must be one of" in capsys.readouterr().err
