"""Tool calling: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` in the
chat API, tool messages in the history, calls as text (``models.tools``),
and answers held to the calls' form by a grammar (tiny preset, random
weights, CPU, no Ray).

A random model calls nothing of its own accord; held to ``required`` or a
named function, every answer that stops is one call or more, of offered
functions, with arguments their parameter schemas accept.
"""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from models.conversation import IGNORE_INDEX, encode_conversation
from models.tools import CallStream, ToolCall, call_text, parse_call, structural_tag, tools_prompt
from serve.protocol import APIError, parse_chat_request
from serve.settings import Limits

from conftest import answer_ids
from test_serve_protocol import StubLLM, api  # noqa: F401 - api: the API with a stand-in service (a fixture)

LIMITS = Limits(max_schema_bytes=3000, max_tools=3)
ADD = {"name": "add", "description": "Adds two small numbers.",
       "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}
PAINT = {"name": "paint", "parameters": {"type": "object", "additionalProperties": False, "required": ["colour"],
                                         "properties": {"colour": {"enum": ["red", "blue"]}}}}
TOOLS = [{"type": "function", "function": f} for f in (ADD, PAINT)]
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def parse(**body):
    body.setdefault("messages", ASK)
    return parse_chat_request(body, LIMITS)


def error_of(**body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(**body)
    return e.value


def accepted(call: ToolCall) -> bool:
    """Whether a call is of ADD or PAINT with arguments their schemas accept."""
    args = json.loads(call.arguments)
    if call.name == "add":
        return set(args) == {"a", "b"} and all(type(args[k]) is int and 0 <= args[k] <= 9 for k in "ab")
    return call.name == "paint" and args in ({"colour": "red"}, {"colour": "blue"})


# ------------------------------------------------------------------ parsing

def test_tools_and_tool_choice_are_parsed():
    req = parse(tools=TOOLS)
    assert [t["name"] for t in req.tools] == ["add", "paint"] and req.tools[0]["parameters"] == ADD["parameters"]
    assert req.tools[0]["description"] == ADD["description"] and "description" not in req.tools[1]
    assert (req.tool_choice, req.parallel_tool_calls, req.calls_tools) == ("auto", True, True)
    assert parse(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).parallel_tool_calls is False
    assert parse(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "paint"}}).tool_choice == "paint"
    off = parse(tools=TOOLS, tool_choice="none")
    assert off.tool_choice == "none" and not off.calls_tools
    assert (parse().tools, parse().tool_choice) == (None, "none")
    assert parse(tools=[], tool_choice="none").tools is None
    bare = parse(tools=[{"type": "function", "function": {"name": "now"}}]).tools[0]
    assert bare == {"name": "now", "parameters": {"type": "object", "properties": {}}}


def test_a_conversation_with_calls_and_their_results_is_parsed():
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "c2", "type": "function", "function": {"name": "paint", "arguments": '{"colour": "red"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "painted"}]}]
    req = parse(messages=msgs, tools=TOOLS)
    assert [m.role for m in req.messages] == ["user", "assistant", "tool", "tool"]
    assert req.messages[1].parts == [] and [c["name"] for c in req.messages[1].tool_calls] == ["add", "paint"]
    assert req.messages[1].tool_calls[0] == {"id": "c1", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert [m.tool_call_id for m in req.messages[2:]] == ["c1", "c2"]
    assert req.messages[3].parts[0].text == "painted"


CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}


@pytest.mark.parametrize("body, param, words", [
    ({"tools": {"add": ADD}}, "tools", "must be a list"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", "type 'code_interpreter' is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "add two"}}]}, "tools[0].function.name", "letters, digits"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "offered twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters",
     "must be a JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "must describe an object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]},
     "tools[0].function.description", "must be a string"),
    ({"tools": TOOLS * 2}, "tools", "at most 3 are allowed"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 3000}}]}, "tools",
     "at most 3000"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "got 'any'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice",
     "'mul', which 'tools' does not offer"),
    ({"tool_choice": "required"}, "tool_choice", "offers no 'tools'"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": TOOLS, "min_tokens": 2}, "min_tokens", "cannot be combined"),
    ({"functions": [ADD]}, "functions", "offer them as 'tools'"),
    ({"messages": ASK + [{"role": "tool", "content": "5"}]}, "messages[1].tool_call_id", "the id of the call"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "c1", "content": "5"}]}, "messages[1].role",
     "must follow an assistant message with tool_calls"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c9",
                                                                      "content": "5"}]},
     "messages[2].tool_call_id", "'c9' names no call of messages[1]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls",
     "only assistant messages"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "add",
                                                                                   "arguments": "{a: 1}"}}]}]
      + ASK}, "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "add",
                                                                                   "arguments": "[1]"}}]}] + ASK},
     "messages[1].tool_calls[0].function.arguments", "must be a JSON object, got list"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]}]
      + ASK}, "messages[1].tool_calls[0].id", "non-empty string"),
    ({"messages": ASK + [{"role": "assistant", "content": None}] + ASK}, "messages[1].content", "missing"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [CALL]}]}, "messages[1].role", "must come from the user"),
])
def test_bad_tool_requests_name_the_problem(body, param, words):
    err = error_of(**body)
    assert (err.status, err.param) == (400, param), err.message
    assert words in err.message, err.message


# ------------------------------------------------------------ calls as text

def test_calls_turn_into_text_and_back():
    text = call_text("add", {"a": 2, "b": 3})
    assert text == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert call_text("add", '{"a":2,"b":3}') == text
    assert parse_call(text[len("<tool_call>"):-len("</tool_call>")]) == ToolCall("add", '{"a": 2, "b": 3}')
    assert parse_call('{"name": "add", "arguments": [1]}') is None and parse_call("{oops") is None
    assert call_text("say", {"text": "héllo"}).count("héllo") == 1  # not escaped to \\u00e9
    block = tools_prompt([ADD, PAINT])
    listed = block.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in listed] == ["add", "paint"]
    assert json.loads(listed[0])["function"]["parameters"] == ADD["parameters"]


ANSWER = ("Let me add them.\n\n" + call_text("add", {"a": 2, "b": 3}) + "\n"
          + call_text("say", {"text": "<tool_call>x</tool_call>"}) + "\n\n<tool_call>\nnot json\n</tool_call> Done.  ")


def split(pieces: list[str]) -> list:
    stream, out = CallStream(), []
    for piece in pieces:
        out += stream.push(piece)
    return out + stream.push("", final=True)


def test_an_answer_splits_into_content_and_calls_wherever_it_is_cut():
    """Streamed in any pieces, an answer gives the same content and calls as
    whole: the blank lines around calls dropped, a tag that does not hold a
    call kept as text, trailing whitespace dropped."""
    whole = split([ANSWER])
    assert whole == ["Let me add them.", ToolCall("add", '{"a": 2, "b": 3}'),
                     ToolCall("say", '{"text": "<tool_call>x</tool_call>"}'), "<tool_call>\nnot json\n</tool_call>",
                     " Done."]
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(ANSWER)), rng.randint(1, 30)))
        out = split([ANSWER[a:b] for a, b in zip([0] + cuts, cuts + [len(ANSWER)])])
        assert "".join(p for p in out if isinstance(p, str)) == "".join(p for p in whole if isinstance(p, str))
        assert [p for p in out if not isinstance(p, str)] == [p for p in whole if not isinstance(p, str)]


def test_text_that_may_open_a_call_waits_and_a_cut_off_call_is_text():
    stream = CallStream()
    assert stream.push("Hello <tool") == ["Hello"]  # " <tool" may begin a call
    assert stream.push("box> and") == [" <toolbox> and"]  # it did not
    assert stream.push(' <tool_call>\n{"name": "add", "arg') == []
    assert stream.push("", final=True) == [' <tool_call>\n{"name": "add", "arg']  # max_tokens cut it


# ----------------------------------------------------------- conversations

def test_tools_calls_and_results_render_as_text_and_only_answers_are_learned(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "Adding.",
             "tool_calls": [{"name": "add", "arguments": '{"a": 2, "b": 3}'}]},
            {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    enc = encode_conversation(tok, msgs, 4, tools=[ADD])
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    system = text.split("<|system|>\n")[1].split("<|end|>")[0]
    assert system == "Be brief.\n\n" + tools_prompt([ADD])
    assert "<|assistant|>\nAdding.\n" + call_text("add", {"a": 2, "b": 3}) + "<|end|>" in text
    assert "<|user|>\n<tool_response>\n5\n</tool_response><|end|>" in text
    learned = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX],
                         skip_special_tokens=False)
    assert learned == "Adding.\n" + call_text("add", {"a": 2, "b": 3}) + "<|end|>It is 5.<|end|>"
    # no system message: the tools are one, after the configured system prompt
    alone = tok.decode(encode_conversation(tok, msgs[1:2], 4, add_generation_prompt=True, tools=[ADD],
                                           system_prompt="You help.").input_ids, skip_special_tokens=False)
    assert alone.split("<|system|>\n")[1].startswith("You help.\n\n# Tools\n")
    assert "# Tools" not in tok.decode(encode_conversation(tok, msgs[1:2], 4).input_ids)


def test_a_held_out_call_is_right_only_as_the_same_calls_and_nothing_else(tok):
    """Held-out answer accuracy (``ray_jobs.train.answered``) compares calls
    by name and arguments as JSON values; text beside a call, a call cut off
    or another argument is wrong. Enough tokens are generated for the call."""
    from ray_jobs.train import ANSWER_TOKENS, answer_budget, answered

    want = {"role": "assistant", "content": "", "tool_calls": [{"name": "paint", "arguments": {"colour": "red"}}]}
    text = call_text("paint", {"colour": "red"})
    assert answered(text, want) and answered(" " + text + "\n", want)
    assert answered(text.replace('{"colour": "red"}', '{ "colour":"red" }'), want)  # the same JSON value
    assert not answered(call_text("paint", {"colour": "blue"}), want)
    assert not answered(call_text("add", {"colour": "red"}), want)
    assert not answered("Sure. " + text, want)
    assert not answered(text[:-3], want)  # cut off: text, not a call
    assert not answered(text + "\n" + text, want)  # one call too many
    assert not answered("red", want)
    assert answered("Top left.", {"role": "assistant", "content": "top left"})
    assert not answered(text, {"role": "assistant", "content": "red"})
    assert answer_budget(tok, {"role": "assistant", "content": "Red."}) == ANSWER_TOKENS
    # the demo scores the API's answers alike (its message in OpenAI's shape)
    from mmphi.commands.demo import answered_message

    def message(content, *calls):
        return {"role": "assistant", "content": content,
                "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                               for i, (n, a) in enumerate(calls)] or None}

    assert answered_message(message(None, ("paint", '{"colour":"red"}')), want)
    assert not answered_message(message("Sure.", ("paint", '{"colour": "red"}')), want)
    assert not answered_message(message(None, ("paint", '{"colour": "blue"}')), want)
    assert not answered_message(message(None, ("paint", '{"colour": "red"}'), ("paint", '{"colour": "red"}')), want)
    assert answered_message(message("Red."), {"role": "assistant", "content": "Red."})
    assert not answered_message(message(None, ("paint", '{"colour": "red"}')), {"role": "assistant", "content": "Red."})
    need = len(tok.encode_text(text))
    assert need > ANSWER_TOKENS and answer_budget(tok, want) == need + 4


def test_the_job_scores_held_out_calls_in_batches_of_their_own(tiny_model, monkeypatch):
    """The training job's evaluation (``ray_jobs.train.evaluate``) generates
    held-out tool calls apart from answers in words, with enough tokens for
    the call, and scores each kind its way (a generation stand-in answers a
    call for a batch given more than 8 tokens, "Red." otherwise)."""
    import numpy as np
    import torch

    from data_pipelines.synthetic import TOOLS
    from models.vision import vision_spec
    from ray_jobs.data import Features, Sample
    from ray_jobs.train import ANSWER_TOKENS, answer_budget, evaluate

    tok = tiny_model.tokenizer
    dim = vision_spec(tiny_model.cfg.vision)["feature_dim"]
    feats = Features({f"{i}.png": np.zeros((tiny_model.num_image_tokens, dim), np.float16) for i in range(5)},
                     [f"{i}.png" for i in range(5)])
    ask = [{"type": "image"}, {"type": "text", "text": "Which?"}]
    paint = {"name": "order_paint", "arguments": {"colour": "red"}}
    words = [Sample(f"w{i}", f"{i}.png", [{"role": "user", "content": ask}, {"role": "assistant", "content": "Red."}],
                    ["colour"]) for i in range(3)]
    calls = [Sample(f"t{i}", f"{3 + i}.png", [{"role": "user", "content": ask},
                                              {"role": "assistant", "content": "", "tool_calls": [paint]}],
                    ["tool"], TOOLS) for i in range(2)]
    seen = []

    def generate(input_ids, attention_mask, image_features, max_new_tokens):
        seen.append((len(input_ids), max_new_tokens))
        text = call_text("order_paint", {"colour": "red"}) if max_new_tokens > ANSWER_TOKENS else "Red."
        return torch.tensor([tok.encode_text(text) + [tok.ids.end]] * len(input_ids))

    monkeypatch.setattr(tiny_model, "generate", generate)
    try:
        res = evaluate(tiny_model, tok, [], [], feats, [words[0], calls[0], words[1], calls[1], words[2]], 1, 0,
                       batch_size=4, loss=False)
    finally:
        tiny_model.eval()  # evaluate leaves a model in training mode
    assert seen == [(3, ANSWER_TOKENS), (2, answer_budget(tok, calls[0].messages[-1]))]
    assert res["answer_counts"] == {"colour": 3, "tool": 2}
    assert res["answer_accuracy"] == {"colour": 1.0, "tool": 1.0}


# ---------------------------------------------------------------- grammar

def spec(choice: str, parallel: bool = True, tools=(ADD, PAINT)) -> dict:
    return {"type": "structural_tag", "tag": json.dumps(structural_tag(list(tools), choice, parallel))}


def calls_prompt(model, tools=(ADD, PAINT)) -> list[int]:
    return encode_conversation(model.tokenizer, ASK, model.num_image_tokens, add_generation_prompt=True,
                               tools=list(tools)).input_ids


def answer(model, replica, call: dict, **kw) -> tuple[list, bool]:
    """An answer's pieces (content and calls) and whether it stopped."""
    ids = answer_ids(replica, call, **kw)
    stops = model.tokenizer.stop_ids
    text = model.tokenizer.decode([t for t in ids if t not in stops])
    return split([text]), bool(ids) and ids[-1] in stops


@pytest.mark.parametrize("choice, parallel", [("required", True), ("paint", True), ("required", False)])
def test_answers_held_to_calls_are_calls_of_offered_functions(tiny_model, replica, choice, parallel):
    """Greedy and sampled, batched and one at a time: each answer that stops
    is calls and nothing else, of the named function when one is named, one
    call when parallel calls are off, with arguments the function's schema
    accepts. Without the grammar the same prompt gives no call."""
    call = {"input_ids": calls_prompt(tiny_model), "image_features": None, "max_new_tokens": 160,
            "response_format": spec(choice, parallel)}
    stopped = 0
    for batching in (True, False):
        replica.reconfigure({"continuous_batching": batching})
        for kw in ({}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 4}):
            pieces, stop = answer(tiny_model, replica, call, **kw)
            if not stop:
                continue  # max_tokens cut it: nothing is promised
            stopped += 1
            assert pieces and all(isinstance(p, ToolCall) and accepted(p) for p in pieces), (kw, pieces)
            assert choice == "required" or {p.name for p in pieces} == {choice}
            assert parallel or len(pieces) == 1
    assert stopped >= 3
    free, _ = answer(tiny_model, replica, {**call, "response_format": None})
    assert not any(isinstance(p, ToolCall) for p in free)


def test_auto_leaves_text_free_until_a_call_opens(tiny_model):
    """``auto``: any text may come, and may end the answer; once
    ``<tool_call>`` is written, only an offered function's name may follow,
    then arguments its schema accepts."""
    from serve.grammar import Grammars

    tok = tiny_model.tokenizer
    rows = tiny_model.llm.get_output_embeddings().weight.shape[0]
    grammars = Grammars(tok.hf, rows, tok.stop_ids)

    def fed(text: str):
        c = grammars.constraint(spec("auto"))
        return c, all(c.accept(t) for t in tok.encode_text(text))

    c, ok = fed("Any text at all {} <tool")
    assert ok and c.accept(tok.stop_ids[0])  # free text may end the answer
    c, ok = fed('Sure. <tool_call>\n{"name": "')
    assert ok and not c.accept(tok.stop_ids[0])
    assert fed('Sure. <tool_call>\n{"name": "paint", "arguments": {"colour": "blue"}}\n</tool_call> ok')[1]
    assert not fed('Sure. <tool_call>\n{"name": "mul", ')[1]
    assert not fed('Sure. <tool_call>\n{"name": "paint", "arguments": {"colour": "green"')[1]
    with pytest.raises(ValueError, match="no tool to call"):
        structural_tag([ADD], "paint")


def test_calls_are_held_with_a_tokenizer_of_phi3s_kind():
    """With SentencePiece byte fallback (Phi-3's tokenizer kind: a newline
    is the ``<0x0A>`` token, a space ``\u2581``), a call as that tokenizer
    encodes it is accepted and may end; a call of an unoffered function, or
    text before a required call, is not."""
    from serve.grammar import Grammars

    from conftest import sentencepiece_tokenizer

    hf = sentencepiece_tokenizer(["\u2581", "tool", "_call", "name", "arguments", "paint", "colour", "red", "add"],
                                 specials=("<|end|>",))
    stop = hf.convert_tokens_to_ids("<|end|>")
    grammars = Grammars(hf, len(hf), [stop])

    def takes(choice: str, text: str) -> bool:
        c = grammars.constraint(spec(choice))
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert any(1 <= i <= 256 for i in ids)  # byte tokens among them
        return all(c.accept(t) for t in ids) and c.accept(stop) and c.finished

    call = call_text("paint", {"colour": "red"})  # encoded "\u2581", "<0x3C>" ...: the space the tokenizer adds
    assert takes("required", call) and takes("paint", call) and takes("auto", "Sure. " + call)
    assert takes("required", call + "\n" + call_text("add", {"a": 1, "b": 2}))
    assert not takes("add", call) and not takes("required", "Sure. " + call)
    assert not takes("required", call_text("mul", {"a": 1}))


# ---------------------------------------------------------------- the API

class ScriptedLLM(StubLLM):
    """An LLM handle that answers every call with the tokens of ``text``, a few at a time, and records the calls."""

    def __init__(self, tok, text: str):
        super().__init__()
        self.ids = tok.encode_text(text) + [tok.ids.end]

    async def tokens(self, call: dict, k: int):
        for at in range(0, len(self.ids), 3):
            await asyncio.sleep(0)
            yield self.ids[at:at + 3]


def test_calls_come_back_in_openai_shape_streamed_or_not(api, tok):
    from test_serve_protocol import sse_chunks

    api.service.llm = llm = ScriptedLLM(tok, ANSWER.replace(" Done.  ", ""))
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 200}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me add them.<tool_call>\nnot json\n</tool_call>"  # no blank lines around calls
    calls = message["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "add", {"a": 2, "b": 3}), ("function", "say", {"text": "<tool_call>x</tool_call>"})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    sent = llm.calls[0]
    assert json.loads(sent["response_format"]["tag"]) == structural_tag(parse(tools=TOOLS).tools, "auto")
    assert tools_prompt(parse(tools=TOOLS).tools) in tok.decode(sent["input_ids"])
    # streamed: the content as it comes, each call whole once it closes, by its index
    r = api.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [c["choices"][0] for c in sse_chunks(r.text) if c["choices"]]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == message["content"]
    streamed = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert [tc["index"] for tc in streamed] == [0, 1]
    assert [tc["function"] for tc in streamed] == [c["function"] for c in calls]
    assert deltas[-1]["finish_reason"] == "tool_calls"
    # an answer without calls: content as before, no tool_calls key
    api.service.llm = ScriptedLLM(tok, "Five.")
    plain = api.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "Five."} and plain["finish_reason"] == "stop"


def test_results_go_back_into_the_prompt_and_none_offers_no_tools(api, tok):
    api.service.llm = llm = ScriptedLLM(tok, "It is 5.")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    r = api.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "It is 5.", r.text
    sent = llm.calls[0]
    prompt_text = tok.decode(sent["input_ids"], skip_special_tokens=False)
    assert prompt_text.endswith(f"<|assistant|>\n{call_text('add', {'a': 1, 'b': 2})}<|end|>\n"
                                "<|user|>\n<tool_response>\n3\n</tool_response><|end|>\n<|assistant|>\n")
    assert "# Tools" not in prompt_text and "response_format" not in sent


def test_a_parameter_schema_xgrammar_cannot_compile_is_a_400(api):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "[a-"}}}}}
    r = api.post("/v1/chat/completions", json={"messages": ASK, "tools": [bad]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("tools", "invalid_schema") and "Unclosed '['" in err["message"], err


def test_tool_results_without_a_user_message_are_answered_or_refused_in_words(api, tok):
    api.service.llm = ScriptedLLM(tok, "Done.")
    opened = [{"role": "assistant", "content": None, "tool_calls": [CALL]}]
    r = api.post("/v1/chat/completions", json={"messages": opened + [{"role": "tool", "tool_call_id": "c1",
                                                                      "content": "3"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Done.", r.text
    r = api.post("/v1/chat/completions", json={"messages": opened + [{"role": "tool", "tool_call_id": "c1",
                                                                      "content": "three " * 2000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
