from lilliput.eval.short_answer import Question, extract, is_correct, synthetic


def test_extraction_and_checking():
    assert extract("13 + 25 = 38\nsee 13", "number") == "38"
    assert extract("The answer is 1,204.", "number") == "1204"
    assert extract("It is -4", "number") == "-4" and extract("none", "number") is None
    assert extract("The letter after C is D.", "alphabet") == "D" and extract("none", "alphabet") is None
    assert extract("I think (B) is right. A is not.", "letter") == "B"
    assert extract("Apples", "letter") is None
    q = Question("What is 2 plus 2?", "4", "number")
    assert is_correct(q, "4") and is_correct(q, "2 plus 2 is 4") and not is_correct(q, "4 apples, not 5")
    items = synthetic(per_family=3, seed=1)
    assert len(items) == 15 and items == synthetic(per_family=3, seed=1)
    for it in items:
        assert is_correct(it, it.answer)


def test_letter_replies():
    for reply, want in [("I", "I"), ("B. Paris", "B"), ("The answer is C.", "C"), ("A) four", "A"),
                        ("I would say D", "D")]:
        assert extract(reply, "letter") == want, reply
