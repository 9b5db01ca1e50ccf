"""Textbook-style synthetic data (Gunasekar et al. 2023, "Textbooks Are All You Need"): the prompts.

Pure and model-free: which topic, kind of text (explanation, worked example, exercises with
answers ...), persona, audience, length and wording each document is asked for, all drawn
from one per-document seed, so a document's prompt is a function of (topics, run seed, index)
and diversity comes from the combinations, not from sampling temperature alone. The teacher
that answers the prompts lives in lilliput.jobs.synth.

    topics = load_topics()                         # the shipped list, ~100 short topics
    for p in textbook_prompts(topics, seed=0):     # endless: every topic once per round
        p.messages()                               # [{"role": "system", ...}, {"role": "user", ...}]
    assemble(generated_text, cut=True)             # the document: a cut-off last sentence dropped
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

TOPICS_FILE = Path(__file__).with_name("topics.txt")

PERSONAS = (
    "a patient teacher",
    "a textbook author writing for twelve-year-olds",
    "a university lecturer who loves clear examples",
    "a friendly tutor helping a student before an exam",
    "an encyclopedia editor who writes precisely",
    "a science journalist explaining ideas to the public",
    "a primary school teacher",
    "a retired professor writing a study guide",
)
AUDIENCES = (
    "twelve-year-old students",
    "high school students",
    "first-year university students",
    "adults learning the subject for the first time",
    "curious children",
    "students preparing for an exam",
)
KINDS = {
    "explanation": "Explain {topic}",
    "worked_example": "Write a worked example about {topic}, solving it step by step",
    "exercises": "Write three exercises about {topic}, each followed by its answer",
    "lesson": "Write a short textbook lesson on {topic}, with one example and one exercise with its answer",
    "question_answer": "Write a question a student might ask about {topic}, then answer it clearly",
    "analogy": "Explain {topic} with an everyday analogy, then say where the analogy stops working",
}
LENGTHS = ("in one paragraph", "in two or three short paragraphs", "in about 200 words")
TEMPLATES = (
    "{task} for {audience}, {length}.",
    "{task}. Your readers are {audience}. Write {length}, clearly and correctly.",
    "Topic: {topic}\nReaders: {audience}\nTask: {task}, {length}.",
    "{task}. Write for {audience} {length}, in plain prose without headings.",
)


@dataclass(frozen=True)
class TextbookPrompt:
    """What one synthetic document is asked to be; `messages()` is what the teacher sees."""

    topic: str
    kind: str
    """A key of KINDS: explanation, worked_example, exercises, lesson, question_answer, analogy."""
    persona: str
    audience: str
    length: str
    template: int
    """Index into TEMPLATES."""
    seed: int
    """The document's seed: it drew the fields above and seeds the teacher's sampler."""

    def system(self) -> str:
        return f"You are {self.persona}."

    def user(self) -> str:
        task = KINDS[self.kind].format(topic=self.topic)
        return TEMPLATES[self.template].format(task=task, topic=self.topic, audience=self.audience,
                                               length=self.length)

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system()}, {"role": "user", "content": self.user()}]

    def record(self) -> dict:
        """The prompt's fields and its text, for a document's metadata."""
        return {**asdict(self), "system": self.system(), "user": self.user()}


def load_topics(path: Path | str | None = None) -> list[str]:
    """Topics from a text file, one a line (blank lines and lines starting with # skipped); None: the
    shipped list. Duplicates are dropped, order kept."""
    path = Path(path) if path is not None else TOPICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"topics file {path} not found; pass a text file with one topic a line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    topics = list(dict.fromkeys(t for t in lines if t and not t.startswith("#")))
    if not topics:
        raise ValueError(f"{path} holds no topics; write one topic a line")
    return topics


def document_seed(run_seed: int, index: int) -> int:
    """The seed of document `index` of a run: a 63-bit hash, so neighbouring runs share no seeds."""
    h = hashlib.sha256(f"lilliput-textbook:{run_seed}:{index}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") >> 1


def textbook_prompt(topic: str, seed: int) -> TextbookPrompt:
    """The prompt for `topic` drawn from `seed`: the same seed always gives the same prompt."""
    rng = random.Random(seed)
    return TextbookPrompt(topic=topic, kind=rng.choice(sorted(KINDS)), persona=rng.choice(PERSONAS),
                          audience=rng.choice(AUDIENCES), length=rng.choice(LENGTHS),
                          template=rng.randrange(len(TEMPLATES)), seed=seed)


def textbook_prompts(topics: list[str], seed: int = 0, start: int = 0) -> Iterator[TextbookPrompt]:
    """Prompts for documents start, start+1, ... without end: each round covers every topic once, in
    an order shuffled per round, so any prefix of the stream spreads over the topics evenly."""
    if not topics:
        raise ValueError("no topics given; pass at least one")
    index = start
    while True:
        rnd, pos = divmod(index, len(topics))
        order = list(range(len(topics)))
        random.Random(f"{seed}:{rnd}").shuffle(order)
        yield textbook_prompt(topics[order[pos]], document_seed(seed, index))
        index += 1


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def assemble(text: str, cut: bool = False) -> str:
    """A generated answer as a document: trailing spaces and runs of blank lines removed, and when the
    generation was `cut` at its token budget, the unfinished last sentence dropped (a text with no
    sentence end stays whole: curation's quality rules judge it). "" when nothing is left."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if cut and (ends := list(_SENTENCE_END.finditer(text))):
        text = text[:ends[-1].end()]
    return text.strip()
