"""The data-honesty commands: the provenance ledger (data ls | stats | add | export | ledger merge),
watermark detection and curation."""

from __future__ import annotations

import argparse
import json
import sys

from lilliput.cli.flags import Parser, load, model_args, read_text
from lilliput.core.options import add_config_args, config_from_args


# --- the provenance ledger: lilliput data ls | stats | add | export ---------------------------------

def cmd_data_ls(ns) -> int:
    from lilliput.data.ledger import Ledger

    with Ledger.open(ns.ledger, create=False) as ledger:
        rows = ledger.documents(origin=ns.origin, generation=ns.generation, limit=ns.limit)
    for r in rows:
        if ns.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['id']:<44} {r['origin']:<9} g{r['generation']}  {r['bytes']:>10,} B  {r['licence'][:40]}")
    return 0


def cmd_data_stats(ns) -> int:
    from lilliput.data.ledger import Ledger

    with Ledger.open(ns.ledger, create=False) as ledger:
        stats = ledger.stats()
    if ns.json:
        print(json.dumps(stats))
        return 0
    print(f"{stats['documents']} documents in {stats['ledger']}")
    for g in stats["by_generation"]:
        print(f"  {g['origin']:<9} generation {g['generation']}: {g['documents']} documents, {g['bytes']:,} bytes")
    for f in stats["removed_by_filter"]:
        print(f"  removed by {f['filter']}: {f['documents']} documents")
    return 0


def cmd_data_add(ns) -> int:
    from lilliput.data.ledger import Entry, Generator, Ledger

    generator = None
    if ns.generator:
        try:
            generator = Generator(**json.loads(ns.generator))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--generator must be a JSON object with model, sampling, seed, "
                             f"watermark_key_id ({e})") from None
    entries = [Entry(text=sys.stdin.read() if f == "-" else read_text(f), source=ns.source, licence=ns.licence,
                     file="" if f == "-" else f, origin=ns.origin, generator=generator,
                     generation=ns.generation if ns.generation is not None else int(ns.origin == "synthetic"),
                     parents=tuple(ns.parent or ())) for f in ns.files]
    with Ledger.open(ns.ledger) as ledger:
        for doc_id in ledger.add_many(entries):
            print(doc_id)
    return 0


def cmd_data_export(ns) -> int:
    from lilliput.data.ledger import Ledger, SelectionConfig

    with Ledger.open(ns.ledger, create=False) as ledger:
        sel = ledger.export(ns.out, config_from_args(SelectionConfig, ns))
    print(json.dumps({"out": ns.out, **sel.record()}))
    return 0


def ledger_arg(p: argparse.ArgumentParser) -> None:
    from lilliput.data.ledger import default_ledger_path

    p.add_argument("--ledger", default=str(default_ledger_path()), help="the provenance ledger file "
                   "(default: $LILLIPUT_CACHE/ledger.sqlite or ~/.cache/lilliput/ledger.sqlite)")


def _add_ledger_parsers(data) -> None:
    from lilliput.data.ledger import ORIGINS, SelectionConfig

    p = data.add_parser("ls", help="list the ledger's documents")
    ledger_arg(p)
    p.add_argument("--origin", choices=ORIGINS, help="only human or only synthetic documents")
    p.add_argument("--generation", type=int, help="only this generation")
    p.add_argument("--limit", type=int, help="at most N documents")
    p.add_argument("--json", action="store_true", help="one JSON object per document")
    p.set_defaults(func=cmd_data_ls)
    p = data.add_parser("stats", help="documents by origin and generation, curation removals by filter")
    ledger_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("add", help="record text files (or - for stdin) in the ledger")
    p.add_argument("files", nargs="+")
    ledger_arg(p)
    p.add_argument("--source", default="", help="where the text comes from")
    p.add_argument("--licence", default="", help="its licence")
    p.add_argument("--origin", choices=ORIGINS, default="human")
    p.add_argument("--generator", help='synthetic text: JSON {"model", "sampling", "seed", "watermark_key_id"}')
    p.add_argument("--generation", type=int, help="0 for human text (default), >= 1 for synthetic (default 1)")
    p.add_argument("--parent", action="append", help="id of a document this one was generated from (repeat)")
    p.set_defaults(func=cmd_data_add)
    p = data.add_parser("export", help="write a training set chosen by policy as JSON lines; print its digest")
    p.add_argument("out", help="output .jsonl file")
    ledger_arg(p)
    add_config_args(p, SelectionConfig)
    p.set_defaults(func=cmd_data_export)


# --- watermark detection: lilliput watermark detect FILE|- --key KEY -----------------------------------

def cmd_watermark_detect(ns) -> int:
    from lilliput.data.watermark import Detector, WatermarkConfig

    text = sys.stdin.read() if ns.file == "-" else read_text(ns.file)
    _, tok = load(ns)  # the tokenizer only matters, but it comes with its model
    result = Detector(ns.key, config_from_args(WatermarkConfig, ns)).detect_text(text, tok)
    if ns.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.verdict}: z {result.z:.2f} (threshold {result.z_threshold}, false-positive rate "
              f"{result.fpr:.1e}), p {result.p_value:.3e}, {result.green}/{result.tokens_scored} green tokens "
              f"({result.green_fraction:.1%}, {result.tokens - result.tokens_scored} not scored)")
    return 0


def _add_watermark_parser(sub) -> None:
    from lilliput.data.watermark import WatermarkConfig

    wm = sub.add_parser("watermark", help="detect watermarked text").add_subparsers(
        dest="what", required=True, parser_class=Parser, metavar="ACTION")
    p = wm.add_parser("detect", help="z-score and exact p-value of a text's green tokens")
    p.add_argument("file", help="text file, or - for stdin")
    p.add_argument("--key", required=True, help="the secret key the text was generated with")
    model_args(p)
    add_config_args(p, WatermarkConfig, skip=("delta",))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_watermark_detect)


# --- curation: lilliput curate --input ... --output DIR ---------------------------------------------

def cmd_curate(ns) -> int:
    from lilliput.core.checkpoint import LoadConfig
    from lilliput.data.curate import CurateConfig
    from lilliput.jobs.curate import run_curate

    result, merged = run_curate(ns.input, ns.output, config_from_args(CurateConfig, ns),
                                config_from_args(LoadConfig, ns), ledger=ns.ledger, batch_size=ns.batch_size)
    if result.submitted:
        print(f"submitted; when the jobs end: lilliput data ledger merge {result.shards} --ledger LEDGER")
        return 0
    summary = {"input": ns.input, "output": ns.output, **result.summary(), "shards": str(result.shards),
               "ledger": ns.ledger, "merged": merged}
    if ns.json:
        print(json.dumps(summary))
        return 0
    print(f"kept {summary['kept']} of {summary['documents']} documents -> {ns.output} ({summary['seconds']} s)")
    for name, n in summary["removed_by_filter"].items():
        print(f"  removed by {name}: {n}")
    for name, n in summary["tagged_by_filter"].items():
        print(f"  tagged by {name}: {n}")
    print(f"ledger: {ns.ledger} ({merged['decisions']} decisions)" if merged else
          f"ledger shards: {result.shards} (lilliput data ledger merge {result.shards} --ledger LEDGER)")
    return 0


def _add_curate_parser(sub) -> None:
    from lilliput.data.curate import CurateConfig

    p = sub.add_parser("curate", help="a datatrove pipeline: dedup (exact, MinHash), C4, Gopher and FineWeb rules, "
                       "watermark and perplexity filters; local, Slurm or Ray")
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="JSON-lines or Parquet files ({id, text, ...}), or folders of them")
    p.add_argument("--output", required=True, help="folder for the kept documents: one JSON-lines shard per task")
    p.add_argument("--ledger", help="merge every verdict (kept or removed, with its reason) into this ledger")
    model_args(p)
    add_config_args(p, CurateConfig)
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass of the perplexity model")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_curate)


# --- ledger shards: lilliput data ledger merge SHARDS... --ledger L -----------------------------------

def cmd_ledger_merge(ns) -> int:
    from lilliput.data.ledger import Ledger
    from lilliput.data.ledger_shards import merge

    with Ledger.open(ns.ledger) as ledger:
        summary = merge(ns.shards, ledger)
    if ns.json:
        print(json.dumps({"ledger": ns.ledger, **summary}))
    else:
        print(f"merged {summary['shards']} shards into {ns.ledger}: {summary['documents']} documents, "
              f"{summary['decisions']} decisions")
    return 0


def _add_ledger_merge_parser(data) -> None:
    led = data.add_parser("ledger", help="ledger shards").add_subparsers(
        dest="ledger_action", required=True, parser_class=Parser, metavar="ACTION")
    p = led.add_parser("merge", help="fold ledger shards (one per pipeline task) into one ledger")
    p.add_argument("shards", nargs="+", help="shard files, or folders of them (a curate run's <output>.work/ledger)")
    ledger_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ledger_merge)


def add_data_parsers(sub, data) -> None:
    """`data ls|stats|add|export|ledger merge` under `data`, and `watermark` and `curate` under the top level."""
    _add_ledger_parsers(data)
    _add_ledger_merge_parser(data)
    _add_watermark_parser(sub)
    _add_curate_parser(sub)
