"""The report a user reads to choose a model: one self-contained HTML page, a markdown table, PNGs.

`make_report(ReportConfig(runs=(...), out=...))` reads bench records (`bench.json`, from
`lilliput bench`), run records of shrink stages (`run.json` beside a checkpoint) and peer
comparisons (`bench/results/*.json` with `rows`, e.g. vs_llamacpp.json), and writes
`report.html` (inline CSS, plots as base64 PNG, nothing fetched from the network), `report.md`
and the plots `quality_vs_speed.png` and `quality_vs_size.png` with their Pareto fronts.

One basis per quantity on a page: models are labelled by what they are (base + method, from
their run.json), sizes are weights in memory (size on disk beside it: a GGUF's 4-bit file is
dequantized to float when lilliput loads it), each perplexity column names its held-out text
and window (a note says so when two settings share a page), and a peer comparison from a
committed file says when and on which machine it was measured.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lilliput.eval.efficiency import DECODE_ONLY, END_TO_END

MB = 1e6
NUMERIC = re.compile(r"^[-+\d.,e\[\] ()]*$")


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...] = ()
    """bench.json / run.json / peer JSON files, or folders holding bench.json or run.json."""
    out: str = "report"
    """Output folder for report.html, report.md and the PNGs."""
    title: str = "lilliput report"
    """Title of the page."""


# --- pure parts ------------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]], maximize_x: bool, maximize_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties kept), sorted by x."""
    sx, sy = (1 if maximize_x else -1), (1 if maximize_y else -1)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(sx * a >= sx * x and sy * b >= sy * y and (a, b) != (x, y) for a, b in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _get(d: Any, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def model_row(m: dict) -> dict[str, Any]:
    """The flat figures of one bench model record (None where not measured)."""
    tp = m.get("throughput") or {}
    disk = m["size_on_disk_bytes"] / MB if m.get("size_on_disk_bytes") else None
    weights = _get(m, "memory", "weights_bytes")
    if weights is None and m.get("engine") == "llama.cpp":
        weights = m.get("size_on_disk_bytes")  # llama.cpp maps the GGUF's tensors as they are on disk
    return {
        "model": m.get("label") or str(m.get("spec")),
        "engine": m.get("engine", "lilliput"),
        "perplexity": _get(m, "perplexity", "perplexity"),
        "task_acc": m.get("task_accuracy_mean"),
        "size_mb": weights / MB if weights else None,
        "disk_mb": disk,
        "parameters": m.get("parameters"),
        "rss_load_mb": _get(m, "memory", "rss_at_load_bytes", default=0) / MB or None,
        "peak_mb": _get(m, "memory", "peak_generation_bytes", default=0) / MB or None,
        "ttft_ms": {n: s["median"] * 1e3 for n, s in (m.get("ttft_s") or {}).items()},
        "itl_ms": _get(m, "inter_token_latency_s", "median", default=0) * 1e3 or None,
        "itl_p90_ms": _get(m, "inter_token_latency_s", "p90", default=0) * 1e3 or None,
        # two speeds, two names (lilliput.eval.efficiency); records before the rename said tokens_per_s
        # (end to end) and decode_tokens_per_s
        "tok_s": {b: r.get("end_to_end_tok_s") or r["tokens_per_s"] for b, r in tp.items()},
        "decode_tok_s": {b: r.get("decode_tok_s") or r.get("decode_tokens_per_s") for b, r in tp.items()
                         if r.get("decode_tok_s") or r.get("decode_tokens_per_s")},
        "j_per_token": _get(tp, "1", "joules_per_token", "median"),
        "skipped": m.get("skipped"),
        "notes": m.get("notes") or [],
    }


def load_runs(runs: Sequence[str]) -> dict[str, list]:
    """{"bench": [records], "stages": [(name, record)], "peers": [(name, record)]} from paths."""
    if not runs:
        raise ValueError("no runs given: pass bench output folders or JSON files (e.g. bench/bench.json)")
    found: dict[str, list] = {"bench": [], "stages": [], "peers": []}
    for run in runs:
        path = Path(run)
        if path.is_dir():
            files = [p for p in (path / "bench.json", path / "run.json") if p.is_file()]
            if not files:
                raise FileNotFoundError(f"{path} holds no bench.json or run.json: pass a `lilliput bench --out` "
                                        f"folder or a checkpoint folder")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"run {run!r} does not exist: pass a bench.json, a run.json or their folder")
        for f in files:
            try:
                record = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} is not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{f} is not a lilliput record (a JSON object)")
            name = f.parent.name if f.name in ("run.json", "bench.json") else f.stem
            if "models" in record:
                found["bench"].append(record)
            elif "rows" in record:
                found["peers"].append((name, record))
            else:
                found["stages"].append((name, record))
    return found


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, dict) and {"median", "min", "max"} <= set(v):
        return f"{_fmt(v['median'])} [{_fmt(v['min'])}-{_fmt(v['max'])}]"
    return str(v)


def model_table(rows: list[dict], ppl_head: str = "perplexity") -> tuple[list[str], list[list[str]]]:
    """Header and cells of the every-model table (same content in HTML and markdown)."""
    lengths = sorted({n for r in rows for n in r["ttft_ms"]}, key=int)
    batches = sorted({b for r in rows for b in r["tok_s"]}, key=int)
    head = (["model", "engine", ppl_head, "task acc", "weights MB (memory)", "disk MB", "parameters",
             "RSS load MB", "peak MB"]
            + [f"TTFT {n} ms" for n in lengths] + ["ITL ms (p90)"]
            + [f"{DECODE_ONLY} b{b} [min-max]" for b in batches]
            + [f"{END_TO_END} b{b} [min-max]" for b in batches] + ["J/token b1"])
    cells = []
    for r in rows:
        if r["skipped"]:
            cells.append([r["model"], r["engine"], "skipped: " + r["skipped"]] + [""] * (len(head) - 3))
            continue
        itl = f"{_fmt(r['itl_ms'])} ({_fmt(r['itl_p90_ms'])})" if r["itl_ms"] else "-"
        params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "-"
        cells.append([r["model"], r["engine"], _fmt(r["perplexity"], 4), _fmt(r["task_acc"]), _fmt(r["size_mb"]),
                      _fmt(r["disk_mb"]), params, _fmt(r["rss_load_mb"]), _fmt(r["peak_mb"])]
                     + [_fmt(r["ttft_ms"].get(n)) for n in lengths] + [itl]
                     + [_fmt(r["decode_tok_s"].get(b)) for b in batches]
                     + [_fmt(r["tok_s"].get(b)) for b in batches] + [_fmt(r["j_per_token"])])
    return head, cells


def _scalars(d: dict, prefix: str = "", depth: int = 2) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
        elif isinstance(v, dict) and depth > 1:
            out.update(_scalars(v, f"{prefix}{k}.", depth - 1))
    return out


def stage_table(stages: list[tuple[str, dict]], ppl_head: str = "perplexity") -> tuple[list[str], list[list[str]]]:
    """One row per stage of a `lilliput shrink` run.json (its "stages" list), else one row per record."""
    if stages and all(isinstance(rec.get("stages"), list) for _, rec in stages):
        return shrink_stage_table(stages, ppl_head)
    head = ["stage", "command", "metrics"]
    cells = []
    for name, rec in stages:
        metrics = _scalars(rec.get("metrics") or {k: v for k, v in rec.items()
                                                   if k not in ("machine", "command", "created", "git_sha", "lilliput")})
        cells.append([name, str(rec.get("command", "-")), ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())])
    return head, cells


def shrink_stage_table(runs: list[tuple[str, dict]], ppl_head: str = "perplexity") -> tuple[list[str], list[list[str]]]:
    """Stages of shrink runs: perplexity, task accuracy, size, parameters and decode-only speed, each
    with its ratio to the run's input. The one stage table: the report, `lilliput shrink`'s model card
    and `make demo` print it."""
    tasks = sorted({t for _, rec in runs for st in rec["stages"] for t in st.get("tasks", {})})
    head = ["run", "stage", ppl_head, *(f"{t} acc" for t in tasks), "weights MB (memory)", "parameters",
            f"{DECODE_ONLY} b1", "seconds"]
    cells = []
    for name, rec in runs:
        recipe = rec.get("recipe")
        name = rec.get("label") or (recipe.get("name", name) if isinstance(recipe, dict) else name)
        base = rec["stages"][0]
        for st in rec["stages"]:
            def rel(key: str, scale: float = 1.0) -> str:
                v, b0 = st.get(key), base.get(key)
                return "-" if v is None else f"{v / scale:,.1f}" + (f" ({v / b0:.2f}x)" if b0 else "")
            cells.append([name, str(st.get("stage")), rel("perplexity"),
                          *(_fmt(st.get("tasks", {}).get(t)) for t in tasks), rel("bytes", MB),
                          f"{st['parameters'] / 1e6:.1f}M" if st.get("parameters") else "-", rel("decode_tok_s"),
                          _fmt(st.get("seconds"))])
    return head, cells


def heldout_settings(found: dict[str, list]) -> dict[str, set[tuple]]:
    """{"bench": {(passages, window)}, "stages": {...}}: the held-out settings behind the page's perplexities."""
    bench = {(_get(rec, "config", "passages"), _get(rec, "config", "ppl_window"))
             for rec in found["bench"] if _get(rec, "config", "passages")}
    stages = set()
    for _, rec in found["stages"]:
        h = rec.get("heldout") or _get(rec, "recipe", "eval") or _get(rec, "metrics", "heldout")
        if isinstance(h, dict) and h.get("passages"):
            stages.add((h["passages"], h.get("window")))
    return {"bench": bench, "stages": stages}


def heldout_text(settings: set[tuple]) -> str:
    """" (100 LAMBADA passages, window 512)" for one setting; "" when there is none or several."""
    if len(settings) != 1:
        return ""
    passages, window = next(iter(settings))
    return f" ({passages} LAMBADA passages, window {window})"


def peer_provenance(rec: dict, here: dict | None) -> tuple[str, bool]:
    """(one sentence on when and where a committed peer comparison was measured, same machine?)."""
    m = rec.get("machine") or {}
    where = f"{m.get('cpu', 'an unrecorded CPU')}, {m.get('cores', '?')} cores"
    same = bool(here) and (m.get("cpu"), m.get("cores")) == (here.get("cpu"), here.get("cores"))
    text = (f"Not measured in this run: a result file written by `{rec.get('command', '?')}` on "
            f"{str(rec.get('created', 'an unrecorded date'))[:10]} (git {str(rec.get('git_sha') or '?')[:10]}), on {where}.")
    if not same:
        text += (" That is not this machine" + (f" ({here.get('cpu')}, {here.get('cores')} cores)" if here else "")
                 + ": compare its ratios, which it measured within its own run, not its absolute figures with "
                   "the tables above.")
    return text, same


def peer_tables(peers: list[tuple[str, dict]]) -> list[tuple[str, list[str], list[list[str]], dict]]:
    """(name, header, cells, headline ratios) of each peer comparison's `rows`."""
    out = []
    for name, rec in peers:
        rows = rec["rows"]
        head = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_fmt(r.get(k)) for k in head] for r in rows]
        ratios = {k: v for k, v in rec.items() if "_vs_" in k or k.startswith("limit")}
        out.append((name, head, cells, ratios))
    return out


# --- rendering --------------------------------------------------------------------------------------

def plot_front(rows: list[dict], x_key: str, x_label: str, maximize_x: bool, path: Path) -> Path | None:
    """Perplexity against x with the Pareto front drawn; None when fewer than one point has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r[x_key], r["perplexity"], r["model"]) for r in rows
           if r.get(x_key) is not None and r.get("perplexity") is not None]
    if not pts:
        return None
    front = pareto_front([(x, y) for x, y, _ in pts], maximize_x=maximize_x, maximize_y=False)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#8aa1b4", zorder=2, label="model")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="#d1495b", zorder=3,
            label="Pareto front")
    for x, y, label in pts:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(x=0.2, y=0.2)  # room for the labels of the extreme points
    xs = [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # a wide range: equal ratios get equal room
        ax.set_xscale("log")
    ax.set_xlabel(x_label + (" (higher is better)" if maximize_x else " (lower is better)"))
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(head: list[str], cells: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in cells]
    return "\n".join(lines)


def html_table(head: list[str], cells: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    cell = lambda c: f"<td>{html.escape(c)}</td>" if NUMERIC.match(c) else f'<td class="t">{html.escape(c)}</td>'  # noqa: E731
    trs = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in cells)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde2e8;padding-bottom:4px}
.meta{color:#5b6b7b;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots figure{margin:0;background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:8px}
.plots img{width:520px;max-width:100%;display:block}
.scroll{overflow-x:auto;background:#fff;border:1px solid #dde2e8;border-radius:6px}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{padding:5px 9px;border-bottom:1px solid #edf0f3;text-align:right;white-space:nowrap}
th{background:#eef2f6;position:sticky;top:0} td:first-child,th:first-child,td:nth-child(2){text-align:left}
tbody tr:hover{background:#f3f8fd} td.t{text-align:left}
.note{background:#fff8e6;border:1px solid #f1dca7;border-radius:6px;padding:8px 12px;font-size:12.5px}
.kpi{display:inline-block;background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:6px 12px;margin:0 8px 8px 0}
.kpi b{font-size:18px;display:block}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def page_tables(found: dict[str, list]) -> tuple[list[dict], tuple, tuple]:
    """(model rows, the every-model table, the stage table) of loaded runs: what the page shows and what
    `make demo` prints, so the two show the same figures under the same labels."""
    rows = [model_row(m) for rec in found["bench"] for m in rec["models"]]
    for r in rows:  # the plot's speed is the engine's, decode-only, as the shrink stages measure it
        r["decode_tok_s_b1"] = _get(r["decode_tok_s"], "1", "median")
    settings = heldout_settings(found)
    models = model_table(rows, "perplexity" + heldout_text(settings["bench"]))
    stages = stage_table(found["stages"], "perplexity" + heldout_text(settings["stages"]))
    return rows, models, stages


def summary_markdown(runs: Sequence[str]) -> str:
    """The every-model and stage tables of `runs` as markdown (the terminal's copy of the page's tables)."""
    _, models, stages = page_tables(load_runs(runs))
    return "\n\n".join(markdown_table(*t) for t in (models, stages) if t[1])


def make_report(cfg: ReportConfig) -> Path:
    """Write report.html, report.md and the Pareto PNGs into `cfg.out`; returns report.html."""
    found = load_runs(cfg.runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, (mhead, mcells), (shead, scells) = page_tables(found)
    plots = [p for p in (plot_front(rows, "decode_tok_s_b1", f"{DECODE_ONLY} at batch 1", True,
                                    out / "quality_vs_speed.png"),
                         plot_front(rows, "size_mb", "weights in memory (MB)", False, out / "quality_vs_size.png")) if p]
    settings = heldout_settings(found)
    peers = peer_tables(found["peers"])
    here = next((rec["machine"] for rec in found["bench"] if rec.get("machine")), None)
    if here is None:
        from lilliput.core.record import machine

        here = machine()
    provenance = {name: peer_provenance(rec, here) for name, rec in found["peers"]}
    mixed = len(settings["bench"] | settings["stages"]) > 1
    ppl_note = ("Perplexities on this page come from different held-out settings (passages, window): "
                + "; ".join(f"{p} passages, window {w}" for p, w in sorted(settings["bench"] | settings["stages"], key=str))
                + ". A model's figures in two tables are comparable only within one setting.") if mixed else None
    energy = {json.dumps(m.get("energy_method"), sort_keys=True): m.get("energy_method")
              for rec in found["bench"] for m in rec["models"] if m.get("energy_method")}
    notes = [f"{r['model']}: {n}" for r in rows for n in r["notes"]]
    machines = {json.dumps(rec.get("machine"), sort_keys=True): rec for rec in found["bench"]}  # peers say their own

    # markdown
    md = [f"# {cfg.title}", ""]
    if ppl_note:
        md += [ppl_note, ""]
    if rows:
        md += ["## Models", "", markdown_table(mhead, mcells), ""]
    if scells:
        md += ["## Stages", "", markdown_table(shead, scells), ""]
    for name, head, cells, ratios in peers:
        md += [f"## Peer: {name}", "", provenance[name][0], "", ", ".join(f"{k} = {_fmt(v)}" for k, v in ratios.items()), "",
               markdown_table(head, cells), ""]
    for e in energy.values():
        md += [f"Energy: {e.get('method')}" + (f", {e.get('watts_per_core')} W per busy core ({e.get('source')})"
                                                if e.get("watts_per_core") else "") + f". {e.get('note', '')}", ""]
    md += [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(md) + "\n")

    # html
    body = [f"<h1>{html.escape(cfg.title)}</h1>"]
    for rec in machines.values():
        m = rec.get("machine")
        if not m:
            continue
        body.append(f'<div class="meta">{html.escape(str(m.get("cpu", "?")))}, {m.get("cores", "?")} cores, '
                    f'torch {html.escape(str(m.get("torch", "?")))} | created {html.escape(str(rec.get("created", "?")))}'
                    f' | git {html.escape(str(rec.get("git_sha") or "?")[:10])} | <code>{html.escape(str(rec.get("command")))}</code></div>')
    if ppl_note:
        body.append(f'<p class="note">{html.escape(ppl_note)}</p>')
    if plots:
        body.append("<h2>Quality against speed and size</h2><div class='plots'>"
                    + "".join(f"<figure>{_img(p)}</figure>" for p in plots) + "</div>")
    if rows:
        body.append("<h2>Every model</h2>" + html_table(mhead, mcells))
        body.append('<p class="meta">Timings: median of repeats [min-max]; TTFT = time to first token; ITL = '
                    "gap between streamed tokens at batch 1 (median, p90); decode-only tok/s: tokens after the first over the "
                    "time after prefill, all rows together; end-to-end tok/s: every generated token over the whole "
                    "call, prefill included. "
                    "Weights MB: every parameter and buffer as held in memory (the basis of the size plot); disk MB: "
                    "the file or folder it loads from. Parameters: each logical weight once (tied or quantized).</p>")
    if scells:
        body.append("<h2>Stages</h2>" + html_table(shead, scells))
    for name, head, cells, ratios in peers:
        kpis = "".join(f'<span class="kpi"><b>{html.escape(_fmt(v))}</b>{html.escape(k)}</span>' for k, v in ratios.items())
        text, same = provenance[name]
        body.append(f"<h2>Peer: {html.escape(name)}</h2><p class=\"{'meta' if same else 'note'}\">{html.escape(text)}</p>"
                    f"<div>{kpis}</div>" + html_table(head, cells))
    if energy:
        body.append("<h2>Energy</h2>")
    for e in energy.values():
        text = f"Energy method: {e.get('method')}. {str(e.get('note', '')).rstrip('.')}."
        if e.get("watts_per_core"):
            text += f" Assumed {e['watts_per_core']} W per busy core: {e.get('source')}."
        body.append(f'<p class="note">{html.escape(text)}</p>')
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(cfg.title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><main>{"".join(body)}</main></body></html>\n')
    path = out / "report.html"
    path.write_text(page)
    return path
