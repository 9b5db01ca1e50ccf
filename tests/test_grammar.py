"""Constrained decoding with llguidance: a tiny random model writes JSON that parses and validates."""

import json
import math

import pytest

from lilliput.cli import main
from lilliput.core.checkpoint import save_checkpoint
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.grammar import JsonGrammar
from lilliput.infer.sequence import GenerationConfig

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture
def eos_bytes():
    tok = ByteTokenizer()
    tok.eos_ids = {0}  # NUL ends a sequence: a grammar needs an end token
    return tok


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_writes_valid_json_under_the_grammar(tiny_model, eos_bytes, one_thread, temperature):
    grammar = JsonGrammar.from_schema(eos_bytes, SCHEMA, tiny_model.config.vocab_size)
    engine = Engine(tiny_model, eos_bytes, EngineConfig(max_batch=4))
    cfg = GenerationConfig(max_new_tokens=120, temperature=temperature, seed=3)
    seqs = [engine.add(p, cfg, [grammar.processor()]) for p in ["a", "bb", "the data: ", "{"]]
    engine.run()
    for s in seqs:
        assert s.finish_reason == "stop", s.text  # ended by the grammar, not the budget
        jsonschema.validate(json.loads(s.text), SCHEMA)
    free = Engine(tiny_model, eos_bytes).generate(["a"], GenerationConfig(max_new_tokens=40))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # unconstrained, the random model writes no JSON


def test_each_sample_has_its_own_matcher(tiny_model, eos_bytes, one_thread):
    grammar = JsonGrammar.from_schema(eos_bytes, {"type": "object", "properties": {"k": {"enum": ["x", "y"]}},
                                                  "required": ["k"], "additionalProperties": False}, 256)
    engine = Engine(tiny_model, eos_bytes, EngineConfig(max_batch=4))
    first = engine.add("q", GenerationConfig(max_new_tokens=30, temperature=1.0, seed=1), [grammar.processor()])
    while first.status.value != "running":
        engine.step()
    forks = engine.fork(first, 2)
    for f in forks:  # Engine.fork shares processor objects between forks: give each its own matcher
        f.processors = [grammar.processor()]
    engine.run()
    assert all(json.loads(s.text)["k"] in "xy" for s in [first, *forks])


def test_logprobs_list_only_tokens_the_grammar_allows(tiny_model, eos_bytes, one_thread):
    """Where the grammar allows fewer tokens than asked for, the alternatives stop there: a -inf is
    no alternative, and JSON cannot carry it (it was a 500 from the server)."""
    grammar = JsonGrammar.from_schema(eos_bytes, {"type": "object", "properties": {"k": {"const": 1}},
                                                  "required": ["k"], "additionalProperties": False}, 256)
    engine = Engine(tiny_model, eos_bytes, EngineConfig(max_batch=1))
    seq = engine.add("q", GenerationConfig(max_new_tokens=30, logprobs=5), [grammar.processor()])
    engine.run()
    assert json.loads(seq.text) == {"k": 1} and len(seq.logprobs) == len(seq.output)
    assert all(math.isfinite(lp) for r in seq.logprobs for _, lp in [(r["token"], r["logprob"]), *r["top"]])
    assert min(len(r["top"]) for r in seq.logprobs) == 1  # '{"k": 1}' is forced, token by token


def test_bad_schemas_and_tokenizers_are_value_errors(byte_tokenizer, eos_bytes):
    with pytest.raises(ValueError, match="end-of-sequence"):
        JsonGrammar.from_schema(byte_tokenizer, SCHEMA, 256)
    with pytest.raises(ValueError, match="schema"):
        JsonGrammar.from_schema(eos_bytes, {"type": "nonsense-type"}, 256)
    with pytest.raises(ValueError, match="schema"):
        JsonGrammar.from_schema(eos_bytes, ["not", "an", "object"], 256)


def test_generate_json_schema_flag(tiny_model, byte_tokenizer, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    # the byte tokenizer has no end-of-sequence token, so a grammar could never end: one clear line
    assert main(["generate", "hi", "--model", str(ckpt), "--json-schema", str(schema)]) == 2
    assert "end-of-sequence" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(ckpt), "--json-schema", str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_writes_valid_json_under_the_schema(smollm):
    from lilliput.infer.generate import generate

    model, tok = smollm
    grammar = JsonGrammar.from_schema(tok, SCHEMA, model.config.vocab_size)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe Bob, 42, happy, as JSON."}])
    g = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=60), bos=False,
                 processors=[grammar.processor()])[0]
    assert g.finish_reason == "stop"
    jsonschema.validate(json.loads(g.text), SCHEMA)
