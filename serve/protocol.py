"""OpenAI-compatible request parsing and response shapes (no Ray, no torch).

``parse_json_body`` reads a request body as JSON; ``parse_chat_request``
turns a ``/v1/chat/completions`` body into a :class:`ChatRequest` and
``parse_transcription_form`` checks the fields of a
``/v1/audio/transcriptions`` form. Each raises :class:`APIError` (status,
OpenAI error type, code, the offending parameter and a message naming the
problem).
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from models.tools import CHOICES, NAME, parameters

from .settings import Limits

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4", "webm", "aac", "aiff")
ROLE_ALIASES = {"developer": "system"}
UNSUPPORTED = {
    "functions": "the legacy 'functions' are not supported; offer them as 'tools'",
    "function_call": "the legacy 'function_call' is not supported; use 'tool_choice'",
    "audio": "audio output is not supported",
}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class APIError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # e.g. Retry-After on a 503
        self.type = type or ("invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


@dataclass
class Part:
    kind: str  # "text", "image" or "audio"
    text: str = ""
    data: bytes = b""  # image or audio bytes (an image URL is fetched later, see ``url``)
    url: str | None = None  # remote http(s) image, fetched by the ingress when allowed
    format: str | None = None  # audio container


@dataclass
class Message:
    role: str  # system, user, assistant, tool
    parts: list[Part]
    # an assistant's calls: {"id", "name", "arguments" (JSON text of an object)} each
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers


@dataclass
class ChatRequest:
    messages: list[Message]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None
    # extension (vLLM's name): stop ids are suppressed until this many tokens are generated
    min_tokens: int = 0
    seed: int | None = None  # sampling with the request's own generator: the same seed, the same answer
    n: int = 1  # answers (choices) to the same prompt; choice i samples with seed + i
    # structured output (serve.grammar's format spec): {"type": "json_object"} or
    # {"type": "json_schema", "schema": "<JSON text>"}; None: free text
    response_format: dict | None = None
    # subtracted from a token's logit: frequency x its count in the answer so far, presence once it occurs
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # log-probabilities of the answer's tokens: None (off), or how many most likely tokens to list beside each
    logprobs: int | None = None
    # token id -> a number from -100 to 100 added to its logit (-100 bans it, 100 all but forces it)
    logit_bias: dict[int, float] | None = None
    # functions the model may call: {"name", "description"?, "parameters"?} each (models.tools)
    tools: list[dict] | None = None
    # "none", "auto", "required", or a function's name (that function is called)
    tool_choice: str = "none"
    parallel_tool_calls: bool = True  # False: at most one call per answer
    extra: dict = field(default_factory=dict)

    @property
    def calls_tools(self) -> bool:
        """Whether answers may (or must) call tools."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def num_images(self) -> int:
        return sum(p.kind == "image" for m in self.messages for p in m.parts)

    @property
    def num_audio(self) -> int:
        return sum(p.kind == "audio" for m in self.messages for p in m.parts)


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON; empty, malformed, not UTF-8 or nested too deeply is a 400."""
    if not raw:
        raise bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body is not valid JSON: it is nested too deeply", code="invalid_json") from None


def check_text(text: str, param: str) -> str:
    """``text`` if it is valid Unicode: JSON's ``\\ud800`` escapes can give lone
    surrogates, which no tokenizer (nor UTF-8) can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{param} is not valid Unicode text: it holds a lone surrogate "
                  f"({text[e.start]!r}) at character {e.start}", param, "invalid_text") from None
    return text


def has_prompt(message: Message) -> bool:
    """Whether a user message asks something: text that is not only
    whitespace, or an image or audio part (the API and the chat page both
    refuse a conversation whose last message does not)."""
    return any(p.kind != "text" or p.text.strip() for p in message.parts)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", name)
    return float(value)


def decode_base64(data: Any, what: str, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{what} must be a non-empty base64 string", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{what} is not valid base64", param) from None
    if not raw:
        raise bad(f"{what} is empty", param)
    return raw


def parse_data_uri(url: str, param: str) -> bytes:
    m = _DATA_URI.match(url)
    if not m:
        raise bad("image_url data URI is malformed; expected data:image/<type>;base64,<data>", param)
    if not m.group("b64"):
        raise bad("image_url data URI must be base64-encoded (data:image/<type>;base64,...)", param)
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise bad(f"image_url data URI has media type {mime!r}; expected an image/* type", param)
    return decode_base64(url[m.end():], "image_url data", param)


def _parse_part(part: Any, role: str, where: str, allow_remote: bool) -> Part:
    if isinstance(part, str):
        return Part("text", text=check_text(part, where))
    if not isinstance(part, dict):
        raise bad(f"{where} must be an object with a 'type', got {type(part).__name__}", where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise bad(f"{where}.text must be a string", f"{where}.text")
        return Part("text", text=check_text(text, f"{where}.text"))
    if kind in ("image_url", "input_audio") and role != "user":
        raise bad(f"{where}: only user messages may carry {kind} parts (this one is {role!r})", where)
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise bad(f"{where}.image_url.url must be a string (a data: URI)", f"{where}.image_url.url")
        if url[:5].lower() == "data:":
            return Part("image", data=parse_data_uri(url, f"{where}.image_url.url"))
        if url.lower().startswith(("http://", "https://")):
            if not allow_remote:
                raise bad("remote image URLs are disabled on this server; send the image as a "
                          "data:image/...;base64,... URI", f"{where}.image_url.url", "remote_images_disabled")
            return Part("image", url=url)
        raise bad("image_url.url must be a data: URI" + (" or an http(s) URL" if allow_remote else ""),
                  f"{where}.image_url.url")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise bad(f"{where}.input_audio must be an object with 'data' and 'format'", f"{where}.input_audio")
        fmt = spec.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
            raise bad(f"{where}.input_audio.format {fmt!r} is not supported; use one of {', '.join(AUDIO_FORMATS)}",
                      f"{where}.input_audio.format", "unsupported_format")
        data = decode_base64(spec.get("data"), "input_audio.data", f"{where}.input_audio.data")
        return Part("audio", data=data, format=fmt)
    raise bad(f"{where}.type {kind!r} is not supported; use 'text', 'image_url' or 'input_audio'", f"{where}.type")


def parse_messages(raw: Any, limits: Limits, allow_remote: bool = False) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"{len(raw)} messages given; the limit is {limits.max_messages}", "messages", "too_many_messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object, got {type(m).__name__}", where)
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}.role must be 'system', 'user', 'assistant' or 'tool' (got {m.get('role')!r})",
                      f"{where}.role")
        calls = parse_tool_calls(m.get("tool_calls"), where) if role == "assistant" else None
        if role != "assistant" and m.get("tool_calls") is not None:
            raise bad(f"{where}: only assistant messages may carry tool_calls (this one is {role!r})",
                      f"{where}.tool_calls")
        content = m.get("content")
        if content is None and not calls:
            raise bad(f"{where}.content is missing", f"{where}.content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [Part("text", text=check_text(content, f"{where}.content"))]
        elif isinstance(content, list):
            parts = [_parse_part(p, role, f"{where}.content[{j}]", allow_remote) for j, p in enumerate(content)]
        else:
            raise bad(f"{where}.content must be a string or a list of parts, got {type(content).__name__}",
                      f"{where}.content")
        out.append(Message(role, parts, calls, answered_call(m, out, where) if role == "tool" else None))
    if out[-1].role not in ("user", "tool"):
        raise bad("the last message must come from the user (or be a tool's result)",
                  f"messages[{len(out) - 1}].role")
    if out[-1].role == "user" and not has_prompt(out[-1]):
        raise bad(f"messages[{len(out) - 1}].content is empty: the last user message needs text (not only "
                  "whitespace), an image or audio", f"messages[{len(out) - 1}].content", "empty_prompt")
    check_media_counts(out, limits)
    return out


def parse_tool_calls(raw: Any, where: str) -> list[dict] | None:
    """An assistant message's ``tool_calls`` -> ``[{"id", "name", "arguments"}]`` (None when absent or empty)."""
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise bad(f"{where}.tool_calls must be a list of calls", f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise bad(f"{at} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", at)
        cid, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        if not isinstance(cid, str) or not cid:
            raise bad(f"{at}.id must be a non-empty string", f"{at}.id")
        function_name(name, f"{at}.function.name")
        if not isinstance(arguments, str):
            raise bad(f"{at}.function.arguments must be a string (the arguments as JSON)", f"{at}.function.arguments")
        try:
            args = json.loads(check_text(arguments, f"{at}.function.arguments"))
        except json.JSONDecodeError as e:
            raise bad(f"{at}.function.arguments is not valid JSON: {e}", f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise bad(f"{at}.function.arguments must be a JSON object, got {type(args).__name__}",
                      f"{at}.function.arguments")
        calls.append({"id": check_text(cid, f"{at}.id"), "name": name, "arguments": arguments})
    return calls


def function_name(name: Any, param: str) -> str:
    """``name`` if it is a function name by OpenAI's rule, else a 400 naming ``param``."""
    if not isinstance(name, str) or not NAME.match(name):
        raise bad(f"{param} must be 1 to 64 letters, digits, '_' or '-', got {name!r}", param)
    return name


def answered_call(m: dict, before: list[Message], where: str) -> str:
    """A tool message's ``tool_call_id``, which must name a call of the
    assistant message it follows (only tool messages between them)."""
    cid = m.get("tool_call_id")
    if not isinstance(cid, str) or not cid:
        raise bad(f"{where}.tool_call_id must be a non-empty string: the id of the call this is the result of",
                  f"{where}.tool_call_id")
    k = len(before) - 1
    while k >= 0 and before[k].role == "tool":
        k -= 1
    if k < 0 or not before[k].tool_calls:
        raise bad(f"{where}: a tool message must follow an assistant message with tool_calls", f"{where}.role")
    if cid not in {c["id"] for c in before[k].tool_calls}:
        raise bad(f"{where}.tool_call_id {cid!r} names no call of messages[{k}]", f"{where}.tool_call_id")
    return cid


def parse_tools(body: dict, limits: Limits) -> tuple[list[dict] | None, str, bool]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` -> (functions
    ``[{"name", "description"?, "parameters"}]`` or None, the choice:
    "none", "auto", "required" or a function's name, parallel calls allowed).
    Whether xgrammar takes the parameter schemas is the ingress's check."""
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if raw is not None and not isinstance(raw, list):
        raise bad("'tools' must be a list of {'type': 'function', 'function': {...}} objects", "tools")
    if raw and len(raw) > limits.max_tools:
        raise bad(f"'tools' offers {len(raw)} functions; at most {limits.max_tools} are allowed", "tools",
                  "too_many_tools")
    tools = []
    for i, tool in enumerate(raw or []):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad(f"{at} must be {{'type': 'function', 'function': {{'name', 'description', 'parameters'}}}}"
                      + (f"; type {kind!r} is not supported" if kind not in (None, "function") else ""), at)
        f = tool["function"]
        name = f.get("name")
        function_name(name, f"{at}.function.name")
        if any(t["name"] == name for t in tools):
            raise bad(f"{at}.function.name {name!r} is offered twice", f"{at}.function.name")
        spec = {"name": name}
        description = f.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise bad(f"{at}.function.description must be a string", f"{at}.function.description")
            spec["description"] = check_text(description, f"{at}.function.description")
        params = f.get("parameters")
        if params is None:
            params = parameters({})
        if not isinstance(params, dict):
            raise bad(f"{at}.function.parameters must be a JSON schema (an object), got {type(params).__name__}",
                      f"{at}.function.parameters")
        if params.get("type", "object") != "object":
            raise bad(f"{at}.function.parameters must describe an object (the arguments), got type "
                      f"{params.get('type')!r}", f"{at}.function.parameters")
        if f.get("strict") is not None and not isinstance(f["strict"], bool):
            raise bad(f"{at}.function.strict must be true or false", f"{at}.function.strict")
        spec["parameters"] = params
        tools.append(spec)
    text = json.dumps(tools, ensure_ascii=False)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_schema_bytes:
        raise bad(f"'tools' is {size} bytes as JSON; this server allows at most {limits.max_schema_bytes}", "tools",
                  "schema_too_large")
    check_text(text, "tools")
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", "tool_choice")
        if not any(t["name"] == name for t in tools):
            raise bad(f"'tool_choice' names the function {name!r}, which 'tools' does not offer", "tool_choice")
        choice = name
    elif choice not in CHOICES:
        raise bad(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                  f"{{'name': ...}}}}, got {choice!r}", "tool_choice")
    elif choice != "none" and not tools:
        raise bad(f"'tool_choice' is {choice!r} but the request offers no 'tools'", "tool_choice")
    return tools or None, choice, parallel is not False


def check_media_counts(messages: list[Message], limits: Limits) -> None:
    images = sum(p.kind == "image" for m in messages for p in m.parts)
    if images > limits.max_images:
        raise bad(f"{images} images given; the limit is {limits.max_images} per request", "messages", "too_many_images")
    audio = sum(p.kind == "audio" for m in messages for p in m.parts)
    if audio > limits.max_audio_parts:
        raise bad(f"{audio} audio parts given; the limit is {limits.max_audio_parts} per request", "messages",
                  "too_many_audio_parts")


def parse_chat_request(body: Any, limits: Limits, allow_remote: bool = False) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], "none"):
            raise bad(f"'{key}': {why}", key, "unsupported_parameter")
    common = _sampling(body, limits)
    response_format = parse_response_format(body.get("response_format"), limits)
    tools, tool_choice, parallel_tool_calls = parse_tools(body, limits)
    callable_tools = bool(tools) and tool_choice != "none"
    if callable_tools and response_format is not None:
        raise bad("a JSON 'response_format' cannot be combined with 'tools' the model may call; send "
                  "'tool_choice': 'none' or no 'response_format'", "response_format")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad(f"'logprobs' must be true or false, got {logprobs!r}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs")
        if top and not logprobs:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body.get("max_completion_tokens", body.get("max_tokens")), limits)
    min_tokens = _min_tokens(body, max_tokens or limits.default_max_tokens)
    if min_tokens and response_format is not None:
        raise bad("'min_tokens' cannot be combined with a JSON 'response_format': the format decides where the "
                  "answer ends", "min_tokens")
    if min_tokens and callable_tools:
        raise bad("'min_tokens' cannot be combined with 'tools' the model may call: the calls' form decides where "
                  "the answer ends", "min_tokens")
    return ChatRequest(
        messages=parse_messages(body.get("messages"), limits, allow_remote),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        response_format=response_format,
        logprobs=(top or 0) if logprobs else None,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        **common,
    )


def _sampling(body: dict, limits: Limits) -> dict:
    """The fields the chat and completions APIs share: ``ChatRequest``'s
    n, penalties, logit_bias, seed, model, stop, stream, include_usage,
    temperature and top_p (``user`` is only checked)."""
    n = body.get("n")
    if n is None:
        n = 1
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(f"'n' (the number of answers) must be a positive integer, got {n!r}", "n")
    elif n > limits.max_choices:
        raise bad(f"'n' is {n}; this server gives at most {limits.max_choices} answers (choices) per request", "n",
                  "too_many_choices")
    seed = body.get("seed")  # a sampled answer's own generator (greedy ones need none)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"'seed' must be an integer, got {type(seed).__name__}", "seed")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise bad(f"'seed' must fit in 64 bits, got {seed}", "seed")
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise bad(f"'user' must be a string, got {type(user).__name__}", "user")
        check_text(user, "user")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise bad("'model' must be a string", "model")
        check_text(model, "model")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    for i, item in enumerate(stop):
        check_text(item, f"stop[{i}]")
    if len(stop) > limits.max_stop:
        raise bad(f"'stop' has {len(stop)} strings; at most {limits.max_stop} are allowed", "stop")
    stream = body.get("stream")
    if stream is None:  # null is the default, as for every optional field
        stream = False
    elif not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = opts.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return {"n": n, "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "logit_bias": parse_logit_bias(body.get("logit_bias"), limits), "seed": seed, "model": model,
            "stop": stop, "stream": stream, "include_usage": bool(include_usage),
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1.0}


def _max_tokens(max_tokens: Any, limits: Limits, lowest: int = 1) -> int | None:
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < lowest:
            kind = "a positive integer" if lowest else "a non-negative integer"
            raise bad(f"'max_tokens' must be {kind}, got {max_tokens!r}", "max_tokens")
        if max_tokens > limits.max_new_tokens:
            raise bad(f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_new_tokens}",
                      "max_tokens", "max_tokens_too_large")
    return max_tokens


def _min_tokens(body: dict, max_tokens: int) -> int:
    min_tokens = body.get("min_tokens")
    if min_tokens is None:
        return 0
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise bad(f"'min_tokens' must be a non-negative integer, got {min_tokens!r}", "min_tokens")
    if min_tokens > max_tokens:
        raise bad(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})", "min_tokens")
    return min_tokens


COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class CompletionRequest:
    """A ``/v1/completions`` request: raw prompts (text, or token ids) to
    continue, with the sampling fields of a chat request (``req``, whose
    messages are empty)."""
    prompts: list[str | list[int]]
    req: ChatRequest
    echo: bool = False  # the prompt is part of each answer's text (and logprobs)


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    """A ``/v1/completions`` body. ``prompt`` is a string, a list of
    strings, a list of token ids or a list of such lists; ``max_tokens`` may
    be 0 with ``echo`` (the prompt's own log-probabilities, as evaluation
    harnesses ask); ``logprobs`` is how many most likely tokens to list beside each."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' (insertion) is not supported", "suffix", "unsupported_parameter")
    common = _sampling(body, limits)
    best_of = body.get("best_of")
    if best_of not in (None, common["n"]):
        raise bad(f"'best_of' ({best_of!r}) is not supported unless it equals 'n'", "best_of", "unsupported_parameter")
    raw = body.get("prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_id(t) for t in raw)):
        prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) or (isinstance(p, list) and p and
                                                                      all(_is_id(t) for t in p)) for p in raw):
        prompts = list(raw)
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists "
                  "(none empty)", "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise bad(f"prompt {i} is empty", "prompt", "empty_prompt")
            check_text(p, "prompt")
    if len(prompts) * common["n"] > limits.max_choices:
        raise bad(f"{len(prompts)} prompts x n {common['n']} = {len(prompts) * common['n']} answers; this server "
                  f"gives at most {limits.max_choices} per request", "prompt", "too_many_choices")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad("'echo' must be true or false", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise bad(f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the most likely tokens to "
                  f"list beside each), got {logprobs!r}", "logprobs")
    max_tokens = _max_tokens(body.get("max_tokens"), limits, lowest=0 if echo else 1)
    if max_tokens is None:
        max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    req = ChatRequest(messages=[], max_tokens=max_tokens, min_tokens=_min_tokens(body, max_tokens),
                      logprobs=logprobs, **common)
    return CompletionRequest(prompts, req, bool(echo))


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def parse_logit_bias(bias: Any, limits: Limits) -> dict[int, float] | None:
    """``logit_bias`` -> {token id: bias}, or None when absent or empty.
    Whether the ids are in the vocabulary is the ingress's check (it has the tokenizer)."""
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers from -100 to 100", "logit_bias")
    if len(bias) > limits.max_logit_bias:
        raise bad(f"'logit_bias' has {len(bias)} tokens; at most {limits.max_logit_bias} are allowed", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad(f"'logit_bias' key {key!r} is not a token id (a non-negative integer)", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"'logit_bias' of token {key} must be a number from -100 to 100, got {value!r}", "logit_bias")
        out[int(key)] = float(value)
    return out


_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_response_format(fmt: Any, limits: Limits) -> dict | None:
    """``response_format`` -> a format spec (``serve.grammar``), or None for
    free text. Checks the shape; whether xgrammar supports the schema is the
    ingress's check (``serve.grammar.check_spec``)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad("'response_format' must be an object with a 'type': 'text', 'json_object' or 'json_schema'",
                  "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad(f"'response_format.type' {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
                  "response_format.type", "unsupported_parameter")
    js = fmt.get("json_schema")
    if not isinstance(js, dict):
        raise bad("'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                  "response_format.json_schema")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not _SCHEMA_NAME.match(name)):
        raise bad(f"'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                  "response_format.json_schema.name")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise bad("'response_format.json_schema.strict' must be true or false", "response_format.json_schema.strict")
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise bad("'response_format.json_schema.schema' must be a JSON schema (an object), got "
                  f"{'nothing' if schema is None else type(schema).__name__}", "response_format.json_schema.schema")
    text = json.dumps(schema, ensure_ascii=False)
    check_text(text, "response_format.json_schema.schema")
    if len(text.encode("utf-8")) > limits.max_schema_bytes:
        raise bad(f"'response_format.json_schema.schema' is {len(text.encode('utf-8'))} bytes as JSON; this server "
                  f"allows at most {limits.max_schema_bytes}", "response_format.json_schema.schema", "schema_too_large")
    return {"type": "json_schema", "schema": text}


# ------------------------------------------------------------ transcriptions

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


@dataclass
class TranscriptionRequest:
    language: str | None  # a Whisper language code, or None to detect it
    response_format: str
    temperature: float | None
    model: str | None


def whisper_language(value: str) -> str:
    """A Whisper language code from a code or a name ('en', 'English',
    'castilian'); anything else is a 400. (Imports Whisper's language table.)"""
    from models.speech import language_code

    try:
        return language_code(value)
    except ValueError as e:
        raise bad(str(e), "language", "unsupported_language") from None


def parse_transcription_form(form: Mapping[str, Any]) -> TranscriptionRequest:
    """The fields of a ``/v1/audio/transcriptions`` form other than ``file``."""
    fields = {}
    for name in ("response_format", "language", "temperature", "model"):
        value = form.get(name)
        if value is not None and not isinstance(value, str):
            raise bad(f"'{name}' must be a plain form field, not a file", name)
        fields[name] = value or None
    fmt = fields["response_format"] or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise bad(f"response_format {fmt!r} is not supported; use json, text or verbose_json", "response_format")
    language = fields["language"] and whisper_language(fields["language"])
    temperature = fields["temperature"]
    if temperature is not None:
        try:
            temperature = float(temperature)
        except ValueError:
            raise bad(f"'temperature' must be a number, got {temperature!r}", "temperature") from None
        if not 0.0 <= temperature <= 1.0:
            raise bad(f"'temperature' must be between 0 and 1, got {fields['temperature']}", "temperature")
    return TranscriptionRequest(language, fmt, temperature, fields["model"])


# ----------------------------------------------------------------- responses

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_field(content: list | None) -> dict | None:
    """A choice's ``logprobs``: None when not asked for, else its token entries (``serve.logprobs.entry``)."""
    return None if content is None else {"content": content, "refusal": None}


def tool_call(name: str, arguments: str) -> dict:
    """One call of an answer in OpenAI's shape, with a fresh id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def completion(cid: str, model: str, answers: list[tuple[str | None, str, list | None, list | None]], prompt: int,
               completion_tokens: int, fingerprint: str | None = None) -> dict:
    """A whole response: ``answers`` are (text, finish_reason, logprob
    entries or None, tool calls (``tool_call``'s) or None), one per choice;
    ``completion_tokens`` counts all of them, ``prompt`` the prompt once."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": i, "message": assistant_message(text, calls), "finish_reason": finish,
                     "logprobs": logprobs_field(rated)} for i, (text, finish, rated, calls) in enumerate(answers)],
        "usage": usage(prompt, completion_tokens),
    }


def assistant_message(text: str | None, calls: list | None) -> dict:
    """A choice's message: its text (null when it only calls tools) and its calls when it makes any."""
    if not calls:
        return {"role": "assistant", "content": text or ""}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None = None,
          usage_: dict | None = None, fingerprint: str | None = None, index: int = 0,
          logprobs: list | None = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": fingerprint,
           "choices": [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish,
                                                  "logprobs": logprobs_field(logprobs)}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


# ------------------------------------------------------ /v1/completions shapes

def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


class TextOffsets:
    """Where each token starts in the text its bytes spell, in characters,
    from ``start``. A character split over several tokens (byte-fallback
    pieces of one) counts once, when its last byte arrives: a token that
    begins inside it starts where it does."""

    def __init__(self, start: int = 0):
        self.at = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, data: bytes, width: int | None = None) -> int:
        """The start of a token of bytes ``data`` (``width``: its length in the text instead)."""
        start = self.at
        self.at += len(self._utf8.decode(data)) if width is None else width
        return start


def legacy_logprobs(entries: list[dict], offset: int | TextOffsets,
                    widths: list[int | None] | None = None) -> tuple[dict, TextOffsets]:
    """Chat logprobs entries (``serve.logprobs.entry``) in the completions
    API's shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text
    -> logprob) and ``text_offset`` (each token's start in the choice's
    text, from ``offset``, a character index or the :class:`TextOffsets` of
    the entries before; ``widths`` gives a token's length in the text where it
    differs from its bytes', e.g. 0 for a BOS the server added), and the
    offsets after the last token (to pass on with the entries that follow)."""
    offsets = offset if isinstance(offset, TextOffsets) else TextOffsets(offset)
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, e in enumerate(entries):
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        top = e.get("top_logprobs")
        out["top_logprobs"].append(None if top is None else {t["token"]: t["logprob"] for t in top})
        out["text_offset"].append(offsets.take(bytes(e["bytes"]), None if widths is None else widths[k]))
    return out, offsets


def text_completion(cid: str, model: str, choices: list[tuple[str, str, dict | None]], prompt: int,
                    completion_tokens: int, fingerprint: str | None = None) -> dict:
    """A whole ``text_completion``: ``choices`` are (text, finish_reason, logprobs or None)."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": i, "text": text, "logprobs": rated, "finish_reason": finish}
                        for i, (text, finish, rated) in enumerate(choices)],
            "usage": usage(prompt, completion_tokens)}


def text_chunk(cid: str, model: str, created: int, index: int | None, text: str = "", finish: str | None = None,
               logprobs: dict | None = None, usage_: dict | None = None, fingerprint: str | None = None) -> dict:
    """One streamed ``text_completion`` event (``index`` None: the usage alone, no choice)."""
    out = {"id": cid, "object": "text_completion", "created": created, "model": model,
           "system_fingerprint": fingerprint,
           "choices": [] if index is None else [{"index": index, "text": text, "logprobs": logprobs,
                                                  "finish_reason": finish}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out
