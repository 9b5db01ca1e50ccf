"""Curation on datatrove against the hand-written curate it replaced, in one run.

The hand-written implementation (MinHash LSH with an exact Jaccard check of every candidate, and
regular-expression Gopher and C4 rules, one process) is loaded from git at `--baseline-ref`: the
last commit that had it (found from the history when omitted), so it runs in this same process,
on the same data, as it ran before it was deleted.

Written to bench/results/curate.json:

- `near_dedup`: precision and recall of the near-duplicate pairs each finds against planted truth.
  The planted set: `--originals` passages of the shipped corpus (lilliput.data.planted), then one
  copy of each with 0% .. 15% of its words replaced (Jaccard of word 5-gram sets, as
  lilliput.data.shingles defines them, from 1.0 down to ~0.3); true pairs are those at Jaccard >=
  0.8. Only near-dedup runs (exact dedup and quality rules off). The hand-written one's pairs:
  `near_duplicates` on its signatures with the texts (curation's path). The datatrove pipeline's:
  pairs inside each MinHash cluster, read from the ledger's reasons, with every candidate checked
  (`datatrove`: what `lilliput curate` runs; its precision and recall are also the top-level
  `near_dedup_precision` and `near_dedup_recall`) and without the check (`datatrove_unchecked`:
  datatrove's way, bands and rows from `lsh_params`). `by_similarity`: the share of planted pairs
  each found, per copy rate.
- `embedded_corpus`: both on `--originals` passages of the shipped corpus with no copies planted:
  the pairs each calls near-duplicates (none are: the passages do not overlap).
- `throughput`: the whole curation (exact dedup, C4, Gopher quality and repetition, near dedup;
  read JSON lines, write JSON lines) of `--docs` documents in two files: documents/s of the
  hand-written one (one process) and of the datatrove pipeline on the local executor with 1 and
  with 2 workers (2 tasks), and how much their kept sets agree (the rules tokenize differently:
  datatrove's counts spaCy tokens, punctuation included, where the old rules counted words).
  `rules_tokenizer`: datatrove's C4 and Gopher rules on `--rule-docs` of those documents in this
  process, with datatrove's spaCy tokenizer and with lilliput's `CachedSpaCyTokenizer` (what the
  pipeline uses): ms per document of each and whether every verdict and every kept text is the same.
- `ray_equals_local` (and `ray`): the same pipeline on the same small input (`--ray-originals`
  planted passages in two files, two tasks) on the local executor and on a local Ray cluster
  (ray.init, 2 CPUs): whether the kept documents and every ledger verdict are the same.

    PYTHONPATH=. .venv/bin/python bench/curate.py               # the full run (~5 min on 2 cores)
    PYTHONPATH=. .venv/bin/python bench/curate.py --docs 400    # smoke
    PYTHONPATH=. .venv/bin/python bench/curate.py --readme      # docs/data.md's curation figures from curate.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from lilliput.core.record import run_record, write_json
from lilliput.data.corpus import sample_documents
from lilliput.data.curate import CurateConfig, curate, lsh_params
from lilliput.data.planted import RATES, passages, perturb, plant, score

OUT = Path(__file__).parent / "results" / "curate.json"
ROOT = Path(__file__).resolve().parents[1]
OLD = ("minhash", "quality", "curate")


def baseline_ref(ref: str | None) -> str:
    """The commit whose lilliput/data/minhash.py is the hand-written one: `ref`, else the parent of the
    commit that deleted it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    if ref is None:
        deleted = git("log", "-1", "--format=%H", "--diff-filter=D", "--", "lilliput/data/minhash.py")
        if not deleted:
            raise SystemExit("no commit deleted lilliput/data/minhash.py; pass --baseline-ref")
        ref = deleted + "^"
    return git("rev-parse", ref)


def load_old(ref: str, folder: Path):
    """The hand-written curate of commit `ref` as the package `lilliput_before.data`."""
    pkg = folder / "lilliput_before" / "data"
    pkg.mkdir(parents=True)
    (folder / "lilliput_before" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    for name in OLD:
        src = subprocess.run(["git", "show", f"{ref}:lilliput/data/{name}.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("lilliput.data.minhash", "lilliput_before.data.minhash")
                                        .replace("lilliput.data.quality", "lilliput_before.data.quality"))
    sys.path.insert(0, str(folder))
    return {name: importlib.import_module(f"lilliput_before.data.{name}") for name in OLD}


def old_pairs(old, docs: list[dict], threshold: float) -> set[tuple[str, str]]:
    mh = old["minhash"]
    cfg = mh.MinHashConfig(threshold=threshold)
    texts = [d["text"] for d in docs]
    return {(docs[i]["id"], docs[j]["id"]) for i, j, _ in
            mh.near_duplicates(mh.minhash_signatures(texts, cfg), cfg, texts=texts)}


def new_pairs(docs: list[dict], threshold: float, check: bool = True) -> set[tuple[str, str]]:
    from lilliput.data.curate import curate_documents

    cfg = CurateConfig(exact_dedup=False, c4=False, gopher_quality=False, gopher_repetition=False,
                       near_threshold=threshold, near_check=check)
    _, result = curate_documents(docs, cfg)
    members = defaultdict(list)
    for doc_id, _, _, reason in result.decisions:
        if m := re.search(r"MinHash cluster (\d+)", reason):
            members[m[1]].append(doc_id)
    return {(a, b) for ids in members.values() for a in ids for b in ids if a < b}


def by_rate(planted, found: set, rates) -> dict:
    found = {tuple(sorted(p)) for p in found}
    out = {}
    for k, rate in enumerate(rates):
        pairs = [(a, b, s) for i, (a, b, s) in enumerate(planted.pairs) if i % len(rates) == k]
        out[f"{rate:.3f}"] = {"mean_jaccard": round(sum(s for *_, s in pairs) / len(pairs), 3),
                              "found": round(sum(tuple(sorted((a, b))) in found for a, b, _ in pairs) / len(pairs), 3)}
    return out


def throughput_corpus(originals: list[str], n: int, seed: int) -> list[dict]:
    """n documents: the originals, variants of them with half their words replaced (distinct documents),
    and planted copies of a quarter of them (exact and near)."""
    rng = random.Random(seed)
    base = []
    while len(base) < n * 3 // 4:
        text = originals[len(base) % len(originals)]
        base.append(text if len(base) < len(originals) else perturb(text, 0.5, rng))
    planted = plant(base[: n - len(base)], seed=seed)
    docs = [{"id": f"b{k}", "text": t} for k, t in enumerate(base)]
    docs += [d for d in planted.docs if d["id"].startswith("c")]
    rng.shuffle(docs)
    return docs


def rules_tokenizer(docs: list[dict]) -> dict:
    """datatrove's C4 and Gopher rules, in the pipeline's order, with datatrove's tokenizer and with lilliput's."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from lilliput.data.word_tokenizer import CachedSpaCyTokenizer

    def run(language):
        rules = [C4QualityFilter(language=language), GopherQualityFilter(language=language),
                 GopherRepetitionFilter(language=language)]
        out, t = [], time.perf_counter()
        for d in docs:
            doc, verdict = Document(d["text"], d["id"]), True
            for rule in rules:
                if (verdict := rule.filter(doc)) is not True:
                    break
            out.append((verdict, doc.text))
        return time.perf_counter() - t, out

    s_theirs, theirs = run("en")
    s_ours, ours = run(CachedSpaCyTokenizer("en"))
    return {"documents": len(docs), "datatrove_ms_per_doc": round(1000 * s_theirs / len(docs), 2),
            "lilliput_ms_per_doc": round(1000 * s_ours / len(docs), 2), "speedup": round(s_theirs / s_ours, 2),
            "same_verdicts_and_texts": theirs == ours, "kept": sum(v is True for v, _ in ours)}


def ray_vs_local(originals: list[str], tmp: Path, seed: int) -> dict:
    """The same pipeline on the same small input on the local executor and on a local Ray cluster."""
    import dataclasses

    import ray

    from lilliput.data.planted import plant

    planted = plant(originals, seed=seed)
    for k, part in enumerate((planted.docs[::2], planted.docs[1::2])):
        f = tmp / "ray_in" / f"{k}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(d) + "\n" for d in part))
    # 6 hashes at near_recall 0.9: 3 bands, 3 bucket tasks (a Ray task is an actor, a new process)
    cfg = CurateConfig(tasks=2, workers=2, mem_per_cpu_gb=0.25, minhash_hashes=6, near_recall=0.9)
    kept = lambda folder: sorted(line for f in folder.glob("*.jsonl") for line in f.read_text().splitlines())  # noqa: E731
    t = time.perf_counter()
    local = curate([tmp / "ray_in"], tmp / "ray_local", cfg)
    s_local, t = time.perf_counter() - t, time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t = time.perf_counter()
        on_ray = curate([tmp / "ray_in"], tmp / "ray_ray", dataclasses.replace(cfg, executor="ray"))
        s_ray = time.perf_counter() - t
    finally:
        ray.shutdown()
    same_kept = kept(tmp / "ray_ray") == kept(tmp / "ray_local")
    same_verdicts = sorted(on_ray.decisions) == sorted(local.decisions)
    return {"documents": len(planted.docs), "kept": len(kept(tmp / "ray_local")),
            "removed_by_filter": local.summary()["removed_by_filter"], "same_kept": same_kept,
            "same_verdicts": same_verdicts, "equal": same_kept and same_verdicts,
            "local_seconds": round(s_local, 2), "ray_seconds": round(s_ray, 2),
            "ray_version": importlib.metadata.version("ray")}


def readme(result: dict) -> str:
    """README's curation figures, from a curate.json."""
    near, thr = result["near_dedup"], result["throughput"]
    old, new, loose = near["lilliput"], near["datatrove"], near["datatrove_unchecked"]
    one, two, hand = thr["datatrove_1_workers"], thr["datatrove_2_workers"], thr["hand_written"]
    rules, ray = thr["rules_tokenizer"], result["ray"]
    cpu = f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    return (
        f"Measured (`bench/results/curate.json`, one run of `bench/curate.py`, {cpu}): on {near['documents']} "
        f"documents with {near['true_pairs']} planted near copies at Jaccard >= {near['threshold']}, the pipeline's "
        f"near-dedup ({near['datatrove_bands']}; every candidate's Jaccard checked on the truth's own 5-grams) finds "
        f"them with precision {new['precision']:.2f} and recall {new['recall']:.2f}; datatrove's bands alone "
        f"({loose['method'].split(' (')[0]}, no check) {loose['precision']:.2f} and {loose['recall']:.2f}; the "
        f"hand-written MinHash it replaced {old['precision']:.2f} and {old['recall']:.2f}. None pairs any of "
        f"{result['embedded_corpus']['documents']} unrelated corpus passages. The whole pipeline on "
        f"{thr['documents']:,} documents runs {one['docs_per_s']:.0f} documents/s with one local worker and "
        f"{two['docs_per_s']:.0f} with two, against {hand['docs_per_s']:.0f} for the hand-written one-process "
        f"version in the same run. datatrove's rules tokenize with spaCy; its tokenizer rebuilds spaCy's "
        f"vocabulary at every call (C4 calls it once a line), lilliput's keeps it: the rules take "
        f"{rules['lilliput_ms_per_doc']:.1f} ms a document instead of {rules['datatrove_ms_per_doc']:.1f}, with "
        f"{'the same' if rules['same_verdicts_and_texts'] else 'DIFFERENT'} verdicts on {rules['documents']}. "
        f"On a local Ray cluster the same pipeline gives {'the same' if result['ray_equals_local'] else 'NOT the same'}"
        f" output and verdicts as the local executor ({ray['documents']} documents).")


MARK = ("<!-- curate.json: bench/curate.py --readme -->", "<!-- /curate.json -->")


def write_readme(result: dict, path: Path) -> None:
    text = path.read_text()
    if MARK[0] not in text or MARK[1] not in text:
        raise SystemExit(f"{path} has no {MARK[0]} ... {MARK[1]} block")
    head, rest = text.split(MARK[0], 1)
    _, tail = rest.split(MARK[1], 1)
    path.write_text(f"{head}{MARK[0]}\n{textwrap.fill(readme(result), 100, break_on_hyphens=False)}\n{MARK[1]}{tail}")


def run_old(old, files: list[Path], out: Path) -> tuple[float, set[str]]:
    c = old["curate"]
    t = time.perf_counter()
    docs = [d for f in files for d in c.read_documents(f)]
    result = c.curate(docs, c.CurateConfig())
    c.write_documents(out, result.kept)
    return time.perf_counter() - t, {d.id for d in result.kept}


def run_new(files: list[Path], out: Path, workers: int) -> tuple[float, set[str], dict]:
    t = time.perf_counter()
    result = curate(files, out, CurateConfig(tasks=2, workers=workers))
    return time.perf_counter() - t, set(result.kept_ids()), result.stage_seconds


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-ref", help="git commit holding the hand-written curate (found when omitted)")
    ap.add_argument("--originals", type=int, default=130, help="passages of the shipped corpus (at most 130)")
    ap.add_argument("--docs", type=int, default=4000, help="documents of the throughput corpus")
    ap.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rule-docs", type=int, default=500, help="documents the rules run on with both tokenizers")
    ap.add_argument("--ray-originals", type=int, default=16, help="planted passages of the Ray vs local run")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--readme", action="store_true", help="only write docs/data.md's curation figures from --out")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme(json.loads(Path(args.out).read_text()), ROOT / "docs" / "data.md")
        print(readme(json.loads(Path(args.out).read_text())))
        return 0

    ref = baseline_ref(args.baseline_ref)
    tmp = Path(tempfile.mkdtemp(prefix="lilliput-bench-curate-"))
    old = load_old(ref, tmp / "old")
    originals = passages(sample_documents(), args.originals, prose_only=False)

    planted = plant(originals, seed=args.seed, shuffle=True)
    truth = planted.truth(args.threshold)
    print(f"planted: {len(planted.docs)} documents, {len(truth)} pairs at Jaccard >= {args.threshold}", flush=True)
    t = time.perf_counter()
    found_old = old_pairs(old, planted.docs, args.threshold)
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    found_new = new_pairs(planted.docs, args.threshold)
    t_new, t = time.perf_counter() - t, time.perf_counter()
    found_loose = new_pairs(planted.docs, args.threshold, check=False)
    t_loose = time.perf_counter() - t
    checked = CurateConfig(near_threshold=args.threshold).minhash()
    bands, rows = lsh_params(args.threshold, CurateConfig.minhash_hashes)
    near = {"documents": len(planted.docs), "threshold": args.threshold, "true_pairs": len(truth),
            "datatrove_bands": f"{checked.num_buckets} bands x {checked.hashes_per_bucket} rows",
            "lilliput": {**score(found_old, truth), "method": "128 hashes, datasketch-style bands weighted to recall "
                         "(fn 0.9), every candidate's Jaccard computed exactly", "seconds": round(t_old, 2)},
            "datatrove": {**score(found_new, truth), "method": f"{checked.num_buckets} bands x "
                          f"{checked.hashes_per_bucket} rows (candidate_bands: a pair at the threshold proposed with "
                          f"probability >= {CurateConfig.near_recall}) of xxhash64 MinHash over lilliput.data.shingles "
                          "(the truth's 5-grams), every candidate's Jaccard checked (VerifyCandidates); pairs inside "
                          "each cluster", "seconds": round(t_new, 2)},
            "datatrove_unchecked": {**score(found_loose, truth), "method": f"{bands} bands x {rows} rows (lsh_params), "
                                    "the same shingles, no check; pairs inside each cluster",
                                    "seconds": round(t_loose, 2)},
            "agreement": score(found_new, found_old)["precision"] if found_new else None,
            "by_similarity": {"lilliput": by_rate(planted, found_old, RATES),
                              "datatrove": by_rate(planted, found_new, RATES),
                              "datatrove_unchecked": by_rate(planted, found_loose, RATES)}}
    print(json.dumps(near), flush=True)

    corpus = [{"id": f"p{k}", "text": t} for k, t in enumerate(originals)]
    emb_old, emb_new = old_pairs(old, corpus, args.threshold), new_pairs(corpus, args.threshold)
    embedded = {"documents": len(corpus), "lilliput_pairs": len(emb_old), "datatrove_pairs": len(emb_new),
                "common_pairs": len({tuple(sorted(p)) for p in emb_old} & {tuple(sorted(p)) for p in emb_new})}
    print(json.dumps(embedded), flush=True)

    docs = throughput_corpus(originals, args.docs, args.seed)
    files = []
    for k, part in enumerate((docs[::2], docs[1::2])):
        f = tmp / "in" / f"{k}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(d) + "\n" for d in part))
        files.append(f)
    s_old, kept_old = run_old(old, files, tmp / "old_out.jsonl")
    print(f"hand-written: {len(docs) / s_old:.1f} docs/s", flush=True)
    runs = {}
    for workers in (1, 2):
        s, kept, stages = run_new(files, tmp / f"new_{workers}", workers)
        runs[workers] = (s, kept, stages)
        print(f"datatrove, {workers} workers: {len(docs) / s:.1f} docs/s", flush=True)
    overlap = lambda a, b: round(len(a & b) / len(a | b), 3) if a | b else 1.0  # noqa: E731
    throughput = {
        "documents": len(docs), "files": len(files),
        "hand_written": {"seconds": round(s_old, 2), "docs_per_s": round(len(docs) / s_old, 1), "kept": len(kept_old)},
        **{f"datatrove_{w}_workers": {"seconds": round(s, 2), "docs_per_s": round(len(docs) / s, 1), "kept": len(k),
                                      "stage_seconds": st, "vs_hand_written": round(s_old / s, 3)}
           for w, (s, k, st) in runs.items()},
        "workers_2_vs_1": round(runs[1][0] / runs[2][0], 3),
        "kept_jaccard_datatrove_vs_hand_written": overlap(runs[1][1], kept_old),
        "kept_same_1_vs_2_workers": runs[1][1] == runs[2][1],
        "rules_tokenizer": rules_tokenizer(docs[:args.rule_docs])}
    print(json.dumps(throughput["rules_tokenizer"]), flush=True)
    ray = ray_vs_local(originals[:args.ray_originals], tmp, args.seed)
    print(json.dumps(ray), flush=True)
    result = run_record("bench/curate.py " + " ".join(argv), baseline_ref=ref,
                        near_dedup_precision=near["datatrove"]["precision"],
                        near_dedup_recall=near["datatrove"]["recall"], ray_equals_local=ray["equal"],
                        near_dedup=near, embedded_corpus=embedded, throughput=throughput, ray=ray,
                        versions={"datatrove": importlib.metadata.version("datatrove"),
                                  "spacy": importlib.metadata.version("spacy")})
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
