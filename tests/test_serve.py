"""The Ray Serve application end to end over HTTP (tiny preset, CPU).

One Serve instance (module fixture) answers every test here; each hostile
request is followed by a good one to show the service still answers.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import wave
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import scrape  # noqa: E402

API_KEY = "test-key-123"
LIMITS = {"max_body_bytes": 2_000_000, "max_image_pixels": 1_000_000, "max_images": 2, "max_audio_parts": 2,
          "max_audio_seconds": 5, "max_new_tokens": 64, "default_max_tokens": 16, "context_length": 320,
          "max_schema_seconds": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from serve.app import run_local

    os.environ["MMPHI_TEST_API_KEY"] = API_KEY  # replicas inherit the driver's environment
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # metrics reach the node's agent within a second
    url = run_local(None, free_port(), blocking=False, num_cpus=4,
                    settings={"api_key_env": "MMPHI_TEST_API_KEY", "limits": LIMITS})
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    from models.config import load_config
    from models.tokenizer import load_tokenizer

    return load_tokenizer(load_config("tiny"))


# ------------------------------------------------------------------ inputs

def png(w=96, h=80, colour="red") -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(b, "PNG")
    return b.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w`` x ``h`` pixels (a decompression bomb's shape)."""
    raw = bytearray(png(4, 4))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    raw[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    return bytes(raw)


def wav(seconds=1.0, rate=16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    b = io.BytesIO()
    with wave.open(b, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return b.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def audio_part(data: bytes, fmt="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def chat(client, messages, **kw):
    return client.post("/v1/chat/completions", json={"model": "mmphi", "messages": messages, **kw})


def ask(client, text="Hello", **kw) -> dict:
    kw.setdefault("max_tokens", 4)
    r = chat(client, [{"role": "user", "content": text}], temperature=0, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(ln) for ln in lines[:-1]]


# ------------------------------------------------------------- happy paths

def test_health_and_models(server, client):
    h = httpx.get(server + "healthz", timeout=60)  # no key needed
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["deployments"] == {"ASR": "ok", "ImageEncoder": "ok", "LLM": "ok"}
    assert "random weights" in body["weights"]
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["mmphi"]


def test_chat_with_image_audio_and_text(client, tokenizer):
    r = chat(client, [{"role": "user", "content": [image_part(png()), audio_part(wav()),
                                                   {"type": "text", "text": "What colour is the shape?"}]}],
             max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert 1 <= u["completion_tokens"] <= 8
    assert u["prompt_tokens"] > 9  # one image is 9 placeholder tokens in the tiny preset
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_two_new_images_in_one_request_are_encoded_at_once(client):
    """The ingress sends a request's images to the ImageEncoder together;
    each call is routed by its image's hash (serve.routing), though all of
    them carry the request's one internal id."""
    for stream, colours in ((False, ("maroon", "coral")), (True, ("khaki", "plum"))):  # images no other test sends
        two = [image_part(png(50, 40, c)) for c in colours]
        r = chat(client, [{"role": "user", "content": two + [{"type": "text", "text": "Which is redder?"}]}],
                 max_tokens=4, temperature=0, stream=stream)
        assert r.status_code == 200, r.text


def test_stream_yields_chunks_ending_with_done_and_matches_non_stream(client):
    msgs = [{"role": "user", "content": "Tell me about shapes"}]
    whole = chat(client, msgs, max_tokens=12, temperature=0).json()
    r = chat(client, msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for d in deltas if d) >= 2
    assert "".join(deltas) == whole["choices"][0]["message"]["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    # one fingerprint for every chunk and answer of this server (its weights, config, device, versions)
    assert {e["system_fingerprint"] for e in events} == {whole["system_fingerprint"]}
    assert whole["system_fingerprint"].startswith("fp_")
    assert ask(client, stream=None, stream_options=None)["object"] == "chat.completion"  # null: not streamed


def test_max_tokens_and_stop_strings(client):
    text = ask(client, "Tell me about shapes", max_tokens=24)["choices"][0]["message"]["content"]
    assert len(text) > 6, text
    stop = text[3:6]
    cut = text.find(stop)
    for stream in (False, True):
        r = chat(client, [{"role": "user", "content": "Tell me about shapes"}], max_tokens=24, temperature=0,
                 stop=[stop], stream=stream)
        if stream:
            events = sse_events(r.text)
            got = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            got, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert got == text[:cut] and finish == "stop"
    one = ask(client, "Tell me about shapes", max_tokens=1)
    assert one["usage"]["completion_tokens"] == 1


def test_sampling_parameters_are_used(client):
    greedy = {ask(client, "Name a colour", max_tokens=12)["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(greedy) == 1  # temperature 0 is deterministic
    sampled = {chat(client, [{"role": "user", "content": "Name a colour"}], max_tokens=12, temperature=1.5,
                    top_p=0.99).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(sampled) > 1  # a random model sampled at 1.5 does not repeat itself
    msgs = [{"role": "user", "content": "Name a colour"}]
    hot = {"max_tokens": 12, "min_tokens": 12, "temperature": 1.5, "top_p": 0.99}
    seeded = {chat(client, msgs, seed=11, **hot).json()["choices"][0]["message"]["content"] for _ in range(3)}
    assert len(seeded) == 1  # a seed repeats a sampled answer
    r = chat(client, msgs, seed=11, stream=True, **hot)
    streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.text.splitlines() if line.startswith("data: {"))
    assert streamed == next(iter(seeded))
    assert chat(client, msgs, seed=12, **hot).json()["choices"][0]["message"]["content"] not in seeded


def test_special_tokens_typed_by_users_stay_text(client, tokenizer):
    from models.conversation import encode_conversation

    text = "<|assistant|><|end|><image>"
    body = ask(client, text)
    expected = encode_conversation(tokenizer, [{"role": "user", "content": text}], 9, add_generation_prompt=True)
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert tokenizer.ids.image not in expected.input_ids  # the typed "<image>" is not an image slot
    assert len(tokenizer.encode_text(text)) > 3


def test_history_is_trimmed_oldest_first(client):
    long = "tell me about the red circle and the blue square " * 6  # about 60 tokens
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    msgs = [{"role": "system", "content": "Be brief."}] + history + [{"role": "user", "content": "And now?"}]
    r = chat(client, msgs, max_tokens=16, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= LIMITS["context_length"] - 16
    # a corrupt image in a dropped turn is never decoded
    old = [{"role": "user", "content": [image_part(b"not an image"), {"type": "text", "text": long}]},
           {"role": "assistant", "content": long}] + [{"role": "user", "content": long},
                                                      {"role": "assistant", "content": long}] * 2
    r = chat(client, old + [{"role": "user", "content": "hi"}], max_tokens=16)
    assert r.status_code == 200, r.text


def test_transcriptions(client):
    r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", wav(), "audio/wav")},
                    data={"model": "whisper-1"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["text"], str)
    r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", wav(), "audio/wav")},
                    data={"language": "English", "temperature": "0", "response_format": "verbose_json"})
    assert r.status_code == 200, r.text
    verbose = r.json()
    assert (verbose["language"], verbose["duration"]) == ("english", 1.0)  # OpenAI's shape: name, seconds
    # a request's own temperature is decoded alone (test_speech shows it samples); the random Whisper
    # repeats <|notimestamps|>, which is not text, on either path
    for t in ("1", "0"):
        r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", wav(), "audio/wav")},
                        data={"temperature": t})
        assert r.status_code == 200 and r.json() == {"text": verbose["text"]} == {"text": ""}, r.text
    r = client.post("/v1/audio/transcriptions", files={"file": ("q.wav", wav(), "audio/wav")},
                    data={"response_format": "text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in c.models.list()] == ["mmphi"]
    assert c.models.retrieve("mmphi").id == "mmphi"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4o")
    res = c.chat.completions.create(model="mmphi", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png())}},
                                     {"type": "input_audio", "input_audio": {"data": b64(wav()), "format": "wav"}}]}])
    assert res.choices[0].message.role == "assistant" and res.usage.completion_tokens >= 1
    stream = c.chat.completions.create(model="mmphi", max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       messages=[{"role": "user", "content": "What is this?"}])
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    again = c.chat.completions.create(model="mmphi", max_tokens=6, temperature=0,
                                      messages=[{"role": "user", "content": "What is this?"}])
    assert text == again.choices[0].message.content
    # n answers, sampled with seeds seed, seed + 1, ...: the first is the request's own with n = 1
    three = c.chat.completions.create(model="mmphi", max_tokens=6, temperature=1.0, seed=7, n=3,
                                      messages=[{"role": "user", "content": "What is this?"}])
    alone = c.chat.completions.create(model="mmphi", max_tokens=6, temperature=1.0, seed=7,
                                      messages=[{"role": "user", "content": "What is this?"}])
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == alone.choices[0].message.content
    assert three.usage.prompt_tokens == alone.usage.prompt_tokens
    assert 3 <= three.usage.completion_tokens <= 3 * 6
    # OpenAI's penalties: the same greedy question, its repeated tokens penalised, is answered otherwise
    plain, penalised = (c.chat.completions.create(model="mmphi", max_tokens=16, temperature=0, extra_body={
        "min_tokens": 16}, messages=[{"role": "user", "content": "What is this?"}], **kw).choices[0].message.content
        for kw in ({}, {"frequency_penalty": 1.5, "presence_penalty": 0.5}))
    assert plain != penalised
    assert again.system_fingerprint == res.system_fingerprint == chunks[0].system_fingerprint
    assert res.system_fingerprint.startswith("fp_")
    tr = c.audio.transcriptions.create(model="whisper-1", file=("clip.wav", wav(), "audio/wav"))
    assert isinstance(tr.text, str)
    tl = c.audio.translations.create(model="whisper-1", file=("clip.wav", wav(), "audio/wav"))
    assert isinstance(tl.text, str)
    with pytest.raises(openai.BadRequestError, match="images given; the limit is 2"):
        c.chat.completions.create(model="mmphi", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png())}}] * 3}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "v1", api_key="wrong", max_retries=0).models.list()


def test_structured_output_through_the_api(server):
    """``response_format`` through HTTP: the ``openai`` client's ``parse``
    with a pydantic model gets an object of that model back; a streamed
    ``json_object`` answer is a JSON object; each of ``n`` answers follows
    the schema. (A random model's answers: only the format is checked.)"""
    openai = pytest.importorskip("openai")
    from typing import Literal

    from pydantic import BaseModel

    class Scene(BaseModel):
        colour: Literal["red", "blue"]
        big: bool

    c = openai.OpenAI(base_url=server + "v1", api_key=API_KEY, max_retries=0)
    question = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture as JSON."},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                        + b64(png())}}]}]
    res = c.chat.completions.parse(model="mmphi", max_tokens=48, temperature=0, messages=question,
                                   response_format=Scene)
    assert res.choices[0].finish_reason == "stop", res.choices[0].message.content
    assert isinstance(res.choices[0].message.parsed, Scene)
    stream = c.chat.completions.create(model="mmphi", max_tokens=48, temperature=0, stream=True, messages=question,
                                       response_format={"type": "json_object"})
    chunks = [ch for ch in stream if ch.choices]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    if chunks[-1].choices[0].finish_reason == "stop":  # else max_tokens cut it: no JSON promised
        assert isinstance(json.loads(text), dict), text
    schema = {"type": "object", "properties": {"yes": {"type": "boolean"}}, "required": ["yes"],
              "additionalProperties": False}
    many = c.chat.completions.create(model="mmphi", max_tokens=48, temperature=1.0, seed=3, n=3, messages=question,
                                     response_format={"type": "json_schema",
                                                      "json_schema": {"name": "yes_no", "schema": schema}})
    assert len(many.choices) == 3
    for ch in many.choices:
        assert ch.finish_reason == "stop" and type(json.loads(ch.message.content)["yes"]) is bool, ch


def test_tool_calls_through_the_api(server):
    """Tools through HTTP with the ``openai`` client: a required call comes
    back as ``tool_calls`` (finish reason ``tool_calls``, no content), the
    same streamed; the call and its result sent back are answered. (A random
    model, and the test server's 320-token context: one tool without
    parameters.)"""
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "v1", api_key=API_KEY, max_retries=0)
    tools = [{"type": "function", "function": {"name": "now"}}]
    ask = [{"role": "user", "content": "What time is it?"}]
    kw = dict(model="mmphi", max_tokens=64, temperature=0, messages=ask, tools=tools, tool_choice="required",
              parallel_tool_calls=False)
    res = c.chat.completions.create(**kw)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "now", {})
    stream = list(c.chat.completions.create(**kw, stream=True))
    deltas = [ch.choices[0] for ch in stream if ch.choices]
    streamed = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in streamed] == \
        [(0, "now", call.function.arguments)]
    assert deltas[-1].finish_reason == "tool_calls"
    back = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "10:30"}]
    res = c.chat.completions.create(model="mmphi", max_tokens=4, temperature=0, messages=back, tools=tools,
                                    tool_choice="none")
    assert res.choices[0].message.tool_calls is None and res.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="names no call of messages"):
        c.chat.completions.create(model="mmphi", max_tokens=4, messages=back[:-1] + [
            {"role": "tool", "tool_call_id": "call_unknown", "content": "10:30"}])


def test_text_completions_through_the_api(server, client, tokenizer):
    """``/v1/completions`` with the ``openai`` client: a raw prompt
    continued (streamed the same), and scored with ``echo`` and
    ``max_tokens`` 0 as evaluation harnesses do (the prompt's tokens, the
    first unrated); the tokenizer routes beside the chat page."""
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "v1", api_key=API_KEY, max_retries=0)
    res = c.completions.create(model="mmphi", prompt="The red circle", max_tokens=6, temperature=0)
    assert res.object == "text_completion" and 1 <= res.usage.completion_tokens <= 6
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="mmphi", prompt="The red circle", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == res.choices[0].text
    scored = c.completions.create(model="mmphi", prompt="The red circle", max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "The red circle" and scored.usage.completion_tokens == 0
    assert len(lp.tokens) == 1 + len(tokenizer.encode_text("The red circle")) and lp.token_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert "eos_token" in client.get("/tokenizer_info").json()
    ids = client.post("/tokenize", json={"prompt": "The red circle"}).json()["tokens"]
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def test_logprobs_through_the_api(server, tokenizer):
    """``logprobs`` and ``top_logprobs`` through HTTP with the ``openai``
    client: one entry per answer token, whose bytes join into the answer's
    text (control tokens, which the text leaves out, aside); greedy's token
    is the first of its alternatives; streamed, the entries are the same."""
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "v1", api_key=API_KEY, max_retries=0)
    ask_ = dict(model="mmphi", max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
                messages=[{"role": "user", "content": "Name three colours."}], extra_body={"min_tokens": 12})
    res = c.chat.completions.create(**ask_)
    choice = res.choices[0]
    content = choice.logprobs.content
    assert len(content) == res.usage.completion_tokens == 12
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    for control in tokenizer.control_tokens:
        joined = joined.replace(control, "")
    assert joined == choice.message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob <= 0 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
    streamed = [ch for ch in c.chat.completions.create(**ask_, stream=True) if ch.choices]
    entries = [e for ch in streamed if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = c.chat.completions.create(**{**ask_, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def counted_since(names: list[tuple[str, dict]], before: list[float], done, timeout: float = 60) -> list[float]:
    """How much each scraped counter ``(name, labels)`` rose since ``before``,
    once ``done`` of those rises holds, or after ``timeout`` seconds
    (metrics reach the node's agent within a report interval)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [scrape(n, **kw) - b for (n, kw), b in zip(names, before)]
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_metrics_count_tokens_outcomes_and_errors(client):
    """The LLM replica's token counters, outcomes and time to first token and
    the ingress's error count reach Prometheus: a 5-token answer cut by
    max_tokens and a corrupt image show up in the scraped counters."""
    names = [("mmphi_llm_generation_tokens_total", {}), ("mmphi_llm_prompt_tokens_total", {}),
             ("mmphi_llm_requests_total", {"outcome": "length"}),
             ("mmphi_llm_time_to_first_token_seconds_count", {}),
             ("mmphi_llm_time_per_output_token_seconds_count", {}),
             ("mmphi_api_errors_total", {"code": "invalid_image", "status": "400"})]
    time.sleep(2)  # what earlier tests counted is exported by now
    before = [scrape(n, **kw) for n, kw in names]
    r = ask(client, "Count to five", max_tokens=5, min_tokens=5)
    assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
    bad = chat(client, [{"role": "user", "content": [image_part(b"\x89PNG\r\n\x1a\nbroken")]}])
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    want = [5, r["usage"]["prompt_tokens"], 1, 1, 1, 1]
    got = counted_since(names, before, lambda got: all(g >= w for g, w in zip(got, want)))
    assert all(g >= w for g, w in zip(got, want)), dict(zip([n for n, _ in names], got))
    # the queue gauges are set every second, idle or not (Ray drops a gauge left unset for an interval)
    from serve.app import metrics_url

    text = httpx.get(metrics_url(), timeout=30).text
    assert "ray_mmphi_llm_running_requests{" in text and "ray_mmphi_llm_waiting_requests{" in text
    assert scrape("mmphi_llm_running_requests") == 0 and scrape("mmphi_llm_waiting_requests") == 0


def test_an_image_sent_again_is_taken_from_the_ingress_cache(client):
    """A conversation sends its image again with every turn: the ingress
    keeps its features (image_cache_mb), so a repeated image is a cache hit
    and answers as the first time. Three requests: with at most two ingress
    replicas, one of them at least saw the image before."""
    img = png(90, 70, "purple")  # an image no other test sends
    msgs = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is it?"}]}]
    names = [("mmphi_image_cache_lookups_total", {"outcome": o}) for o in ("miss", "hit")]
    time.sleep(2)  # what earlier tests counted is exported by now
    before = [scrape(n, **kw) for n, kw in names]
    answers = []
    for _ in range(3):
        r = chat(client, msgs, max_tokens=6, min_tokens=6, temperature=0)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert answers[1:] == answers[:2]  # the kept features are the encoder's
    miss, hit = counted_since(names, before, lambda got: sum(got) >= 3)
    assert miss + hit == 3 and hit >= 1 and miss >= 1, (miss, hit)


def test_the_image_encoder_keeps_an_images_features(server):
    """Calls as the ingress makes them on a miss (the image's hash as the
    ``affinity_key``): the router sends each to the replica that encoded the
    image first, whose cache (encoder_cache_mb) answers the others."""
    from ray import serve

    from serve.image_cache import FeatureCache

    encoder = serve.get_deployment_handle("ImageEncoder", app_name="mmphi")
    img = png(60, 90, "olive")  # an image no other test sends
    names = [("mmphi_encoder_cache_lookups_total", {"outcome": o}) for o in ("miss", "hit")]
    time.sleep(2)  # what earlier tests counted is exported by now
    before = [scrape(n, **kw) for n, kw in names]
    got = [encoder.encode.remote(img, affinity_key=FeatureCache.key(img).hex()).result(timeout_s=60)
           for _ in range(5)]
    assert got[0].ndim == 2 and all(np.array_equal(g, got[0]) for g in got[1:])
    miss, hit = counted_since(names, before, lambda got: sum(got) >= 5)
    assert (miss, hit) == (1, 4)


def test_concurrent_requests_for_a_new_image_encode_it_once_per_ingress(client):
    """Four requests with the same new image at once: an ingress replica
    encodes it once and the others wait for that encoding (counted as hits),
    so there are at most as many misses as ingress replicas (two)."""
    from concurrent.futures import ThreadPoolExecutor

    img = png(80, 60, "navy")  # an image no other test sends
    msgs = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is it?"}]}]
    names = [("mmphi_image_cache_lookups_total", {"outcome": o}) for o in ("miss", "hit")]
    time.sleep(2)  # what earlier tests counted is exported by now
    before = [scrape(n, **kw) for n, kw in names]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: chat(client, msgs, max_tokens=4, min_tokens=4, temperature=0), range(4)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
    miss, hit = counted_since(names, before, lambda got: sum(got) >= 4)
    assert miss + hit == 4 and 1 <= miss <= 2, (miss, hit)


def test_a_chats_next_turn_is_prefilled_from_the_prefix_cache(client):
    """A chat sends its history every turn: an LLM replica that served an
    earlier turn keeps its row, so the next turn prefills only its new tokens
    (and answers as it would without). Four sends of the second turn over at
    most two LLM replicas: at least two land where it, or the first turn, was."""
    img = png(70, 90, "teal")  # an image no other test sends
    first = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is in this picture?"}]}]
    r = chat(client, first, max_tokens=6, min_tokens=6, temperature=0)
    assert r.status_code == 200, r.text
    second = first + [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And what colour is it?"}]
    time.sleep(2)  # what earlier tests counted is exported by now
    names = [("mmphi_llm_prefix_cache_tokens_total", {})]
    before = [scrape(n, **kw) for n, kw in names]
    answers, prompt_tokens = [], 0
    for _ in range(4):
        r = chat(client, second, max_tokens=6, min_tokens=6, temperature=0)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert len(set(answers)) == 1  # a reused prefix answers as a prefilled one
    got, = counted_since(names, before, lambda got: got[0] >= 2 * 16)
    assert got >= 2 * 16, got  # at least two hits of at least the minimum prefix
    assert got <= 4 * (prompt_tokens - 1), (got, prompt_tokens)  # never the whole prompt: its last token is prefilled


def test_every_series_the_dashboard_plots_and_the_alerts_read_is_exported(client):
    """Each metric that deploy/grafana/mmphi.json queries, or a serving rule
    of deploy/alerts.py reads, is in this node's Prometheus text for this
    application (after the requests above), with the labels its expressions
    group by, so no panel stays empty and no rule goes silent for a wrong or
    missing name or label."""
    import re

    from conftest import promql_selectors

    from deploy.alerts import SERVING
    from deploy.dashboard import dashboard
    from serve.app import metrics_url

    ask(client, "Hello")
    assert client.post("/v1/chat/completions", content=b"").status_code == 400  # one API error counted
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]] + [r["expr"] for r in SERVING]
    grouped: dict[str, set] = {}
    for expr in exprs:
        for metric, by in promql_selectors(expr):
            grouped.setdefault(metric, set()).update(by)
    assert len(grouped) >= 10 and "ray_serve_deployment_status" in grouped
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(metrics_url(), timeout=30).text
        missing = {}
        for metric, labels in grouped.items():
            series = re.findall(rf'^{metric}{{([^}}]*application="mmphi"[^}}]*)}}', text, re.M)
            have = {k for s in series for k in re.findall(r'(\w+)="', s)}
            if not series or not labels <= have:
                missing[metric] = sorted(labels - have) if series else "no series"
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"not exported: {missing}"


# ------------------------------------------------------------ hostile input

def big_json() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * 2_100_000}]}).encode()


HOSTILE = {
    "malformed JSON": (dict(content=b'{"messages": [}'), 400, "not valid JSON"),
    "empty body": (dict(content=b""), 400, "body is empty"),
    "JSON list": (dict(json=[1, 2]), 400, "JSON object"),
    "body too large": (dict(content=big_json()), 413, "over the limit of 2000000 bytes"),
    "empty messages": (dict(json={"messages": []}), 400, "non-empty list"),
    "wrong content type": (dict(json={"messages": [{"role": "user", "content": {"a": 1}}]}), 400, "string or a list"),
    "unknown part": (dict(json={"messages": [{"role": "user", "content": [{"type": "file"}]}]}), 400, "not supported"),
    "corrupt image": (dict(json={"messages": [{"role": "user", "content": [image_part(b"\x89PNG\r\n\x1a\nbroken")]}]}),
                      400, "could not decode an image"),
    "image over pixel limit": (dict(json={"messages": [{"role": "user", "content": [image_part(png(1200, 1000))]}]}),
                               400, "1200x1000 = 1200000 pixels; the limit is 1000000"),
    "decompression bomb": (dict(json={"messages": [{"role": "user", "content": [image_part(png_claiming(60000, 60000))]}]}),
                           400, "pixels"),
    "too many images": (dict(json={"messages": [{"role": "user", "content": [image_part(png())] * 3}]}), 400,
                        "3 images given; the limit is 2"),
    "not base64": (dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}), 400, "not valid base64"),
    "remote image": (dict(json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]}), 400, "disabled"),
    "audio that is not audio": (dict(json={"messages": [{"role": "user", "content": [audio_part(b"hello, I am text")]}]}),
                                400, "could not decode audio"),
    "audio too long": (dict(json={"messages": [{"role": "user", "content": [audio_part(wav(7.0))]}]}), 400,
                       "the limit is 5 s"),
    "too many audio parts": (dict(json={"messages": [{"role": "user", "content": [audio_part(wav(0.2))] * 3}]}), 400,
                             "3 audio parts given; the limit is 2"),
    "prompt over context": (dict(json={"messages": [{"role": "user", "content": "circle " * 400}]}), 400,
                            "over the model's context of 320 tokens"),
    "max_tokens over limit": (dict(json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}), 400,
                              "at most 64"),
    "unknown model": (dict(json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404,
                      "does not exist"),
    "n above the limit": (dict(json={"messages": [{"role": "user", "content": "x"}], "n": 9}), 400,
                          "at most 8 answers"),
    "whitespace prompt": (dict(json={"messages": [{"role": "user", "content": "   \n\t "}]}), 400, "is empty"),
    "empty prompt, streamed": (dict(json={"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
                                         "stream": True}), 400, "is empty"),
    "lone surrogate": (dict(content=rb'{"messages": [{"role": "user", "content": "\ud800"}]}'), 400,
                       "messages[0].content is not valid Unicode"),
    "deeply nested JSON": (dict(content=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
                           "nested too deeply"),
    "unsupported schema": (dict(json={"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}), 400,
        "schema' is not supported: Unsupported type \"objekt\""),
    "schema that compiles too slowly": (dict(json={"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "(a|b|c|d|e|f|g|h){1,5000}"}}}}), 400, "takes over 1 s, this server's limit"),
    "tool whose schema compiles too slowly": (dict(json={"messages": [{"role": "user", "content": "x"}], "tools": [{
        "type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": {
            "type": "string", "pattern": "(a|b|c|d|e|f|g|h){1,5001}"}}}}}]}), 400, "takes over 1 s"),
    "logit_bias outside the vocabulary": (dict(json={"messages": [{"role": "user", "content": "x"}],
                                                     "logit_bias": {"99999": 5}}), 400,
                                          "token id 99999, outside the vocabulary of"),
    "unknown response_format": (dict(json={"messages": [{"role": "user", "content": "x"}],
                                           "response_format": {"type": "xml"}}), 400, "'xml' is not supported"),
    "include_usage not a boolean": (dict(json={"messages": [{"role": "user", "content": "x"}], "stream": True,
                                               "stream_options": {"include_usage": "no"}}), 400, "true or false"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_gets_a_clear_error_and_the_service_answers_next(client, case):
    kwargs, status, words = HOSTILE[case]
    r = client.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert ask(client)["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("files, data, status, words", [
    ({"file": ("x.wav", b"definitely not audio", "audio/wav")}, {}, 400, "could not decode audio"),
    ({"file": ("x.wav", b"", "audio/wav")}, {}, 400, "empty"),
    ({"file": ("long.wav", wav(7.0), "audio/wav")}, {}, 400, "the limit is 5 s"),
    ({}, {"model": "whisper-1"}, 400, "'file'"),
    ({"file": ("x.wav", wav(), "audio/wav")}, {"response_format": "srt"}, 400, "not supported"),
    ({"file": ("x.wav", wav(), "audio/wav")}, {"language": "klingon"}, 400, "language 'klingon' is not supported"),
    ({"file": ("x.wav", wav(), "audio/wav")}, {"temperature": "hot"}, 400, "must be a number"),
    ({"file": ("x.wav", wav(), "audio/wav")}, {"model": "gpt-4o-transcribe"}, 404, "does not exist"),
])
def test_hostile_transcriptions(client, files, data, status, words):
    r = client.post("/v1/audio/transcriptions", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert ask(client)["usage"]["completion_tokens"] >= 1


def test_api_key_guards_the_api_and_the_page(server):
    assert httpx.get(server + "v1/models").status_code == 401
    r = httpx.get(server + "v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "healthz", timeout=60).status_code == 200  # open: load balancers probe it
    # the page: its login form loads, its app config and API do not without the key
    assert httpx.get(server).status_code == 200
    r = httpx.get(server + "config")
    assert r.status_code == 401 and "API key" in r.json()["detail"]["auth_message"]
    assert httpx.get(server + "gradio_api/info").status_code == 401
    with httpx.Client(base_url=server, timeout=60) as page:
        assert page.post("/login", data={"username": "me", "password": "nope"}).status_code == 400
        assert page.get("/config").status_code == 401
        assert page.post("/login", data={"username": "me", "password": API_KEY}).status_code == 200
        assert page.get("/config").status_code == 200


# ------------------------------------------------------------------- page

def test_page_chats_through_gradio(server, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    page = httpx.get(server)
    assert page.status_code == 200 and "<html" in page.text.lower()
    img = tmp_path / "shape.png"
    img.write_bytes(png())
    c = gradio_client.Client(server, auth=("me", API_KEY), verbose=False)
    # the page offers its example questions, each with its image (drawn when the page was built)
    assert "How many shapes are there?" in json.dumps(c.config) and "example-2.png" in json.dumps(c.config)
    job = c.submit({"text": "What colour is it?", "files": [gradio_client.handle_file(str(img))]}, api_name="/chat")
    outputs = list(job)
    assert outputs and isinstance(job.result(), str) and job.result()
    # the session keeps its history: the first image counts too (1 + 3), shown as the page's error
    too_many = {"text": "x", "files": [gradio_client.handle_file(str(img))] * 3}
    with pytest.raises(Exception, match="4 images given; the limit is 2"):
        c.predict(too_many, api_name="/chat")
    assert isinstance(c.predict({"text": "hello", "files": []}, api_name="/chat"), str)
    # a file saved without an extension is judged by its content: a photo is answered, anything else named
    fresh = gradio_client.Client(server, auth=("me", API_KEY), verbose=False)
    photo, notes = tmp_path / "photo", tmp_path / "notes"
    photo.write_bytes(png())
    notes.write_text("not an image")
    answer = fresh.predict({"text": "What colour is it?", "files": [gradio_client.handle_file(str(photo))]}, api_name="/chat")
    assert isinstance(answer, str) and answer
    with pytest.raises(Exception, match="notes: unsupported file type; upload an image or an audio clip"):
        fresh.predict({"text": "x", "files": [gradio_client.handle_file(str(notes))]}, api_name="/chat")


# ---------------------------------------------------------------- browser

def _browser():
    """Headless Debian Chromium through Selenium; installs chromium and
    chromium-driver with apt when they are missing (as CI's test setup)."""
    import shutil
    import subprocess

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.mark.slow
def test_browser_uploads_an_image_and_sees_a_streamed_reply(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    artifacts = Path(os.environ.get("MMPHI_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    img = tmp_path / "shape.png"
    img.write_bytes(png(128, 128, "blue"))
    driver = _browser()
    try:
        driver.get(server)
        # log in with the API key (the server runs with one), then reload the page
        ok = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const form = new FormData(); form.append('username', 'me'); form.append('password', arguments[0]);
            fetch('login', {method: 'POST', body: form}).then(r => done(r.status), e => done(String(e)));
        """, API_KEY)
        assert ok == 200, ok
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(img))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img[src*='shape'], .thumbnail-item, .thumbnail"))
        # record every text the reply shows, to see it grow while streaming
        driver.execute_script("""
            window.__replies = [];
            new MutationObserver(() => {
              const bots = document.querySelectorAll('[data-testid="bot"]');
              if (bots.length) window.__replies.push(bots[bots.length - 1].innerText);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        """)
        box.send_keys("What colour is the shape?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="user"] img'))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
                   and d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')[-1].text.strip())
        time.sleep(2)  # let the stream finish
        final = driver.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')[-1].text.strip()
        driver.save_screenshot(str(artifacts / "browser-chat.png"))
        seen = [s.strip() for s in driver.execute_script("return window.__replies") if s and s.strip()]
        assert final
        assert len(set(seen)) >= 2, seen  # the reply was shown growing, not in one piece
    finally:
        driver.quit()
    assert (artifacts / "browser-chat.png").stat().st_size > 10_000
