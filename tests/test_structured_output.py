"""Structured output (``response_format``): parsing, schema checks, and
answers held to a JSON schema token by token in the batching loop and the
``generate`` path (tiny preset, random weights, CPU, no Ray).

A random model left alone writes no JSON; held to a schema, every answer
that stops is a JSON document the schema accepts.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from serve.batching import GenerationRequest
from serve.protocol import APIError, parse_chat_request
from serve.settings import Limits

from conftest import answer_ids
from test_batching import make, prompt, reference, run_schedule

LIMITS = Limits(max_schema_bytes=2000)
SCENE = {"type": "object", "additionalProperties": False, "required": ["colour", "count", "big"],
         "properties": {"colour": {"enum": ["red", "green", "blue"]},
                        "count": {"type": "integer", "minimum": 1, "maximum": 6},
                        "big": {"type": "boolean"}}}
SCENE_SPEC = {"type": "json_schema", "schema": json.dumps(SCENE)}


def follows_scene(text: str) -> bool:
    """Whether ``text`` is a JSON object with exactly SCENE's keys and values in range."""
    doc = json.loads(text)
    return (isinstance(doc, dict) and set(doc) == {"colour", "count", "big"} and doc["colour"] in ("red", "green", "blue")
            and type(doc["count"]) is int and 1 <= doc["count"] <= 6 and type(doc["big"]) is bool)


def parse(**body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(body, LIMITS)


# ------------------------------------------------------------------ parsing

def test_response_formats_become_format_specs():
    assert parse().response_format is None
    assert parse(response_format={"type": "text"}).response_format is None
    assert parse(response_format={"type": "json_object"}).response_format == {"type": "json_object"}
    spec = parse(response_format={"type": "json_schema",
                                  "json_schema": {"name": "scene", "strict": True, "schema": SCENE}}).response_format
    assert spec["type"] == "json_schema" and json.loads(spec["schema"]) == SCENE
    assert parse(response_format={"type": "json_schema", "json_schema": {"schema": SCENE}}).response_format == spec


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": "json"}, "response_format", "must be an object with a 'type'"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'yaml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "with a 'name' and a 'schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "must be a JSON schema (an object), got nothing"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema.schema", "got str"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters, digits"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}}},
     "response_format.json_schema.strict", "true or false"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["y" * 3000]}}}},
     "response_format.json_schema.schema", "at most 2000"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens", "cannot be combined"),
])
def test_bad_response_formats_name_the_problem(body, param, words):
    with pytest.raises(APIError) as e:
        parse(**body)
    assert (e.value.status, e.value.param) == (400, param)
    assert words in e.value.message, e.value.message


def test_schemas_xgrammar_cannot_compile_are_refused_in_words():
    from serve.grammar import FormatError, check_spec

    check_spec(SCENE_SPEC)
    check_spec({"type": "json_object"})
    for schema, words in (({"type": "objekt"}, 'Unsupported type "objekt"'),
                          ({"type": "string", "pattern": "[a-"}, "Unclosed '['"),
                          ({"$ref": "#/defs/x"}, "defs")):
        with pytest.raises(FormatError) as e:
            check_spec({"type": "json_schema", "schema": json.dumps(schema)})
        assert words in str(e.value) and "/project/" not in str(e.value) and not str(e.value).startswith("[")


SLOW = {"type": "string", "pattern": "(a|b|c|d|e|f|g|h){1,5000}"}  # 58 bytes, seconds to compile


def test_a_schema_that_compiles_too_slowly_is_refused_and_the_checker_goes_on():
    """The ingress's check compiles in a child process within the time
    limit: a schema over it is refused in words (and the child stopped); the
    next schemas are checked by a fresh child, with the same verdicts as in
    this process."""
    import time

    from serve import schema_check
    from serve.grammar import FormatError, check_spec

    check_spec(SCENE_SPEC, timeout_s=2.0)  # starts the child
    child = schema_check._checker._proc
    start = time.monotonic()
    with pytest.raises(FormatError, match=r"compiling it takes over 0\.5 s, this server's limit"):
        check_spec({"type": "json_schema", "schema": json.dumps(SLOW)}, timeout_s=0.5)
    assert time.monotonic() - start < 3 and child.poll() is not None  # stopped, not waited for
    with pytest.raises(FormatError, match="Unsupported type"):
        check_spec({"type": "json_schema", "schema": json.dumps({"type": "objekt"})}, timeout_s=30.0)
    assert schema_check._checker._proc.poll() is None  # a new child answered
    tag = json.dumps({"type": "structural_tag", "format": {"type": "const_string", "value": "x"}})
    assert schema_check.problem("tag", tag, 30.0) is None is schema_check.problem_here("tag", tag)


# ------------------------------------------------------------ the LLM side

@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def grammars(model):
    from serve.grammar import Grammars

    rows = model.llm.get_output_embeddings().weight.shape[0]
    return Grammars(model.tokenizer.hf, rows, model.tokenizer.stop_ids)


def requests(model, n: int = 6) -> list[GenerationRequest]:
    """Free requests of 40 tokens (a held answer is 35-45 one-character tokens of the tiny tokenizer: more room)."""
    return [GenerationRequest(prompt(model, i, 0), max_new_tokens=40) for i in range(n)]


def text_of(model, ids: list[int]) -> str:
    return model.tokenizer.decode([t for t in ids if t not in model.tokenizer.stop_ids])


@pytest.mark.parametrize("kv", ["static", "static-bucketed", "dynamic"])
def test_batched_answers_follow_their_schema_and_leave_free_rows_alone(model, grammars, kv):
    """Six requests in one batch, joining at different steps: the even ones
    held to SCENE (greedy and sampled), the odd ones free. Each held answer
    stops and follows the schema; each free one equals ``generate`` alone;
    without the schema the held prompts' answers are not JSON."""
    stops = list(model.tokenizer.stop_ids)
    free = requests(model)
    held = [replace(r, constraint=grammars.constraint(SCENE_SPEC), temperature=1.0 if i % 4 == 2 else 0.0, seed=i,
                    max_new_tokens=100) if i % 2 == 0 else r for i, r in enumerate(free)]
    sinks = run_schedule(make(model, kv, stop_ids=stops), {0: [0, 1, 2], 2: [3, 4], 5: [5]}, held)
    for i, (sink, req) in enumerate(zip(sinks, held)):
        assert sink.error is None and sink.done.is_set(), (i, sink.error)
        if i % 2:
            assert sink.tokens == reference(model, req, stops), i
            continue
        assert sink.tokens[-1] in stops and req.constraint.finished, (i, text_of(model, sink.tokens))
        assert follows_scene(text_of(model, sink.tokens)), text_of(model, sink.tokens)
    for i in (0, 4):  # the same prompts, free: a random model's greedy answer is not JSON
        with pytest.raises(ValueError):
            json.loads(text_of(model, reference(model, free[i], stops)))


def test_json_object_answers_are_objects(model, grammars):
    """``json_object``: any JSON object; sampled answers that stop parse as one."""
    stops = list(model.tokenizer.stop_ids)
    reqs = [replace(r, constraint=grammars.constraint({"type": "json_object"}), temperature=1.0, seed=i,
                    max_new_tokens=100) for i, r in enumerate(requests(model, 8))]
    sinks = run_schedule(make(model, "static", stop_ids=stops), {0: list(range(8))}, reqs)
    stopped = [s for s in sinks if s.tokens[-1] in stops]
    assert stopped, "no answer finished"
    for s in stopped:
        assert isinstance(json.loads(text_of(model, s.tokens)), dict)


def test_a_broken_constraint_fails_its_answer_alone(model, grammars):
    """A token the grammar refuses (which the masks prevent) ends that answer
    with an error naming it; the request beside it finishes as alone."""
    stops = list(model.tokenizer.stop_ids)
    held, other = requests(model, 2)
    c = grammars.constraint(SCENE_SPEC)
    real_fill = c.fill
    c.fill = lambda words, row: (real_fill(words, row), words[row].fill_(-1))  # allows every token
    sinks = run_schedule(make(model, "static", stop_ids=stops), {0: [0, 1]}, [replace(held, constraint=c), other])
    assert "does not continue the answer's response_format" in str(sinks[0].error)
    assert sinks[1].error is None and sinks[1].tokens == reference(model, other, stops)


def test_the_llm_replica_holds_answers_to_a_format_with_batching_on_and_off(model, replica):
    """The LLM deployment's ``generate`` fed the ingress's dict: the same
    schema-following answer through the batching loop and through the
    one-``generate``-per-request path (greedy, and seeded sampling); an answer
    continued from its first tokens (``answer_start``, as after a replica
    died) ends as the whole one; the second identical request reuses the
    first one's kept row (prefix cache) and answers the same."""
    ids = prompt(model, 2, 0)
    call = {"input_ids": ids, "image_features": None, "max_new_tokens": 100, "response_format": SCENE_SPEC}
    seen = {}
    for batching in (True, False):
        replica.reconfigure({"continuous_batching": batching})
        for kw in ({}, {"temperature": 1.0, "seed": 11}):
            out = answer_ids(replica, call, **kw)
            assert follows_scene(text_of(model, out)), (batching, kw, text_of(model, out))
            seen.setdefault(str(kw), set()).add(tuple(out))
        whole = answer_ids(replica, call)
        rest = answer_ids(replica, call, input_ids=ids + whole[:5], answer_start=len(ids), max_new_tokens=95)
        assert whole[:5] + rest == whole, batching
    assert all(len(v) == 1 for v in seen.values()), seen  # batching on and off agree
    replica.reconfigure({"continuous_batching": True})
    hits = replica.batcher.stats["prefix_hits"]
    assert answer_ids(replica, call) == whole and replica.batcher.stats["prefix_hits"] > hits
    with pytest.raises(ValueError, match="does not follow its response_format"):
        answer_ids(replica, call, input_ids=ids + [model.tokenizer.ids.user], answer_start=len(ids))


def test_the_mask_leaves_exactly_the_allowed_tokens(grammars):
    from serve.grammar import bitmask, mask_scores

    c = grammars.constraint(SCENE_SPEC)
    words = bitmask(3, grammars.vocab_size)
    c.fill(words, 1)
    scores = torch.zeros(3, grammars.vocab_size + 5)  # logits wider than the grammar's vocabulary
    mask_scores(scores, words, [1])
    allowed = torch.isfinite(scores[1]).nonzero().flatten().tolist()
    assert allowed and all(grammars_token_starts_object(grammars, t) for t in allowed)
    assert torch.isfinite(scores[[0, 2]]).all()  # other rows untouched
    assert not torch.isfinite(scores[1, grammars.vocab_size:]).any()


def test_json_answers_may_start_with_the_space_of_phi3s_tokenizer_kind():
    """A SentencePiece tokenizer with byte fallback (Phi-3's kind) encodes
    an answer's text after a space ("\u2581{"): that one space is allowed
    before the JSON, two are not, and none is needed."""
    from serve.grammar import Grammars

    from conftest import sentencepiece_tokenizer

    hf = sentencepiece_tokenizer(["\u2581", "colour", "red", "count", "big", "true"], specials=("<|end|>",))
    stop = hf.convert_tokens_to_ids("<|end|>")
    grammars = Grammars(hf, len(hf), [stop])

    def takes(ids: list[int]) -> bool:
        c = grammars.constraint(SCENE_SPEC)
        return all(c.accept(t) for t in ids) and c.accept(stop) and c.finished

    answer = '{"colour": "red", "count": 2, "big": true}'
    ids = hf(answer, add_special_tokens=False)["input_ids"]
    space = hf.convert_tokens_to_ids("\u2581")
    assert ids[0] == space and takes(ids) and takes(ids[1:])
    assert not takes([space] + ids)


def grammars_token_starts_object(grammars, token: int) -> bool:
    """Whether a fresh SCENE matcher accepts ``token`` first."""
    return grammars.constraint(SCENE_SPEC).accept(token)



def test_format_bench_times_held_and_free_streams(tmp_path):
    """``bench/format_bench.py`` on a short run: both settings decode the
    same number of steps, the held one spends measurable time on its format
    (none for the free one), and xgrammar's part ran answers to their end on
    a vocabulary of real size."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import format_bench

    out = tmp_path / "format.json"
    res = format_bench.main(["--rows", "1,4", "--steps", "12", "--vocab-answers", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    free1, held1, free4, held4 = res["loop"]
    assert [r["rows"] for r in res["loop"]] == [1, 1, 4, 4] and free1["format"] is None
    assert free1["format_ms_mean"] == 0 < held1["format_ms_mean"] < held1["step_ms_mean"]
    assert held4["step_ratio_vs_free"] == pytest.approx(held4["step_ms_mean"] / free4["step_ms_mean"])
    v = res["xgrammar_gpt2_vocab"]
    assert v["vocab_size"] > 50_000 and v["tokens"] >= 3 and v["fill_us_p99"] >= v["fill_us_p50"] > 0
