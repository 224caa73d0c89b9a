"""The LLaVA-Instruct format reader/writer: conversion, round trip, bad records."""
from __future__ import annotations

import json

import pytest

from data_pipelines.llava import (
    Record, dataset_paths, read_llava, to_llava, write_errors, write_llava,
)

IMG = {"type": "image"}


def txt(s):
    return {"type": "text", "text": s}


def good(rid, image="train2017/a.jpg", question="<image>\nWhat is this?", answer="A cat."):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def root(tmp_path):
    """An image folder with train2017/a.jpg and b.jpg (contents do not matter to the reader)."""
    (tmp_path / "imgs" / "train2017").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / "train2017" / name).write_bytes(b"x")
    return tmp_path / "imgs"


def dump(tmp_path, data, name="data.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_round_trip_records_equal(tmp_path, root):
    records = [
        Record("1", "train2017/a.jpg", [{"role": "user", "content": [IMG, txt("What is this?")]},
                                        {"role": "assistant", "content": "A cat."},
                                        {"role": "user", "content": "And its colour?"},
                                        {"role": "assistant", "content": "Black."}], meta={"k": [1, 2]}),
        Record("2", "train2017/b.jpg", [{"role": "user", "content": [txt("Describe"), IMG]},
                                        {"role": "assistant", "content": "A dog."}]),
        Record("3", "train2017/a.jpg", [{"role": "user", "content": [txt("Look\n"), IMG, txt("\nhere")]},
                                        {"role": "assistant", "content": "Ok."}]),
        Record("4", "train2017/a.jpg", [{"role": "user", "content": [IMG]},
                                        {"role": "assistant", "content": "Yes."}]),
        Record("5", None, [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Two plus two?"},
                           {"role": "assistant", "content": "Four."}]),
    ]
    p = tmp_path / "rt.json"
    p.write_text(json.dumps([to_llava(r) for r in records]))
    report = read_llava(p, root)
    assert report.errors == []
    assert report.records == records
    # the writer gives the same records too, and is deterministic
    write_llava(records, tmp_path / "w.json")
    assert read_llava(tmp_path / "w.json", root).records == records
    first = (tmp_path / "w.json").read_bytes()
    write_llava(records, tmp_path / "w.json")
    assert (tmp_path / "w.json").read_bytes() == first


def test_marker_positions_and_roles(tmp_path, root):
    data = [
        good(10, question="<image>\nWhat is this?"),
        good(11, question="What is this?\n<image>"),
        good(12, question="What is this?"),                 # image field, no marker
        good(13, image=None, question="Hello?", answer="Hi."),
        {"id": "14", "image": "train2017/b.jpg",
         "conversations": [{"from": "system", "value": "Sys."}, {"from": "human", "value": "Q?"},
                           {"from": "gpt", "value": "A."}]},
    ]
    recs = {r.id: r for r in read_llava(dump(tmp_path, data), root).records}
    assert list(recs) == ["10", "11", "12", "13", "14"]      # int ids become strings
    assert recs["10"].messages[0] == {"role": "user", "content": [IMG, txt("What is this?")]}
    assert recs["11"].messages[0] == {"role": "user", "content": [txt("What is this?"), IMG]}
    assert recs["12"].messages[0] == {"role": "user", "content": [IMG, txt("What is this?")]}
    assert recs["10"].messages[1] == {"role": "assistant", "content": "A cat."}
    assert recs["13"].image is None and recs["13"].messages[0] == {"role": "user", "content": "Hello?"}
    assert [m["role"] for m in recs["14"].messages] == ["system", "user", "assistant"]
    assert recs["14"].messages[1]["content"] == [IMG, txt("Q?")]
    assert recs["10"].meta == {}
    # an image without a marker is written back with the marker first
    assert to_llava(recs["12"])["conversations"][0]["value"] == "<image>\nWhat is this?"


BAD = [
    ("not_a_dict", ["a", "list"]),
    ("no_conversations", {"id": "b1", "image": "train2017/a.jpg"}),
    ("no_conversations", {"id": "b2", "conversations": []}),
    ("bad_turn", {"id": "b3", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}),
    ("bad_turn", {"id": "b4", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "y"}]}),
    ("no_assistant", {"id": "b5", "conversations": [{"from": "human", "value": "Hello"}]}),
    ("multiple_markers", good("b6", question="<image>\n<image>\nTwo?")),
    ("marker_not_in_human", {"id": "b7", "image": "train2017/a.jpg",
                             "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}]}),
    ("marker_without_image", good("b8", image=None)),
    ("path_escape", good("b9", image="../secret.jpg")),
    ("path_escape", good("b10", image="/etc/passwd")),
    ("path_escape", good("b11", image="train2017/../../x.jpg")),
    ("path_escape", good("b12", image="C:\\x.jpg")),
    ("missing_image", good("b13", image="train2017/nope.jpg")),
    ("bad_id", good(None)),
    ("bad_meta", good("b15") | {"meta": [1]}),
    ("bad_image_path", good("b16", image=["train2017/a.jpg"])),
    ("bad_tools", good("b17", image=None, question="Hi") | {"tools": "[{oops"}),
    ("bad_tools", good("b18", image=None, question="Hi") | {"tools": [{"name": "two words"}]}),
    ("bad_turn", {"id": "b19", "conversations": [{"from": "human", "value": "Q"},
                                                {"from": "function_call", "value": '{"name": "f"}'}]}),
    ("bad_turn", {"id": "b20", "conversations": [{"from": "human", "value": "Q"},
                                                {"from": "function_call", "value": "[]"}]}),
]


WEATHER = {"name": "weather", "description": "Today's weather.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_tool_use_in_sharegpt_form_becomes_calls_and_results_and_round_trips(tmp_path, root):
    """``tools`` (OpenAI-shaped, bare or as JSON text), ``function_call``
    turns (one call or a list; arguments an object or JSON text) and
    ``observation`` turns read as ``Record.tools``, assistant ``tool_calls``
    and ``tool`` messages, and write back to records that read the same."""
    convs = [{"from": "human", "value": "Weather in Paris and Rome?"},
             {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                                                            {"name": "weather", "arguments": '{"city": "Rome"}'}])},
             {"from": "observation", "value": "sun"}, {"from": "observation", "value": "rain"},
             {"from": "gpt", "value": "Sun in Paris, rain in Rome."}]
    data = [{"id": "t1", "tools": [{"type": "function", "function": WEATHER}], "conversations": convs},
            {"id": "t2", "tools": json.dumps([WEATHER]), "conversations": convs},
            {"id": "t3", "conversations": convs[:2] + [{"from": "observation", "value": "sun"}]}]
    report = read_llava(dump(tmp_path, data), root)
    assert report.errors == []
    t1, t2, t3 = report.records
    assert t1.tools == t2.tools == [WEATHER] and t3.tools is None
    assert [m["role"] for m in t1.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert t1.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "weather", "arguments": {"city": "Paris"}}, {"name": "weather", "arguments": {"city": "Rome"}}]}
    assert t1.messages[2] == {"role": "tool", "content": "sun"} and t1.messages == t2.messages
    write_llava(report.records, tmp_path / "w.json")
    assert read_llava(tmp_path / "w.json", root).records == report.records
    assert json.loads(to_llava(t3)["conversations"][1]["value"]) == \
        [{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "weather", "arguments": {"city": "Rome"}}]


def test_tool_conversations_train_on_their_calls_and_answers(tmp_path, root, tok):
    """Encoded for training, a tool conversation offers its tools in the
    system message and learns the calls and the answer, not the results."""
    from models.conversation import IGNORE_INDEX, encode_for_training
    from models.tools import call_text

    data = [{"id": "t", "tools": [WEATHER], "conversations": [
        {"from": "human", "value": "Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."}]}]
    rec = read_llava(dump(tmp_path, data), root).records[0]
    enc = encode_for_training(tok, rec.messages, 4, 2048, tools=rec.tools)
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    assert '<tools>\n{"type": "function", "function": {"name": "weather"' in text
    learned = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX],
                         skip_special_tokens=False)
    assert learned == call_text("weather", {"city": "Paris"}) + "<|end|>Sunny.<|end|>"


def test_bad_records_skipped_counted_and_listed(tmp_path, root):
    data = []
    for i, (_, bad) in enumerate(BAD):
        data += [good(f"g{i}"), bad]
    data.append(good("last", image="train2017/b.jpg"))
    report = read_llava(dump(tmp_path, data), root)
    assert [r.id for r in report.records] == [f"g{i}" for i in range(len(BAD))] + ["last"]
    assert report.n_total == len(data)
    assert [e["kind"] for e in report.errors] == [kind for kind, _ in BAD]
    assert [e["index"] for e in report.errors] == [2 * i + 1 for i in range(len(BAD))]
    assert report.errors[1]["id"] == "b1" and report.errors[0]["id"] is None
    assert all(e["reason"] for e in report.errors)
    assert "'robot'" in report.errors[3]["reason"]
    text = report.summary()
    assert f"{len(data)} records" in text and f"{len(BAD)} skipped" in text and "path escapes" in text

    out = write_errors(report, tmp_path / "errs" / "skipped.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == report.errors
    assert all({"index", "id", "reason"} <= set(e) for e in lines)


def test_missing_images_and_escapes_with_checks_off(tmp_path, root):
    data = [good("a", image="train2017/nope.jpg"), good("b", image="../up.jpg")]
    p = dump(tmp_path, data)
    on = read_llava(p, root)
    assert [e["kind"] for e in on.errors] == ["missing_image", "path_escape"]
    off = read_llava(p, root, check_images=False)
    assert [r.id for r in off.records] == ["a"]          # missing file accepted, escape never
    assert [e["kind"] for e in off.errors] == ["path_escape"]
    assert [r.id for r in read_llava(p).records] == ["a"]   # no image_root: files not checked


def test_not_a_list_is_fatal(tmp_path):
    with pytest.raises(ValueError, match="not a list"):
        read_llava(dump(tmp_path, {"id": 1, "conversations": []}))
    bad = tmp_path / "broken.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_llava(bad)


def test_jsonl(tmp_path, root):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good("j1")) + "\n\n{oops\n" + json.dumps(good("j2", image=None)) + "\n")
    report = read_llava(p, root)
    assert [r.id for r in report.records] == ["j1"]
    assert [(e["kind"], e["line"]) for e in report.errors] == [("invalid_json", 3), ("marker_without_image", 4)]


def test_to_llava_refuses_what_the_format_cannot_hold():
    with pytest.raises(ValueError, match="literal"):
        to_llava(Record("x", None, [{"role": "user", "content": "see <image>"},
                                    {"role": "assistant", "content": "ok"}]))
    with pytest.raises(ValueError, match="image"):
        to_llava(Record("x", "a.jpg", [{"role": "user", "content": "no image part"},
                                       {"role": "assistant", "content": "ok"}]))
    with pytest.raises(ValueError, match="two turns"):
        to_llava(Record("x", None, [{"role": "user", "content": "Paris?"}, {
            "role": "assistant", "content": "Let me look.", "tool_calls": [{"name": "weather", "arguments": {}}]}]))


def test_dataset_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.json, val.json, images/"):
        dataset_paths(tmp_path)
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks val.json"):
        dataset_paths(tmp_path)
    (tmp_path / "val.json").write_text("[]")
    assert dataset_paths(tmp_path) == {"train": tmp_path / "train.json", "val": tmp_path / "val.json",
                                       "images": tmp_path / "images"}
    with pytest.raises(FileNotFoundError):
        dataset_paths(tmp_path / "nowhere")
