"""`lilliput shrink`: recipes, TOML files that chain shrink stages (prune -> distill -> quantize).

    name = "demo"
    [eval]
    passages = 100          # held-out LAMBADA passages for perplexity
    tasks = ["piqa"]        # zero-shot tasks, `limit` items each
    limit = 50
    [[stages]]
    kind = "prune"          # a key of STAGES
    method = "layers"       # magnitude | wanda | sparsegpt | heads | channels | layers
    sparsity = 0.2
    [[stages]]
    kind = "distill"        # heals the current model from the original (the teacher)
    max_minutes = 5
    [[stages]]
    kind = "quantize"
    method = "rtn"          # rtn | gptq | awq
    bits = 8

`recipe_model` gives a recipe's model for a script that needs one (bench/router.py's small model):
built without measuring, saved under `$LILLIPUT_CACHE/recipes` keyed by the recipe's inputs, and
loaded from there by the next run with the same inputs.

Every stage's table (less `kind`) becomes the fields of that stage's config dataclass, named as its
flags are (a distill stage's `lr` and `max_minutes` are its train config's); an unknown field is an
error naming the known ones. After the input model and after every stage the job
records held-out perplexity, task accuracy, weight bytes in memory and parameters (through
`lilliput.eval.efficiency`, the one measurement module). Decode speed is measured once, at the
end, for the input and the result side by side (`decode_speeds`: interleaved repeats), so a
machine whose speed drifts during a long recipe cannot flatter or wrong either one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lilliput
from lilliput.compress.quantize import METHODS, quantize_
from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.options import config_from_flags, flag_names
from lilliput.core.record import read_json, run_record
from lilliput.data.ledger import model_fingerprint, sha256_text
from lilliput.core.registry import Registry
from lilliput.eval.bench import model_label
from lilliput.eval.efficiency import DECODE_ONLY, decode_speeds, model_bytes, parameter_count
from lilliput.eval.perplexity import HELDOUT, HeldoutConfig, heldout
from lilliput.eval.report import MB, markdown_table, shrink_stage_table
from lilliput.eval.task_sets import lambada_passages
from lilliput.eval.tasks import TaskConfig, evaluate_tasks
from lilliput.jobs.prune import PruneJob, prune
from lilliput.jobs.quantize import method_label
from lilliput.train.data import default_documents
from lilliput.train.distill import DistillConfig, distill

STAGES: Registry[Callable] = Registry("recipe stage")
"""Stage kind -> fn(model, tokenizer, teacher, table) -> (model, label of what it did)."""


@dataclass(frozen=True)
class EvalSpec:
    passages: int = HELDOUT.passages
    """Held-out LAMBADA passages scored for perplexity after every stage."""
    window: int = HELDOUT.window
    """Perplexity window."""
    tasks: tuple[str, ...] = ("piqa",)
    """Zero-shot tasks scored after every stage."""
    limit: int = 50
    """Items per task."""
    decode_tokens: int = 64
    """Tokens generated (greedy, batch 1) to time decoding of the input and the result."""
    decode_repeats: int = 5
    """Interleaved timed rounds of the input and the result (after one warm-up round)."""

    @property
    def heldout(self) -> HeldoutConfig:
        return HeldoutConfig(passages=self.passages, window=self.window)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[dict[str, Any], ...]
    eval: EvalSpec = EvalSpec()
    description: str = ""


def build_config(cls: type, table: dict[str, Any], what: str):
    """A config dataclass from a TOML table, keyed as its flags are (`lr` sets a nested train.lr) or by
    its own fields: nested dataclasses and tuples converted, unknown keys refused."""
    known = flag_names(cls)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known: {known}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in table.items():
        if key in hints and dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = build_config(hints[key], value, f"{what}.{key}")
        kw[key] = value
    try:
        return config_from_flags(cls, kw)
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML ({e})") from None
    stages = data.pop("stages", None)
    if not stages:
        raise ValueError(f"{path} has no [[stages]]")
    for i, st in enumerate(stages):
        if st.get("kind") not in STAGES:
            raise ValueError(f"{path}: stage {i + 1} has kind {st.get('kind')!r}; known: {', '.join(map(str, STAGES.keys()))}")
    spec = build_config(EvalSpec, data.pop("eval", {}), f"{path} [eval]")
    name = data.pop("name", path.stem)
    description = data.pop("description", "")
    if data:
        raise ValueError(f"{path}: unknown top-level keys {sorted(data)}; known: name, description, eval, stages")
    return Recipe(name=name, stages=tuple(stages), eval=spec, description=description)


# --- stages: (model, tokenizer, teacher, table) -> (model, label) ---------------------------------

@STAGES.register("prune")
def _prune(model, tok, teacher, table):
    job = build_config(PruneJob, table, "prune stage")
    return prune(model, tok, job), job.label()


@STAGES.register("distill")
def _distill(model, tok, teacher, table):
    cfg = build_config(DistillConfig, table, "distill stage")
    return distill(teacher, model, tok, cfg), f"distilled ({cfg.loss}, {cfg.mode})"


@STAGES.register("quantize")
def _quantize(model, tok, teacher, table):
    table = dict(table)
    method = table.pop("method", "rtn")
    if method not in METHODS:
        raise ValueError(f"quantize stage: unknown method {method!r}; known: {', '.join(METHODS)}")
    cfg = build_config(METHODS[method], table, f"quantize stage ({method})")
    return quantize_(model, cfg, tokenizer=tok), method_label(cfg)


# --- measuring ----------------------------------------------------------------------------------

def measure(model, tok, spec: EvalSpec) -> dict[str, Any]:
    """Quality and size of one stage's model: held-out perplexity, task accuracy, bytes, parameters."""
    model.eval()
    tasks = evaluate_tasks(model, tok, TaskConfig(tasks=spec.tasks, limit=spec.limit)) if spec.tasks else {}
    return {"perplexity": round(heldout(model, tok, spec.heldout)["perplexity"], 4),
            "tasks": {k: round(v["acc"], 4) for k, v in tasks.items()},
            "bytes": model_bytes(model), "parameters": parameter_count(model)}


def time_decode(models: dict[str, tuple], tok, spec: EvalSpec) -> dict[str, dict]:
    """Decode tokens/s of each (model, tokenizer), interleaved: {name: spread}."""
    prompt = tok.encode(lambada_passages(1)[0])[:32]
    return decode_speeds(models, prompt, spec.decode_tokens, repeats=spec.decode_repeats)


# --- the job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShrinkJob:
    model: str | None = None
    """The model to shrink: a .gguf file, a model folder or a hub id; the embedded SmolLM2 when omitted."""
    recipe: str = "demo"
    """A recipe TOML file, or the name of one shipped in lilliput/recipes (demo)."""
    out: str = "runs/shrink"
    """Output folder: the shrunk model (loads with --model), its model card and run.json."""


def resolve_recipe(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    shipped = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.toml"
    if not shipped.is_file():
        known = sorted(p.stem for p in shipped.parent.glob("*.toml"))
        raise FileNotFoundError(f"recipe {name!r} not found: give a .toml path or one of {', '.join(known)}")
    return shipped


def run_stages(recipe: Recipe, model, tok, teacher) -> Iterator[tuple[str, dict, str, float, Any]]:
    """Every stage of the recipe in order, nothing measured: yields (stage name, its settings, what it
    did, seconds, the model after it)."""
    for i, table in enumerate(recipe.stages):
        table = dict(table)
        kind = table.pop("kind")
        stage = f"{i + 1}. {kind}" + (f" {table['method']}" if "method" in table else "")
        t0 = time.perf_counter()
        model, did = STAGES[kind](model, tok, teacher, table)
        yield stage, table, did, time.perf_counter() - t0, model


def run_shrink(job: ShrinkJob, log: Callable[[str], None] = print) -> Path:
    """Run every stage of the recipe on the model, measuring after each; time decoding of the input
    and the result side by side; save the result."""
    recipe = load_recipe(resolve_recipe(job.recipe))  # a bad recipe fails before any work
    t_start = time.perf_counter()
    labels = [model_label(job.model)]
    model, tok = load_model(job.model, device="cpu")
    teacher = copy.deepcopy(model).eval()  # the input, kept: distillation's teacher and the speed baseline
    rows = [{"stage": "input", "seconds": 0.0, **measure(model, tok, recipe.eval)}]
    log(_row_line(rows[-1]))
    for stage, table, did, seconds, model in run_stages(recipe, model, tok, teacher):
        labels.append(did)
        rows.append({"stage": stage, "seconds": round(seconds, 1), "settings": table, **measure(model, tok, recipe.eval)})
        log(_row_line(rows[-1]))
    speed = time_decode({"input": (teacher, tok), "result": (model.eval(), tok)}, tok, recipe.eval)
    rows[0]["decode_tok_s"] = round(speed["input"]["median"], 2)
    rows[-1]["decode_tok_s"] = round(speed["result"]["median"], 2)
    log(f"{DECODE_ONLY}, batch 1, interleaved: input {_spread_text(speed['input'])}, result {_spread_text(speed['result'])}")
    record = run_record("lilliput shrink", label=" + ".join(labels), job=dataclasses.asdict(job),
                        recipe=dataclasses.asdict(recipe), heldout=dataclasses.asdict(recipe.eval.heldout),
                        stages=rows, decode={**speed, "prompt_tokens": 32, "new_tokens": recipe.eval.decode_tokens,
                                             "how": f"{DECODE_ONLY}, greedy, batch 1; input and result timed in alternation "
                                                    "(one warm-up round), median [min-max]"},
                        seconds=round(time.perf_counter() - t_start, 1))
    out = save_checkpoint(model, tok, job.out, record)
    (out / "README.md").write_text(model_card(recipe, rows, job))
    return out


# --- a recipe's model, built once per inputs ------------------------------------------------------

def recipe_cache_dir() -> Path:
    """`$LILLIPUT_CACHE/recipes`, else `~/.cache/lilliput/recipes`."""
    root = os.environ.get("LILLIPUT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lilliput") / "recipes"


def recipe_inputs(recipe_path: Path, model, model_spec: str | None) -> dict[str, Any]:
    """What a recipe's result depends on besides lilliput's code: the recipe file, the input model's
    weights, the corpus that calibration and healing draw from (the fetched one when present), the
    lilliput version. Seeds are in the recipe (a quantize stage's calibration.seed, ...)."""
    corpus = hashlib.sha256()
    for doc in default_documents(True):
        corpus.update(f"{doc.id}:{sha256_text(doc.text)}\n".encode())
    return {"recipe_sha256": hashlib.sha256(recipe_path.read_bytes()).hexdigest(),
            "model": model_label(model_spec), "model_fingerprint": model_fingerprint(model),
            "corpus_sha256": corpus.hexdigest(), "lilliput": lilliput.__version__}


def recipe_model(recipe: str, model: str | None = None, cache: Path | None = None, rebuild: bool = False,
                 log: Callable[[str], None] = print):
    """(model, tokenizer, provenance) of `recipe` (a shipped name or a TOML file) run on `model` (the
    embedded SmolLM2 when None): from `cache` (default `recipe_cache_dir()`) when a build from the same
    inputs is there, else built (every stage, nothing measured), saved there and loaded back, so a fresh
    build and a cached one are the same object. `provenance` says which, and what the key covers; the
    key does not cover lilliput's code (`rebuild` after changing a method: `built_by` names the commit)."""
    path = resolve_recipe(recipe)
    spec = load_recipe(path)
    base, tok = load_model(model, device="cpu")
    inputs = recipe_inputs(path, base, model)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache or recipe_cache_dir()) / f"{spec.name}-{key}"
    built = rebuild or not (folder / "run.json").is_file()
    if built:
        log(f"building {spec.name} ({len(spec.stages)} stages) into {folder}")
        teacher = copy.deepcopy(base).eval() if any(st["kind"] == "distill" for st in spec.stages) else None
        t0, labels, out = time.perf_counter(), [model_label(model)], base
        for stage, _table, did, seconds, out in run_stages(spec, base, tok, teacher):
            labels.append(did)
            log(f"  {stage}: {did} ({seconds:.0f} s)")
        save_checkpoint(out, tok, folder, run_record(
            "lilliput.jobs.shrink.recipe_model", label=" + ".join(labels), recipe=dataclasses.asdict(spec),
            recipe_file=str(path), inputs=inputs, key=key, seconds=round(time.perf_counter() - t0, 1)))
        del out, base, teacher
    else:
        del base
    record = read_json(folder / "run.json", "a recipe build's record")
    small, tok = load_model(folder, device="cpu")
    root = Path(lilliput.__file__).resolve().parents[1]
    shown = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
    return small, tok, {"recipe": spec.name, "recipe_file": str(shown), "stages": [dict(st) for st in spec.stages],
                        "label": record["label"], "inputs": inputs, "key": key, "path": str(folder),
                        "built_in_this_run": built, "build_seconds": record["seconds"],
                        "built_by": {k: record.get(k) for k in ("git_sha", "git_dirty", "created")}}


def _spread_text(s: dict) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def _row_line(r: dict) -> str:
    tasks = " ".join(f"{k} {v:.3f}" for k, v in r["tasks"].items())
    return (f"{r['stage']:<22} ppl {r['perplexity']:8.3f}  {tasks}  {r['bytes'] / MB:7.1f} MB  "
            f"{r['parameters'] / 1e6:6.1f}M params  ({r['seconds']:.0f} s)")


def model_card(recipe: Recipe, rows: list[dict], job: ShrinkJob) -> str:
    first, last = rows[0], rows[-1]
    return (f"# {recipe.name}: shrunk with lilliput\n\n{recipe.description}\n\n"
            f"Source model: {job.model or 'embedded SmolLM2-135M-Instruct (Q4_1 GGUF)'}; recipe: `{job.recipe}`.\n\n"
            f"## Every stage, measured\n\n{markdown_table(*shrink_stage_table([(recipe.name, {'stages': rows})]))}\n\n"
            f"Perplexity: {recipe.eval.passages} held-out LAMBADA passages (window {recipe.eval.window}); tasks: "
            f"zero-shot, first {recipe.eval.limit} items; size: weights in memory; {DECODE_ONLY}: greedy, batch 1, "
            f"{recipe.eval.decode_tokens} tokens, input and result timed in alternation, median of "
            f"{recipe.eval.decode_repeats}, on the machine in run.json.\n\n"
            f"## Price and gain\n\nSize {first['bytes'] / MB:.1f} -> {last['bytes'] / MB:.1f} MB (weights in memory), {DECODE_ONLY} "
            f"{first['decode_tok_s']:.1f} -> {last['decode_tok_s']:.1f} tok/s, perplexity {first['perplexity']:.2f} -> "
            f"{last['perplexity']:.2f}.\n\nLoad it with `lilliput generate PROMPT --model <this folder>`.\n")
