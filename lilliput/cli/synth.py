"""`lilliput synth`: textbook-style synthetic documents from a teacher, curated and recorded in the ledger."""

from __future__ import annotations

from lilliput.core.options import add_config_args, config_from_args


def cmd_synth(ns) -> int:
    from lilliput.jobs.synth import DOCUMENTS_FILE, SynthJob, run_synth

    out = run_synth(config_from_args(SynthJob, ns))
    print(f"wrote {out / DOCUMENTS_FILE} and {out / 'run.json'}")
    return 0


def add_synth_parsers(sub) -> None:
    from lilliput.jobs.synth import SynthJob

    p = sub.add_parser("synth", help="a teacher writes textbook-style documents on topics (curated, in the ledger)")
    add_config_args(p, SynthJob)
    p.set_defaults(func=cmd_synth)
