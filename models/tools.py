"""Tool calls as text: how functions, calls and their results appear in a prompt and an answer.

Phi-3 has no tool tokens, so tools travel as plain text in the convention
many tool-use data sets share (``<tool_call>`` tags around a JSON object):

- the functions a request offers are listed in the system message, one JSON
  signature a line inside ``<tools></tools>``, with how to call them
  (:func:`tools_prompt`);
- an assistant calls one by answering
  ``<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>``,
  several calls one a line (:func:`call_text`);
- a call's result comes back as a user turn holding
  ``<tool_response>\\n...\\n</tool_response>`` (:func:`response_text`).

Training (``models.conversation``) and serving render conversations with the
same functions, so a model fine-tuned on tool conversations answers in the
form the server parses. The server holds answers to this form with a
grammar (:func:`structural_tag`, compiled by ``serve.grammar``) and turns
the text back into calls with :class:`CallStream`.

Nothing here imports torch or xgrammar.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALL_BEGIN = CALL_OPEN + '\n{"name": "'  # + name + _ARGS, then the arguments object, then _CALL_END
_ARGS = '", "arguments": '
_CALL_END = "}\n" + CALL_CLOSE
_CLOSE = "\n" + CALL_CLOSE  # a call ends at a newline and the closing tag: JSON strings hold no raw newline
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")  # or a function's name: that function must be called


@dataclass(frozen=True)
class ToolCall:
    """One call an answer makes: the function's name and its arguments as JSON text."""
    name: str
    arguments: str


def parameters(tool: dict) -> dict:
    """A function's parameter schema; one without parameters takes an empty object."""
    return tool.get("parameters") or {"type": "object", "properties": {}}


def arguments_object(arguments: dict | str) -> dict:
    """A call's arguments as an object, given the object or its JSON text."""
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def signature(tool: dict) -> str:
    """A function tool (``{"name", "description"?, "parameters"}``) as one JSON line, in OpenAI's shape."""
    function = {"name": tool["name"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = parameters(tool)
    return json.dumps({"type": "function", "function": function}, ensure_ascii=False)


def tools_prompt(tools: list[dict]) -> str:
    """The system message's block that offers ``tools`` and says how to call them."""
    lines = "\n".join(signature(t) for t in tools)
    return (f"# Tools\nFunctions you may call:\n<tools>\n{lines}\n</tools>\n"
            "To call them, answer with one call a line:\n"
            f'{CALL_OPEN}\n{{"name": <name>, "arguments": <arguments object>}}\n{CALL_CLOSE}\n'
            "Results come back in <tool_response></tool_response>.")


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it; ``arguments`` is an object or its JSON text."""
    return f"{_CALL_BEGIN}{name}{_ARGS}{json.dumps(arguments_object(arguments), ensure_ascii=False)}{_CALL_END}"


def calls_text(calls: list[dict]) -> str:
    """An assistant's calls (``{"name", "arguments"}`` each), one a line."""
    return "\n".join(call_text(c["name"], c["arguments"]) for c in calls)


def response_text(content: str) -> str:
    """A call's result as the user turn that carries it back."""
    return f"<tool_response>\n{content}\n</tool_response>"


def structural_tag(tools: list[dict], choice: str, parallel: bool = True) -> dict:
    """An xgrammar structural tag that holds an answer to this module's call form.

    ``choice`` "auto": free text, but once ``<tool_call>`` is written it must
    go on as a call of one of ``tools`` whose arguments follow that
    function's parameter schema. "required": one call or more (one a line)
    and nothing else but a leading space (a SentencePiece tokenizer,
    Phi-3's, starts a text encoded on its own with one: "\u2581<"); a function's
    name: calls of that function only.
    ``parallel`` False: at most one call. Arguments may hold at most one
    whitespace character in a row, so a weak model cannot pad them."""
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t["name"] == choice]
    if not tools:
        raise ValueError(f"no tool to call for tool choice {choice!r}")
    tags = [{"type": "tag", "begin": f"{_CALL_BEGIN}{t['name']}{_ARGS}",
             "content": {"type": "json_schema", "max_whitespace_cnt": 1,
                         "json_schema": parameters(t)},
             "end": _CALL_END} for t in tools]
    if choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "at_least_one": False,
               "stop_after_first": not parallel}
    else:  # a space may lead: SentencePiece tokenizers (Phi-3's) start a text encoded on its own with one
        fmt = {"type": "sequence", "elements": [
            {"type": "optional", "content": {"type": "const_string", "value": " "}},
            {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
             "stop_after_first": not parallel}]}
    return {"type": "structural_tag", "format": fmt}


def parse_call(body: str) -> ToolCall | None:
    """A call from the text between the tags, or None when it is not ``{"name": str, "arguments": object}``."""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("name"), str) and isinstance(doc.get("arguments"), dict)):
        return None
    return ToolCall(doc["name"], json.dumps(doc["arguments"], ensure_ascii=False))


class CallStream:
    """Splits an answer's text, as it streams, into content and calls.

    ``push`` takes the next piece of text and returns what is settled, in
    order: strings of content and :class:`ToolCall` items. Text that may be
    the start of ``<tool_call>``, and a call until its closing tag (on a
    line of its own: an argument may hold the tag's text, never a raw
    newline), are held back. Whitespace waits until other text follows it, and whitespace
    around calls is dropped, so the content neither ends with nor (after a
    call) starts with blank lines. A call that does not parse, or that the
    answer's end cuts off, is content as written."""

    def __init__(self):
        self.buf = ""  # text not yet settled
        self.space = ""  # settled whitespace, sent once other text follows
        self.after_call = False
        self.calls = 0

    def push(self, text: str, final: bool = False) -> list:
        self.buf += text
        out: list = []
        while (start := self.buf.find(CALL_OPEN)) >= 0 and (end := self.buf.find(_CLOSE, start)) >= 0:
            call = parse_call(self.buf[start + len(CALL_OPEN):end])
            end += len(_CLOSE)
            if call is None:  # not a call: text as written
                self._text(self.buf[:end], out)
            else:
                self._text(self.buf[:start], out)
                self.space, self.after_call = "", True
                self.calls += 1
                out.append(call)
            self.buf = self.buf[end:]
        if final:
            cut = len(self.buf)
        else:
            start = self.buf.find(CALL_OPEN)
            cut = start if start >= 0 else len(self.buf) - _partial(self.buf, CALL_OPEN)
        self._text(self.buf[:cut], out)
        self.buf = self.buf[cut:]
        return out

    def _text(self, text: str, out: list) -> None:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        body = text.rstrip()
        if body:
            out.append(self.space + body)
            self.space = text[len(body):]
        else:
            self.space += text


def _partial(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that begins ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
