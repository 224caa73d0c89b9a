"""``/v1/completions``: raw prompts continued without the chat template,
``echo`` with the prompt's own logprobs (what evaluation harnesses send),
several prompts per request; through the API with the LLM replica class
(tiny preset, CPU, no Ray).
"""
from __future__ import annotations

import pytest
import torch

from serve.protocol import APIError, parse_completion_request
from serve.settings import Limits

from conftest import answer_ids
from test_serve_protocol import StubLLM

LIMITS = Limits(max_choices=4, max_new_tokens=32)


def parse(**body):
    body.setdefault("prompt", "Once upon a time")
    return parse_completion_request(body, LIMITS)


def test_prompts_in_every_form_are_parsed():
    assert parse().prompts == ["Once upon a time"] and parse().req.max_tokens == 16 and not parse().echo
    assert parse(prompt=["a", "b"]).prompts == ["a", "b"]
    assert parse(prompt=[5, 6, 7]).prompts == [[5, 6, 7]]
    assert parse(prompt=[[5, 6], "c"]).prompts == [[5, 6], "c"]
    scored = parse(echo=True, max_tokens=0, logprobs=3, n=2, seed=4, temperature=0.5, stop="\n")
    assert (scored.echo, scored.req.max_tokens, scored.req.logprobs, scored.req.n) == (True, 0, 3, 2)
    assert (scored.req.seed, scored.req.temperature, scored.req.stop) == (4, 0.5, ["\n"])
    assert parse(best_of=1).req.n == 1


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ""}, "prompt", "prompt 0 is empty"),
    ({"prompt": []}, "prompt", "must be a string, a list of strings"),
    ({"prompt": [[]]}, "prompt", "none empty"),
    ({"prompt": [1, -2]}, "prompt", "a list of token ids"),
    ({"prompt": {"text": "a"}}, "prompt", "must be a string"),
    ({"prompt": ["a"] * 3, "n": 2}, "prompt", "3 prompts x n 2 = 6 answers; this server gives at most 4"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"best_of": 3}, "best_of", "unless it equals 'n'"),
    ({"logprobs": 21}, "logprobs", "from 0 to 20"),
    ({"logprobs": True}, "logprobs", "from 0 to 20"),
    ({"max_tokens": 0}, "max_tokens", "a positive integer"),
    ({"max_tokens": 33}, "max_tokens", "at most 32"),
    ({"echo": "yes"}, "echo", "true or false"),
])
def test_bad_completion_requests_name_the_problem(body, param, words):
    with pytest.raises(APIError) as e:
        parse(**body)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert words in e.value.message, e.value.message


# ------------------------------------------------------- with the replica

class ReplicaHandle:
    """The LLM replica class behind the handle interface the ingress calls."""

    def __init__(self, llm):
        self.llm = llm

    def options(self, **_):
        return self

    @property
    def generate(self):
        llm = self.llm

        class Method:
            @staticmethod
            def remote(call):
                gen = llm.generate(call)

                class Stream:
                    def __aiter__(s):
                        return gen

                    def cancel(s):
                        pass

                return Stream()

        return Method

    @property
    def prompt_logprobs(self):
        llm = self.llm

        class Method:
            @staticmethod
            async def remote(request):
                return await llm.prompt_logprobs(request)

        return Method


@pytest.fixture(scope="module")
def llm():
    from serve.deployments import LLM

    replica = LLM.func_or_class({"preset": "tiny", "device": "cpu", "torch_threads": 0})
    yield replica
    replica.shutdown()


@pytest.fixture
def api(llm, tok, tiny_cfg):
    from starlette.testclient import TestClient

    from serve.api import build_api
    from test_serve_protocol import fake_service

    service = fake_service(tok, tiny_cfg)
    service.llm = ReplicaHandle(llm)
    with TestClient(build_api(service, api_key=None, mount_ui=False), raise_server_exceptions=False) as c:
        yield c


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The model's log-softmax at each position (ids an answer never holds ruled out), from one forward pass."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0].float()
        logits[:, model.suppressed_ids] = -float("inf")
        return torch.log_softmax(logits, dim=-1)


def test_a_raw_prompt_is_continued_as_the_model_would(api, llm, tok):
    ids = [tok.ids.bos] + tok.encode_text("Once upon a time")
    expect = answer_ids(llm, {"input_ids": ids, "image_features": None, "max_new_tokens": 8})
    r = api.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["object"] == "text_completion" and res["id"].startswith("cmpl-")
    choice = res["choices"][0]
    assert choice["text"] == tok.decode([t for t in expect if t not in tok.stop_ids])
    assert choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    assert res["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expect),
                            "total_tokens": len(ids) + len(expect)}
    # the same prompt as token ids (no BOS added to ids) gives the same answer
    same = api.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert same["choices"][0]["text"] == choice["text"]


def test_echo_scores_the_prompt_as_the_model_rates_it(api, llm, tok):
    """``echo`` + ``logprobs`` with ``max_tokens`` 0: every prompt token, the
    first without a rating, the others with the model's own log-probability
    and their 3 most likely alternatives; offsets into the echoed text."""
    text = "the red circle is left"
    r = api.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    ids = [tok.ids.bos] + tok.encode_text(text)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference_logprobs(llm.model, ids)
    for k in range(1, len(ids)):
        assert lp["token_logprobs"][k] == pytest.approx(float(ref[k - 1, ids[k]]), abs=1e-4), k
        top = lp["top_logprobs"][k]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(float(ref[k - 1].max()), abs=1e-4)
    assert lp["text_offset"][:2] == [0, 0]  # the BOS the server added takes no text
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"][1:], lp["tokens"][1:])] == lp["tokens"][1:]
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_an_answer_streamed_or_not_and_several_prompts(api, tok):
    body = {"prompt": ["a red", "two blue"], "n": 2, "max_tokens": 24, "echo": True, "logprobs": 1,
            "temperature": 1.0, "seed": 9}
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices, used = r.json()["choices"], r.json()["usage"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"][:len(p)] for c, p in zip(choices, ["a red", "a red", "two blue", "two blue"])] == \
        ["a red", "a red", "two blue", "two blue"]
    assert choices[0]["text"] != choices[1]["text"]  # choice i samples with seed + i
    for c, p in zip(choices, ["a red", "a red", "two blue", "two blue"]):
        n_prompt = 1 + len(tok.encode_text(p))
        assert len(c["logprobs"]["tokens"]) > n_prompt and c["logprobs"]["token_logprobs"][0] is None
        assert all(isinstance(v, float) for v in c["logprobs"]["token_logprobs"][1:])
        offsets = c["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and offsets[n_prompt] == len(p)  # the answer's tokens follow the prompt
    r = api.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    from test_serve_protocol import sse_chunks

    chunks = sse_chunks(r.text)
    for k, c in enumerate(choices):
        mine = [ch["choices"][0] for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == k]
        assert "".join(m["text"] for m in mine) == c["text"]
        joined = {key: [v for m in mine if m["logprobs"] for v in m["logprobs"][key]] for key in c["logprobs"]}
        assert (joined["tokens"], joined["text_offset"]) == (c["logprobs"]["tokens"], c["logprobs"]["text_offset"])
        # the same ratings, up to the rounding of a batch of another make-up
        assert joined["token_logprobs"] == pytest.approx(c["logprobs"]["token_logprobs"], abs=1e-4)
        assert [None if t is None else sorted(t) for t in joined["top_logprobs"]] == \
            [None if t is None else sorted(t) for t in c["logprobs"]["top_logprobs"]]
        assert mine[-1]["finish_reason"] == c["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == used


def test_the_log_likelihood_request_of_evaluation_harnesses(api, llm, tok):
    """lm-evaluation-harness' ``local-completions`` scores a continuation
    with prompts of token ids, ``echo``, ``logprobs`` 1, ``max_tokens`` 1
    and temperature 0, then sums ``token_logprobs[ctxlen:-1]`` and calls it
    greedy when each equals the best of its ``top_logprobs``: here, for the
    model's own greedy continuation (greedy) and another one (not), both
    summing to the model's log-probabilities."""
    context = [tok.ids.bos] + tok.encode_text("the red circle")
    greedy = answer_ids(llm, {"input_ids": context, "image_features": None, "max_new_tokens": 4,
                              "min_new_tokens": 4})
    other = [t + 1 if t + 1 < len(tok) - 10 else t - 1 for t in greedy]
    r = api.post("/v1/completions", json={"model": "mmphi", "prompt": [context + greedy, context + other],
                                          "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                          "echo": True})
    assert r.status_code == 200, r.text
    found = []
    for choice, cont in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), (greedy, other)):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(context) + len(cont) + 1  # the prompt, then the one new token
        scored, tops = lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1]
        ref = reference_logprobs(llm.model, context + cont)
        assert sum(scored) == pytest.approx(sum(float(ref[len(context) - 1 + j, t]) for j, t in enumerate(cont)),
                                            abs=1e-3)
        found.append(all(v == max(top.values()) for v, top in zip(scored, tops)))
    assert found == [True, False]


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": [5, 999999]}, 400, "token id 999999, outside the vocabulary"),
    ({"prompt": "x " * 1100}, 400, "over the model's context of 1024 tokens"),
    ({"prompt": "x", "model": "gpt-3.5-turbo-instruct"}, 404, "does not exist"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, 400, "outside the vocabulary"),
])
def test_bad_prompts_are_refused_in_words(api, tok, body, status, words):
    r = api.post("/v1/completions", json=body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    image = api.post("/v1/completions", json={"prompt": [tok.ids.image, 5]})
    assert image.status_code == 400 and "the image placeholder" in image.json()["error"]["message"]


class RatedLLM(StubLLM):
    """An LLM handle that streams ``text``'s tokens one message each, rated
    -1, -2, ... with one alternative, as the replica does for logprobs."""

    def __init__(self, tok, text: str):
        super().__init__()
        self.ids = tok.encode_text(text)

    async def tokens(self, call: dict, k: int):
        for j, t in enumerate(self.ids):
            yield {"ids": [t], "logprobs": [[-1.0 - j, [[t, -0.5]]]]}


def test_streamed_logprobs_carry_their_offsets_on_from_chunk_to_chunk(tok, tiny_cfg):
    """Each token in its own chunk: the offsets run on through the answer's
    text, streamed as whole (the first chunks' entries start where the text so far ends)."""
    from starlette.testclient import TestClient

    from serve.api import build_api
    from test_serve_protocol import fake_service, sse_chunks

    text = "the red circle"
    service = fake_service(tok, tiny_cfg)
    service.llm = RatedLLM(tok, text)
    with TestClient(build_api(service, api_key=None, mount_ui=False), raise_server_exceptions=False) as api:
        body = {"prompt": "x", "max_tokens": 30, "logprobs": 1}
        whole = api.post("/v1/completions", json=body).json()["choices"][0]
        chunks = [c["choices"][0] for c in sse_chunks(api.post("/v1/completions", json={**body, "stream": True}).text)
                  if c["choices"]]
    lp = whole["logprobs"]
    n = len(tok.encode_text(text))
    assert whole["text"] == text and lp["token_logprobs"] == [-1.0 - j for j in range(n)]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(n)]
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    rated = [c["logprobs"] for c in chunks if c["logprobs"] and c["logprobs"]["tokens"]]
    assert len(rated) > 1  # in several chunks
    assert [o for r in rated for o in r["text_offset"]] == lp["text_offset"]
    assert "".join(c["text"] for c in chunks) == text


def test_offsets_count_characters_when_tokens_split_them(tok, tiny_cfg):
    """Accented letters the tiny tokenizer spells byte by byte: each token's
    ``text_offset`` is its start in the text in characters (a token inside a
    character starts where the character does), streamed or not."""
    from starlette.testclient import TestClient

    from serve.api import build_api
    from test_serve_protocol import fake_service, sse_chunks

    text = "café crème brûlée, ok"
    service = fake_service(tok, tiny_cfg)
    service.llm = RatedLLM(tok, text)
    ids = service.llm.ids
    pieces = [service.token_bytes(t) for t in ids]
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # some tokens hold part of a character
    want = [len(b"".join(pieces[:k]).decode("utf-8", errors="ignore")) for k in range(len(ids))]
    with TestClient(build_api(service, api_key=None, mount_ui=False), raise_server_exceptions=False) as api:
        body = {"prompt": "x", "max_tokens": 60, "logprobs": 0}
        whole = api.post("/v1/completions", json=body).json()["choices"][0]
        chunks = [c["choices"][0] for c in sse_chunks(api.post("/v1/completions", json={**body, "stream": True}).text)
                  if c["choices"]]
    assert whole["text"] == text and whole["logprobs"]["text_offset"] == want
    assert [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]] == want
    for o, p in zip(want, pieces):  # a token that is whole characters is the text at its offset
        if all(b < 0x80 for b in p):
            assert text[o:o + len(p)] == p.decode()


def test_the_tokenizer_routes_answer_in_vllms_shape(tok, tiny_cfg):
    """``/tokenizer_info``, ``/tokenize`` and ``/detokenize``, as the remote
    tokenizer of evaluation harnesses asks for them (and guarded by the API
    key): a prompt's ids are the ones ``/v1/completions`` feeds, a chat's the
    ones the chat API feeds."""
    import base64

    from starlette.testclient import TestClient

    from models.conversation import encode_conversation
    from serve.api import build_api
    from test_serve_protocol import fake_service

    service = fake_service(tok, tiny_cfg)
    with TestClient(build_api(service, api_key="k", mount_ui=False), raise_server_exceptions=False) as api:
        assert api.post("/tokenize", json={"prompt": "x"}).status_code == 401
        api.headers["Authorization"] = "Bearer k"
        info = api.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
        text = "the <|user|> red circle"
        r = api.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert r["tokens"] == tok.encode_text(text) and r["count"] == len(r["tokens"])
        assert api.post("/tokenize", json={"prompt": text}).json()["tokens"] == [tok.ids.bos] + r["tokens"]
        assert api.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
        png = "data:image/png;base64," + base64.b64encode(b"\x89PNG not decoded").decode()
        chat = [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                             {"type": "image_url", "image_url": {"url": png}}]}]
        ids = api.post("/tokenize", json={"messages": chat}).json()["tokens"]
        assert ids == encode_conversation(tok, [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                                             {"type": "image"}]}],
                                          service.num_image_tokens, add_generation_prompt=True,
                                          system_prompt=tiny_cfg.tokenizer.system_prompt).input_ids
        for body, words in (({"tokens": [1, 99999]}, "outside the vocabulary"), ({"tokens": "1 2"}, "list of token"),
                            ({"prompt": 5}, "'prompt' must be a string"),
                            ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                                "data": base64.b64encode(b"RIFF").decode(), "format": "wav"}}]}]}, "transcribed")):
            path = "/detokenize" if "tokens" in body else "/tokenize"
            r = api.post(path, json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
