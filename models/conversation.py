"""Phi-3 chat template, image placeholders and label masking.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool",
"content": str | [parts]}`` where a part is ``{"type": "text", "text": ...}``
or ``{"type": "image"}``. An assistant message may carry ``"tool_calls"``
(``[{"name", "arguments"}]``, arguments an object or its JSON text) and a
conversation may offer ``tools`` (``[{"name", "description"?,
"parameters"?}]``); both, and ``tool`` messages (a call's result), render
as text in ``models.tools``'s form: the tools in the system message, a
result as a user turn. It renders as Phi-3's template::

    <s><|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n ... <|endoftext|>

Control tokens are inserted by id and text is encoded with special-token
matching off, so no user text can become a control token. A message's text
is encoded together with the newline before it, as the template's text
encoded whole is: a SentencePiece tokenizer (Phi-3's) then starts it without
the word-start mark ("What", not "\u2581What"), token for token what
Hugging Face's ``apply_chat_template`` gives (``tests/test_phi3_vocab.py``
checks this on Phi-3's real vocabulary). Each image part
becomes ``num_image_tokens`` copies of the image placeholder id, which the
model later replaces with projected image features.

Labels are the input ids themselves (the causal LM shifts them inside the
model), with -100 everywhere except the assistant's answer tokens and the
``<|end|>`` that closes each answer (so the model learns to stop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .tokenizer import ChatTokenizer
from .tools import calls_text, response_text, tools_prompt

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation that cannot be encoded; the message says why."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    # index into input_ids where each message starts (used for trimming)
    message_starts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def content_parts(content: Any) -> list[dict]:
    """Normalise a message's content to a list of text/image parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ConversationError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ConversationError(f"content part {i}: 'text' must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            parts.append({"type": "image"})
        else:
            raise ConversationError(f"content part {i}: unknown type {kind!r} (expected 'text' or 'image')")
    return parts


def count_images(messages: Iterable[dict]) -> int:
    return sum(p["type"] == "image" for m in messages for p in content_parts(m.get("content", "")))


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConversationError(f"message {i}: role must be one of {', '.join(ROLES)}")
        if "content" not in m and not m.get("tool_calls"):
            raise ConversationError(f"message {i}: missing 'content'")
        if m.get("tool_calls") and m["role"] != "assistant":
            raise ConversationError(f"message {i}: only assistant messages may carry tool_calls")
        if m["role"] != "user" and any(p["type"] == "image" for p in content_parts(m.get("content") or "")):
            raise ConversationError(f"message {i}: only user messages may carry images")
    return messages


def encode_conversation(
    tok: ChatTokenizer,
    messages: list[dict],
    num_image_tokens: int,
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
    tools: list[dict] | None = None,
) -> Encoded:
    """Token ids and labels for a whole conversation (no truncation);
    ``tools`` are offered in the system message (after its own text)."""
    validate_messages(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    if tools:
        block = tools_prompt(tools)
        if messages[0]["role"] == "system":
            head = messages[0]
            parts = content_parts(head.get("content") or "")
            messages = [{**head, "content": parts + [{"type": "text", "text": ("\n\n" if parts else "") + block}]}] \
                + list(messages[1:])
        else:
            messages = [{"role": "system", "content": block}] + list(messages)
    ids = tok.ids
    newline = tok.encode_text("\n")
    input_ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    n_images = 0

    def add(tokens: list[int], train: bool) -> None:
        input_ids.extend(tokens)
        labels.extend(tokens if train else [IGNORE_INDEX] * len(tokens))

    def add_after_newline(text: str, train: bool) -> None:
        """The newline that ends a role header, then the message's text. The
        reference tokenisation (the chat template's text, encoded whole)
        encodes the two together: a SentencePiece tokenizer (Phi-3's) then
        gives the text no word-start mark ("\u2581What"), which it does give a
        text encoded on its own. Where the joint encoding does not begin with
        the newline's own tokens, the text is encoded on its own."""
        add(newline, False)
        joined = tok.encode_text("\n" + text)
        add(joined[len(newline):] if joined[:len(newline)] == newline else tok.encode_text(text), train)

    if ids.bos is not None:
        add([ids.bos], False)
    role_id = {"system": ids.system, "user": ids.user, "assistant": ids.assistant, "tool": ids.user}
    for m in messages:
        starts.append(len(input_ids))
        train = m["role"] == "assistant"
        add([role_id[m["role"]]], False)
        parts = content_parts(m.get("content") or "")
        if m["role"] == "tool":  # a call's result, back as a user turn
            parts = [{"type": "text", "text": response_text("".join(p["text"] for p in parts))}]
        if m.get("tool_calls"):
            text = calls_text(m["tool_calls"])
            said = [p for p in parts if p["text"]]  # the answer's text, then its calls
            parts = said + [{"type": "text", "text": ("\n" if said else "") + text}]
        if parts and parts[0]["type"] == "text":
            add_after_newline(parts[0]["text"], train)
            parts = parts[1:]
        else:
            add(newline, False)
        for part in parts:
            if part["type"] == "image":
                add([ids.image] * num_image_tokens, False)
                n_images += 1
            else:
                add(tok.encode_text(part["text"]), train)
        add([ids.end], train)
        add(newline, False)
    if add_generation_prompt:
        starts.append(len(input_ids))
        add([ids.assistant] + newline, False)
    else:
        add([ids.eos], False)
    return Encoded(input_ids, labels, n_images, starts)


def encode_for_training(
    tok: ChatTokenizer,
    messages: list[dict],
    num_image_tokens: int,
    max_length: int,
    system_prompt: str | None = None,
    tools: list[dict] | None = None,
) -> Encoded:
    """Encode and fit into ``max_length`` by dropping whole trailing turns;
    refuses (ConversationError) when even the first exchange does not fit."""
    enc = encode_conversation(tok, messages, num_image_tokens, system_prompt=system_prompt, tools=tools)
    msgs = list(messages)
    while len(enc) > max_length:
        # drop the last user/assistant exchange, keep at least one answer
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=0)
        if last_user == 0 or not any(m["role"] == "assistant" for m in msgs[:last_user]):
            raise ConversationError(
                f"conversation needs {len(enc)} tokens with its first exchange alone over the "
                f"limit of {max_length} (images count {num_image_tokens} tokens each)"
            )
        msgs = msgs[:last_user]
        enc = encode_conversation(tok, msgs, num_image_tokens, system_prompt=system_prompt, tools=tools)
    if all(label == IGNORE_INDEX for label in enc.labels):
        raise ConversationError("conversation has no assistant answer to learn from")
    return enc


def collate(batch: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of encoded samples; padding gets label -100 and mask 0."""
    if padding_side not in ("right", "left"):
        raise ValueError("padding_side must be 'right' or 'left'")
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, sl] = torch.tensor(e.input_ids)
        labels[row, sl] = torch.tensor(e.labels)
        mask[row, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
