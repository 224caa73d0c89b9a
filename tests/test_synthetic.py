"""The synthetic shapes data set: parses, is deterministic, split by image,
answers agree with the drawn scene, answers are near uniform per type."""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import pytest

from data_pipelines.llava import dataset_paths, read_llava
from data_pipelines.synthetic import PARALLEL_FROM, default_workers, main, synthesize

NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
       "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth600")
    info = synthesize(out, images=600, seed=0, size=128, val_fraction=0.2, progress=False)
    paths = dataset_paths(out)
    train = read_llava(paths["train"], paths["images"], check_images=True)
    val = read_llava(paths["val"], paths["images"], check_images=True)
    return out, info, train, val


def recompute(meta, turn):
    """The answer from the scene description alone (independent of the generator's code)."""
    qtype, target, objects = meta["qtypes"][turn], meta["targets"][turn], meta["objects"]
    if qtype == "count":
        return NUM[len(objects)]
    if qtype == "text":
        op, a = target["op"], target["a"]
        return {"plus": lambda: NUM[a + target["b"]], "minus": lambda: NUM[a - target["b"]],
                "next": lambda: NUM[a + 1], "day": lambda: DAYS[(DAYS.index(a.lower()) + 1) % 7]}[op]()
    return objects[target][qtype]


def test_parses_back_with_zero_errors(big):
    out, info, train, val = big
    assert train.errors == [] and val.errors == []
    records = train.records + val.records
    c = info["counts"]
    assert len(records) == c["records"] == 600 + c["text_records"]
    assert len(train.records) == c["train_records"] and len(val.records) == c["val_records"]
    assert 0.03 <= c["text_records"] / c["records"] <= 0.07
    assert json.loads((out / "synth.json").read_text())["counts"] == c
    for r in records:
        if r.image is None:
            assert all(isinstance(m["content"], str) for m in r.messages)
            continue
        assert r.image == f"{r.id}.png"
        first = r.messages[0]["content"]
        assert first[0] == {"type": "image"} and first[1]["type"] == "text"
        assert [m["role"] for m in r.messages] == ["user", "assistant"] * (len(r.messages) // 2)
        if len(r.meta["objects"]) == 1:
            assert 2 <= len(r.messages) // 2 <= 4
        else:  # multi-object scenes: one count question
            assert r.meta["qtypes"] == ["count"] and len(r.messages) == 2


def test_split_by_image(big):
    _, info, train, val = big
    tr = {r.image for r in train.records if r.image}
    va = {r.image for r in val.records if r.image}
    assert not tr & va
    assert len(tr) + len(va) == 600 and len(va) == info["counts"]["val_images"] == 120
    assert not {r.id for r in train.records} & {r.id for r in val.records}
    # stratified by the first question's type and answer: each group is split 80/20 to within one image
    first = lambda rs: Counter((r.meta["qtypes"][0], r.meta["answers"][0]) for r in rs if r.image)  # noqa: E731
    every, held = first(train.records + val.records), first(val.records)
    assert all(abs(held[g] - 0.2 * every[g]) < 1 for g in every), (every, held)


def test_answers_agree_with_meta_and_questions_name_nothing(big):
    _, _, train, val = big
    words = ("circle", "square", "triangle", "star", "cross", "diamond", "red", "green", "blue", "yellow",
             "purple", "white", "top", "bottom", "left", "right", "center")
    for r in train.records + val.records:
        meta = r.meta
        answers = [m["content"] for m in r.messages if m["role"] == "assistant"]
        questions = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]
                     for m in r.messages if m["role"] == "user"]
        assert len(answers) == len(meta["qtypes"]) == len(meta["targets"]) == len(meta["answers"])
        for t, (q, a) in enumerate(zip(questions, answers)):
            want = recompute(meta, t)
            assert a == want[0].upper() + want[1:] + "."
            assert meta["answers"][t] == want
            if r.image is not None:
                # no question names a shape, a colour or a place: only the image answers it
                assert not any(w in q.lower().split() for w in words), q
        if r.image is not None:
            qtypes = meta["qtypes"]
            assert len(set(qtypes)) == len(qtypes)           # no type twice: no turn answers another
            if len(meta["objects"]) > 1:
                assert qtypes == ["count"]
            else:
                assert "count" not in qtypes[1:]                # count, when asked, comes first
                assert all(tg == 0 for q, tg in zip(qtypes, meta["targets"]) if q != "count")


def test_scenes_are_well_formed(big):
    _, info, train, _ = big
    size = info["params"]["size"]
    for r in train.records:
        objs = r.meta["objects"]
        if r.image is None:
            assert objs == []
            continue
        assert 1 <= len(objs) <= 6
        if len(objs) >= 4:
            assert {o["size"] for o in objs} == {"small"}
        assert len({o["colour"] for o in objs}) == len({o["shape"] for o in objs}) == len(objs)
        for o in objs:
            x, y = o["center"]
            col, row = int(3 * x / size), int(3 * y / size)
            assert CELLS[3 * row + col] == o["position"]
            # the centre keeps a margin from its cell's borders
            for v in (x, y):
                assert min(v % (size / 3), size / 3 - v % (size / 3)) >= 0.05 * size - 1
            assert o["radius"] <= x < size - o["radius"] and o["radius"] <= y < size - o["radius"]
        for a in objs:
            for b in objs:
                if a is not b:
                    assert math.dist(a["center"], b["center"]) > a["radius"] + b["radius"]
        radii = {o["size"]: o["radius"] for o in objs}
        if len(radii) == 2:
            assert radii["large"] > 1.4 * radii["small"]


def test_answers_near_uniform_and_chance_levels(big):
    out, info, train, val = big
    chance = json.loads((out / "synth.json").read_text())["chance"]
    want = {"colour": 1 / 6, "shape": 1 / 6, "position": 1 / 9, "count": 1 / 6, "size": 1 / 2}
    for q, p in want.items():
        assert chance[q] == pytest.approx(p)
    counts: dict[str, Counter] = {}
    for r in train.records + val.records:
        for q, a in zip(r.meta["qtypes"], r.meta["answers"]):
            counts.setdefault(q, Counter())[a] += 1
    for q, p in want.items():
        n = sum(counts[q].values())
        assert n >= 100, f"{q} asked only {n} times"
        assert len(counts[q]) == round(1 / p), (q, counts[q])          # every answer occurs
        majority = max(counts[q].values()) / n
        assert info["majority"][q] == pytest.approx(majority, abs=1e-3)
        assert info["counts"]["questions"][q] == n
        limit = 1.6 if q in ("colour", "shape", "position", "count") else 1.25
        assert majority <= limit * p, (q, counts[q])
    images = [r for r in train.records + val.records if r.image]
    single = sum(len(r.meta["objects"]) == 1 for r in images) / len(images)
    assert 0.33 <= single <= 0.47, single
    # count answers over first exchanges (what evaluation scores) are near uniform too
    first = Counter(r.meta["answers"][0] for r in images if r.meta["qtypes"][0] == "count")
    assert len(first) == 6 and max(first.values()) / sum(first.values()) <= 1.6 / 6, first


def test_images_decode_and_show_the_objects(big):
    from models.vision import load_image

    out, info, train, _ = big
    size = info["params"]["size"]
    image_records = [r for r in train.records if r.image][:25]
    for r in image_records:
        img = load_image(out / "images" / r.image)
        assert img.size == (size, size) and img.mode == "RGB"
        for o in r.meta["objects"]:
            px = img.getpixel(tuple(o["center"]))
            assert all(abs(a - b) <= 3 for a, b in zip(px, o["rgb"])), (r.id, o, px)
    single = next(r for r in image_records if len(r.meta["objects"]) == 1)
    img = load_image(out / "images" / single.image)
    o = single.meta["objects"][0]
    assert img.getpixel(tuple(o["center"])) == tuple(o["rgb"])
    # the far corner from the object is grey background
    x, y = o["center"]
    corner = (0 if x > size / 2 else size - 1, 0 if y > size / 2 else size - 1)
    r_, g, b = img.getpixel(corner)
    assert r_ == g == b and r_ < 120


def test_deterministic_by_seed_whatever_the_processes(tmp_path):
    """The same seed writes the same files, drawn in this process or by two
    spawned ones (which get the images in chunks, out of order)."""
    a = synthesize(tmp_path / "a", images=12, seed=3, size=64, progress=False)
    b = synthesize(tmp_path / "b", images=12, seed=3, size=64, progress=False, workers=2)
    synthesize(tmp_path / "c", images=12, seed=4, size=64, progress=False)
    assert a["counts"] == b["counts"]
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) and len(images) == 12
    for name in ["train.json", "val.json", "synth.json"] + [f"images/{n}" for n in images]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "c" / "train.json").read_bytes()
    assert (tmp_path / "a" / "images/000000.png").read_bytes() != (tmp_path / "c" / "images/000000.png").read_bytes()
    assert read_llava(tmp_path / "c" / "val.json", tmp_path / "c" / "images").errors == []


def test_drawing_processes_follow_the_size_and_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(PARALLEL_FROM - 1) == 1  # small sets: starting processes costs more than it saves
    assert default_workers(PARALLEL_FROM) == 8  # one per core, at most 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(6000) == 2
    with pytest.raises(ValueError, match="workers must be at least 1"):
        synthesize(tmp_path / "w", images=4, workers=0, progress=False)


def test_main_prints_summary(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "cli"), images=6, seed=0, size=48, val_fraction=0.5)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "6 images" in text and "chance" in text and "colour" in text
    assert (tmp_path / "cli" / "synth.json").is_file()
    bad = argparse.Namespace(out=str(tmp_path / "bad"), images=0, seed=0, size=48, val_fraction=0.5)
    assert main(bad) == 2
    no_workers = argparse.Namespace(out=str(tmp_path / "bad"), images=6, seed=0, size=48, val_fraction=0.5, workers=0)
    assert main(no_workers) == 2 and "workers must be at least 1" in capsys.readouterr().err


def test_main_names_an_output_that_is_not_a_folder(tmp_path, capsys):
    """``--out`` naming a file, or a folder under a file, is one line naming
    it (exit 2), not a traceback; nothing is written."""
    f = tmp_path / "notes.txt"
    f.write_text("x")
    args = dict(images=2, seed=0, size=48, val_fraction=0.5, workers=1)
    assert main(argparse.Namespace(out=str(f), **args)) == 2
    assert capsys.readouterr().err == f"mmphi data synth: {f} is a file, not a folder: give the data set's folder\n"
    assert main(argparse.Namespace(out=str(f / "sub"), **args)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmphi data synth: cannot write {f / 'sub'}: ") and len(err.splitlines()) == 1, err
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tool_records_call_a_function_with_what_the_image_shows(tmp_path):
    """``tool_fraction`` adds records whose first answer is a call (the
    object's colour or grid cell as the argument), then the function's result and
    a reply; the other records are the same bytes as without them, and the
    held-out part has each call's share of the whole."""
    from data_pipelines.synthetic import TOOLS, call_answer
    from models.vision import load_image
    from ray_jobs import data as D

    plain = synthesize(tmp_path / "plain", images=40, seed=5, size=64, progress=False)
    info = synthesize(tmp_path / "tools", images=40, seed=5, size=64, progress=False, tool_fraction=1.5)
    c = info["counts"]
    assert c["tool_records"] == 60 and c["images"] == 100 and c["records"] == plain["counts"]["records"] + 60
    assert info["chance"]["tool"] == pytest.approx((1 / 6 + 1 / 9) / 2) and info["tools"] == TOOLS
    assert c["questions"]["tool"] == c["questions"]["tool_reply"] == 60
    paths = dataset_paths(tmp_path / "tools")
    train = read_llava(paths["train"], paths["images"], check_images=True)
    val = read_llava(paths["val"], paths["images"], check_images=True)
    assert train.errors == val.errors == []
    tools = [r for r in train.records + val.records if r.id.startswith("tool-")]
    assert len(tools) == 60 and len(train.records) + len(val.records) == c["records"]
    names = Counter()
    for r in tools:
        assert r.tools == TOOLS and len(r.meta["objects"]) == 1
        obj = r.meta["objects"][0]
        assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]
        (call,) = r.messages[1]["tool_calls"]
        parameter, attribute = {"order_paint": ("colour", "colour"), "move_arm": ("cell", "position")}[call["name"]]
        assert call["arguments"] == {parameter: obj[attribute]}
        assert r.meta["answers"][0] == call_answer(call["name"], call["arguments"])
        assert json.loads(r.messages[2]["content"])[parameter] == obj[attribute]
        question = r.messages[0]["content"][-1]["text"].lower().rstrip(".").split()
        assert obj["colour"] not in question and not set(obj["position"].split()) & set(question)  # only the image
        names[call["name"]] += 1
        img = load_image(paths["images"] / r.image)
        assert img.getpixel(tuple(obj["center"])) == tuple(obj["rgb"])
    assert set(names) == {"order_paint", "move_arm"}
    held = [r for r in val.records if r.id.startswith("tool-")]
    assert len(held) == 12  # a fifth, stratified by the call
    # spread among the image records, so the first N held-out questions (what evaluation reads) hold their share
    images_first = [r for r in val.records if r.image]
    assert 5 <= sum(r.id.startswith("tool-") for r in images_first[:10]) <= 7
    # every other record as it was without tool records
    plain_val = read_llava(tmp_path / "plain" / "val.json", tmp_path / "plain" / "images").records
    assert [r for r in val.records if not r.id.startswith("tool-")] == plain_val
    for name in sorted(p.name for p in (tmp_path / "plain" / "images").iterdir()):
        assert (tmp_path / "plain" / "images" / name).read_bytes() == (paths["images"] / name).read_bytes()
    # training samples carry the tools; held-out answer accuracy scores the call
    first = [s for s in D.first_exchanges(D.load_samples(str(tmp_path / "tools"), "val", "qlora"))
             if s.id.startswith("tool-")]
    assert len(first) == 12 and all(s.qtypes == ["tool"] and s.tools == TOOLS for s in first)
    assert all(s.messages[-1]["tool_calls"] for s in first)
    with pytest.raises(ValueError, match="tool-records"):
        synthesize(tmp_path / "bad", images=4, tool_fraction=-0.1, progress=False)
