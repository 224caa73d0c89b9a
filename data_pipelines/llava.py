"""Reader and writer for the LLaVA-Instruct-150K conversation format.

A data set is a JSON list (or a ``.jsonl`` file, one record a line) of::

    {"id": "000000033471", "image": "train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A bus."}, ...],
     "meta": {...}}                                   # optional, ours

``image`` is relative to an image folder (COCO ``train2017/...`` style) and
is absent for text-only records; ``<image>`` marks where the image goes in
the first human turn. Tool use follows the ShareGPT convention: a record's
``"tools"`` (a list of function definitions, OpenAI-shaped or bare, or that
list as JSON text), ``function_call`` turns (the assistant's call, a JSON
``{"name", "arguments"}`` or a list of them) and ``observation`` turns (a
call's result); they become ``Record.tools``, assistant messages with
``tool_calls`` and ``tool`` messages (rendered by ``models.tools``). :func:`read_llava` turns each record into a
:class:`Record` whose ``messages`` are in ``models.conversation``'s format
(``human`` -> ``user``, ``gpt`` -> ``assistant``, a leading ``system`` turn
-> ``system``; the marker becomes an ``{"type": "image"}`` part). A bad
record never stops the read: it is skipped, counted and explained in
``ReadReport.errors``. Only a file that is not a JSON list is fatal.
:func:`to_llava` is the inverse, for writing data sets.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from models.tools import NAME, arguments_object

IMAGE_MARKER = "<image>"
FROM_TO_ROLE = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                "observation": "tool"}
ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}

# error kind -> short human label (used by ReadReport.summary)
ERROR_KINDS = {
    "invalid_json": "invalid JSON line",
    "not_a_dict": "record is not an object",
    "bad_id": "missing or invalid id",
    "no_conversations": "missing or empty conversations",
    "bad_turn": "malformed turn",
    "no_assistant": "no assistant turn",
    "multiple_markers": "more than one <image> marker",
    "marker_not_in_human": "<image> marker outside a human turn",
    "marker_without_image": "<image> marker but no image",
    "bad_image_path": "invalid image path",
    "path_escape": "image path escapes the image folder",
    "missing_image": "image file missing",
    "bad_meta": "invalid meta",
    "bad_tools": "invalid tools",
}


@dataclass
class Record:
    """One conversation: ``messages`` in ``models.conversation`` format.

    ``image`` is the path relative to the image folder (None for text-only);
    ``meta`` is free-form metadata carried through unchanged (the synthetic
    set stores the ground truth that evaluation needs there)."""

    id: str
    image: str | None
    messages: list[dict]
    meta: dict = field(default_factory=dict)
    tools: list[dict] | None = None  # functions offered: {"name", "description"?, "parameters"?} each


@dataclass
class ReadReport:
    """What :func:`read_llava` kept and what it skipped (and why)."""

    records: list[Record]
    errors: list[dict]
    source: str | None = None

    @property
    def n_total(self) -> int:
        return len(self.records) + len(self.errors)

    def summary(self) -> str:
        n_img = sum(r.image is not None for r in self.records)
        head = f"{self.source}: " if self.source else ""
        text = (f"{head}{self.n_total} records, {len(self.records)} kept "
                f"({n_img} with an image, {len(self.records) - n_img} text-only), "
                f"{len(self.errors)} skipped")
        if self.errors:
            kinds = Counter(e.get("kind", "other") for e in self.errors)
            text += " (" + ", ".join(f"{ERROR_KINDS.get(k, k)}: {n}" for k, n in kinds.most_common()) + ")"
        return text


class _Skip(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _escapes(path: str) -> bool:
    """True for absolute paths (POSIX or Windows) and any ``..`` component."""
    if PurePosixPath(path).is_absolute() or path.startswith("\\"):
        return True
    win = PureWindowsPath(path)
    if win.drive or win.root:
        return True
    return any(p == ".." for p in path.replace("\\", "/").split("/"))


def _split_marker(text: str) -> list[dict]:
    """Text with one ``<image>`` -> parts; the marker's adjacent newline (the
    one after it, else the one before it) goes with it; empty texts vanish."""
    i = text.index(IMAGE_MARKER)
    before, after = text[:i], text[i + len(IMAGE_MARKER):]
    if after.startswith("\n"):
        after = after[1:]
    elif before.endswith("\n"):
        before = before[:-1]
    parts: list[dict] = []
    if before:
        parts.append({"type": "text", "text": before})
    parts.append({"type": "image"})
    if after:
        parts.append({"type": "text", "text": after})
    return parts


def _convert(raw: Any, image_root: Path | None, check_images: bool, exists: dict) -> Record:
    if not isinstance(raw, dict):
        raise _Skip("not_a_dict", f"record is a {type(raw).__name__}, not an object")
    rid = raw.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise _Skip("bad_id", f"id must be a non-empty string or an integer, got {rid!r}")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _Skip("no_conversations", "'conversations' is missing, not a list, or empty")

    markers = 0
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Skip("bad_turn", f"turn {t} is a {type(turn).__name__}, not an object")
        frm, value = turn.get("from"), turn.get("value")
        if frm not in FROM_TO_ROLE:
            raise _Skip("bad_turn", f"turn {t}: unknown 'from' {frm!r} (expected human, gpt, function_call, "
                        "observation or a leading system)")
        if frm == "system" and t != 0:
            raise _Skip("bad_turn", f"turn {t}: a system turn is only allowed first")
        if not isinstance(value, str):
            raise _Skip("bad_turn", f"turn {t}: 'value' must be a string, got {type(value).__name__}")
        n = value.count(IMAGE_MARKER)
        if n and frm != "human":
            raise _Skip("marker_not_in_human", f"turn {t} ({frm}) contains the <image> marker")
        markers += n
    if markers > 1:
        raise _Skip("multiple_markers", f"{markers} <image> markers; one image per record is supported")
    if not any(turn["from"] in ("gpt", "function_call") for turn in convs):
        raise _Skip("no_assistant", "no 'gpt' or 'function_call' turn: nothing to learn from")
    tools = _tools(raw.get("tools"))

    image = raw.get("image")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise _Skip("bad_image_path", f"'image' must be a non-empty string path, got {image!r}")
        if _escapes(image):
            raise _Skip("path_escape", f"image path {image!r} is absolute or contains '..'")
        if check_images and image_root is not None:
            if image not in exists:
                exists[image] = (image_root / image).is_file()
            if not exists[image]:
                raise _Skip("missing_image", f"image file {image!r} not found under {image_root}")
    elif markers:
        raise _Skip("marker_without_image", "the text has an <image> marker but the record has no 'image'")

    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise _Skip("bad_meta", f"'meta' must be an object, got {type(meta).__name__}")

    messages: list[dict] = []
    placed = False
    for t, turn in enumerate(convs):
        role, value = FROM_TO_ROLE[turn["from"]], turn["value"]
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls(value, t)})
        elif IMAGE_MARKER in value:
            messages.append({"role": role, "content": _split_marker(value)})
            placed = True
        else:
            messages.append({"role": role, "content": value})
    if image is not None and not placed:
        # LLaVA's convention: an image with no marker goes first in the first human turn.
        for m in messages:
            if m["role"] == "user":
                m["content"] = [{"type": "image"}] + ([{"type": "text", "text": m["content"]}] if m["content"] else [])
                break
        else:
            raise _Skip("marker_without_image", "the record has an image but no human turn to attach it to")
    return Record(id=str(rid), image=image, messages=messages, meta=dict(meta), tools=tools)


def _tools(raw: Any) -> list[dict] | None:
    """A record's ``tools`` -> ``[{"name", "description"?, "parameters"?}]`` (None when absent or empty)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError as e:
            raise _Skip("bad_tools", f"'tools' is a string but not JSON: {e.msg}") from None
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise _Skip("bad_tools", f"'tools' must be a list of functions, got {type(raw).__name__}")
    out = []
    for i, tool in enumerate(raw):
        f = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
            raise _Skip("bad_tools", f"tools[{i}] is not a function with a name of 1 to 64 letters, digits, '_' "
                        "or '-'")
        if not isinstance(f.get("parameters", {}), dict) or not isinstance(f.get("description", ""), str):
            raise _Skip("bad_tools", f"tools[{i}] ({f['name']}): 'parameters' must be an object (a JSON schema) "
                        "and 'description' a string")
        out.append({k: f[k] for k in ("name", "description", "parameters") if k in f})
    return out


def _calls(value: str, t: int) -> list[dict]:
    """A ``function_call`` turn's value -> ``[{"name", "arguments"}]``."""
    try:
        doc = json.loads(value)
    except json.JSONDecodeError as e:
        raise _Skip("bad_turn", f"turn {t}: a function_call's value is not JSON: {e.msg}") from None
    calls = doc if isinstance(doc, list) else [doc]
    if not calls:
        raise _Skip("bad_turn", f"turn {t}: a function_call turn with an empty list of calls")
    for call in calls:
        args = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = call["arguments"] = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not (isinstance(args, dict) and isinstance(call.get("name"), str) and NAME.match(call["name"])):
            raise _Skip("bad_turn", f"turn {t}: a function_call's value must be {{\"name\": ..., \"arguments\": "
                        "{...}} or a list of them")
    return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def _iter_raw(path: Path) -> Iterator[tuple[Any, dict | None, dict]]:
    """(record, None, where) or (None, error, where) for each record of the
    file; ``where`` is ``{"line": n}`` for JSON Lines, else empty."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), None, {"line": lineno}
                except json.JSONDecodeError as e:
                    yield None, {"index": index, "line": lineno, "id": None, "kind": "invalid_json",
                                 "reason": f"line {lineno} is not valid JSON: {e.msg}"}, {}
                index += 1
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); a LLaVA data set is a JSON list of records, "
                         "or JSON Lines in a file named .jsonl") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list of records as the LLaVA "
                         "format requires")
    for item in data:
        yield item, None, {}


def read_llava(json_path, image_root=None, *, check_images: bool = True) -> ReadReport:
    """Read a LLaVA-format ``.json`` list or ``.jsonl`` file into Records.

    Bad records are skipped and listed in ``errors`` as
    ``{"index", "id", "kind", "reason"}`` (plus ``"line"`` for JSON Lines):
    not an object; missing/empty conversations; a turn with an unknown
    ``from``, a non-string ``value`` or a ``system`` turn that is not first;
    no ``gpt`` turn; more than one ``<image>`` marker or one outside a human
    turn; a marker with no ``image`` field; an image path that is absolute or
    contains ``..``; an image file missing under ``image_root`` (checked only
    when ``check_images`` and ``image_root`` is given).

    An ``image`` field with no ``<image>`` marker is accepted: as LLaVA does,
    the image part is put first in the first human turn.

    Raises ``ValueError`` when a ``.json`` file is not valid JSON or not a
    list (in a ``.jsonl`` file a broken line is one skipped record, kind
    ``invalid_json``); ``FileNotFoundError`` when the file, or the given
    ``image_root`` while checking images, does not exist.
    """
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else None
    if root is not None and check_images and not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    records: list[Record] = []
    errors: list[dict] = []
    exists: dict[str, bool] = {}
    for index, (raw, err, where) in enumerate(_iter_raw(path)):
        if err is not None:
            errors.append(err)
            continue
        try:
            records.append(_convert(raw, root, check_images, exists))
        except _Skip as s:
            rid = raw.get("id") if isinstance(raw, dict) else None
            errors.append({"index": index, **where, "id": rid, "kind": s.kind, "reason": s.reason})
    return ReadReport(records=records, errors=errors, source=str(path))


def write_errors(report: ReadReport, path) -> Path:
    """Write the skipped records of ``report`` as JSON Lines (one error a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in report.errors:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return path


def _content_to_value(content: Any, role: str, rid: str) -> tuple[str, int]:
    """Render a message's content as LLaVA text; returns (text, number of images)."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ValueError(f"record {rid}: message content must be a string or a list of parts")
    images = [i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") in ("image", "image_url")]
    for p in parts:
        if not isinstance(p, dict) or p.get("type") not in ("text", "image", "image_url"):
            raise ValueError(f"record {rid}: unknown content part {p!r}")
        if p["type"] == "text":
            if not isinstance(p.get("text"), str):
                raise ValueError(f"record {rid}: a text part's 'text' must be a string")
            if IMAGE_MARKER in p["text"]:
                raise ValueError(f"record {rid}: text contains the literal {IMAGE_MARKER} marker, "
                                 "which the LLaVA format cannot represent")
    if not images:
        return "".join(p["text"] for p in parts), 0
    if len(images) > 1:
        raise ValueError(f"record {rid}: more than one image part; the LLaVA format holds one image")
    if role != "user":
        raise ValueError(f"record {rid}: only user messages may carry the image")
    k = images[0]
    prefix = "".join(p["text"] for p in parts[:k])
    suffix = "".join(p["text"] for p in parts[k + 1:])
    # inverse of _split_marker: the newline goes after the marker when text
    # follows it, else before it when text precedes it
    if suffix:
        return f"{prefix}{IMAGE_MARKER}\n{suffix}", 1
    if prefix:
        return f"{prefix}\n{IMAGE_MARKER}", 1
    return IMAGE_MARKER, 1


def to_llava(record: Record) -> dict:
    """A Record as a LLaVA-format dict (``meta`` written back when non-empty);
    ``read_llava`` of the written data gives back an equal Record."""
    conversations = []
    n_images = 0
    for m in record.messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLE_TO_FROM:
            raise ValueError(f"record {record.id}: unknown role {role!r}")
        if m.get("tool_calls"):
            if m.get("content"):
                raise ValueError(f"record {record.id}: an assistant message with both text and tool_calls; the "
                                 "format holds them as two turns (gpt, then function_call)")
            calls = [{"name": c["name"], "arguments": arguments_object(c["arguments"])} for c in m["tool_calls"]]
            conversations.append({"from": "function_call",
                                  "value": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)})
            continue
        value, n = _content_to_value(m.get("content"), role, record.id)
        n_images += n
        conversations.append({"from": ROLE_TO_FROM[role], "value": value})
    if (record.image is None) != (n_images == 0):
        raise ValueError(f"record {record.id}: image {record.image!r} but {n_images} image parts in the messages")
    out: dict = {"id": record.id}
    if record.image is not None:
        out["image"] = record.image
    out["conversations"] = conversations
    if record.tools:
        out["tools"] = record.tools
    if record.meta:
        out["meta"] = record.meta
    return out


def write_llava(records, path) -> Path:
    """Write Records as a LLaVA JSON list, one record a line (deterministic bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(to_llava(r), ensure_ascii=False) for r in records]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    path.write_text(text, encoding="utf-8")
    return path


def dataset_paths(folder) -> dict:
    """``{"train", "val", "images"}`` paths of a data set folder laid out as
    ``train.json``, ``val.json`` (``.jsonl`` also accepted) and ``images/``;
    raises FileNotFoundError naming everything that is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data set folder {folder} " + ("is a file, not a folder" if folder.exists()
                                                                else "does not exist"))
    out: dict = {}
    missing = []
    for split in ("train", "val"):
        for ext in (".json", ".jsonl"):
            if (folder / f"{split}{ext}").is_file():
                out[split] = folder / f"{split}{ext}"
                break
        else:
            missing.append(f"{split}.json")
    if (folder / "images").is_dir():
        out["images"] = folder / "images"
    else:
        missing.append("images/")
    if missing:
        raise FileNotFoundError(f"data set folder {folder} lacks {', '.join(missing)} "
                                "(expected train.json, val.json and images/)")
    return out
