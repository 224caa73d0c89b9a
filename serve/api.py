"""The FastAPI app of the ingress: OpenAI-compatible API, health, Gradio page.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events),
``POST /v1/completions`` (raw prompts, ``echo`` scores them),
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (the
served tokenizer, in vLLM's shape, which evaluation harnesses use),
``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /healthz``; the Gradio chat page is mounted
at ``/``. Every error is JSON in OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, an unknown ``/v1/`` route (404) or method (405,
with ``Allow``) too.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mmphi import __version__

from .chat import ChatService, cause_of
from .loading import system_fingerprint
from .metrics import APIMetrics
from .protocol import (APIError, bad, check_text, chunk, completion, completion_id, legacy_logprobs, parse_chat_request,
                       parse_completion_request, parse_json_body, parse_transcription_form, text_chunk,
                       text_completion, text_completion_id, usage)

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs


_metrics: APIMetrics | None = None


def count_error(err: APIError) -> None:
    """Count an error answered (``mmphi_api_errors_total``)."""
    global _metrics
    if _metrics is None:
        _metrics = APIMetrics()
    _metrics.error(err.code or err.type, err.status)


def error_response(err: APIError) -> JSONResponse:
    count_error(err)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def internal_error(prefix: str, exc: BaseException) -> APIError:
    """A 500 naming the exception: its type and the first line of its message,
    the user-level one for a Ray task error (whose text is a remote traceback)."""
    inner = cause_of(exc)
    lines = str(inner).strip().splitlines()
    return APIError(500, f"{prefix}: {type(inner).__name__}" + (f": {lines[0]}" if lines else ""))


CONTEXT_TOKENS = 8  # a completion prompt's last tokens that the answer's text is decoded after
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


def guarded(path: str) -> bool:
    """Whether a path is the API's (an API key guards it, its bodies are limited)."""
    return path.startswith("/v1/") or path in TOKENIZER_ROUTES


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413,
    from the Content-Length header or while reading a body sent without one
    (on the API's paths)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not guarded(scope["path"]):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body is over the limit of {self.limit} bytes",
                           code="request_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.limit:
                    return await error_response(too_big)(scope, receive, send)
            except ValueError:
                return await error_response(bad("Content-Length header is not a number"))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await error_response(too_big)(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


def build_api(service: ChatService, *, api_key: str | None, mount_ui: bool = True) -> FastAPI:
    settings = service.settings
    limits = settings.limits
    model_name = settings.model_name
    fingerprint = system_fingerprint(service.source, settings)
    app = FastAPI(title="mmphi", description="A multimodal Phi-3 served with Ray Serve", docs_url="/v1/docs",
                  openapi_url="/v1/openapi.json", redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(bad(f"{where or 'request'}: {first.get('msg', 'invalid request')}", where or None))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key and guarded(request.url.path):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - a bad request must not take the replica down
            log.exception("unhandled error on %s", request.url.path)
            return error_response(internal_error("internal error", e))

    async def read_json(request: Request):
        return parse_json_body(await request.body())

    @app.get("/healthz")
    async def healthz():
        checks = {}
        for name, handle in (("ASR", service.asr), ("ImageEncoder", service.image_encoder), ("LLM", service.llm)):
            try:
                await asyncio.wait_for(handle.ping.remote(), timeout=10)
                checks[name] = "ok"
            except Exception as e:  # noqa: BLE001
                checks[name] = f"unavailable: {type(e).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "model": model_name, "version": __version__,
                             "weights": service.source.description, "deployments": checks,
                             "recovered": dict(service.recovered)},
                            status_code=200 if ok else 503)

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                        param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "mmphi",
                "weights": service.source.description}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise unknown_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(await read_json(request), limits, settings.allow_remote_images)
        if req.model not in (None, model_name):
            raise unknown_model(req.model)
        prep = await service.prepare(req)
        cid = completion_id()
        if not req.stream:  # n answers side by side (one LLM replica batches them: the same affinity key)
            results = await side_by_side([service.complete(req, prep, i) for i in range(req.n)])
            return completion(cid, model_name, [(r.text, r.finish_reason, r.logprobs, r.tool_calls) for r in results],
                              prep.prompt_tokens, sum(r.completion_tokens for r in results), fingerprint)

        results: list[dict] = [{} for _ in range(req.n)]
        answers = [service.answer(prep, req, results[i], i) for i in range(req.n)]
        firsts = await opened(answers)

        async def events(merged):
            created = int(time.time())
            sent = [0] * req.n  # logprobs entries sent per choice
            calls = [0] * req.n  # tool calls sent per choice

            def event(delta, finish=None, index=0, usage_=None, upto=0):
                rated = results[index].get("logprobs") if delta is not None else None
                if rated is not None and "role" in delta:  # the opening event: none yet, the list when asked
                    rated = []
                elif rated is not None:  # the entries of this event's text (or those before the finish)
                    rated, sent[index] = rated[sent[index]:upto], upto
                return sse(chunk(cid, model_name, created, delta, finish, usage_, fingerprint, index, rated))

            for i in range(req.n):
                yield event({"role": "assistant", "content": ""}, index=i)
            async for i, delta, upto in merged:
                if isinstance(delta, dict):  # a call, whole: its index among the choice's calls, id, name, args
                    calls[i] += 1
                    yield event({"tool_calls": [{"index": calls[i] - 1, **delta}]}, index=i, upto=upto)
                    continue
                yield event({"content": delta}, index=i, upto=upto) if delta is not None else \
                    event({}, results[i]["finish_reason"], index=i, upto=upto)
            if req.include_usage:
                yield event(None, usage_=usage(prep.prompt_tokens, sum(r["completion_tokens"] for r in results)))

        return event_stream(cid, answers, firsts, results, events)

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI's (legacy) text completions: raw prompts continued without
        the chat template, ``echo`` (the prompt in the answer, and its own
        logprobs: evaluation harnesses score a text with ``max_tokens`` 0),
        ``logprobs`` (the most likely tokens beside each), several prompts
        per request (choices prompt by prompt, ``n`` each)."""
        from .chat import Prepared

        creq = parse_completion_request(await read_json(request), limits)
        req = creq.req
        if req.model not in (None, model_name):
            raise unknown_model(req.model)
        service.check_logit_bias(req)
        many = len(creq.prompts) > 1
        encoded = [service.prompt_ids(p, req.max_tokens, f"prompt {k}" if many else "the prompt")
                   for k, p in enumerate(creq.prompts)]
        # the answer continues the prompt's text: its last tokens place the answer's first word
        preps = [Prepared(ids, None, req.max_tokens, 0, text_context=tuple(ids[-CONTEXT_TOKENS:])) for ids, _ in encoded]
        jobs = [(p, i) for p in range(len(preps)) for i in range(req.n)]  # choice k = prompt p's answer i
        rated = req.logprobs is not None
        heads = [""] * len(preps)  # each prompt's echoed text, and its tokens' logprobs with their end offset
        head_rates: list = [None] * len(preps)
        if creq.echo:
            heads = [p if isinstance(p, str) else service.tok.decode(ids, skip_special_tokens=False)
                     for p, (ids, _) in zip(creq.prompts, encoded)]
            if rated:
                entries = await asyncio.gather(*[service.prompt_entries(ids, req.logprobs) for ids, _ in encoded])
                head_rates = [legacy_logprobs(e, 0, [0 if added else None] + [None] * (len(e) - 1))
                              for e, (_, added) in zip(entries, encoded)]
        prompt_tokens = sum(len(ids) for ids, _ in encoded)
        cid = text_completion_id()

        def start(p: int) -> int:
            """Where the first answer token's text starts: after the echoed prompt's."""
            return head_rates[p][1].at if head_rates[p] else 0

        if not req.stream:
            results = await side_by_side([service.complete(req, preps[p], i) for p, i in jobs])
            choices = []
            for (p, _), r in zip(jobs, results):
                lp = None
                if rated:
                    lp, _ = legacy_logprobs(r.logprobs, start(p))
                    if head_rates[p] is not None:
                        lp = {key: head_rates[p][0][key] + lp[key] for key in lp}
                choices.append((heads[p] + r.text, r.finish_reason, lp))
            return text_completion(cid, model_name, choices, prompt_tokens, sum(r.completion_tokens for r in results),
                                   fingerprint)

        results: list[dict] = [{} for _ in jobs]
        answers = [service.answer(preps[p], req, results[k], i) for k, (p, i) in enumerate(jobs)]
        firsts = await opened(answers)

        async def events(merged):
            created = int(time.time())
            sent = [0] * len(jobs)  # logprobs entries sent per choice
            offset = [start(p) for p, _ in jobs]  # where the next entry's text starts

            def event(k: int, text: str, upto: int, finish: str | None = None) -> str:
                lp = None
                if rated:  # the entries of this event's text (or those before the finish)
                    got = results[k].get("logprobs") or []
                    lp, offset[k] = legacy_logprobs(got[sent[k]:upto], offset[k])
                    sent[k] = upto
                return sse(text_chunk(cid, model_name, created, k, text, finish, lp, fingerprint=fingerprint))

            if creq.echo:
                for k, (p, _) in enumerate(jobs):
                    yield sse(text_chunk(cid, model_name, created, k, heads[p], None,
                                         head_rates[p][0] if head_rates[p] else None, fingerprint=fingerprint))
            async for k, delta, upto in merged:
                yield event(k, delta, upto) if delta is not None else event(k, "", upto, results[k]["finish_reason"])
            if req.include_usage:
                yield sse(text_chunk(cid, model_name, created, None, fingerprint=fingerprint, usage_=usage(
                    prompt_tokens, sum(r["completion_tokens"] for r in results))))

        return event_stream(cid, answers, firsts, results, events)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The served tokenizer's special tokens and context, as vLLM's server gives them."""
        hf = service.tok.hf
        return {"tokenizer_class": type(hf).__name__, "bos_token": hf.bos_token, "eos_token": hf.eos_token,
                "pad_token": hf.pad_token, "unk_token": hf.unk_token, "model_max_length": service.context_length,
                "vocab_size": len(service.tok)}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """``{"prompt": text, "add_special_tokens": true}`` -> the ids
        ``/v1/completions`` would feed for that prompt (the BOS first unless
        ``add_special_tokens`` is false; text stays text), or ``{"messages":
        [...]}`` -> the ids of that chat's prompt, with the template, the
        system prompt and each image's placeholder tokens (audio must be
        transcribed first: refused)."""
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object with a 'prompt' or 'messages'")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise bad("'add_special_tokens' must be true or false", "add_special_tokens")
        if body.get("messages") is not None:
            from .protocol import parse_messages

            messages = parse_messages(body["messages"], limits, allow_remote=True)
            if any(p.kind == "audio" for m in messages for p in m.parts):
                raise bad("audio parts are transcribed before they count as tokens; send their text",
                          "messages", "unsupported_parameter")
            ids = service.chat_prompt_ids(messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("'prompt' must be a string (or send 'messages')", "prompt")
            ids = service.tok.encode_text(check_text(prompt, "prompt"))
            if special and service.tok.ids.bos is not None:
                ids = [service.tok.ids.bos] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": service.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """``{"tokens": [ids]}`` -> ``{"prompt": their text}`` (control tokens written out)."""
        body = await read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("'tokens' must be a list of token ids", "tokens")
        outside = next((t for t in tokens if not 0 <= t < len(service.tok)), None)
        if outside is not None:
            raise bad(f"token id {outside} is outside the vocabulary of {len(service.tok)} tokens", "tokens",
                      "invalid_token_id")
        return {"prompt": service.tok.decode(tokens, skip_special_tokens=False)}

    # OpenAI's name for its Whisper model (clients send it), this server's name, the Whisper size
    asr_models = {"whisper-1", model_name, str(service.source.cfg.speech.model)}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        """OpenAI's transcription form: ``file``, optional ``model``,
        ``language`` (a Whisper language code or name; detected when absent),
        ``response_format`` (json, text, or verbose_json: with the language's
        name and the audio's seconds) and ``temperature`` (Whisper's sampling
        temperature for this request; the server's configured one when absent)."""
        return await speech(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        """OpenAI's translation form: English text of speech in any language
        Whisper knows (a multilingual model's task); the fields of a
        transcription but ``language`` (the spoken one is detected)."""
        return await speech(request, "translate")

    async def speech(request: Request, task: str):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad("send the audio as multipart/form-data with a 'file' field", "file")
        try:
            form = await request.form(max_part_size=limits.max_body_bytes)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise bad(f"malformed multipart body: {e}", "file") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("multipart field 'file' (the audio file) is required", "file")
        req = parse_transcription_form(form)
        if task == "translate" and req.language is not None:
            raise bad("a translation detects the spoken language; 'language' is a transcription's field",
                      "language", "unsupported_parameter")
        if req.model not in (None, *asr_models):
            raise APIError(404, f"model {req.model!r} does not exist; this server transcribes with "
                           f"{', '.join(repr(m) for m in sorted(asr_models))}", param="model", code="model_not_found")
        fmt = req.response_format
        heard = await service.transcribe(await upload.read(), req.language, "file", req.temperature, detail=True,
                                          task=task)
        if fmt == "text":
            return PlainTextResponse(heard["text"])
        if fmt == "verbose_json":
            from whisper.tokenizer import LANGUAGES

            # as OpenAI's: the language's name ("english"), the one given or the one Whisper detected; a
            # translation's is its text's, English
            language = "english" if task == "translate" else LANGUAGES.get(heard["language"], heard["language"])
            return {"task": task, "language": language, "duration": round(heard["duration"], 3),
                    "text": heard["text"]}
        return {"text": heard["text"]}

    # last of the API's routes: any other /v1/ path or method is an error in OpenAI's shape (not FastAPI's
    # {"detail": "Not Found"}, nor the chat page's 404 from the mount at /)
    routes = [r for r in app.routes if getattr(r, "methods", None) and r.path.startswith("/v1/")]
    listed = ", ".join(sorted({r.path.replace(":path}", "}") for r in routes}))

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"],
                   include_in_schema=False)
    async def unknown(request: Request, rest: str):
        path = "/v1/" + rest
        allowed = sorted({m for r in routes if r.path_regex.match(path) for m in r.methods} - {"HEAD"})
        if allowed:
            return JSONResponse(APIError(405, f"{request.method} is not allowed on {path}; use {' or '.join(allowed)}",
                                         code="method_not_allowed").body(),
                                status_code=405, headers={"Allow": ", ".join(allowed)})
        raise APIError(404, f"no route {request.method} {path}; the API's routes are {listed}", code="not_found")

    if mount_ui:
        import gradio as gr

        from .ui import build_ui

        # with an API key the page asks for it too (as the password, any user name):
        # otherwise the page would be an open door to the model the key guards
        def page_auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())

        app = gr.mount_gradio_app(app, build_ui(service), path="/", max_file_size=limits.max_body_bytes,
                                  footer_links=[], auth=page_auth if api_key else None,
                                  auth_message=("This service needs its API key: enter it as the password "
                                                "(any user name).") if api_key else None)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


async def side_by_side(calls: list) -> list:
    """Await ``calls`` together; one failing cancels the others, and its
    error is the response (a 503 for a full queue ...)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in calls]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


async def opened(answers: list) -> list[list]:
    """Each streamed answer's first piece, read before any header is sent,
    so a refusal until then (a full queue: 503) is an HTTP error; on one,
    every answer is closed and it is raised."""
    firsts = await asyncio.gather(*[_first(a) for a in answers], return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        for a in answers:
            await a.aclose()
        raise failed
    return firsts


def event_stream(cid: str, answers: list, firsts: list, results: list[dict], events) -> StreamingResponse:
    """Server-sent events: ``events(merged)`` turns the answers' pieces, as
    they come (``interleave``), into events; an error once the headers are
    sent is reported in the stream; ``data: [DONE]`` ends it."""
    async def stream():
        merged = interleave(answers, firsts, results)
        try:
            async for item in events(merged):
                yield item
        except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
            log.exception("error while streaming %s", cid)
            err = e if isinstance(e, APIError) else internal_error("generation failed", e)
            count_error(err)
            yield sse(err.body())
        finally:  # also when the client went away: the LLM calls end with their answers
            await merged.aclose()
            for a in answers:
                await a.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _first(answer) -> list[str]:
    """An answer's first text delta (none when it has none)."""
    try:
        return [await answer.__anext__()]
    except StopAsyncIteration:
        return []


async def interleave(answers: list, firsts: list[list[str]], results: list[dict]):
    """``(choice, delta, rated)`` from every answer as it comes (``firsts``:
    what each yielded already), and ``(choice, None, rated)`` when one ends;
    ``rated``: how many logprobs entries the answer's result held when it
    yielded the delta (an answer read ahead of the stream has more by the
    time its delta is sent). Closing it stops reading the answers; the
    caller closes them."""
    def rated(i: int) -> int:
        return len(results[i].get("logprobs") or ())

    if len(answers) == 1:  # no tasks for the usual single answer
        for delta in firsts[0]:
            yield 0, delta, rated(0)
        async for delta in answers[0]:
            yield 0, delta, rated(0)
        yield 0, None, rated(0)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            for delta in firsts[i]:
                queue.put_nowait((i, delta, rated(i)))
            async for delta in answers[i]:
                queue.put_nowait((i, delta, rated(i)))
            queue.put_nowait((i, None, rated(i)))
        except Exception as e:  # noqa: BLE001 - raised where the deltas are read
            queue.put_nowait((i, e, 0))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(answers))]
    try:
        left = len(answers)
        while left:
            i, item, n = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item is None
            yield i, item, n
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
