"""`lilliput arena`: dense attention, MoE, Mamba, xLSTM and a hybrid trained and measured at equal budget."""

from __future__ import annotations

from lilliput.core.options import add_config_args, config_from_args


def cmd_arena(ns) -> int:
    from lilliput.jobs.arena import ArenaJob, quick_job, run_arena

    job = config_from_args(ArenaJob, ns, base=quick_job() if ns.quick else None)
    print(run_arena(job, command="lilliput arena" + (" --quick" if job.quick else "")))
    return 0


def add_arena_parsers(sub) -> None:
    from lilliput.jobs.arena import ArenaJob

    p = sub.add_parser("arena", help="train dense, MoE, Mamba, xLSTM and a hybrid at equal budget; compare "
                                     "perplexity, decode cost vs context and associative recall")
    add_config_args(p, ArenaJob)
    p.set_defaults(func=cmd_arena)
