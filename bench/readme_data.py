"""The data pillar's tables (watermark, collapse, textbook), registered with bench/readme.py's TABLES."""

from __future__ import annotations

from pathlib import Path

from readme_format import fmt, load, md, source, table


@table("watermark")
def _watermark(results: Path) -> str | None:
    r = load(results, "watermark")
    if r is None:
        return None
    df = r.get("distortion_free") or {}
    gl = df.get("by_length", {})
    rows = [[n, v["tpr"], v["threshold_z"], v["median_z"],
             *((gl[n]["tpr"], gl[n]["median_log10_p"]) if n in gl else ("-", "-"))] for n, v in r["by_length"].items()]
    out = ("True-positive rate at a 0.1% false-positive rate on human text, by length (green list: the z that at "
           "most 0.1% of human passages exceed; Gumbel-max: exact p <= 1e-3):\n\n"
           + md(["tokens", "green-list TPR", "threshold z", "median z", "Gumbel TPR", "median log10 p"], rows))

    def ci(v) -> str:
        return f"[{fmt(v[0])}, {fmt(v[1])}]" if v else "-"

    def scheme(name: str, x: dict) -> list:
        rob = x.get("robustness", {})
        return [name, x["tpr_at_fpr_1e-3"], ci(x.get("tpr_at_fpr_1e-3_ci95")), x["tpr_at_fpr_1e-3_retokenized"],
                x["ppl_cost"], ci(x.get("ppl_cost_ci95")),
                *(fmt(rob.get(f"replace_{k}", {}).get("tpr")) for k in ("0.1", "0.2", "0.3"))]

    rows = [scheme("green list (Kirchenbauer)", r)] + ([scheme("Gumbel-max (distortion-free)", df)] if df else [])
    out += (f"\n\nAt {r.get('settings', {}).get('length', 200)} tokens (intervals: 95%, Clopper-Pearson for TPR, bootstrap over prompts for the perplexity "
            "cost; the last three columns: TPR after replacing that share of tokens by random ones):\n\n"
            + md(["scheme", "`tpr_at_fpr_1e-3`", "95% CI", "re-tokenized", "`ppl_cost`", "95% CI", "10%", "20%", "30%"],
                 rows))
    if df:
        h = df["human"]
        out += (f"\n\nGumbel p-values on {h['n']} human passages: {fmt(h['fpr_at_1e-3'])} at or below 1e-3, "
                f"{fmt(h['share_below_0.01'])} below 0.01, {fmt(h['share_below_0.05'])} below 0.05 (KS distance from "
                f"uniform {fmt(h['ks_distance'])}, 1% critical value {fmt(h['ks_critical_1pct'])}).")
    return out + "\n\n" + source(r, "watermark")


@table("collapse")
def _collapse(results: Path) -> str | None:
    r = load(results, "collapse")
    if r is None:
        return None
    if "equal_compute" not in r:  # a run from before the two budget rules
        rows = [[s, *(fmt(v.get(p)) for p in ("replace", "accumulate", "fraction"))] for s, v in r["ppl_growth"].items()]
        return ("Held-out perplexity after the last generation / after the first:\n\n"
                + md(["sampling", "replace", "accumulate", "fixed human fraction"], rows) + "\n\n" + source(r, "collapse"))
    rules = [r[k] for k in ("equal_compute", "equal_passes") if r.get(k)]
    policies = list(rules[0]["ppl_growth"])
    grows = "accumulate" if "accumulate" in policies else policies[-1]  # the policy whose training set grows

    def cell(g: dict) -> str:
        return f"{fmt(g.get('mean'))} ± {fmt(g.get('std'))}" if g.get("mean") is not None else "-"

    label = {"tokens": "equal compute (same tokens per generation)", "epochs": "equal passes (same epochs per generation)"}
    rows = [[label[x["budget"]], *(cell(x["ppl_growth"][p]) for p in policies),
             *(cell(x["tail_coverage_ratio"][p]) for p in policies),
             f"{x['train_tokens'][grows][-1]:,}"] for x in rules]
    g0 = r["gpt"]["generation0"]
    control = g0.get("control")
    return (f"Small GPTs, {r['gpt']['human']['bytes'] / 1e6:.2f} MB of human text, {len(rules[0]['perplexity'][policies[0]])} "
            f"generations, {rules[0]['seeds']} seeds ({r['headline_sampling']} sampling). Last generation / generation 0, "
            "mean ± std over seeds:\n\n"
            + md(["budget rule", *(f"perplexity, {p}" for p in policies), *(f"rare-word coverage, {p}" for p in policies),
                  f"tokens, last {grows} model"], rows)
            + f"\n\nGeneration 0 trains {g0['epochs']:.2f} epochs"
            + (f"; trained {control['train_tokens'] / g0['train_tokens']:.0f}x as long, its held-out perplexity is "
               f"{fmt(control['ratio'])}x" if control else "") + ".\n\n" + source(r, "collapse"))


@table("textbook")
def _textbook(results: Path) -> str | None:
    r = load(results, "textbook")
    if r is None:
        return None
    if "mixes" not in r:  # a run from before the seeds
        rows = [[x["synthetic_fraction"], x["ppl_human"], x.get("ppl_textbook"), x["train_tokens"]] for x in r["students"]]
        return (md(["synthetic fraction", "perplexity, human text", "perplexity, textbook text", "train tokens"], rows)
                + "\n\n" + source(r, "textbook"))

    def pm(v: dict) -> str:
        return f"{fmt(v['mean'])} ± {fmt(v['std'])}"

    tasks = r["student"]["tasks"]
    rows = [[m["synthetic_fraction"], pm(m["ppl_human"]), pm(m["ppl_textbook"]), *(pm(m["tasks"][t]) for t in tasks)]
            for m in r["mixes"]]
    out = (f"Students of {r['student']['parameters'] / 1e6:.2f}M parameters, {r['student']['train']['max_tokens']:,} "
           f"bytes each, {r['seeds']} seeds (mean ± std):\n\n"
           + md(["synthetic fraction", "perplexity, human text", "perplexity, textbook text",
                 *(f"{t} acc_norm" for t in tasks)], rows))
    vs = r.get("vs_human") or {}
    if vs:
        rows = [[f, pm(v["ppl_human_ratio"]), pm(v["ppl_textbook_ratio"]),
                 *(f"{fmt(d['mean'])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"
                   for d in (v["task_acc_norm_difference"][t] for t in tasks))] for f, v in vs.items()]
        out += ("\n\nAgainst the human-only students (perplexity ratios seed by seed; acc_norm differences with a 95% "
                "bootstrap interval over questions):\n\n"
                + md(["synthetic fraction", "human perplexity ratio", "textbook perplexity ratio",
                      *(f"{t} difference" for t in tasks)], rows))
    wm = (r.get("synth") or {}).get("watermark")
    if wm:
        out += (f"\n\nWatermark ({wm['scheme']}): {fmt(wm['detected'])} of {wm['documents']} held-out documents detected "
                f"at a false-positive rate of {wm['fpr']:g}; {fmt(wm['human_flagged'])} of human text flagged.")
    return out + "\n\n" + source(r, "textbook")
