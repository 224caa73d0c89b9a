"""Prefix reuse in the static KV cache (serve.prefix_cache, serve.batching).

A chat's next turn repeats the previous turn's prompt and answer: the row the
previous turn left is reused and only the new tokens are prefilled. Every
greedy answer must still equal, token for token, what ``generate`` gives the
request alone; an image whose features differ is never reused, and retained
rows give way to running requests.
"""
from __future__ import annotations

import numpy as np
import pytest

from models.conversation import encode_conversation
from serve.batching import BatchingOptions, GenerationRequest
from serve.prefix_cache import MIN_TOKENS, PrefixIndex, feature_digests
from tests.test_batching import Collector, make, reference, run_schedule


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(params=["static", "static-bucketed"])
def kv(request):
    return request.param


@pytest.fixture(scope="module")
def images(model):
    from PIL import Image

    pics = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    pics[1].paste((250, 250, 0), (8, 8, 40, 30))
    return model.encode_images(pics).float().numpy()


def chat(model, turns: list[tuple[int, str]], answers: list[str]) -> list[int]:
    """The prompt of a chat: ``turns`` of (images, question), the answers of all but the last."""
    messages = []
    for k, (n_img, question) in enumerate(turns):
        messages.append({"role": "user", "content": [{"type": "image"}] * n_img + [{"type": "text", "text": question}]})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return encode_conversation(model.tokenizer, messages, model.num_image_tokens, add_generation_prompt=True,
                               system_prompt=model.cfg.tokenizer.system_prompt).input_ids


def answer_text(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def test_next_turn_reuses_the_previous_turn_and_answers_as_alone(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    first = GenerationRequest(chat(model, [(1, "What is in the picture?")], []), images[:1], max_new_tokens=12)
    a1 = reference(model, first, stops)
    second_ids = chat(model, [(1, "What is in the picture?"), (0, "And what colour is it?")], [answer_text(model, a1)])
    second = GenerationRequest(second_ids, images[:1], max_new_tokens=12)
    expected = reference(model, second, stops)

    batcher = make(model, kv, stop_ids=stops)
    assert run_schedule(batcher, {0: [0]}, [first])[0].tokens == a1
    assert batcher.describe()["retained_rows"] == 1
    computed = batcher.stats["prompt_tokens"]
    sink = run_schedule(batcher, {0: [0]}, [second])[0]
    assert sink.error is None and sink.tokens == expected
    assert batcher.stats["prefix_hits"] == 1
    # the whole first prompt (its image among it) came from the cache, and only the rest was prefilled
    assert batcher.stats["prefix_tokens"] >= len(first.input_ids)
    assert batcher.stats["prompt_tokens"] - computed == len(second_ids) - batcher.stats["prefix_tokens"]
    # the second turn's row now holds everything the first held, and replaces it
    assert batcher.describe()["retained_rows"] == 1


def test_an_image_with_other_features_is_not_reused(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    ids = chat(model, [(1, "Describe the picture in a few words.")], [])
    first = GenerationRequest(ids, images[:1], max_new_tokens=6)
    other = GenerationRequest(ids, images[1:2], max_new_tokens=6)  # the same tokens, another picture
    expected = reference(model, other, stops)
    assert expected != reference(model, first, stops)  # the picture matters to the answer

    batcher = make(model, kv, stop_ids=stops)
    run_schedule(batcher, {0: [0]}, [first])
    sink = run_schedule(batcher, {0: [0]}, [other])[0]
    assert sink.tokens == expected
    # at most the text before the image was reused
    first_slot = ids.index(model.tokenizer.ids.image)
    assert batcher.stats["prefix_tokens"] <= first_slot
    if first_slot >= MIN_TOKENS:
        assert batcher.stats["prefix_hits"] == 1


def test_rows_that_leave_below_running_ones_are_kept_and_reused(model, images, kv):
    """Request 0 finishes while 1 still runs: its row is a hole the last row
    moves into, so its keys and values are copied above first."""
    stops = list(model.tokenizer.stop_ids)
    q0, q1 = "Name one colour.", "Count from one to ten, slowly, and then say the colours of the sky."
    r0 = GenerationRequest(chat(model, [(1, q0)], []), images[:1], max_new_tokens=3)
    r1 = GenerationRequest(chat(model, [(0, q1)], []), None, max_new_tokens=20)
    a0 = reference(model, r0, stops)
    follow = GenerationRequest(chat(model, [(1, q0), (1, "And this one?")], [answer_text(model, a0)]),
                               images[:2], max_new_tokens=10)
    expected = [a0, reference(model, r1, stops), reference(model, follow, stops)]

    batcher = make(model, kv, stop_ids=stops)
    moves = batcher.static.moves
    sinks = run_schedule(batcher, {0: [0, 1], 8: [2]}, [r0, r1, follow])
    assert [s.tokens for s in sinks] == expected
    assert batcher.static.moves > moves  # request 0's row was copied away before request 1's took its place
    assert batcher.stats["prefix_hits"] >= 1 and batcher.stats["prefix_tokens"] >= len(r0.input_ids)


def test_retained_rows_make_way_for_running_requests(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    questions = ["What is seven plus five?", "Where is the circle?", "Name three colours.", "Hi"]
    reqs = [GenerationRequest(chat(model, [(k % 2, q)], []), images[k % 3:k % 3 + 1] if k % 2 else None,
                              max_new_tokens=6) for k, q in enumerate(questions)]
    expected = [reference(model, r, stops) for r in reqs]
    batcher = make(model, kv, 4, stop_ids=stops)
    for k in range(4):  # one at a time: each leaves its row retained
        assert run_schedule(batcher, {0: [k]}, reqs)[k].tokens == expected[k]
    assert 1 <= batcher.describe()["retained_rows"] <= 4
    # four new requests at once need every row: retained ones are forgotten, answers unchanged
    again = [GenerationRequest(chat(model, [(0, f"{q} Please answer briefly.")], []), None, max_new_tokens=6)
             for q in questions]
    sinks = run_schedule(batcher, {0: [0, 1, 2, 3]}, again)
    assert [s.tokens for s in sinks] == [reference(model, r, stops) for r in again]
    assert batcher.stats["largest_batch"] == 4


def test_a_row_kept_among_the_steps_padding_rows_is_reused(model, images, kv):
    """Four rows run; the last (row 3) finishes first. A bucketed step over the
    three left runs four rows, the fourth as padding, which writes only the
    column no request uses: row 3 is kept where it is, and its conversation's
    next turn answers as alone."""
    stops = list(model.tokenizer.stop_ids)
    q = "Describe the picture in a few words."
    short = GenerationRequest(chat(model, [(1, q)], []), images[:1], max_new_tokens=3)  # the longest prompt: row 3
    a1 = reference(model, short, stops)
    others = [GenerationRequest(chat(model, [(0, t)], []), None, max_new_tokens=20) for t in ("Hi", "One", "Two")]
    follow = GenerationRequest(chat(model, [(1, q), (0, "Why?")], [answer_text(model, a1)]), images[:1],
                               max_new_tokens=10)
    reqs = others + [short, follow]
    expected = [reference(model, r, stops) for r in reqs]
    batcher = make(model, kv, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0, 1, 2, 3], 5: [4]}, reqs)
    assert [s.tokens for s in sinks] == expected
    assert batcher.stats["prefix_hits"] >= 1
    assert batcher.stats["prefix_tokens"] >= len(short.input_ids)  # the whole first turn: row 3 was intact
    assert batcher.static.moves == 0  # kept in place, and continued in place


def test_a_retained_row_a_new_request_takes_is_not_reused(model, images, kv):
    """Turn 1 leaves row 0 retained; an unrelated request takes row 0; turn 2,
    arriving while it runs, must not read that row's new contents."""
    stops = list(model.tokenizer.stop_ids)
    q = "What is in the picture?"
    turn1 = GenerationRequest(chat(model, [(1, q)], []), images[:1], max_new_tokens=4)
    a1 = reference(model, turn1, stops)
    other = GenerationRequest(chat(model, [(0, "Count from one to ten, slowly, and then say the colours of the sky.")],
                                   []), None, max_new_tokens=20)
    turn2 = GenerationRequest(chat(model, [(1, q), (0, "Are you sure?")], [answer_text(model, a1)]), images[:1],
                              max_new_tokens=8)
    expected = [a1, reference(model, other, stops), reference(model, turn2, stops)]
    batcher = make(model, kv, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0], 6: [1], 8: [2]}, [turn1, other, turn2])
    assert [s.tokens for s in sinks] == expected


def test_chats_that_take_turns_keep_each_others_rows(model, images, kv):
    """Two chats alternate, one request at a time: each first turn takes the
    row the other chat's turn left, which moves up instead of being lost, so
    every second turn continues its own chat's row."""
    stops = list(model.tokenizer.stop_ids)
    qa, qb = "What is in the picture?", "Count from one to ten, slowly, please."
    a1 = GenerationRequest(chat(model, [(1, qa)], []), images[:1], max_new_tokens=5)
    b1 = GenerationRequest(chat(model, [(0, qb)], []), None, max_new_tokens=5)
    ans_a, ans_b = reference(model, a1, stops), reference(model, b1, stops)
    a2 = GenerationRequest(chat(model, [(1, qa), (0, "Are you sure?")], [answer_text(model, ans_a)]), images[:1],
                           max_new_tokens=6)
    b2 = GenerationRequest(chat(model, [(0, qb), (0, "Go on.")], [answer_text(model, ans_b)]), None, max_new_tokens=6)
    batcher = make(model, kv, stop_ids=stops)
    for req, want in ((a1, ans_a), (b1, ans_b), (a2, reference(model, a2, stops)), (b2, reference(model, b2, stops))):
        assert run_schedule(batcher, {0: [0]}, [req])[0].tokens == want
    assert batcher.stats["prefix_hits"] == 2
    assert batcher.stats["prefix_tokens"] >= len(a1.input_ids) + len(b1.input_ids)


def test_several_continued_chats_join_together(model, images, kv):
    """Three chats' second turns arrive at once and run their new tokens in
    one pass; one of them (max_new_tokens 1) leaves at its first token, so
    the rows after it close the gap."""
    stops = list(model.tokenizer.stop_ids)
    qs = ["What is in the picture?", "Where is the circle in it?", "Name its colours, please."]
    firsts = [GenerationRequest(chat(model, [(1, q)], []), images[k:k + 1], max_new_tokens=4) for k, q in enumerate(qs)]
    answers = [reference(model, r, stops) for r in firsts]
    seconds = [GenerationRequest(chat(model, [(1, q), (0, "Why?")], [answer_text(model, a)]), images[k:k + 1],
                                 max_new_tokens=1 if k == 0 else 8) for k, (q, a) in enumerate(zip(qs, answers))]
    expected = [reference(model, r, stops) for r in seconds]
    batcher = make(model, kv, stop_ids=stops)
    assert [s.tokens for s in run_schedule(batcher, {0: [0, 1, 2]}, firsts)] == answers
    hits = batcher.stats["prefix_hits"]
    assert [s.tokens for s in run_schedule(batcher, {0: [0, 1, 2]}, seconds)] == expected
    assert batcher.stats["prefix_hits"] - hits == 3


def test_prefix_cache_off_retains_nothing(model, images):
    stops = list(model.tokenizer.stop_ids)
    req = GenerationRequest(chat(model, [(1, "What is in the picture?")], []), images[:1], max_new_tokens=6)
    batcher = make(model, "static", stop_ids=stops, options={"prefix_cache": False})
    run_schedule(batcher, {0: [0]}, [req])
    run_schedule(batcher, {0: [0]}, [req])
    assert batcher.stats["prefix_hits"] == 0 and batcher.describe()["retained_rows"] == 0
    assert batcher.describe()["prefix_cache"] is False
    # turned on live, then off again: what was retained is dropped
    batcher.options = BatchingOptions(prefix_cache=True)
    run_schedule(batcher, {0: [0]}, [req])
    assert batcher.describe()["retained_rows"] == 1
    batcher.options = BatchingOptions(prefix_cache=False)
    assert batcher.describe()["retained_rows"] == 0
    with pytest.raises(ValueError, match="prefix_cache must be true or false"):
        BatchingOptions.from_dict({"prefix_cache": "yes"})


def test_dynamic_cache_has_no_prefix_index(model):
    batcher = make(model, "dynamic")
    assert batcher.prefix is None and "prefix_cache" not in batcher.describe()


# ------------------------------------------------------------ the index alone
IMG = 99  # the placeholder id in these unit tests; images of 4 tokens


def index() -> PrefixIndex:
    return PrefixIndex(image_id=IMG, image_tokens=4)


def test_match_picks_the_longest_prefix_and_stops_short_of_the_whole_prompt():
    ix = index()
    base = list(range(1, 41))
    ix.add(5, base[:20], ())
    ix.add(6, base[:30] + [7, 7], ())
    m = ix.match(base, ())
    assert m.entry.row == 6 and m.tokens == 30 and m.images == 0
    assert ix.match(base[:30], ()).tokens == 29  # one token is left to give the first answer token's logits
    assert ix.match(list(range(100, 140)), ()) is None
    assert ix.match(base[:MIN_TOKENS - 1] + [0] * 20, ()) is None  # too short to be worth it


def test_match_cuts_at_an_image_that_differs_or_is_cut():
    ix = index()
    text = list(range(1, 21))
    ids = text + [IMG] * 4 + [50, 51] + [IMG] * 4 + list(range(60, 70))
    ix.add(1, ids, (b"a", b"b"))
    m = ix.match(ids + [1, 2], (b"a", b"b"))
    assert (m.tokens, m.images) == (len(ids), 2)
    m = ix.match(ids + [1, 2], (b"a", b"x"))  # the second picture differs: reuse ends before its placeholders
    assert (m.tokens, m.images) == (26, 1)
    m = ix.match(ids + [1, 2], (b"x", b"b"))
    assert (m.tokens, m.images) == (20, 0)
    ix2 = index()
    ix2.add(1, text + [IMG] * 2, (b"a",))  # a row that ends inside an image (its prompt did not)
    assert ix2.match(text + [IMG] * 4 + [3], (b"a",)).tokens == 20


def test_add_replaces_what_it_extends_and_free_rows_go_oldest_first():
    ix = index()
    ix.add(7, list(range(20)), ())
    ix.add(6, list(range(30)), ())  # extends row 7's tokens: row 7 is forgotten
    assert set(ix.entries) == {6}
    ix.add(5, list(range(50, 80)), ())
    assert ix.free_row(4, 8, busy={0, 1}) == 7  # a free row above the floor, top first
    ix.add(7, list(range(90, 120)), ())
    ix.add(4, list(range(200, 230)), ())
    ix.match(list(range(30)) + [1], ())  # row 6 used last: row 5 is the oldest now
    assert ix.free_row(4, 8, busy=set()) == 5 and 5 not in ix.entries
    assert ix.free_row(8, 8, busy=set()) is None  # no row above the floor


def test_relocate_moves_rows_out_of_the_way_newest_first():
    ix = index()
    for row, start in ((0, 0), (1, 100), (2, 200), (6, 300), (7, 400)):
        ix.add(row, list(range(start, start + 20)), ())
    ix.match(list(range(100, 130)), ())  # row 1 used last, then row 2's clock is older
    # rows 0..3 are about to run; row 2 is continued in place; rows 4 and 5 are free
    moves = ix.relocate(4, 8, keep={2}, protect=set())
    assert moves == [(1, 5, 20), (0, 4, 20)]  # the most recently used first, to the top free row
    assert sorted(ix.entries) == [4, 5, 6, 7] and all(e.row == r for r, e in ix.entries.items())
    assert ix.entries[5].ids[0] == 100 and ix.entries[4].ids[0] == 0
    # no free row: a less recently used one above gives way, unless a request is about to copy it
    ix2 = index()
    for row, start in ((0, 0), (2, 200), (3, 300)):
        ix2.add(row, list(range(start, start + 20)), ())
    ix2.match(list(range(0, 30)), ())  # row 0 newest
    assert ix2.relocate(2, 4, keep=set(), protect={2, 3}) == []  # every older row is protected: forgotten
    assert sorted(ix2.entries) == [2, 3]
    ix2.add(0, list(range(500, 520)), ())
    assert ix2.relocate(2, 4, keep=set(), protect={3}) == [(0, 2, 20)]  # row 2 (older) gave way
    assert ix2.entries[2].ids[0] == 500


def test_feature_digests_tell_pictures_apart(images):
    a = feature_digests(images[:2])
    assert len(a) == 2 and a[0] != a[1] and a == feature_digests(images[:2].copy())
    assert feature_digests(None) == ()
    req = GenerationRequest([1, 2], images[:1])
    assert req.digests() == a[:1]


# ------------------------------------------------------------ random chats
FOLLOW_UPS = ["Why?", "Are you sure?", "And this one?", "Say it again, in other words.", "What else do you see?"]


def _random_chats(model, images, kv, seed: int, chats: int = 7, rows: int = 4, steps: int = 400,
                  options: dict | None = None):
    """``chats`` conversations of 2 to 4 turns over ``rows`` rows, each next
    turn sent at a random step after the previous answer, with its own
    ``max_new_tokens``; a few turns bring a new picture, a few are cancelled
    mid-answer. Openings repeat across chats (the same question with another
    picture, or none), so rows of other chats match too. Returns what each
    request got: (request, tokens, cancelled after) and the batcher."""
    import random

    rnd = random.Random(seed)
    stops = list(model.tokenizer.stop_ids)
    batcher = make(model, kv, rows, stop_ids=stops, options=options or {})
    openings = ["What is in the picture?", "Describe the picture in a few words.", "Hi"]
    plan = []
    for _ in range(chats):
        n_turns = rnd.randint(2, 4)
        first_img = rnd.random() < 0.7
        turns = [(int(first_img), rnd.choice(openings))]
        turns += [(int(rnd.random() < 0.25), rnd.choice(FOLLOW_UPS)) for _ in range(n_turns - 1)]
        pics = [rnd.randrange(len(images)) for _ in turns]
        plan.append({"turns": turns, "pics": pics, "answers": [], "sink": None, "next_at": rnd.randrange(6)})
    done = []
    for step in range(steps):
        for c in plan:
            if c["sink"] is None and len(c["answers"]) < len(c["turns"]) and step >= c["next_at"]:
                k = len(c["answers"])
                turns = c["turns"][:k + 1]
                feats = [c["pics"][j] for j, (n, _) in enumerate(turns) if n]
                req = GenerationRequest(chat(model, turns, c["answers"]), images[feats] if feats else None,
                                        max_new_tokens=rnd.randint(1, 10))
                c["cancel"] = rnd.randint(1, req.max_new_tokens) if rnd.random() < 0.15 else None
                c["req"], c["sink"] = req, Collector()
                c["ticket"] = batcher.submit(req, c["sink"])
        batcher.step()
        for c in plan:
            sink = c["sink"]
            if sink is None:
                continue
            if c["cancel"] is not None and len(sink.tokens) >= c["cancel"] and not sink.done.is_set():
                c["ticket"].cancel()
                sink.done.set()  # what arrives after the cancel is not the answer
            if sink.done.is_set():
                assert sink.error is None, sink.error
                done.append((c["req"], list(sink.tokens), c["cancel"]))
                c["answers"].append(answer_text(model, sink.tokens))
                c["sink"], c["next_at"] = None, step + 1 + rnd.randrange(8)
        if all(len(c["answers"]) == len(c["turns"]) for c in plan) and not batcher.active and not batcher.waiting:
            break
    else:
        raise AssertionError(f"the chats did not finish in {steps} steps")
    return done, batcher


def assert_answered_as_alone(model, done: list) -> None:
    """Each of ``_random_chats``' requests got ``generate``'s answer for it
    alone; a cancelled one a prefix of it."""
    stops = list(model.tokenizer.stop_ids)
    for k, (req, tokens, cancel) in enumerate(done):
        want = reference(model, req, stops)
        if cancel is None:
            assert tokens == want, f"request {k}: batched {tokens} != alone {want}"
        else:
            assert tokens[:cancel] == want[:len(tokens[:cancel])], f"request {k} (cancelled): {tokens} vs {want}"


@pytest.mark.parametrize("seed, rows", [(0, 4), (1, 6)])
def test_random_chats_answer_as_alone(model, images, kv, seed, rows):
    """Seven chats over four or six rows, arriving, continuing, bringing pictures and
    being cancelled at random: every answer is ``generate``'s for its request
    alone (a cancelled one a prefix of it), though rows were continued,
    copied, moved up and forgotten along the way."""
    done, batcher = _random_chats(model, images, kv, seed, rows=rows)
    assert len(done) >= 14
    assert_answered_as_alone(model, done)
    # the schedule did what it is for: rows continued, and rows copied or moved
    assert batcher.stats["prefix_hits"] >= 2, batcher.stats
    assert batcher.static.moves > 0 and batcher.stats["largest_batch"] >= 4
