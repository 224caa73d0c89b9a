"""A learnable synthetic image data set in LLaVA format (``mmphi data synth``).

Each image is a noisy grey background with 1 to 6 non-overlapping objects;
each object has one of 6 shapes, one of 6 colours, a size (small or large;
scenes of 4 or more objects only small ones) and a cell of a 3x3 grid;
objects of one image have distinct colours and distinct shapes. Each image gives one record (id = image stem); about 5 % of
the records are text-only arithmetic questions.

Two kinds of scene, so every question has one right answer that only the
image gives, without referring expressions a small model must first learn
to resolve:

- single-object scenes (40 % of the images): 2 to 4 exchanges about the
  object's colour, shape, position (its grid cell, 9 answers) and size, and
  in 30 % of them first a count question ("one");
- multi-object scenes (2 to 6 objects, 12 % each): one count question.

So count answers are uniform over one..six (chance 1/6); counting needs the
patch tokens pooled over the whole image. No question names an attribute of
the object, so no turn's answer follows from the question or earlier turns.
Held-out accuracy is measured on first exchanges, so accuracy above the
chance levels written to ``synth.json`` measures vision; the validation
images are drawn in proportion from each (first question type, answer)
group, so their first answers have the shares of the whole set.

Optionally (``tool_fraction``, ``mmphi data synth --tool-records``), tool-use
records: each a one-object scene of its own and a request that one of two
functions (``TOOLS``) answers, the call taking the object's colour or grid
cell as its argument, then the function's result and a reply. Their first
answer is the call; held-out accuracy scores it as the same calls.

Everything is drawn from ``random.Random`` streams derived from the seed
(one per image, so the first N images do not depend on how many follow)
and PIL drawing: the same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from .llava import Record, write_llava

VERSION = 3
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220),
           "yellow": (240, 220, 30), "purple": (140, 40, 170), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": (0.09, 0.11), "large": (0.17, 0.20)}  # radius of the bounding circle / image side
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_MARGIN = 0.05   # an object's centre keeps this far (x side) from its cell's borders
EDGE_PAD = 0.01      # ... and its bounding circle this far from the image edges
GAP = 0.03           # minimum gap between two objects' bounding circles
BACKGROUND = (35, 95)  # grey level range
NOISE = 6              # +- noise on the background
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
           "nineteen", "twenty")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TEXT_FRACTION = 0.05
MAX_OBJECTS = 6
SINGLE_FRACTION = 0.4  # of the images; the rest have 2..MAX_OBJECTS objects, equally often
# a single-object record starts with a count question this often, which makes
# "one" as frequent an answer as each of two..six
COUNT_SINGLE = (1 - SINGLE_FRACTION) / (MAX_OBJECTS - 1) / SINGLE_FRACTION

ANSWERS = {
    "colour": sorted(COLOURS), "shape": list(SHAPES), "position": list(CELLS),
    "count": list(NUMBERS[1:MAX_OBJECTS + 1]), "size": ["small", "large"],
}
# tool: the right function (the request names what it wants) with a drawn argument, each function half the time
CHANCE = {k: 1 / len(v) for k, v in ANSWERS.items()} | {"text": None, "tool": (1 / len(COLOURS) + 1 / len(CELLS)) / 2,
                                                        "tool_reply": None}
QTYPES = ("count", "colour", "shape", "position", "size")

TEMPLATES = {
    "colour": ["What colour is the shape?", "What is the colour of the object?",
               "Which colour is the object in the picture?", "What color is the shape?"],
    "shape": ["What shape is shown?", "Which shape is in the picture?", "What is the shape of the object?"],
    "position": ["Where is the object?", "In which part of the image is the shape?",
                 "Where is the shape located?", "Where in the picture is the object?"],
    "count": ["How many shapes are there?", "How many objects are in the image?",
              "Count the shapes in the picture."],
    "size": ["Is the object small or large?", "Is the shape large or small?",
             "How big is the object: small or large?"],
    "plus": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}. What do you get?"],
    "minus": ["What is {a} minus {b}?", "How much is {a} take away {b}?", "Subtract {b} from {a}. What is left?"],
    "next": ["What number comes after {a}?", "Which number follows {a}?", "What is the next number after {a}?"],
    "day": ["What day comes after {day}?", "Which day follows {day}?", "What is the day after {day}?"],
}
# tool use: a single-object scene, a request that one of two functions answers
# with the object's colour or its grid cell as the argument, the function's
# result and a closing reply; the call is the answer held-out accuracy checks
TOOLS = [
    {"name": "order_paint", "description": "Order a tin of paint in one colour.",
     "parameters": {"type": "object", "properties": {"colour": {"type": "string", "enum": sorted(COLOURS)}},
                    "required": ["colour"]}},
    {"name": "move_arm", "description": "Move the robot arm over one cell of the table.",
     "parameters": {"type": "object", "properties": {"cell": {"type": "string", "enum": list(CELLS)}},
                    "required": ["cell"]}},
]
MAX_TOOL_FRACTION = 10  # tool-use records per image (--tool-records) at most
TOOL_ARGUMENT = {"order_paint": "colour", "move_arm": "position"}  # the object's attribute each one's argument is
TOOL_PARAMETER = {"order_paint": "colour", "move_arm": "cell"}
TOOL_TEMPLATES = {
    "order_paint": ["Order paint in the colour of the object.", "Buy a tin of paint that matches the shape.",
                    "Get me paint of the same colour as the object."],
    "move_arm": ["Move the arm over the object.", "Send the robot arm to the shape.",
                 "Put the arm above the object."],
}
EXCHANGE_WEIGHTS = {2: 0.3, 3: 0.4, 4: 0.3}  # exchanges per single-object record
OBJECT_QTYPES = ("colour", "shape", "position", "size")  # asked about the object of a single-object scene


def answer_text(canonical: str) -> str:
    """``"top left"`` -> ``"Top left."``; evaluation compares case-insensitively without the period."""
    return canonical[:1].upper() + canonical[1:] + "."


def normalise_answer(text: str) -> str:
    """Inverse of :func:`answer_text` for comparison: lower case, no outer spaces or final period."""
    return text.strip().rstrip(".").strip().lower()


def expected_answer(meta: dict, turn: int) -> str:
    """The canonical answer of assistant turn ``turn``, recomputed from ``meta``."""
    qtype, target, objects = meta["qtypes"][turn], meta["targets"][turn], meta["objects"]
    if qtype == "count":
        return NUMBERS[len(objects)]
    if qtype in ("colour", "shape", "position", "size"):
        return objects[target][qtype]
    if qtype == "text":
        return _text_answer(target)
    if qtype == "tool":
        return call_answer(target, {TOOL_PARAMETER[target]: objects[0][TOOL_ARGUMENT[target]]})
    if qtype == "tool_reply":
        return normalise_answer(_tool_reply(target, objects[0][TOOL_ARGUMENT[target]]))
    raise ValueError(f"unknown question type {qtype!r}")


def call_answer(name: str, arguments: dict) -> str:
    """A call as one comparable string: ``order_paint {"colour": "red"}`` (keys sorted)."""
    return f"{name} {json.dumps(arguments, sort_keys=True)}"


# ---------------------------------------------------------------- drawing

def _draw(d: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    """Draw ``shape`` inside the circle of radius ``r`` around (cx, cy); solid, no antialiasing."""
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.72 * r
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx + r * math.cos(a), cy - r * math.sin(a)) for a in
                   (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.42 * r
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w, arm = 0.3 * r, 0.95 * r
        d.rectangle((cx - arm, cy - w, cx + arm, cy + w), fill=fill)
        d.rectangle((cx - w, cy - arm, cx + w, cy + arm), fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _cell_range(cell: int, r: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Integer (x range, y range) for a centre in ``cell`` with radius ``r``."""
    row, col = divmod(cell, 3)
    third, m, pad = size / 3, CELL_MARGIN * size, EDGE_PAD * size

    def span(k: int) -> tuple[int, int]:
        lo = max(k * third + m, r + pad)
        hi = min((k + 1) * third - m, size - 1 - r - pad)
        return math.ceil(lo), math.floor(hi)

    return span(col), span(row)


def _place(rng: random.Random, radii: list[int], size: int) -> list[tuple[int, int, int]]:
    """(cell, x, y) for each radius: distinct cells, bounding circles ``GAP`` apart."""
    gap = GAP * size
    for _ in range(1000):
        cells = rng.sample(range(9), len(radii))
        for _ in range(8):
            placed = []
            for cell, r in zip(cells, radii):
                (x0, x1), (y0, y1) = _cell_range(cell, r, size)
                x, y = rng.randint(x0, x1), rng.randint(y0, y1)
                if all(math.hypot(x - px, y - py) >= r + pr + gap for (_, px, py), pr in zip(placed, radii)):
                    placed.append((cell, x, y))
                else:
                    break
            if len(placed) == len(radii):
                return placed
    raise RuntimeError(f"could not place {len(radii)} objects in a {size}px image")


def make_scene(rng: random.Random, size: int, objects: int | None = None) -> tuple[Image.Image, list[dict]]:
    """One image and its objects (``shape, colour, size, position, center, radius, rgb``);
    ``objects``: how many (default: drawn, one in ``SINGLE_FRACTION`` of the scenes)."""
    n = objects or (1 if rng.random() < SINGLE_FRACTION else rng.randint(2, MAX_OBJECTS))
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    # four or more objects only fit the 3x3 grid's cells when small
    sizes = [rng.choice(("small", "large")) if n <= 3 else "small" for _ in range(n)]
    radii = [round(size * rng.uniform(*SIZES[s])) for s in sizes]
    places = _place(rng, radii, size)
    grey = rng.randint(*BACKGROUND)
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size))
    img = noise.point(lambda v: grey - NOISE + (v * (2 * NOISE + 1) >> 8)).convert("RGB")
    d = ImageDraw.Draw(img)
    objects = []
    for shape, colour, sz, r, (cell, x, y) in zip(shapes, colours, sizes, radii, places):
        _draw(d, shape, x, y, r, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "size": sz, "position": CELLS[cell],
                        "center": [x, y], "radius": r, "rgb": list(COLOURS[colour])})
    return img, objects


# ---------------------------------------------------------------- questions

def _pick_qtypes(rng: random.Random, n_objects: int) -> list[str]:
    if n_objects > 1:
        return ["count"]
    k = rng.choices(list(EXCHANGE_WEIGHTS), weights=list(EXCHANGE_WEIGHTS.values()))[0]
    if rng.random() < COUNT_SINGLE:
        return ["count", *rng.sample(OBJECT_QTYPES, k - 1)]
    return rng.sample(OBJECT_QTYPES, k)


def image_record(rng: random.Random, stem: str, image_path: str, objects: list[dict]) -> Record:
    qtypes = _pick_qtypes(rng, len(objects))
    targets = [None if q == "count" else 0 for q in qtypes]
    messages = []
    for t, qtype in enumerate(qtypes):
        q = rng.choice(TEMPLATES[qtype])
        a = expected_answer({"objects": objects, "qtypes": qtypes, "targets": targets}, t)
        content = [{"type": "image"}, {"type": "text", "text": q}] if t == 0 else q
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer_text(a)}]
    answers = [normalise_answer(m["content"]) for m in messages if m["role"] == "assistant"]
    return Record(id=stem, image=image_path, messages=messages,
                  meta={"objects": objects, "qtypes": qtypes, "targets": targets, "answers": answers})


def _tool_result(name: str, value: str) -> str:
    if name == "order_paint":
        return json.dumps({"status": "ordered", "colour": value})
    return json.dumps({"status": "moved", "cell": value})


def _tool_reply(name: str, value: str) -> str:
    if name == "order_paint":
        return f"Ordered {value} paint."
    return f"The arm is over the {value} cell."


def tool_record(rng: random.Random, stem: str, image_path: str, objects: list[dict]) -> Record:
    """A request about a single-object scene that a function answers: the
    call (its argument is the object's colour or grid cell), its result, a reply."""
    name = rng.choice(sorted(TOOL_ARGUMENT))
    value = objects[0][TOOL_ARGUMENT[name]]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(TOOL_TEMPLATES[name])}]},
        {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": {TOOL_PARAMETER[name]: value}}]},
        {"role": "tool", "content": _tool_result(name, value)},
        {"role": "assistant", "content": _tool_reply(name, value)},
    ]
    meta = {"objects": objects, "qtypes": ["tool", "tool_reply"], "targets": [name, name]}
    meta["answers"] = [expected_answer(meta, 0), expected_answer(meta, 1)]
    return Record(id=stem, image=image_path, messages=messages, meta=meta, tools=TOOLS)


def _text_answer(spec: dict) -> str:
    op, a = spec["op"], spec["a"]
    if op == "plus":
        return NUMBERS[a + spec["b"]]
    if op == "minus":
        return NUMBERS[a - spec["b"]]
    if op == "next":
        return NUMBERS[a + 1]
    if op == "day":
        return DAYS[(DAYS.index(a) + 1) % 7].lower()
    raise ValueError(f"unknown text question {op!r}")


def _text_problem(rng: random.Random) -> tuple[dict, str]:
    op = rng.choice(("plus", "minus", "next", "day"))
    if op == "plus":
        spec = {"op": op, "a": rng.randint(0, 10), "b": rng.randint(0, 10)}
    elif op == "minus":
        a = rng.randint(0, 20)
        spec = {"op": op, "a": a, "b": rng.randint(0, a)}
    elif op == "next":
        spec = {"op": op, "a": rng.randint(0, 19)}
    else:
        spec = {"op": op, "a": rng.choice(DAYS)}
    words = {"a": NUMBERS[spec["a"]] if op != "day" else None, "b": NUMBERS[spec["b"]] if "b" in spec else None,
             "day": spec["a"] if op == "day" else None}
    return spec, rng.choice(TEMPLATES[op]).format(**words)


def text_record(rng: random.Random, rid: str) -> Record:
    messages, targets = [], []
    for _ in range(rng.choice((1, 1, 2))):
        spec, q = _text_problem(rng)
        a = _text_answer(spec)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": answer_text(a)}]
        targets.append(spec)
    answers = [normalise_answer(m["content"]) for m in messages if m["role"] == "assistant"]
    return Record(id=rid, image=None, messages=messages,
                  meta={"objects": [], "qtypes": ["text"] * len(targets), "targets": targets, "answers": answers})


# ---------------------------------------------------------------- the data set

def _split(n: int, fraction: float, rng: random.Random) -> set[int]:
    if n < 2 or fraction <= 0:
        return set()
    k = min(max(1, round(n * fraction)), n - 1)
    return set(rng.sample(range(n), k))


def _split_stratified(keys: list[tuple], fraction: float, rng: random.Random) -> set[int]:
    """The same number of indices as :func:`_split`, drawn from each group of
    equal ``keys`` in proportion to its size (largest remainders), so the
    held-out part has the answer shares of the whole set, not a sample's."""
    n = len(keys)
    if n < 2 or fraction <= 0:
        return set()
    k = min(max(1, round(n * fraction)), n - 1)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups)
    exact = {g: len(groups[g]) * k / n for g in order}
    quota = {g: int(exact[g]) for g in order}
    for g in sorted(order, key=lambda g: quota[g] - exact[g])[: k - sum(quota.values())]:
        quota[g] += 1
    return {i for g in order for i in rng.sample(groups[g], quota[g])}


def _interleave(a: list, b: list) -> list:
    """``a`` and ``b`` merged, each in its order, ``b``'s items spread evenly among ``a``'s."""
    keyed = [((i + 1) / (len(a) + 1), 0, x) for i, x in enumerate(a)]
    keyed += [((j + 0.5) / len(b), 1, x) for j, x in enumerate(b)]
    return [x for _, _, x in sorted(keyed, key=lambda k: k[:2])]


def _stats(records: list[Record]) -> dict:
    answers: dict[str, Counter] = {}
    for r in records:
        for qtype, a in zip(r.meta["qtypes"], r.meta["answers"]):
            answers.setdefault(qtype, Counter())[a] += 1
    order = [q for q in (*QTYPES, "text", "tool", "tool_reply") if q in answers]
    return {
        "questions": {q: sum(answers[q].values()) for q in order},
        "majority": {q: round(max(answers[q].values()) / sum(answers[q].values()), 4) for q in order},
        "answer_counts": {q: dict(sorted(answers[q].items())) for q in order},
    }


def _render(job: tuple[str, int, int, int, int]) -> list[Record]:
    """Draw and save images ``start`` to ``stop - 1``; their records, in order.
    Each image's generator is seeded by its index alone, so any split of the
    range over processes writes the same files and records."""
    out, seed, size, start, stop = job
    records = []
    for i in range(start, stop):
        rng = random.Random(f"mmphi-synth/{seed}/image/{i}")
        stem = f"{i:06d}"
        img, objects = make_scene(rng, size)
        img.save(Path(out) / "images" / f"{stem}.png", format="PNG")
        records.append(image_record(rng, stem, f"{stem}.png", objects))
    return records


def _tool_render(out: Path, seed: int, size: int, i: int) -> Record:
    """Draw and save tool record ``i``'s single-object scene; its record."""
    rng = random.Random(f"mmphi-synth/{seed}/tool/{i}")
    stem = f"tool-{i:06d}"
    img, objects = make_scene(rng, size, objects=1)
    img.save(out / "images" / f"{stem}.png", format="PNG")
    return tool_record(rng, stem, f"{stem}.png", objects)


PARALLEL_FROM = 1000  # fewer images are drawn in this process: starting workers would cost more than it saves


def default_workers(images: int) -> int:
    """Processes for ``images`` images: one per core (at most 8) from
    ``PARALLEL_FROM`` images, one below."""
    return 1 if images < PARALLEL_FROM else max(1, min(os.cpu_count() or 1, 8))


def synthesize(out_dir, *, images: int = 600, seed: int = 0, size: int = 128, val_fraction: float = 0.2,
               progress: bool = True, workers: int = 1, tool_fraction: float = 0.0) -> dict:
    """Write ``train.json``, ``val.json``, ``images/NNNNNN.png`` and ``synth.json``
    under ``out_dir``; returns what ``synth.json`` holds (plus ``out_dir``).
    ``workers``: processes drawing the images (``default_workers`` picks a
    count); the output does not depend on it. Above 1 they are spawned, so a
    script calling this needs the ``if __name__ == "__main__":`` guard.
    ``tool_fraction``: tool-use records (:func:`tool_record`) to add, as a
    fraction of ``images``, each with an image of its own
    (``images/tool-NNNNNN.png``); the other records do not depend on it."""
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not 0 <= tool_fraction <= MAX_TOOL_FRACTION:
        raise ValueError(f"tool-use records per image (--tool-records) must be in [0, {MAX_TOOL_FRACTION}], "
                         f"got {tool_fraction}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: give the data set's folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_text = max(1, round(images * TEXT_FRACTION / (1 - TEXT_FRACTION)))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images, desc="synth images", unit="img", file=sys.stderr, leave=False)
    chunk = max(1, min(250, -(-images // (4 * workers))))  # a few chunks per worker keep them all busy to the end
    jobs = [(str(out), seed, size, start, min(start + chunk, images)) for start in range(0, images, chunk)]
    image_records = []
    if workers == 1:
        done = map(_render, jobs)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (Ray, PyTorch) that a forked child would inherit broken
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        done = pool.map(_render, jobs)
    try:
        for records in done:  # in order
            image_records += records
            if bar is not None:
                bar.update(len(records))
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    if bar is not None:
        bar.close()
    text_records = [text_record(random.Random(f"mmphi-synth/{seed}/text/{i}"), f"text-{i:06d}")
                    for i in range(n_text)]
    tool_records = [_tool_render(out, seed, size, i) for i in range(round(images * tool_fraction))]

    split_rng = random.Random(f"mmphi-synth/{seed}/split")
    # stratified by the first question's type and answer: held-out accuracy is
    # measured on first questions, and a blind model's on the shares of their answers
    val_img = _split_stratified([(r.meta["qtypes"][0], r.meta["answers"][0]) for r in image_records],
                                val_fraction, split_rng)
    val_txt = _split(n_text, val_fraction, split_rng)
    val_tool = _split_stratified([tuple(r.meta["answers"][:1]) for r in tool_records], val_fraction,
                                 random.Random(f"mmphi-synth/{seed}/tool-split"))
    # tool records spread evenly among the image records: the first N of a split (evaluation reads a prefix)
    # hold their share of them
    train = _interleave([r for i, r in enumerate(image_records) if i not in val_img],
                        [r for i, r in enumerate(tool_records) if i not in val_tool])
    train += [r for i, r in enumerate(text_records) if i not in val_txt]
    val = _interleave([r for i, r in enumerate(image_records) if i in val_img],
                      [r for i, r in enumerate(tool_records) if i in val_tool])
    val += [r for i, r in enumerate(text_records) if i in val_txt]
    write_llava(train, out / "train.json")
    write_llava(val, out / "val.json")

    stats = _stats(image_records + text_records + tool_records)
    n_tool = len(tool_records)
    info = {
        "generator": "mmphi synthetic shapes",
        "version": VERSION,
        "params": {"images": images, "seed": seed, "size": size, "val_fraction": val_fraction,
                   "text_records": n_text, "tool_fraction": tool_fraction, "tool_records": n_tool,
                   "objects_per_image": [1, MAX_OBJECTS],
                   "single_object_fraction": SINGLE_FRACTION,
                   "count_question_in_single_object_records": round(COUNT_SINGLE, 4),
                   "exchanges_per_single_object_record": {str(k): w for k, w in EXCHANGE_WEIGHTS.items()},
                   "radius_fraction": {k: list(v) for k, v in SIZES.items()}, "cell_margin": CELL_MARGIN,
                   "edge_pad": EDGE_PAD, "object_gap": GAP, "background": list(BACKGROUND), "noise": NOISE},
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "cells": list(CELLS),
        "answers": ANSWERS,
        **({"tools": TOOLS} if n_tool else {}),
        "chance": CHANCE,
        "counts": {"records": len(image_records) + n_text + n_tool, "images": images + n_tool,
                   "text_records": n_text, "tool_records": n_tool,
                   "train_records": len(train), "val_records": len(val),
                   "train_images": images - len(val_img) + n_tool - len(val_tool),
                   "val_images": len(val_img) + len(val_tool),
                   "questions": stats["questions"]},
        "majority": stats["majority"],
        "answer_counts": stats["answer_counts"],
        "files": {"train": "train.json", "val": "val.json", "images": "images/"},
    }
    (out / "synth.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info | {"out_dir": str(out)}


def single_object_view(data_dir, name: str = "single") -> Path:
    """A data set folder ``data_dir/name`` holding the single-object and text-only
    records of ``data_dir``'s training split, its whole validation split and a
    link to its images (so embeddings made for ``data_dir`` serve it too).

    A curriculum's first phase: "where is the object?" is learnt from scenes
    with one object; counting several objects pulls a small model towards
    features that ignore where objects are, so the demo trains on these first
    and on everything after. Rewritten on every call (cheap)."""
    from .llava import dataset_paths, read_llava

    src = Path(data_dir)
    paths = dataset_paths(src)
    out = src / name
    out.mkdir(exist_ok=True)
    records = read_llava(paths["train"], paths["images"], check_images=False).records
    keep = [r for r in records if len(r.meta.get("objects", [])) <= 1]
    write_llava(keep, out / "train.json")
    (out / "val.json").write_bytes(paths["val"].read_bytes())
    link = out / "images"
    if not link.exists():
        link.symlink_to(Path("..") / paths["images"].name, target_is_directory=True)
    return out


def summary(info: dict) -> str:
    c = info["counts"]
    lines = [f"wrote {info.get('out_dir', '')}: {c['images']} images, {c['records']} records "
             f"({c['text_records']} text-only, {c.get('tool_records', 0)} tool use); train {c['train_records']} records / {c['train_images']} images, "
             f"val {c['val_records']} records / {c['val_images']} images",
             f"{'question':<10}{'count':>7}{'chance':>9}{'majority':>10}"]
    for q, n in c["questions"].items():
        chance = info["chance"].get(q)
        lines.append(f"{q:<10}{n:>7}{'-' if chance is None else f'{chance:.3f}':>9}{info['majority'][q]:>10.3f}")
    return "\n".join(lines)


def main(args) -> int:
    """``mmphi data synth``: reads ``args.out, images, seed, size, val_fraction, workers, tool_records``."""
    try:
        info = synthesize(args.out, images=args.images, seed=args.seed, size=args.size,
                          val_fraction=args.val_fraction, progress=True,
                          tool_fraction=getattr(args, "tool_records", 0.0) or 0.0,
                          workers=default_workers(args.images) if getattr(args, "workers", None) is None else args.workers)
    except ValueError as e:
        print(f"mmphi data synth: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a parent that is a file, no permission, a full disk
        print(f"mmphi data synth: cannot write {args.out}: {e.strerror or e}"
              + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 2
    print(summary(info))
    return 0
