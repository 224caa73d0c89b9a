"""The Gradio chat page: text, image and audio uploads, microphone, streamed
answers, per-session history, a clear button, visible errors, examples.

It runs the same :class:`~serve.chat.ChatService` as the HTTP API, so the
page and the API share limits, trimming and error messages.
"""
from __future__ import annotations

import logging
import mimetypes
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from .chat import ChatService
from .protocol import APIError, ChatRequest, Message, Part, check_media_counts, has_prompt

log = logging.getLogger("ray.serve")  # Serve writes it to the replica logs

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".webm", ".aac", ".aiff"}


def sniff_kind(head: bytes) -> str | None:
    """'image', 'audio' or None, from a file's first bytes (its format's signature)."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if head.startswith((b"ID3", b"fLaC", b"OggS", b"\x1a\x45\xdf\xa3")):  # mp3 tag, flac, ogg, webm/matroska
        return "audio"
    if head[4:8] == b"ftyp":  # mp4 family: a recording (m4a, mp4) is heard, not seen
        return "image" if head[8:12] in (b"avif", b"heic", b"heix", b"mif1") else "audio"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG audio or ADTS frame
        return "audio"
    return None


def file_kind(path: str) -> str | None:
    """'image', 'audio' or None, from the file name (then its guessed type),
    or, for a name that says neither, from the file's first bytes: a photo
    saved without an extension is still a photo."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXT:
        return "image"
    if ext in AUDIO_EXT:
        return "audio"
    mime = mimetypes.guess_type(path)[0] or ""
    if mime.startswith(("image/", "audio/")):
        return mime.split("/")[0]
    if ext and mime:  # a name of another known type (notes.txt, paper.pdf)
        return None
    try:
        with open(path, "rb") as f:
            return sniff_kind(f.read(16))
    except OSError:
        return None


def media_textbox() -> gr.MultimodalTextbox:
    """The page's message box. It sets no ``file_types``: Gradio would refuse
    a file by its name alone, one without an extension as "Invalid file type:
    None" (in the browser and on the server). The page's own check
    (:func:`file_kind`) judges every file, by its name or else its content,
    and names the file it refuses. (No subclass: Gradio writes a ``.pyi``
    stub beside the module of every component class defined.)"""
    return gr.MultimodalTextbox(
        file_count="multiple", sources=["upload", "microphone"],
        placeholder="Ask about an image, or record a question", show_label=False,
    )


def _file_path(item: Any) -> str | None:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, dict):
        if "path" in item:
            return item["path"]
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
    return getattr(item, "path", None) or getattr(getattr(item, "file", None), "path", None)


def _parts(content: Any, role: str) -> list[Part]:
    """Gradio history content (text, file dicts, components, lists of them) -> parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", text=content)]
    if isinstance(content, (list, tuple)):
        if isinstance(content, tuple) and content and all(isinstance(x, str) for x in content):
            content = [{"path": content[0]}]  # Gradio's (path, alt_text) file tuple
        return [p for item in content for p in _parts(item, role)]
    if isinstance(content, dict) and content.get("type") == "text":
        return [Part("text", text=str(content.get("text", "")))]
    path = _file_path(content)
    if path is None or role != "user":
        return []
    kind = file_kind(path)
    if kind is None:
        raise APIError(400, f"{Path(path).name}: unsupported file type; upload an image or an audio clip")
    return [Part(kind, data=Path(path).read_bytes())]


def to_messages(message: dict | str, history: list) -> list[Message]:
    """The page's history plus the new multimodal message -> API messages,
    consecutive entries of one role merged."""
    out: list[Message] = []
    entries = [(h.get("role"), h.get("content")) for h in history if isinstance(h, dict)]
    if isinstance(message, str):
        message = {"text": message, "files": []}
    new = [{"path": _file_path(f)} for f in message.get("files") or []]
    entries.append(("user", new + ([message["text"]] if message.get("text") else [])))
    for role, content in entries:
        if role not in ("user", "assistant"):
            continue
        parts = _parts(content, role)
        if out and out[-1].role == role:
            out[-1].parts.extend(parts)
        else:
            out.append(Message(role, parts))
    return out


def examples_folder() -> Path:
    """Where the example images live: one folder per user in the temporary
    directory, shared by every chat page this user builds (the images are
    the same every time), so restarted replicas leave nothing behind."""
    folder = Path(tempfile.gettempdir()) / f"mmphi-examples-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


EXAMPLES = (("colour", False), ("position", False), ("count", True))  # question, and whether about several objects


def example_inputs(folder: Path) -> list[dict]:
    """The questions the synthetic training set asks, about images drawn like
    its own: the colour and the place of a lone object, how many objects a
    busier scene holds, and one text-only question."""
    from data_pipelines.synthetic import NUMBERS, TEMPLATES, make_scene

    rng = random.Random(7)
    examples = []
    for i, (qtype, several) in enumerate(EXAMPLES):
        while True:
            img, objects = make_scene(rng, 128)
            if (len(objects) > 1) == several:
                break
        path = folder / f"example-{i}.png"
        tmp = folder / f".example-{i}.png.{os.getpid()}"
        img.save(tmp, format="PNG")
        os.replace(tmp, path)  # whole, also while another replica writes the same image
        examples.append({"text": TEMPLATES[qtype][0], "files": [str(path)]})
    examples.append({"text": TEMPLATES["plus"][0].format(a=NUMBERS[3], b=NUMBERS[4]), "files": []})
    return examples


def build_ui(service: ChatService) -> gr.Blocks:
    limits = service.limits
    random_weights = service.source.checkpoint is None and service.source.cfg.llm.random_init is not None
    note = (" **These are random weights (no checkpoint was given): the answers are noise.** "
            "Start with `mmphi serve --checkpoint RUNS/NAME/final` to chat with a trained model."
            if random_weights else "")

    async def respond(message, history):
        try:
            messages = to_messages(message, history)
            if not has_prompt(messages[-1]):
                raise APIError(400, "type a message or attach an image or audio clip")
            check_media_counts(messages, limits)
            req = ChatRequest(messages=messages, max_tokens=None, temperature=0.0, top_p=1.0, stop=[],
                              stream=True, include_usage=False, model=None)
            prep = await service.prepare(req)
            text, result = "", {}
            async for delta in service.answer(prep, req, result):
                text += delta
                yield text
            if not text:
                yield "(empty answer)"
        except APIError as e:
            raise gr.Error(e.message) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - shown on the page, logged in full
            log.exception("chat page request failed")
            raise gr.Error(f"the server failed: {type(e).__name__}: {e}") from None

    try:
        examples = example_inputs(examples_folder())
    except Exception:  # noqa: BLE001 - the page works without examples
        log.exception("could not draw the example images")
        examples = None
    textbox = media_textbox()
    return gr.ChatInterface(
        respond, multimodal=True, textbox=textbox, examples=examples, cache_examples=False,
        title="mmphi: a multimodal Phi-3",
        description=(f"Serving {service.source.description}. Images (up to {limits.max_images} per conversation) "
                     f"and audio clips (up to {limits.max_audio_seconds:g} s) can be attached; audio is "
                     f"transcribed with Whisper. Old turns are dropped when the conversation outgrows the "
                     f"context of {service.context_length} tokens." + note),
        concurrency_limit=None, fill_height=True, api_name="chat",
    )
