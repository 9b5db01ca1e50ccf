"""Questions a 135M model can sometimes answer, with a program that checks the answer.

Three kinds of answer, each with a canonical extraction (what votes count): a number, a letter
of the alphabet, or the letter of a multiple-choice option (`extract`). `synthetic()` makes small arithmetic, counting and alphabet questions from
a seed; `arc_letters()` asks ARC-Easy questions as lettered multiple choice answered by
generation. GSM8K is out of reach (SmolLM2-135M scores ~1-2% there).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lilliput.eval.task_sets import arc_easy

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LEGS = {"dog": 4, "cat": 4, "spider": 8, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "bee": 6, "cow": 4,
        "duck": 2}


@dataclass(frozen=True)
class Question:
    prompt: str
    """The user's message."""
    answer: str
    """The right answer, canonical (digits, or one capital letter)."""
    kind: str
    """number, alphabet or letter (multiple choice): how a reply is read (`extract`)."""
    family: str = ""
    """Which generator made it (for per-family accuracy)."""


def extract(text: str, kind: str) -> str | None:
    """The answer a reply gives, read from its first non-empty line (small models restate the
    question: "13 + 25 = 38", "The letter after C is D"):
    - number: the line's last integer;
    - alphabet: the line's last standalone capital letter;
    - letter (multiple choice): the reply itself when it is one letter, the letter it starts with
      ("B." / "B)"), one in parentheses or after "answer is", else the first standalone capital
      letter that is not the pronoun I."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if kind == "number":
        found = re.findall(r"-?\d+", line.replace(",", ""))
        return str(int(found[-1])) if found else None
    if kind == "alphabet":
        found = re.findall(r"\b([A-Z])\b", line)
        return found[-1] if found else None
    for pattern in (r"^\W*([A-Z])\W*$", r"^\W*([A-HJ-Z])(?![A-Za-z])", r"\(([A-Z])\)",
                    r"(?i:answer|option|letter)(?: is)?:?\s*([A-Z])\b", r"\b([A-HJ-Z])\b"):
        if m := re.search(pattern, line):
            return m.group(1)
    return None


def is_correct(q: Question, text: str) -> bool:
    return extract(text, q.kind) == q.answer


def synthetic(per_family: int = 20, seed: int = 0) -> list[Question]:
    """Addition, subtraction, next number, legs of an animal, next letter: per_family of each."""
    rng = random.Random(seed)
    out = []
    for _ in range(per_family):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        out.append(Question(f"What is {a} plus {b}? Reply with the number only.", str(a + b), "number", "add"))
        hi, lo = max(a, b) + 5, min(a, b)
        out.append(Question(f"What is {hi} minus {lo}? Reply with the number only.", str(hi - lo), "number", "sub"))
        n = rng.randint(5, 98)
        out.append(Question(f"Which number comes right after {n}? Reply with the number only.", str(n + 1),
                            "number", "next_number"))
        animal = rng.choice(sorted(LEGS))
        out.append(Question(f"How many legs does a {animal} have? Reply with the number only.", str(LEGS[animal]),
                            "number", "legs"))
        i = rng.randint(0, 24)
        out.append(Question(f"Which letter comes right after {LETTERS[i]} in the alphabet? Reply with the letter only.",
                            LETTERS[i + 1], "alphabet", "next_letter"))
    return out


def arc_letters(limit: int | None = 50) -> list[Question]:
    """ARC-Easy questions with lettered choices, answered by writing the letter."""
    out = []
    for item in arc_easy(limit):
        q = item.context.removeprefix("Question: ").removesuffix("\nAnswer:")
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        out.append(Question(f"{q}\n{options}\nReply with the letter of the right answer only.", LETTERS[item.gold],
                            "letter", "arc_easy"))
    return out
