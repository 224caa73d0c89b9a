"""The chat pipeline the ingress runs for the HTTP API and the Gradio page.

``ChatService.prepare`` turns a parsed request into model input: audio parts
are transcribed by the ASR deployment, the history is trimmed oldest-first
until prompt + ``max_tokens`` fit the context, and the images still in the
prompt are encoded by the ImageEncoder deployment. ``ChatService.stream``
then streams text from the LLM deployment, applies stop strings, and, when an
LLM replica dies mid-answer, continues on another replica from the tokens
already produced.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
import ray

from .logprobs import entry
from .protocol import APIError, ChatRequest, Message, Part, bad, tool_call

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def cause_of(exc: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error (or ``exc`` itself)."""
    return getattr(exc, "cause", None) or exc


def overloaded(exc: BaseException, deployment: str) -> APIError | None:
    """A 503 with Retry-After for a call that Serve refused because
    ``deployment`` already has ``max_queued_requests`` waiting (else None)."""
    from ray.serve.exceptions import BackPressureError

    inner = cause_of(exc)
    if not isinstance(inner, BackPressureError):
        return None
    limit = inner.args[1] if len(inner.args) > 1 else None  # (num_queued_requests, max_queued_requests, ...)
    retry = inner.retry_after_s or 1
    return APIError(503, f"the server is at capacity: every {deployment} replica is busy and {limit} more requests "
                    "already wait for one; retry in a moment", code="server_overloaded", type="server_error",
                    headers={"Retry-After": str(max(1, round(retry)))})


def raise_if_overloaded(exc: BaseException, deployment: str) -> None:
    """Raise :func:`overloaded`'s 503 in place of a refused call's error."""
    err = overloaded(exc, deployment)
    if err is not None:
        raise err from None


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def image_error_message(message: str) -> str:
    """An image decoding error for the client: without Python object reprs
    (PIL names the ``BytesIO`` it read), in words rather than PIL's."""
    message = _OBJECT_REPR.sub("", message).strip()
    return message.replace("cannot identify image file", "the data is not in an image format the server reads")


@dataclass
class Prepared:
    input_ids: list[int]
    image_features: np.ndarray | None
    max_new_tokens: int
    dropped_messages: int
    affinity: str | None = None  # the conversation's routing key (serve.routing)
    format: dict | None = None  # the grammar answers are held to (serve.grammar's spec): a response_format or tools
    # the prompt's last ids when the answer continues its text (a completion): the answer's text is what
    # decoding them together with it adds, so a first token that starts a word keeps its space
    text_context: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None = None  # OpenAI's logprobs.content entries, when asked for
    tool_calls: list | None = None  # the calls the answer makes (serve.protocol.tool_call's), when it makes any


class TextStream:
    """Incremental detokenisation with stop strings.

    Text that may still change (a trailing incomplete UTF-8 sequence) or that
    may be the start of a stop string is held back until it is settled.
    Each push decodes only a window of the last few tokens (from the token
    before the last settled piece), not the whole answer: decoding the whole
    answer at every token costs the ingress time quadratic in its length.

    ``context``: ids the answer's text continues (a completion's prompt
    end), decoded with the first tokens only to place them, never sent. A
    SentencePiece tokenizer (Phi-3's) drops the space of a text's first
    word ("\u2581blue" alone decodes to "blue"); after its context the
    answer keeps it (" blue"). A context that ends partway through a
    character (byte tokens of a token-id prompt) leaves those bytes to the
    answer: the character they complete is the answer's first text."""

    def __init__(self, tokenizer, stops: list[str], context=()):
        self.tok, self.stops = tokenizer, list(stops)
        self.ids: list[int] = list(context)
        self.prefix = 0  # the window starts here: a settled token, so leading-space rules match
        self.read = len(self.ids)  # ids[:read] are in self.text (or the context)
        self.in_context = bool(self.ids)  # head (ids[prefix:read]) is the context, never sent
        self.text = ""
        self.sent = 0
        self.text_so_far = ""

    def _settle(self, final: bool) -> None:
        """Append the text of the new ids once it no longer ends in an
        incomplete UTF-8 sequence (or at the end)."""
        if self.read == len(self.ids):
            return
        head = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        window = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        start = len(head)
        if self.in_context and not window.startswith(head):  # the context ended partway through a character
            start = len(os.path.commonprefix([head, window]))
        if final or (len(window) > start and not window.endswith("\ufffd")):
            self.text += window[start:]
            self.prefix, self.read, self.in_context = self.read, len(self.ids), False

    def push(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """Add token ids; returns (new text to send, a stop string was reached)."""
        self.ids.extend(ids)
        self._settle(final)
        text = self.text
        hits = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            delta, self.sent = text[self.sent:cut], max(self.sent, cut)
            self.text_so_far += delta
            return delta, True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            end -= self._partial_stop(text[self.sent:end])
        delta = text[self.sent:end]
        self.sent = max(self.sent, end)
        self.text_so_far += delta
        return delta, False

    def _partial_stop(self, tail: str) -> int:
        """Length of the longest suffix of ``tail`` that begins a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


class ChatService:
    def __init__(self, asr, image_encoder, llm, tokenizer, source, settings):
        self.asr, self.image_encoder, self.llm = asr, image_encoder, llm
        self.tok, self.source, self.settings = tokenizer, source, settings
        self.limits = settings.limits
        self.context_length = self.limits.context_length or source.context_length
        from models.vision import vision_spec

        self.num_image_tokens = vision_spec(source.cfg.vision)["num_tokens"]
        self.stop_ids = set(tokenizer.stop_ids)
        # requests that survived a dead replica: retried calls, continued answers
        self.recovered = {"retried_calls": 0, "continued_answers": 0}
        from .image_cache import FeatureCache
        from .metrics import ImageCacheMetrics

        self.image_cache = FeatureCache(int(settings.image_cache_mb * 2**20))
        self.image_cache_metrics = ImageCacheMetrics()

    # ---------------------------------------------------------------- calls
    async def _call(self, method, *args, **kwargs):
        """``await method.remote(*args, **kwargs)``, retried when the replica died under it."""
        for attempt in range(self.settings.retries + 1):
            try:
                return await method.remote(*args, **kwargs)
            except RETRYABLE as e:
                if attempt == self.settings.retries:
                    raise
                self.recovered["retried_calls"] += 1
                log.warning("replica died during %s (%s); retrying", getattr(method, "_method_name", "call"),
                            type(e).__name__)
                await asyncio.sleep(0.5 * (attempt + 1))
            except Exception as e:  # noqa: BLE001 - a full queue is a 503, the rest goes on up
                raise_if_overloaded(e, getattr(method, "deployment_name", None) or "model")
                raise

    async def transcribe(self, data: bytes, language: str | None = None, param: str = "file",
                         temperature: float | None = None, detail: bool = False,
                         task: str = "transcribe") -> str | dict:
        """``ASR.transcribe``; undecodable audio is a 400 naming ``param``, a
        translation an English-only model cannot make a 400 saying so."""
        from models.speech import AudioDecodeError, TranslationUnsupported

        try:
            return await self._call(self.asr.transcribe, data, language, temperature, detail, task)
        except Exception as e:  # noqa: BLE001 - mapped to a 400 or re-raised
            inner = cause_of(e)
            if isinstance(e, AudioDecodeError) or isinstance(inner, AudioDecodeError):
                raise bad(str(inner), param, "invalid_audio") from None
            if isinstance(e, TranslationUnsupported) or isinstance(inner, TranslationUnsupported):
                raise bad(str(inner), "model", "unsupported_model") from None
            raise

    async def encode_image(self, data: bytes, where: str, param: str) -> np.ndarray:
        """CLIP features of one image; ``where`` names it in errors ("image 2 (messages[3].content[0])")."""
        from models.images import ImageDecodeError

        # the image's hash keys both caches: the encoder's router sends it to the replica that keeps it
        key = self.image_cache.key(data) if self.image_cache.max_bytes or self.settings.encoder_cache_mb else None
        try:
            if not self.image_cache.max_bytes:  # image_cache_mb 0: no lookups, none counted
                return await self._call(self.image_encoder.encode, data, affinity_key=key and key.hex())
            # an image another request is encoding now is waited for, not encoded twice (a hit)
            feats, hit = self.image_cache.fetch(
                key, lambda: self._call(self.image_encoder.encode, data, affinity_key=key.hex()))
            self.image_cache_metrics.lookup(hit)
            return await feats
        except Exception as e:  # noqa: BLE001
            inner = cause_of(e)
            if isinstance(e, ImageDecodeError) or isinstance(inner, ImageDecodeError):
                raise bad(f"{where}: {image_error_message(str(inner))}", param, "invalid_image") from None
            raise

    async def fetch_image(self, url: str, param: str) -> bytes:
        import httpx

        cap = self.limits.max_body_bytes
        try:
            async with httpx.AsyncClient(timeout=self.settings.remote_image_timeout_s, follow_redirects=True) as c:
                async with c.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise bad(f"fetching the image URL gave HTTP {r.status_code}", param, "image_fetch_failed")
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > cap:
                            raise bad(f"the image at the URL is over {cap} bytes", param, "image_too_large")
                    return bytes(data)
        except httpx.HTTPError as e:
            raise bad(f"could not fetch the image URL: {e}", param, "image_fetch_failed") from None

    # -------------------------------------------------------------- prepare
    async def prepare(self, req: ChatRequest) -> Prepared:
        fmt = req.response_format
        if fmt is not None:
            await self.check_format(fmt)
        elif req.calls_tools:
            fmt = await self.tools_format(req)
        self.check_logit_bias(req)
        messages = await self._resolve_media(req.messages)
        max_new = req.max_tokens or self.limits.default_max_tokens
        if max_new >= self.context_length:
            raise bad(f"'max_tokens' is {max_new} but the model's context is {self.context_length} tokens",
                      "max_tokens", "context_length_exceeded")
        kept, enc = self._fit(messages, max_new, req.tools if req.calls_tools else None)
        images = [(n, at, p) for n, (at, p) in enumerate(self._image_parts(messages))
                  if any(p is q for m in kept for q in m.parts)]
        feats = None
        if images:
            arrays = await asyncio.gather(*[
                self.encode_image(p.data, f"image {n + 1} (messages[{mi}].content[{pi}])",
                                  f"messages[{mi}].content[{pi}].image_url")
                for n, (mi, pi), p in images])
            feats = np.stack(arrays).astype(np.float32, copy=False)
        from .routing import affinity_key

        return Prepared(enc.input_ids, feats, max_new, len(messages) - len(kept), affinity_key(kept), fmt)

    def check_logit_bias(self, req: ChatRequest) -> None:
        if req.logit_bias:
            outside = sorted(t for t in req.logit_bias if t >= len(self.tok))
            if outside:
                raise bad(f"'logit_bias' names token id {outside[0]}, outside the vocabulary of {len(self.tok)} "
                          "tokens", "logit_bias", "invalid_token_id")

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        """A chat's prompt ids as ``prepare`` builds them (before any trimming to the context)."""
        return self._encode(messages).input_ids

    # ------------------------------------------------ /v1/completions prompts
    def prompt_ids(self, prompt: str | list[int], max_new: int, where: str = "prompt") -> tuple[list[int], bool]:
        """A completions prompt's token ids, and whether the server added a
        BOS: text is encoded as text (never control tokens) after the BOS;
        token ids are taken as they are, but for the image placeholder (no
        image comes with a raw prompt). Refused when prompt + ``max_new``
        exceeds the context."""
        if isinstance(prompt, str):
            bos = self.tok.ids.bos
            ids, added = ([bos] if bos is not None else []) + self.tok.encode_text(prompt), bos is not None
        else:
            ids, added = list(prompt), False
            wrong = next((t for t in ids if t >= len(self.tok) or t == self.tok.ids.image), None)
            if wrong is not None:
                raise bad(f"{where} holds token id {wrong}, " + ("the image placeholder, which needs an image"
                                                               if wrong == self.tok.ids.image else
                                                               f"outside the vocabulary of {len(self.tok)} tokens"),
                          "prompt", "invalid_token_id")
        if len(ids) + max_new > self.context_length:
            raise bad(f"{where} has {len(ids)} tokens and max_tokens asks for {max_new}, over the model's context "
                      f"of {self.context_length} tokens", "prompt", "context_length_exceeded")
        return ids, added

    async def prompt_entries(self, ids: list[int], top: int) -> list[dict]:
        """Each prompt token's logprobs entry (``serve.logprobs.entry``); the
        first has none (nothing comes before it): logprob and top_logprobs None."""
        rates = await self._call(self.llm.prompt_logprobs, {"input_ids": ids, "top": top})
        first = {**entry(self.token_bytes, ids[0], 0.0, []), "logprob": None, "top_logprobs": None}
        return [first] + [entry(self.token_bytes, t, lp, alt) for t, (lp, alt) in zip(ids[1:], rates)]

    async def check_format(self, spec: dict) -> None:
        """A 400 naming the problem when the response format's schema cannot be
        compiled (within ``limits.max_schema_seconds``)."""
        from .grammar import FormatError, check_spec

        try:
            await asyncio.to_thread(check_spec, spec, self.limits.max_schema_seconds)
        except FormatError as e:
            raise bad(f"'response_format.json_schema.schema' is not supported: {e}",
                      "response_format.json_schema.schema", "invalid_schema") from None

    async def tools_format(self, req: ChatRequest) -> dict:
        """The grammar spec that holds answers to the request's tool calls;
        a 400 naming the problem when a function's parameter schema cannot be compiled."""
        import json

        from models.tools import structural_tag

        from .grammar import FormatError, check_spec

        spec = {"type": "structural_tag",
                "tag": json.dumps(structural_tag(req.tools, req.tool_choice, req.parallel_tool_calls),
                                  ensure_ascii=False)}
        try:
            await asyncio.to_thread(check_spec, spec, self.limits.max_schema_seconds)
        except FormatError as e:
            raise bad(f"'tools' has a parameter schema that is not supported: {e}", "tools",
                      "invalid_schema") from None
        return spec

    @staticmethod
    def _image_parts(messages: list[Message]) -> list[tuple[tuple[int, int], Part]]:
        """Each image part with its (message, part) index."""
        return [((mi, pi), p) for mi, m in enumerate(messages) for pi, p in enumerate(m.parts) if p.kind == "image"]

    async def _resolve_media(self, messages: list[Message]) -> list[Message]:
        """Fetch remote images and replace audio parts by their transcripts."""
        jobs, slots = [], []
        n_audio = 0
        for mi, m in enumerate(messages):
            for pi, p in enumerate(m.parts):
                if p.kind == "audio":
                    n_audio += 1
                    jobs.append(self.transcribe(p.data, None, f"audio {n_audio} (messages[{mi}].content[{pi}])"))
                    slots.append((mi, pi, "audio"))
                elif p.kind == "image" and p.url:
                    jobs.append(self.fetch_image(p.url, f"messages[{mi}].content[{pi}].image_url.url"))
                    slots.append((mi, pi, "image"))
        if not jobs:
            return messages
        results = await asyncio.gather(*jobs)
        out = [Message(m.role, list(m.parts)) for m in messages]
        for (mi, pi, kind), value in zip(slots, results):
            out[mi].parts[pi] = Part("text", text=value) if kind == "audio" else Part("image", data=value)
        return out

    def _encode(self, messages: list[Message], tools: list[dict] | None = None):
        from models.conversation import encode_conversation

        msgs = [{"role": m.role, "content": [{"type": "image"} if p.kind == "image" else {"type": "text", "text": p.text}
                                             for p in m.parts],
                 **({"tool_calls": m.tool_calls} if m.tool_calls else {})} for m in messages]
        return encode_conversation(self.tok, msgs, self.num_image_tokens, add_generation_prompt=True,
                                   system_prompt=self.source.cfg.tokenizer.system_prompt, tools=tools)

    def _fit(self, messages: list[Message], max_new: int, tools: list[dict] | None = None):
        """Drop the oldest exchanges (after any leading system messages) until
        prompt + max_new fits the context; refuse when the last turn alone does
        not. ``tools`` (offered in the system message) are never dropped."""
        kept = list(messages)
        while True:
            enc = self._encode(kept, tools)
            if len(enc) + max_new <= self.context_length:
                return kept, enc
            first = next(i for i, m in enumerate(kept) if m.role != "system")
            # a conversation of tool results without a user message has no turn to drop
            last_user = max((i for i, m in enumerate(kept) if m.role == "user"), default=first)
            if first >= last_user:
                raise bad(
                    f"the prompt needs {len(enc)} tokens (images count {self.num_image_tokens} each) and "
                    f"max_tokens asks for {max_new}, over the model's context of {self.context_length} tokens; "
                    "shorten the last message or lower max_tokens", "messages", "context_length_exceeded")
            end = first + 1
            while end < last_user and kept[end].role != "user":
                end += 1
            del kept[first:end]

    # --------------------------------------------------------------- stream
    async def answer(self, prep: Prepared, req: ChatRequest, result: dict,
                     choice: int = 0) -> AsyncIterator[str | dict]:
        """Yield text deltas from the LLM, and, when the request offers tools,
        each call the answer makes (a ``serve.protocol.tool_call`` dict) once
        its closing tag arrives; fills ``result`` with ``finish_reason``
        ("tool_calls" when an answer that stopped made calls),
        ``completion_tokens`` and ``tool_calls`` when done, and, when the
        request asks for logprobs, ``result["logprobs"]`` with each token's
        entry as its ids arrive (before the delta with its text, or the
        finish). ``choice`` (of ``req.n``) samples with the request's seed + ``choice``."""
        text = TextStream(self.tok, req.stop, prep.text_context)
        splitter = None
        if req.calls_tools:
            from models.tools import CallStream

            splitter = CallStream()
        made: list[dict] = []

        def pieces(delta: str, final: bool = False) -> list:
            """Text and calls to send for a text delta (the text itself without tools)."""
            if splitter is None:
                return [delta] if delta else []
            out = [p if isinstance(p, str) else tool_call(p.name, p.arguments) for p in splitter.push(delta, final)]
            made.extend(p for p in out if isinstance(p, dict))
            return out

        generated: list[int] = []
        failures = 0
        finish = None
        stop_string = False
        sampling = {"temperature": req.temperature, "top_p": req.top_p}
        if req.seed is not None and req.temperature > 0:
            seed = req.seed + choice
            sampling["seed"] = seed if seed < 2**64 else seed - 2**64
        if req.logprobs is not None:
            sampling["logprobs"] = req.logprobs
            rated = result["logprobs"] = []
        while finish is None:
            remaining = prep.max_new_tokens - len(generated)
            if remaining <= 0:
                finish = "length"
                break
            call = {"input_ids": prep.input_ids + generated, "image_features": prep.image_features,
                    "max_new_tokens": remaining, "affinity_key": prep.affinity, **sampling}
            if prep.format is not None:
                call["response_format"] = prep.format
            if req.logit_bias:
                call["logit_bias"] = req.logit_bias
            if req.frequency_penalty or req.presence_penalty:
                call.update(frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty)
            if generated:  # after a replica died: the answer so far is in the format and counts for penalties
                call["answer_start"] = len(prep.input_ids)
            if req.min_tokens > len(generated):
                call["min_new_tokens"] = req.min_tokens - len(generated)
            gen = self.llm.options(stream=True).generate.remote(call)
            exhausted = False
            try:
                async for ids in gen:
                    rates = None
                    if isinstance(ids, dict):  # with logprobs
                        ids, rates = ids["ids"], ids["logprobs"]
                    stop_at = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
                    if stop_at is not None:
                        ids = ids[:stop_at + 1]
                    generated.extend(ids)
                    if rates is not None:  # a stop id has no entry (OpenAI lists the answer's tokens)
                        rated.extend(entry(self.token_bytes, t, lp, top) for t, (lp, top) in zip(ids, rates)
                                     if t not in self.stop_ids)
                    delta, hit = text.push([t for t in ids if t not in self.stop_ids])
                    for piece in pieces(delta):
                        yield piece
                    if hit or stop_at is not None:
                        finish, stop_string = "stop", hit
                        break
                else:
                    exhausted = True
                if finish is None:
                    finish = "length" if len(generated) >= prep.max_new_tokens else "stop"
            except RETRYABLE as e:
                failures += 1
                if failures > self.settings.retries:
                    raise
                self.recovered["continued_answers"] += 1
                log.warning("LLM replica died after %d tokens (%s); continuing on another replica",
                            len(generated), type(e).__name__)
                await asyncio.sleep(0.5 * failures)
                continue
            except Exception as e:  # noqa: BLE001 - a full queue is a 503, the rest goes on up
                raise_if_overloaded(e, "LLM")
                raise
            finally:
                if not exhausted:  # stopped early, failed, or the client went away
                    with contextlib.suppress(Exception):  # a refused call's cancel raises its refusal again
                        gen.cancel()
        delta = ""
        if not stop_string:  # flush text held back for a stop string that never came
            delta, _ = text.push([], final=True)
        for piece in pieces(delta, final=True):
            yield piece
        if made and finish == "stop":
            finish = "tool_calls"
        result.update(finish_reason=finish, completion_tokens=len(generated))
        if made:
            result["tool_calls"] = made

    async def complete(self, req: ChatRequest, prep: Prepared | None = None, choice: int = 0) -> Result:
        prep = prep or await self.prepare(req)
        result: dict = {}
        parts = [d async for d in self.answer(prep, req, result, choice)]
        return Result("".join(p for p in parts if isinstance(p, str)), result["finish_reason"], prep.prompt_tokens,
                      result["completion_tokens"], result.get("logprobs"), result.get("tool_calls"))

    @functools.cached_property
    def token_bytes(self):
        """Token id -> its bytes, for logprobs entries (``serve.logprobs``)."""
        from .logprobs import TokenBytes

        return TokenBytes(self.tok.hf)
