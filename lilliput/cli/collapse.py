"""`lilliput collapse`: the model-collapse lab (replace vs accumulate, pure vs top-p sampling)."""

from __future__ import annotations

import json
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args


def cmd_collapse(ns) -> int:
    from lilliput.core.record import run_record, write_json
    from lilliput.jobs.collapse import QUICK, CollapseConfig, plot_collapse, run_collapse

    cfg = config_from_args(CollapseConfig, ns, base=QUICK if ns.quick else CollapseConfig())
    out = Path(ns.out)
    result = run_collapse(cfg, out, device=ns.device)
    path = write_json(out / "collapse.json", run_record("lilliput collapse", **result))
    png = plot_collapse(result, out / "collapse.png")
    if ns.json:
        print(json.dumps({k: v for k, v in result.items() if k.endswith("_ppl_growth")}))
    else:
        for k, v in result.items():
            if k.endswith("_ppl_growth"):
                print(f"{k}: {v:.3f}")
        print(f"-> {path}, {png}, ledgers under {out / 'ledgers'}")
    return 0


def add_collapse_parsers(sub) -> None:
    from lilliput.jobs.collapse import CollapseConfig

    p = sub.add_parser("collapse", help="model-collapse lab: generations trained on their predecessors' text")
    p.add_argument("--out", default="runs/collapse", help="folder for collapse.json, collapse.png and the ledgers")
    p.add_argument("--quick", action="store_true", help="tiny models on the shipped sample, in seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the headline figures as one JSON object")
    add_config_args(p, CollapseConfig)
    p.set_defaults(func=cmd_collapse)
