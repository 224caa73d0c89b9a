"""Serving without Ray: request parsing, stop strings, settings, page history."""
from __future__ import annotations

import base64
import importlib.metadata
import re
from pathlib import Path

import numpy as np
import pytest

from serve.chat import TextStream
from serve.protocol import APIError, parse_chat_request
from serve.settings import Limits, ServeSettings, SettingsError

LIMITS = Limits(max_images=2, max_audio_parts=1, max_new_tokens=64, max_messages=8)
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def parse(**body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(body, LIMITS)


def error_of(**body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(**body)
    assert e.value.status == 400
    return e.value


def test_parses_text_image_and_audio_parts():
    req = parse(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": PNG}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"}},
        ]},
    ], max_tokens=10, temperature=0.5, top_p=0.9, stop="\n", stream=True, stream_options={"include_usage": True})
    parts = req.messages[1].parts
    assert [p.kind for p in parts] == ["text", "image", "audio"]
    assert parts[1].data == b"\x89PNG fake" and parts[2].data == b"RIFF"
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.stream, req.include_usage) == \
        (10, 0.5, 0.9, ["\n"], True, True)
    assert req.num_images == 1 and req.num_audio == 1


def test_min_tokens_defaults_to_zero_and_may_equal_max_tokens():
    assert parse().min_tokens == 0
    assert parse(max_tokens=12, min_tokens=12).min_tokens == 12
    assert parse(min_tokens=LIMITS.default_max_tokens).min_tokens == LIMITS.default_max_tokens


def test_developer_role_is_a_system_message():
    req = parse(messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}])
    assert req.messages[0].role == "system"


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text",
     "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages[1].role",
     "last message"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": PNG}}]},
                   {"role": "user", "content": "x"}]}, "messages[0].content[0]", "only user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     "messages[0].content[0].image_url.url", "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]},
     "messages[0].content[0].image_url.url", "image/* type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     "messages[0].content[0].image_url.url", "remote image URLs are disabled"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     "messages[0].content[0].image_url.url", "data: URI"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "aGk=", "format": "exe"}}]}]},
     "messages[0].content[0].input_audio.format", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}] * 3}]},
     "messages", "3 images given; the limit is 2"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "aGk="}}] * 2}]},
     "messages", "2 audio parts given; the limit is 1"),
    ({"messages": [{"role": "user", "content": "x"}] * 9}, "messages", "9 messages given; the limit is 8"),
    ({"max_tokens": 0}, "max_tokens", "positive integer"),
    ({"max_tokens": 65}, "max_tokens", "at most 64"),
    ({"min_tokens": -1}, "min_tokens", "non-negative integer"),
    ({"min_tokens": 2.5}, "min_tokens", "non-negative integer"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", "must not exceed 'max_tokens' (4)"),
    ({"temperature": 3}, "temperature", "between 0 and 2"),
    ({"top_p": "high"}, "top_p", "must be a number"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"n": 9}, "n", "'n' is 9; this server gives at most 8 answers (choices) per request"),
    ({"n": 0}, "n", "'n' (the number of answers) must be a positive integer, got 0"),
    ({"n": True}, "n", "must be a positive integer"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "must be {'type': 'function', 'function'"),
    ({"logprobs": "yes"}, "logprobs", "'logprobs' must be true or false"),
    ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20, got 21"),
    ({"logprobs": True, "top_logprobs": 1.5}, "top_logprobs", "must be an integer"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "between -2 and 2, got -2.5"),
    ({"presence_penalty": "some"}, "presence_penalty", "must be a number, got str"),
    ({"presence_penalty": 3}, "presence_penalty", "between -2 and 2"),
    ({"logit_bias": [1, 2]}, "logit_bias", "must be an object mapping token ids"),
    ({"logit_bias": {"hello": 5}}, "logit_bias", "key 'hello' is not a token id"),
    ({"logit_bias": {"-3": 5}}, "logit_bias", "key '-3' is not a token id"),
    ({"logit_bias": {"7": 101}}, "logit_bias", "of token 7 must be a number from -100 to 100, got 101"),
    ({"logit_bias": {"7": True}}, "logit_bias", "got True"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "has 301 tokens; at most 300"),
    ({"seed": "42"}, "seed", "'seed' must be an integer, got str"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"seed": 2**64}, "seed", "'seed' must fit in 64 bits, got 18446744073709551616"),
    ({"user": 7}, "user", "'user' must be a string, got int"),
])
def test_bad_requests_name_the_problem(body, param, words):
    err = error_of(**body)
    assert err.param == param
    assert words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_what_clients_send_by_default_is_accepted():
    """Zero penalties, an empty logit_bias and a user name (what SDKs and
    LangChain-style clients send) do not change the request; a seed is kept
    for the sampler."""
    from dataclasses import replace

    plain = parse()
    sent = parse(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, seed=1234, user="alice")
    assert sent == replace(plain, seed=1234) and plain.seed is None


def test_logprobs_ask_for_ratings_and_their_alternatives():
    assert parse().logprobs is None and parse(logprobs=False).logprobs is None
    assert parse(logprobs=True).logprobs == 0 and parse(logprobs=True, top_logprobs=20).logprobs == 20
    assert parse(logprobs=False, top_logprobs=0).logprobs is None  # what some clients send by default


def test_token_bytes_join_into_the_text_for_both_kinds_of_tokenizer(tok):
    """Byte-level BPE (the tiny preset's) and SentencePiece with byte
    fallback (Phi-3's kind, built here from a small vocabulary): the bytes of
    a text's tokens, one by one, join into the text, also where a token holds
    part of a character."""
    from serve.logprobs import TokenBytes, entry

    from conftest import sentencepiece_tokenizer

    text = "the héllo wörld ✓ 的 <|user|> 😀 end"
    ids = tok.encode_text(text)
    tb = TokenBytes(tok.hf)
    assert tb.byte_level and b"".join(tb(i) for i in ids) == text.encode()
    assert any(tb(i).decode("utf-8", errors="replace") != tb(i).decode("utf-8", errors="ignore") for i in ids)

    hf = sentencepiece_tokenizer(["\u2581the", "\u2581", "h", "l", "o", "w", "r", "d", "e", "n", "\u2581end"])
    sp_ids = hf(text.replace(" <|user|>", ""), add_special_tokens=False)["input_ids"]
    sb = TokenBytes(hf)
    assert not sb.byte_level and any(1 <= i <= 256 for i in sp_ids)
    assert b"".join(sb(i) for i in sp_ids) == (" " + text.replace(" <|user|>", "")).encode()
    e = entry(tb, ids[0], float("-inf"), [[ids[0], -0.5]])
    assert e["logprob"] == -9999.0 and e["bytes"] == list(tb(ids[0])) and e["top_logprobs"][0]["logprob"] == -0.5


def test_logit_bias_maps_token_ids_to_numbers():
    assert parse(logit_bias={"7": -100, "12": 2.5}).logit_bias == {7: -100.0, 12: 2.5}
    assert parse(logit_bias={}).logit_bias is None and parse().logit_bias is None


def test_penalties_are_kept_for_the_sampler():
    req = parse(frequency_penalty=0.5, presence_penalty=-1)
    assert (req.frequency_penalty, req.presence_penalty) == (0.5, -1.0)
    assert (parse().frequency_penalty, parse().presence_penalty) == (0.0, 0.0)


def test_body_must_be_an_object():
    with pytest.raises(APIError, match="JSON object"):
        parse_chat_request([1, 2], LIMITS)


class CharTokenizer:
    """One token per character; decode skips nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(text: str, stops: list[str]) -> tuple[list[str], bool]:
    ts = TextStream(CharTokenizer(), stops)
    out = []
    for ch in text:
        delta, hit = ts.push([ord(ch)])
        out.append(delta)
        if hit:
            return out, True
    out.append(ts.push([], final=True)[0])
    return out, False


def test_stop_string_cuts_the_text_and_is_not_sent():
    deltas, hit = feed("hello world. more", ["world"])
    assert hit and "".join(deltas) == "hello "


def test_partial_stop_prefix_is_held_back_then_released():
    deltas, hit = feed("say wow", ["wor"])
    assert not hit and "".join(deltas) == "say wow"
    assert deltas[5] == ""  # "w" could begin "wor": held until "o" ... then "w" settles it
    deltas, hit = feed("abc", ["cd"])
    assert not hit and "".join(deltas) == "abc" and deltas[2] == "" and deltas[3] == "c"


def test_earliest_of_several_stops_wins():
    deltas, hit = feed("one, two; three", [";", ","])
    assert hit and "".join(deltas) == "one"


class Bytes:
    """One token per byte; an incomplete UTF-8 sequence decodes to U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incomplete_utf8_is_held_until_complete():
    ts = TextStream(Bytes(), [])
    euro = "€".encode()
    assert ts.push([euro[0]]) == ("", False)
    assert ts.push([euro[1]]) == ("", False)
    assert ts.push([euro[2]]) == ("€", False)


def test_an_answer_completing_its_contexts_last_character_starts_with_that_character():
    """A token-id prompt (the context) that ends partway through "€": the
    answer's first byte completes it, and the answer's text starts with the
    whole character; a context that ends with a typed U+FFFD keeps it."""
    euro = "€".encode()
    ts = TextStream(Bytes(), [], context=list(b"costs 5") + [euro[0], euro[1]])
    assert ts.push([euro[2]]) == ("€", False)
    assert ts.push(list(b" now")) == (" now", False)
    assert ts.push([], final=True) == ("", False) and ts.text_so_far == "€ now"
    ts = TextStream(Bytes(), [], context=list(b"costs 5") + [euro[0]])
    assert ts.push([euro[1]]) == ("", False)  # still incomplete: held
    assert ts.push([euro[2], *b"!"]) == ("€!", False)
    ts = TextStream(Bytes(), [], context=list("a \ufffd".encode()))  # a replacement character typed as text
    assert ts.push(list(b"x")) == ("x", False)


class CountingTokenizer:
    """The real (tiny preset's) tokenizer, recording how many ids each decode saw."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("source", ["text", "random"])
def test_incremental_text_equals_decoding_the_whole_answer(tok, source):
    """Token by token, the text sent adds up to the whole answer decoded at
    once (multi-byte characters split over byte tokens, special tokens
    skipped), while each push decodes only a few tokens."""
    import random

    if source == "text":
        ids = tok.encode_text("Héllo wörld, 3 × 4 = 12 € — naïve café 😀 über 漢字 end. " * 8)
    else:
        rng = random.Random(5)
        ids = [rng.randrange(len(tok)) for _ in range(400)]
    counting = CountingTokenizer(tok)
    ts = TextStream(counting, [])
    sent = [ts.push([t])[0] for t in ids] + [ts.push([], final=True)[0]]
    assert "".join(sent) == tok.decode(ids) and len(ids) >= 100
    assert max(counting.sizes) <= 12, max(counting.sizes)  # windows, never the whole answer


def test_settings_refuse_unknown_keys_and_bad_limits():
    with pytest.raises(SettingsError, match="checkpont"):
        ServeSettings.from_dict({"checkpont": "x"})
    with pytest.raises(SettingsError, match="limits.max_imgs"):
        ServeSettings.from_dict({"limits": {"max_imgs": 3}})
    with pytest.raises(SettingsError, match="max_body_bytes"):
        ServeSettings.from_dict({"limits": {"max_body_bytes": 0}})
    # a device name torch has no device for is refused here, before any replica starts (serve deploy's config too)
    with pytest.raises(SettingsError, match=r"^device: 'banana' is not a device: choose cpu, cuda, cuda:N or mps$"):
        ServeSettings.from_dict({"device": "banana"})
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert ServeSettings.from_dict({"device": device}).device == device
    s = ServeSettings.from_dict({"limits": {"max_images": 1}, "checkpoint": "/x"})
    assert ServeSettings.from_dict(s.to_dict()) == s


def test_page_history_becomes_api_messages(tmp_path):
    from serve.ui import to_messages

    img = tmp_path / "a.png"
    img.write_bytes(b"png-bytes")
    wav = tmp_path / "q.wav"
    wav.write_bytes(b"wav-bytes")
    history = [
        {"role": "user", "content": {"path": str(img)}},          # a file entry
        {"role": "user", "content": "What colour?"},               # its text, a separate entry
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "file", "file": {"path": str(img)}}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    msgs = to_messages({"text": "Listen", "files": [str(wav)]}, history)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [(p.kind, p.text or p.data) for p in msgs[0].parts] == [("image", b"png-bytes"), ("text", "What colour?")]
    assert [p.kind for p in msgs[2].parts] == ["image", "text"]
    assert msgs[3].parts[0].text == "Blue."
    assert [(p.kind, p.text or p.data) for p in msgs[4].parts] == [("audio", b"wav-bytes"), ("text", "Listen")]


def test_page_refuses_other_files(tmp_path):
    from serve.ui import to_messages

    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(APIError, match="notes.txt: unsupported file type"):
        to_messages({"text": "", "files": [str(f)]}, [])


def test_page_judges_a_file_without_an_extension_by_its_content(tmp_path):
    import io
    import wave

    from PIL import Image

    from serve.ui import file_kind, media_textbox, to_messages

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    photo = tmp_path / "photo"
    photo.write_bytes(buf.getvalue())
    for fmt in ("JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        out = io.BytesIO()
        Image.new("RGB", (4, 4), "red").save(out, format=fmt)
        (tmp_path / f"img-{fmt}").write_bytes(out.getvalue())
        assert file_kind(str(tmp_path / f"img-{fmt}")) == "image", fmt
    clip = tmp_path / "clip"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * 160)
    notes = tmp_path / "notes"
    notes.write_text("just text")
    named = tmp_path / "photo.txt"  # a name of another type is believed, whatever the bytes
    named.write_bytes(buf.getvalue())
    assert (file_kind(str(photo)), file_kind(str(clip)), file_kind(str(notes)), file_kind(str(named))) == (
        "image", "audio", None, None)
    assert file_kind(str(tmp_path / "gone")) is None  # unreadable: refused as unsupported, not a crash
    msgs = to_messages({"text": "What is this?", "files": [str(photo), str(clip)]}, [])
    assert [p.kind for p in msgs[0].parts] == ["image", "audio", "text"]
    with pytest.raises(APIError, match="notes: unsupported file type"):
        to_messages({"text": "", "files": [str(notes)]}, [])

    # Gradio's textbox with file types refuses the photo by its missing extension; the page's passes it on
    import gradio as gr
    from gradio.components.multimodal_textbox import MultimodalData
    from gradio.data_classes import FileData

    payload = MultimodalData(text="What is this?", files=[FileData(path=str(photo))])
    with pytest.raises(gr.Error, match="Invalid file type: None"):
        gr.MultimodalTextbox(file_types=["image", "audio"]).preprocess(payload)
    box = media_textbox()
    assert box.preprocess(payload) == {"text": "What is this?", "files": [str(photo)]}
    assert box.get_config()["file_types"] is None and box.get_config()["file_count"] == "multiple"
    import serve.ui

    assert not Path(serve.ui.__file__).with_suffix(".pyi").exists()  # no stub written beside the module


def test_serve_config_yaml_is_valid():
    from serve.app import DEFAULT_CONFIG, read_serve_config

    args, opts = read_serve_config(DEFAULT_CONFIG)
    ServeSettings.from_dict(args)
    assert set(opts) == {"Ingress", "ASR", "ImageEncoder", "LLM"}
    for name, o in opts.items():
        assert 0 < o["ray_actor_options"]["num_cpus"] <= 1, name
        assert o["autoscaling_config"]["min_replicas"] >= 1


def test_serve_config_passes_ray_schema():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import DEFAULT_CONFIG, build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert build_app(app.args) is not None  # the builder accepts the file's args


class StubLLM:
    """A stand-in LLM handle: records each generate call, streams what
    ``tokens(call, k)`` yields for the ``k``-th call, counts cancels."""

    def __init__(self):
        self.calls, self.cancelled = [], 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, call: dict):
        self.calls.append(dict(call))
        ids, llm = self.tokens(call, len(self.calls)), self

        class Stream:
            def __aiter__(s):
                return ids

            def cancel(s):
                llm.cancelled += 1

        return Stream()


class FakeLLM(StubLLM):
    """The first call yields ``die_after`` tokens, then its replica 'dies'."""

    def __init__(self, die_after: int):
        super().__init__()
        self.die_after = die_after

    async def tokens(self, call: dict, k: int):
        import ray

        for _ in range(self.die_after if k == 1 else call["max_new_tokens"]):
            yield [5]
        if k == 1:
            raise ray.exceptions.ActorUnavailableError("replica died", None)


def test_min_tokens_reaches_the_llm_and_shrinks_when_an_answer_is_continued(tiny_cfg):
    import asyncio

    from serve.chat import ChatService, Prepared
    from serve.loading import Source

    tok = CharTokenizer()
    tok.stop_ids = [0]
    settings = ServeSettings.from_dict({"retries": 1})
    llm = FakeLLM(die_after=3)
    service = ChatService(None, None, llm, tok, Source(tiny_cfg, None, None), settings)
    req = parse(max_tokens=10, min_tokens=8)
    prep = Prepared([1, 2, 3], None, 10, 0)
    result: dict = {}

    async def run():
        return [d async for d in service.answer(prep, req, result)]

    asyncio.run(run())
    assert [c.get("min_new_tokens") for c in llm.calls] == [8, 5]  # 3 tokens came before the replica died
    assert [c["max_new_tokens"] for c in llm.calls] == [10, 7]
    assert result == {"finish_reason": "length", "completion_tokens": 10}
    service.llm = llm = FakeLLM(die_after=10)
    req = parse(max_tokens=10)
    asyncio.run(run())
    assert "min_new_tokens" not in llm.calls[0]  # absent unless asked for


def test_the_pages_example_images_live_in_one_folder_per_user(tmp_path, monkeypatch):
    """Every chat page a user builds (one per ingress replica, again on each
    restart) shares one folder of example images: nothing piles up in /tmp."""
    import os

    from PIL import Image

    from data_pipelines.synthetic import TEMPLATES
    from serve import ui

    monkeypatch.setattr(ui.tempfile, "gettempdir", lambda: str(tmp_path))
    first = ui.example_inputs(ui.examples_folder())
    again = ui.example_inputs(ui.examples_folder())
    assert first == again
    folder = tmp_path / f"mmphi-examples-{os.getuid()}"
    assert list(tmp_path.iterdir()) == [folder]
    assert sorted(f.name for f in folder.iterdir()) == ["example-0.png", "example-1.png", "example-2.png"]
    for ex in first:
        for f in ex["files"]:
            with Image.open(f) as im:
                assert im.format == "PNG" and im.size == (128, 128)
    # questions the training set asks, worded as it words them: three about an image, one text only
    assert [(ex["text"], len(ex["files"])) for ex in first] == [
        (TEMPLATES["colour"][0], 1), (TEMPLATES["position"][0], 1), (TEMPLATES["count"][0], 1),
        ("What is three plus four?", 0)]


# ------------------------------------------------- empty, broken and odd input

AUDIO = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("content", ["", "   \n\t ", [], [{"type": "text", "text": ""}],
                                     [{"type": "text", "text": " "}, "\n"]])
def test_an_empty_last_user_message_is_refused(content, stream):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    err = error_of(messages=history + [{"role": "user", "content": content}], stream=stream)
    assert err.param == "messages[2].content" and err.code == "empty_prompt"
    assert "is empty" in err.message


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": PNG}}], [AUDIO],
                                     [{"type": "text", "text": ""}, {"type": "image_url", "image_url": {"url": PNG}}],
                                     " x "])
def test_image_or_audio_alone_is_a_prompt_and_earlier_messages_may_be_empty(content):
    req = parse(messages=[{"role": "system", "content": ""}, {"role": "user", "content": []},
                          {"role": "assistant", "content": ""}, {"role": "user", "content": content}])
    assert len(req.messages) == 4


def test_the_page_and_the_api_share_the_empty_prompt_rule():
    from serve.protocol import Message, Part, has_prompt

    assert not has_prompt(Message("user", [Part("text", text=" \t")]))
    assert has_prompt(Message("user", [Part("audio", data=b"x")]))
    assert "has_prompt(messages[-1])" in (Path(__file__).parents[1] / "serve" / "ui.py").read_text()


@pytest.mark.parametrize("raw, param", [
    (r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages[0].content"),
    (r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok \udfff"}]}]}',
     "messages[0].content[0].text"),
    (r'{"messages": [{"role": "user", "content": ["a", "\ud83d"]}]}', "messages[0].content[1]"),
    (r'{"messages": [{"role": "system", "content": "\udc80"}, {"role": "user", "content": "hi"}]}',
     "messages[0].content"),
    (r'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}', "stop[0]"),
    (r'{"messages": [{"role": "user", "content": "hi"}], "model": "\ud800"}', "model"),
])
def test_text_that_is_not_valid_unicode_is_refused(raw, param):
    from serve.protocol import parse_json_body

    with pytest.raises(APIError) as e:
        parse_chat_request(parse_json_body(raw.encode()), LIMITS)
    assert e.value.status == 400 and e.value.param == param
    assert "not valid Unicode" in e.value.message
    e.value.message.encode("utf-8")  # the error itself can be sent
    # a valid surrogate pair is one character
    assert parse_chat_request(parse_json_body(rb'{"messages": [{"role": "user", "content": "\ud83d\ude00"}]}'),
                              LIMITS).messages[0].parts[0].text == "\U0001F600"


def test_deeply_nested_json_is_a_clear_error():
    from serve.protocol import parse_json_body

    depth = 100_000
    for raw in (b'{"messages": ' + b"[" * depth + b"]" * depth + b"}", b"{" + b'"a": {' * depth + b"}" * (depth + 1)):
        with pytest.raises(APIError, match="nested too deeply") as e:
            parse_json_body(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json"
    with pytest.raises(APIError, match="must be an object"):  # nested, but not too deeply to read
        parse_chat_request(parse_json_body(b'{"messages": ' + b"[" * 50 + b"]" * 50 + b"}"), LIMITS)


def test_stream_null_is_false_and_include_usage_must_be_a_boolean():
    req = parse(stream=None, stream_options=None)
    assert (req.stream, req.include_usage) == (False, False)
    assert parse(stream=True, stream_options={"include_usage": None}).include_usage is False
    for value in ("no", 0, 1, "true"):
        err = error_of(stream=True, stream_options={"include_usage": value})
        assert err.param == "stream_options.include_usage" and "true or false" in err.message


@pytest.mark.parametrize("given, code", [("en", "en"), ("EN", "en"), ("English", "en"), ("castilian", "es"),
                                         ("haw", "haw"), (" french ", "fr")])
def test_transcription_language_is_a_whisper_code_or_name(given, code):
    from serve.protocol import parse_transcription_form

    assert parse_transcription_form({"language": given}).language == code
    assert parse_transcription_form({}).language is None


@pytest.mark.parametrize("form, param, words", [
    ({"language": "klingon"}, "language", "language 'klingon' is not supported"),
    ({"language": "e"}, "language", "not supported"),
    ({"temperature": "hot"}, "temperature", "must be a number, got 'hot'"),
    ({"temperature": "nan"}, "temperature", "between 0 and 1"),
    ({"temperature": "1.5"}, "temperature", "between 0 and 1"),
    ({"response_format": "srt"}, "response_format", "not supported"),
])
def test_bad_transcription_fields_name_the_problem(form, param, words):
    from serve.protocol import parse_transcription_form

    with pytest.raises(APIError) as e:
        parse_transcription_form(form)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    assert parse_transcription_form({"temperature": "0.2"}).temperature == 0.2


class FakeImageEncoder:
    """Decodes images as the ImageEncoder replica does, without CLIP."""

    @property
    def encode(self):
        return self

    async def remote(self, data: bytes, affinity_key=None):
        from models.images import load_image

        load_image(data)
        return np.zeros((4, 8), np.float32)


class FakeASR:
    def __init__(self):
        self.calls = []

    @property
    def transcribe(self):
        return self

    async def remote(self, data: bytes, language=None, temperature=None, detail=False, task="transcribe"):
        self.calls.append((language, temperature) if task == "transcribe" else (language, temperature, task))
        if detail:
            return {"text": "some words", "language": language or "de", "duration": 2.5}
        return "some words"


def fake_service(tok, tiny_cfg, **settings):
    from serve.chat import ChatService
    from serve.loading import Source

    return ChatService(FakeASR(), FakeImageEncoder(), None, tok, Source(tiny_cfg, None, None),
                       ServeSettings.from_dict(settings))


def test_an_image_that_does_not_decode_is_named_without_python_internals(tok, tiny_cfg):
    import asyncio
    import io

    from PIL import Image

    service = fake_service(tok, tiny_cfg)
    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, "PNG")
    image = "data:image/png;base64,"
    req = parse(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Which?"},
        {"type": "image_url", "image_url": {"url": image + base64.b64encode(good.getvalue()).decode()}},
        {"type": "image_url", "image_url": {"url": image + base64.b64encode(b"\x89PNG broken").decode()}}]}])
    with pytest.raises(APIError) as e:
        asyncio.run(service.prepare(req))
    err = e.value
    assert err.status == 400 and err.code == "invalid_image"
    assert err.message.startswith("image 2 (messages[0].content[2]): could not decode an image"), err.message
    assert " at 0x" not in err.message and "BytesIO" not in err.message and "<" not in err.message
    assert err.param == "messages[0].content[2].image_url"


def test_image_error_message_drops_object_reprs():
    from serve.chat import image_error_message

    msg = image_error_message("could not decode an image from the given bytes: cannot identify image file "
                              "<_io.BytesIO object at 0x7f86a1b2c3d0>")
    assert msg == "could not decode an image from the given bytes: the data is not in an image format the server reads"


@pytest.fixture
def api(tok, tiny_cfg):
    from starlette.testclient import TestClient

    from serve.api import build_api

    service = fake_service(tok, tiny_cfg)
    with TestClient(build_api(service, api_key=None, mount_ui=False), raise_server_exceptions=False) as c:
        c.service = service
        yield c


def test_the_api_refuses_broken_bodies_with_400(api):
    cases = [
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
        (rb'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages[0].content", "not valid Unicode"),
        (rb'{"messages": [{"role": "user", "content": "  "}]}', "messages[0].content", "is empty"),
        (rb'{"messages": [{"role": "user", "content": []}], "stream": true}', "messages[0].content", "is empty"),
    ]
    for raw, param, words in cases:
        r = api.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert words in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_transcriptions_check_language_temperature_and_model(api):
    wav = {"file": ("q.wav", b"RIFF....", "audio/wav")}
    for data, status, param, words in [
        ({"language": "klingon"}, 400, "language", "language 'klingon' is not supported"),
        ({"temperature": "warm"}, 400, "temperature", "must be a number"),
        ({"model": "gpt-4o-transcribe"}, 404, "model", "does not exist"),
    ]:
        r = api.post("/v1/audio/transcriptions", files=wav, data=data)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    assert api.service.asr.calls == []  # refused before the ASR call
    for model in ("whisper-1", "mmphi", str(api.service.source.cfg.speech.model)):
        r = api.post("/v1/audio/transcriptions", files=wav, data={"model": model, "language": "English"})
        assert r.status_code == 200 and r.json() == {"text": "some words"}, r.text
    assert api.service.asr.calls == [("en", None)] * 3
    # the request's temperature reaches Whisper; verbose_json names the language (detected when not
    # given) as OpenAI does, with the audio's seconds
    r = api.post("/v1/audio/transcriptions", files=wav, data={"temperature": "0.4", "response_format": "verbose_json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"task": "transcribe", "language": "german", "duration": 2.5, "text": "some words"}
    assert api.service.asr.calls[-1] == (None, 0.4)


def test_translations_ask_whisper_to_translate_and_detect_the_language(api):
    wav = {"file": ("q.wav", b"RIFF....", "audio/wav")}
    r = api.post("/v1/audio/translations", files=wav, data={"model": "whisper-1", "temperature": "0.2"})
    assert r.status_code == 200 and r.json() == {"text": "some words"}, r.text
    assert api.service.asr.calls == [(None, 0.2, "translate")]
    r = api.post("/v1/audio/translations", files=wav, data={"response_format": "verbose_json"})
    assert r.json() == {"task": "translate", "language": "english", "duration": 2.5, "text": "some words"}
    r = api.post("/v1/audio/translations", files=wav, data={"language": "de"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "language", r.text
    assert len(api.service.asr.calls) == 2  # refused before the ASR call


def test_internal_errors_name_the_cause_without_a_remote_traceback():
    from serve.api import internal_error

    class TaskError(Exception):  # the shape of ray.exceptions.RayTaskError: a traceback, then .cause
        cause = ValueError("unsupported thing\nmore detail")

        def __str__(self):
            return '\x1b[36mray::ASR.transcribe()\x1b[39m (pid=1)\n  File "/x/y.py", line 3'

    err = internal_error("internal error", TaskError())
    assert err.status == 500 and err.message == "internal error: ValueError: unsupported thing"


def test_unknown_routes_and_methods_are_errors_in_openai_shape(api):
    """Any /v1/ path the API lacks is a 404 naming the routes it has, a known
    path with another method a 405 with Allow; both in OpenAI's error shape,
    and the API answers next. ``GET /v1/models/{id}`` retrieves the model."""
    r = api.get("/v1/embeddings")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("no route GET /v1/embeddings; the API's routes are ")
    assert "/v1/chat/completions" in err["message"] and "/v1/models/{model_id}" in err["message"]
    assert "/v1/completions" in err["message"]
    r = api.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    assert r.json()["error"] == {"message": "GET is not allowed on /v1/chat/completions; use POST", "type":
                                 "invalid_request_error", "param": None, "code": "method_not_allowed"}
    r = api.delete("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET", r.text
    name = api.get("/v1/models").json()["data"][0]["id"]
    one = api.get(f"/v1/models/{name}")
    assert one.status_code == 200 and one.json() == api.get("/v1/models").json()["data"][0]
    r = api.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert f"this server serves {name!r}" in r.json()["error"]["message"]
    health = api.get("/healthz")
    assert health.status_code in (200, 503)  # outside /v1/: not the catch-all
    assert health.json()["version"] == importlib.metadata.version("mmphi")  # the server's own, for bug reports
    r = api.post("/v1/audio/transcriptions", files={"file": ("q.wav", b"RIFF....", "audio/wav")})
    assert r.status_code == 200 and r.json() == {"text": "some words"}, r.text


def test_system_fingerprint_follows_the_weights_config_and_device(tiny_model, tiny_cfg, tmp_path):
    """One fingerprint for the same weights (a copied checkpoint included),
    another when a weight file's bytes, the config or the device change."""
    import shutil

    from models.checkpoint import read_meta, save_checkpoint
    from models.config import apply_overrides
    from serve.loading import Source, system_fingerprint

    plain = ServeSettings.from_dict({})
    preset = system_fingerprint(Source(tiny_cfg, None, None), plain)
    assert re.fullmatch(r"fp_[0-9a-f]{12}", preset)
    assert system_fingerprint(Source(tiny_cfg, None, None), plain) == preset
    assert system_fingerprint(Source(apply_overrides(tiny_cfg.to_dict(), ["llm.lora.r=4"]), None, None), plain) != preset
    assert system_fingerprint(Source(tiny_cfg, None, None), ServeSettings.from_dict({"device": "cpu"})) != preset

    ckpt = save_checkpoint(tiny_model, tmp_path / "a")
    copy = Path(shutil.copytree(ckpt, tmp_path / "b"))

    def of(path):
        meta = read_meta(path)
        return system_fingerprint(Source(apply_overrides(meta["config"], []), path, meta), plain)

    first = of(ckpt)
    assert first == of(copy) and first != preset
    weights = next(copy / f for f in read_meta(copy)["files"] if f.endswith(".safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert of(copy) != first



class SeededLLM(StubLLM):
    """An answer that depends on the call's seed: token ``40 + seed % 20``
    (or 40 without a seed), ``max_new_tokens`` times; ``fail_seed``'s call
    fails after one token."""

    def __init__(self, fail_seed: int | None = None):
        super().__init__()
        self.fail_seed = fail_seed

    async def tokens(self, call: dict, k: int):
        import asyncio

        seed = call.get("seed")
        for i in range(call["max_new_tokens"]):
            await asyncio.sleep(0.001 * (1 + (seed or 0) % 3))  # the choices' tokens interleave
            if seed is not None and seed == self.fail_seed and i == 1:
                raise RuntimeError("the replica broke")
            yield [40 + (seed or 0) % 20]


def sse_chunks(text: str) -> list[dict]:
    import json

    lines = [ln[len("data: "):] for ln in text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(ln) for ln in lines[:-1]]


def test_n_answers_each_sample_with_their_own_seed(api):
    api.service.llm = llm = SeededLLM()
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 0.7, "seed": 10,
            "max_tokens": 4}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert [c["index"] for c in res["choices"]] == [0, 1, 2]
    assert sorted(c["seed"] for c in llm.calls) == [10, 11, 12]
    texts = [c["message"]["content"] for c in res["choices"]]
    assert texts == [api.service.tok.decode([40 + s % 20] * 4) for s in (10, 11, 12)] and len(set(texts)) == 3
    assert all(c["finish_reason"] == "length" for c in res["choices"])
    one = api.post("/v1/chat/completions", json={**body, "n": 1}).json()  # choice 0 is the request alone
    assert res["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counted once
    assert res["usage"]["completion_tokens"] == 12 and one["choices"][0]["message"]["content"] == texts[0]
    # the same, streamed: each choice's role, text and finish by index, the usage of all
    r = api.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    by_index: dict[int, list] = {}
    for ch in chunks:
        for c in ch["choices"]:
            by_index.setdefault(c["index"], []).append(c)
    assert sorted(by_index) == [0, 1, 2]
    for i, cs in by_index.items():
        assert cs[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in cs) == texts[i]
        assert [c["finish_reason"] for c in cs if c["finish_reason"]] == ["length"] and cs[-1]["finish_reason"]
    order = [c["index"] for ch in chunks for c in ch["choices"] if c["delta"].get("content")]
    assert order != sorted(order)  # streamed as they come, not one choice after the other
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    # greedy: no seed reaches the LLM, n equal answers
    llm.calls.clear()
    greedy = api.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    assert len({c["message"]["content"] for c in greedy["choices"]}) == 1
    assert len(llm.calls) == 3 and all("seed" not in c for c in llm.calls)


class RatedSeededLLM(StubLLM):
    """Each choice's answer (by the call's seed) one token a piece, each
    with its logprob entry, the choices' pieces interleaved in time."""

    def __init__(self, tok):
        super().__init__()
        self.texts = {s: tok.encode_text(t) for s, t in
                      ((10, " the red circle is on the left"), (11, " a small blue square"), (12, " two stars"))}

    async def tokens(self, call: dict, k: int):
        import asyncio

        ids = self.texts[call["seed"]]
        for j, t in enumerate(ids[:call["max_new_tokens"]]):
            if j % 3 == 0:  # the next pieces are there at once (as a replica's stream buffers them)
                await asyncio.sleep(0.002 * (1 + call["seed"] % 3))
            yield {"ids": [t], "logprobs": [[-1.0 - j, [[t, -0.5]]]]}


def test_streamed_logprobs_of_n_answers_come_with_their_own_text(api):
    """With ``n`` answers streamed side by side, each chunk's logprobs entries
    are those of its own text: an answer that ran ahead of the stream does
    not put the next piece's entries in the chunk before it (chat and
    legacy completions)."""
    tok = api.service.tok
    api.service.llm = llm = RatedSeededLLM(tok)
    texts = {i: tok.decode(llm.texts[10 + i]) for i in range(3)}
    body = {"n": 3, "temperature": 0.7, "seed": 10, "max_tokens": 30, "logprobs": True, "stream": True}
    chunks = sse_chunks(api.post("/v1/chat/completions", json={
        **body, "messages": [{"role": "user", "content": "hi"}]}).text)
    got: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            text = c["delta"].get("content") or ""
            assert "".join(e["token"] for e in (c["logprobs"] or {}).get("content") or []) == text, c
            got[c["index"]] = got.get(c["index"], "") + text
    assert got == texts
    chunks = sse_chunks(api.post("/v1/completions", json={**body, "prompt": "x", "logprobs": 1}).text)
    got = {}
    for ch in chunks:
        for c in ch["choices"]:
            assert "".join((c["logprobs"] or {}).get("tokens") or []) == c["text"], c
            got[c["index"]] = got.get(c["index"], "") + c["text"]
    assert got == texts


@pytest.mark.parametrize("stream", [False, True])
def test_one_failing_answer_of_n_fails_the_request_and_stops_the_others(api, stream):
    api.service.llm = llm = SeededLLM(fail_seed=11)
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 0.7, "seed": 10,
            "max_tokens": 40, "stream": stream}
    r = api.post("/v1/chat/completions", json=body)
    if stream:  # headers were sent: the error is in the stream
        assert r.status_code == 200
        assert "the replica broke" in sse_chunks(r.text)[-1]["error"]["message"]
    else:
        assert r.status_code == 500 and "the replica broke" in r.json()["error"]["message"], r.text
    assert llm.cancelled == 3  # every LLM call ended with the request (the failed one too)
    r = api.post("/v1/chat/completions", json={**body, "n": 1, "max_tokens": 3})
    assert r.status_code == 200  # the service answers next
