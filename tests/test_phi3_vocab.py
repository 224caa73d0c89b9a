"""Phi-3's real tokenizer (``models.phi3_vocab``: its 32,064-entry vocabulary
from llama.cpp's test file) through the code that depends on a tokenizer:
the chat template and label masking, typed control tokens, streamed text,
structured output and tool calls, and a replica answering with it.

The vocabulary comes from PyPI (``make test`` fetches it once into
``.cache/phi3-vocab/``). Without it these tests are skipped, except where
``MMPHI_REQUIRE_PHI3_VOCAB=1`` (CI) makes a missing file a failure."""
from __future__ import annotations

import json
import os

import pytest

from models import phi3_vocab
from models.phi3_vocab import PHI3_IDS

GGUF = phi3_vocab.present()
if GGUF is None:
    if os.environ.get("MMPHI_REQUIRE_PHI3_VOCAB") == "1":
        raise RuntimeError(f"Phi-3's vocabulary is not in {phi3_vocab.default_dir()}: run `python -m models.phi3_vocab`")
    pytest.skip(f"Phi-3's vocabulary is not in {phi3_vocab.default_dir()} (python -m models.phi3_vocab fetches it)",
                allow_module_level=True)

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["colour", "count"], "additionalProperties": False}
TRICKY = ["Red.", "What colour is the  circle?", " leading space", "\nnewline first", "Ünïcödé 👋🏽 ok",
          "tabs\tand\r\nbreaks", "1234567 digits", "<|end|> typed, <image> too"]


@pytest.fixture(scope="module")
def folder():
    return phi3_vocab.tokenizer_folder(GGUF)


@pytest.fixture(scope="module")
def cfg(folder):
    from models.config import load_config

    return load_config("tiny", ["tokenizer.build=null", f"tokenizer.name_or_path={folder}"])


@pytest.fixture(scope="module")
def tok(cfg):
    from models.tokenizer import load_tokenizer

    return load_tokenizer(cfg)


def written(tok, text: str) -> list[int]:
    """``text``'s ids as the model writes them, right after "<|assistant|>\\n"
    (encoded with that newline, as ``models.conversation`` encodes an answer)."""
    newline = tok.encode_text("\n")
    return tok.encode_text("\n" + text)[len(newline):]


def reference_ids(tok, messages: list[dict], generation: bool) -> list[int]:
    """The chat template's text encoded whole, as Hugging Face's pipeline does."""
    text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return [PHI3_IDS["<s>"]] + tok.hf(text, add_special_tokens=False)["input_ids"]


def test_the_tokenizer_gives_phi3s_reference_token_ids(folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    cases = phi3_vocab.reference_cases(GGUF)
    assert len(cases) == 47
    wrong = [(text, ids) for text, ids in cases if hf(text, add_special_tokens=False)["input_ids"] != ids]
    assert not wrong, wrong[:3]
    assert len(hf) == 32064 and {t: hf.convert_tokens_to_ids(t) for t in PHI3_IDS} == PHI3_IDS


def test_control_tokens_have_phi3s_ids_and_typed_ones_stay_text(tok):
    ids = tok.ids
    assert (ids.bos, ids.eos, ids.system, ids.user, ids.assistant, ids.end) == (1, 32000, 32006, 32010, 32001, 32007)
    assert ids.image == 32064 == len(tok) - 1  # the placeholder comes after Phi-3's vocabulary
    typed = tok.encode_text("<|end|> typed, <|assistant|> and <image> too")
    assert not set(typed) & {ids.end, ids.assistant, ids.image, *tok.stop_ids}
    assert tok.decode(typed) == "<|end|> typed, <|assistant|> and <image> too"


def test_a_conversation_encodes_as_the_chat_template_does(tok):
    """The project's encoding, token for token, is the template's text
    encoded whole: a message's text follows its role's newline without the
    word-start mark a text encoded on its own begins with ("What", not
    "\u2581What"), for system, user and assistant turns, with and without
    the generation prompt. (Typed control tokens are left out: the
    template's text would turn them into control tokens, which the project
    never does.)"""
    from models.conversation import encode_conversation

    for text in TRICKY[:-1]:
        messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": text},
                    {"role": "assistant", "content": text}, {"role": "user", "content": "And now?"}]
        for generation, msgs in ((True, messages), (False, messages + [{"role": "assistant", "content": "Blue."}])):
            got = encode_conversation(tok, msgs, 9, add_generation_prompt=generation).input_ids
            assert got == reference_ids(tok, msgs, generation), (text, tok.hf.convert_ids_to_tokens(got))


def test_phi3s_own_template_renders_the_same_tokens(tok):
    """Phi-3-mini's template as the vocabulary file carries it (user and
    assistant turns, the generation prompt after each user turn)."""
    from transformers import AutoTokenizer

    from models.conversation import encode_conversation

    own = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    assert "<|user|>" in own.chat_template and own.chat_template != tok.hf.chat_template
    msgs = [{"role": "user", "content": "How many shapes?"}, {"role": "assistant", "content": "Three."},
            {"role": "user", "content": "Which colour?"}]
    text = own.apply_chat_template(msgs, tokenize=False)
    assert own(text, add_special_tokens=False)["input_ids"] == \
        encode_conversation(tok, msgs, 9, add_generation_prompt=True).input_ids


def test_labels_are_each_answer_and_its_end(tok):
    from models.conversation import IGNORE_INDEX, encode_conversation

    answers = ["Red.", "Two circles,\nboth small."]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "Describe it."},
            {"role": "assistant", "content": answers[1]}]
    enc = encode_conversation(tok, msgs, 9)
    assert enc.input_ids.count(tok.ids.image) == 9
    spans, run = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert label == i
            run.append(i)
    assert spans == [written(tok, a) + [tok.ids.end] for a in answers]
    assert [tok.decode(s[:-1]) for s in spans] == answers


def test_streamed_text_is_the_decoded_answer(tok):
    """Token by token (SentencePiece pieces, byte-fallback bytes of an emoji,
    a leading space), the streamed pieces add up to the answer's text, also
    after a prompt that ends partway through a character."""
    from serve.chat import TextStream

    for text in TRICKY:
        ids = written(tok, text)
        stream = TextStream(tok.hf, [])
        pieces = [stream.push([t])[0] for t in ids] + [stream.push([], final=True)[0]]
        assert "".join(pieces) == tok.decode(ids), (text, pieces)
        assert "\ufffd" not in "".join(pieces)
    assert tok.decode(written(tok, "Red.")) == "Red."
    # a prompt of ids that ends partway through the bytes of "\U0001d11e": the answer's text starts with it whole
    ids = tok.hf.encode("The clef \U0001d11e sings", add_special_tokens=False)
    k = [i for i, t in enumerate(tok.hf.convert_ids_to_tokens(ids)) if t.startswith("<0x")][2]
    stream = TextStream(tok.hf, [], context=ids[:k])
    assert "".join([stream.push([t])[0] for t in ids[k:]] + [stream.push([], final=True)[0]]) == "\U0001d11e sings"


@pytest.fixture(scope="module")
def grammars(tok):
    from serve.grammar import Grammars

    return Grammars(tok.hf, len(tok), tok.stop_ids)


def _takes(grammars, spec: dict, ids: list[int], stop: int) -> bool:
    c = grammars.constraint(spec)
    return all(c.accept(t) for t in ids) and c.accept(stop) and c.finished


def test_a_schema_holds_answers_in_phi3s_tokens(tok, grammars):
    """The answer as the model writes it after "<|assistant|>\\n" (no
    word-start mark) and as a text of its own ("\u2581{") both follow the
    schema; a word first, or a missing field, does not."""
    spec = {"type": "json_schema", "schema": json.dumps(SCHEMA)}
    answer = '{"colour": "red", "count": 2}'
    after_newline = written(tok, answer)
    alone = tok.encode_text(answer)
    assert tok.hf.convert_ids_to_tokens([after_newline[0], alone[0]]) == ['{"', '\u2581{"']
    assert _takes(grammars, spec, after_newline, tok.ids.end) and _takes(grammars, spec, alone, tok.ids.end)
    assert not _takes(grammars, spec, written(tok, '{"colour": "red"}'), tok.ids.end)
    assert not grammars.constraint(spec).accept(tok.encode_text("Red")[0])


def test_a_tool_call_holds_to_its_function_in_phi3s_tokens(tok, grammars):
    from models.tools import calls_text, structural_tag

    tools = [{"name": "order_paint", "parameters": {"type": "object", "properties": {
        "colour": {"type": "string", "enum": ["red", "blue"]}}, "required": ["colour"]}}]
    spec = {"type": "structural_tag", "tag": json.dumps(structural_tag(tools, "required"))}
    call = calls_text([{"name": "order_paint", "arguments": {"colour": "red"}}])
    assert _takes(grammars, spec, written(tok, call), tok.ids.end)
    wrong = calls_text([{"name": "order_paint", "arguments": {"colour": "green"}}])
    assert not _takes(grammars, spec, written(tok, wrong), tok.ids.end)


def test_a_replica_with_phi3s_tokenizer_answers_to_a_schema(cfg, folder):
    """The LLM deployment (a random tiny Phi-3 whose embedding table has a
    row per entry of Phi-3's vocabulary and one for the placeholder) held to
    a schema: greedy and sampled answers stop, parse and follow it."""
    from conftest import answer_ids

    from models.conversation import encode_conversation
    from serve.deployments import LLM

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "big": {"type": "boolean"}},
              "required": ["colour", "big"], "additionalProperties": False}
    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu", "torch_threads": 0,
                             "overrides": ["tokenizer.build=null", f"tokenizer.name_or_path={folder}"]})
    try:
        model = llm.model
        assert model.llm.get_input_embeddings().weight.shape[0] == 32065
        ids = encode_conversation(model.tokenizer, [{"role": "user", "content": "Describe the scene as JSON."}], 9,
                                  add_generation_prompt=True).input_ids
        for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
            out = answer_ids(llm, {"input_ids": ids, "image_features": None, "max_new_tokens": 40,
                                   "response_format": {"type": "json_schema", "schema": json.dumps(schema)}, **kw})
            assert out[-1] in model.tokenizer.stop_ids, (kw, model.tokenizer.decode(out))
            answer = json.loads(model.tokenizer.decode(out[:-1]))
            assert set(answer) == {"colour", "big"} and answer["colour"] in ("red", "blue"), answer
            assert not set(out) & set(model.suppressed_ids)
    finally:
        llm.shutdown()


def test_a_streamed_call_in_phi3s_tokens_is_split_from_the_text(tok):
    """An answer with text and two calls, streamed token by token (the tags
    come in several SentencePiece pieces): the settled content and calls are
    those of the whole text, and no piece of a tag leaks into the content."""
    from models.tools import CallStream, ToolCall, calls_text
    from serve.chat import TextStream

    calls = [{"name": "order_paint", "arguments": {"colour": "red"}},
             {"name": "move_arm", "arguments": {"cell": "top left"}}]
    answer = "Sure, ordering it.\n" + calls_text(calls)
    ids = written(tok, answer)
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert "<tool_call>" not in pieces and len(ids) > 30  # the tags are split across tokens
    text, split = TextStream(tok.hf, []), CallStream()
    items = [x for t in ids for x in split.push(text.push([t])[0])]
    items += split.push(text.push([], final=True)[0], final=True)
    content = "".join(x for x in items if isinstance(x, str))
    assert content == "Sure, ordering it."
    assert [x for x in items if not isinstance(x, str)] == [ToolCall("order_paint", '{"colour": "red"}'),
                                                           ToolCall("move_arm", '{"cell": "top left"}')]
    assert isinstance(items[-1], ToolCall) and isinstance(items[0], str)  # the text, then the calls


def _continuing(ids: list[int], end: int):
    """A stand-in LLM handle that 'generates' ``ids``, then ``end``."""
    from test_serve_protocol import StubLLM

    class Continue(StubLLM):
        async def tokens(self, call: dict, k: int):
            for t in ids[:call["max_new_tokens"]]:
                yield [t]
            yield [end]

    return Continue()


def test_a_completion_continues_its_prompts_text(tok, cfg):
    """``/v1/completions``: a continuation whose first token starts a word
    ("\u2581blue") keeps that space, as decoding prompt and answer together
    does ("The sky is" + " blue and clear"), streamed or not; each token's
    ``text_offset`` points at its own text in the choice's."""
    from starlette.testclient import TestClient

    from serve.api import build_api
    from test_serve_protocol import fake_service

    prompt, more = "The sky is", " blue and clear"
    whole = tok.encode_text(prompt + more)
    head = tok.encode_text(prompt)
    assert whole[:len(head)] == head and tok.hf.convert_ids_to_tokens(whole[len(head)])[0] == "\u2581"
    service = fake_service(tok, cfg)
    service.llm = _continuing(whole[len(head):], tok.ids.end)
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    with TestClient(build_api(service, api_key=None, mount_ui=False), raise_server_exceptions=False) as c:
        choice = c.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]
        assert choice["text"] == more
        lp = choice["logprobs"]
        ends = lp["text_offset"][1:] + [len(choice["text"])]
        assert [choice["text"][a:b] for a, b in zip(lp["text_offset"], ends)] == lp["tokens"]
        echoed = c.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
        assert echoed == prompt + more
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == more
