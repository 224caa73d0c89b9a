"""Long prompts prefilled in chunks between decoding steps
(``BatchingOptions.prefill_chunk_tokens``, static cache).

A prompt with more tokens than the chunk to prefill (after a kept row's
prefix, for a chat's next turn) runs in a row of its own above the
running ones, at most ``prefill_chunk_tokens`` prompt tokens per step across
such prompts, so the running streams get a token every step meanwhile. Every
greedy answer must still equal ``generate``'s for the request alone.
"""
from __future__ import annotations

import math

import pytest

from serve.batching import BatchingOptions, GenerationRequest
from tests.test_batching import Collector, make, reference
from tests.test_prefix_cache import (  # noqa: F401 - the same fixtures
    _random_chats, answer_text, assert_answered_as_alone, chat, images, kv, model)

CHUNK = 16


def long_request(model, images, text: str, max_new_tokens: int = 8) -> GenerationRequest:
    """Two pictures and a long question: several chunks of ``CHUNK`` tokens."""
    return GenerationRequest(chat(model, [(2, text)], []), images[:2], max_new_tokens=max_new_tokens)


LONG = ("Look at both pictures carefully and then tell me, in a few words, which colours you see and where "
        "the shapes are.")


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    runner = GenerationRequest(chat(model, [(0, "Hi")], []), None, max_new_tokens=30,  # a prompt under a chunk
                               min_new_tokens=30)
    big = long_request(model, images, LONG)
    chunks = math.ceil(len(big.input_ids) / CHUNK)
    assert chunks >= 4
    want = [reference(model, runner, stops), reference(model, big, stops)]

    batcher = make(model, kv, 8, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sinks = [Collector(), Collector()]
    batcher.submit(runner, sinks[0])
    batcher.step()
    batcher.submit(big, sinks[1])
    per_step, first_token_at = [], None
    for step in range(60):
        before = len(sinks[0].tokens)
        prompt_before = batcher.stats["prompt_tokens"]
        batcher.step()
        per_step.append((len(sinks[0].tokens) - before, batcher.stats["prompt_tokens"] - prompt_before))
        if first_token_at is None and sinks[1].tokens:
            first_token_at = step
        if sinks[0].done.is_set() and sinks[1].done.is_set():
            break
    assert [s.tokens for s in sinks] == want
    assert batcher.stats["prefill_chunks"] == chunks
    # the long prompt's first token came with its last chunk, one chunk a step
    assert first_token_at == chunks - 1
    # meanwhile the running stream got a token every step, and no step prefilled more than a chunk
    assert all(got == 1 for got, _ in per_step[:chunks]), per_step
    assert all(prompt <= CHUNK for _, prompt in per_step), per_step
    assert batcher.describe()["retained_rows"] <= 2 and not batcher._prefilling


def test_long_prompts_share_the_chunk_budget_oldest_first(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    reqs = [long_request(model, images, LONG), long_request(model, images[1:], "Which picture has more colours, "
                                                            "the first or the second, and why do you think so?")]
    want = [reference(model, r, stops) for r in reqs]
    batcher = make(model, kv, 4, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sinks = [Collector(), Collector()]
    for r, s in zip(reqs, sinks):
        batcher.submit(r, s)
    firsts = [None, None]
    for step in range(80):
        before = batcher.stats["prompt_tokens"]
        batcher.step()
        assert batcher.stats["prompt_tokens"] - before <= CHUNK
        for k, s in enumerate(sinks):
            if firsts[k] is None and s.tokens:
                firsts[k] = step
        if all(s.done.is_set() for s in sinks):
            break
    assert [s.tokens for s in sinks] == want
    assert firsts[0] < firsts[1]  # the older prompt's chunks go first
    assert firsts[1] == math.ceil((len(reqs[0].input_ids) + len(reqs[1].input_ids)) / CHUNK) - 1


def test_a_cancelled_long_prompt_gives_its_row_back(model, images, kv):
    stops = list(model.tokenizer.stop_ids)
    big = long_request(model, images, LONG)
    batcher = make(model, kv, 2, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sink = Collector()
    ticket = batcher.submit(big, sink)
    batcher.step()
    assert batcher.active == 1 and batcher.stats["prefill_chunks"] == 1
    ticket.cancel()
    batcher.step()
    assert batcher.active == 0 and sink.tokens == []
    assert not any(e.pinned for e in batcher.prefix.entries.values())
    # both rows serve again; chunking turned off live prefills a long prompt at once
    batcher.options = BatchingOptions(prefill_chunk_tokens=0)
    again = [Collector(), Collector()]
    other = long_request(model, images[1:], LONG)
    batcher.submit(big, again[0])
    batcher.submit(other, again[1])
    while not all(s.done.is_set() for s in again):
        batcher.step()
    assert [s.tokens for s in again] == [reference(model, big, stops), reference(model, other, stops)]
    assert batcher.stats["prefill_chunks"] == 1


def test_a_long_prompt_whose_chunking_is_turned_off_live_finishes_at_once(model, images):
    stops = list(model.tokenizer.stop_ids)
    big = long_request(model, images, LONG)
    batcher = make(model, "static", 4, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sink = Collector()
    batcher.submit(big, sink)
    batcher.step()
    assert batcher.stats["prefill_chunks"] == 1 and not sink.tokens
    batcher.options = BatchingOptions(prefill_chunk_tokens=0)
    batcher.step()
    assert batcher.stats["prefill_chunks"] == 2 and sink.tokens  # the rest in one pass, then its first token
    while not sink.done.is_set():
        batcher.step()
    assert sink.tokens == reference(model, big, stops)


OPENING = "Please describe the weather today in a few short words."


def _next_turn(model, images, stops, question: str = LONG):
    """A chat's first turn (text only) and its next one, which brings two
    pictures and a long question: a suffix of several chunks after the first
    turn's row."""
    first = GenerationRequest(chat(model, [(0, OPENING)], []), None, max_new_tokens=6)
    a1 = answer_text(model, reference(model, first, stops))
    second = GenerationRequest(chat(model, [(0, OPENING), (2, question)], [a1]), images[:2], max_new_tokens=8)
    return first, second


def test_a_long_next_turn_is_chunked_from_its_kept_row_in_place(model, images, kv):
    """The kept row of the first turn becomes the pinned row of the second,
    without a copy, and only the new tokens are prefilled, a chunk a step,
    while another stream decodes."""
    stops = list(model.tokenizer.stop_ids)
    first, second = _next_turn(model, images, stops)
    runner = GenerationRequest(chat(model, [(0, "One")], []), None, max_new_tokens=30, min_new_tokens=30)
    want = reference(model, second, stops)
    batcher = make(model, kv, 4, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sink = Collector()
    batcher.submit(first, sink)
    while not sink.done.is_set():
        batcher.step()
    kept = len(first.input_ids) + len(sink.tokens) - 1
    run = Collector()
    batcher.submit(runner, run)
    batcher.step()  # the runner takes row 0; the kept row moves up
    prompt_before, moves = batcher.stats["prompt_tokens"], batcher.static.moves
    sink = Collector()
    batcher.submit(second, sink)
    batcher.step()
    assert batcher.static.moves == moves  # the kept row itself is the pinned row
    assert [p.done for p in batcher._prefilling] == [kept + CHUNK]
    steps = 1
    while not sink.tokens:
        before = len(run.tokens)
        batcher.step()
        steps += 1
        assert len(run.tokens) == before + 1  # the running stream gets a token every step
    assert steps == math.ceil((len(second.input_ids) - kept) / CHUNK)
    while not sink.done.is_set():
        batcher.step()
    assert sink.tokens == want
    assert batcher.stats["prefix_hits"] == 1 and batcher.stats["prefix_tokens"] == kept
    assert batcher.stats["prompt_tokens"] - prompt_before == len(second.input_ids) - kept


def test_long_turns_continuing_one_kept_row_copy_it_and_leave_it_kept(model, images, kv):
    """Two next turns of the same first turn arrive together: each gets a copy
    of the kept prefix in a row of its own, chunked from there, and the kept
    row stays for later turns."""
    stops = list(model.tokenizer.stop_ids)
    first, second = _next_turn(model, images, stops)
    _, third = _next_turn(model, images[1:], stops, "Which picture has more colours, the first or the second, "
                                                    "and why do you think so?")
    want = [reference(model, r, stops) for r in (second, third)]
    batcher = make(model, kv, 4, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sink = Collector()
    batcher.submit(first, sink)
    while not sink.done.is_set():
        batcher.step()
    (source,) = batcher.prefix.entries.values()
    sinks = [Collector(), Collector()]
    for r, s in zip((second, third), sinks):
        batcher.submit(r, s)
    batcher.step()
    rows = sorted(p.entry.row for p in batcher._prefilling)
    assert len(rows) == 2 and source.row not in rows and batcher.prefix.entries[source.row] is source
    assert all(p.base == len(source) for p in batcher._prefilling)
    while not all(s.done.is_set() for s in sinks):
        batcher.step()
    assert [s.tokens for s in sinks] == want
    assert batcher.stats["prefix_hits"] == 2 and batcher.stats["prefix_tokens"] == 2 * len(source)


def test_a_long_next_turn_with_no_row_to_spare_is_prefilled_whole(model, images):
    """Three rows: one decodes, the top one holds the kept row, and two
    requests continue it in the same step: a short one, which starts in the
    middle row, and a long next turn, which may neither take the kept row (the
    short one copies from it) nor find another. It is prefilled after the
    prefix in one pass instead, and answers the same."""
    stops = list(model.tokenizer.stop_ids)
    first, second = _next_turn(model, images, stops)
    other = GenerationRequest(chat(model, [(0, OPENING)], []), None, max_new_tokens=6)  # first's prompt
    runner = GenerationRequest(chat(model, [(0, "One")], []), None, max_new_tokens=30, min_new_tokens=30)
    batcher = make(model, "static", 3, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sinks = [Collector() for _ in range(4)]
    batcher.submit(first, sinks[0])
    while not sinks[0].done.is_set():
        batcher.step()
    batcher.submit(runner, sinks[1])
    batcher.step()  # the kept row moves to row 2
    assert [e.row for e in batcher.prefix.entries.values()] == [2]
    chunks = batcher.stats["prefill_chunks"]  # the first turn's
    batcher.submit(second, sinks[2])
    batcher.submit(other, sinks[3])  # matches the kept row too: neither may take it in place
    while not all(s.done.is_set() for s in sinks[1:]):
        batcher.step()
    assert [s.tokens for s in sinks[1:]] == [reference(model, r, stops) for r in (runner, second, other)]
    assert batcher.stats["prefill_chunks"] == chunks and batcher.stats["prefix_hits"] == 2


@pytest.mark.parametrize("seed, rows", [(3, 3), (4, 5)])
def test_random_chats_with_chunked_prompts_answer_as_alone(model, images, kv, seed, rows):
    """The random chats of test_prefix_cache with a chunk of 12 tokens: most
    first turns and many later ones are chunked, over three or five rows, with
    kept rows, pinned rows and running rows moving around each other."""
    done, batcher = _random_chats(model, images, kv, seed, rows=rows, options={"prefill_chunk_tokens": 12})
    assert_answered_as_alone(model, done)
    assert batcher.stats["prefill_chunks"] >= 10, batcher.stats
    assert not batcher._prefilling and not any(e.pinned for e in batcher.prefix.entries.values())


@pytest.mark.parametrize("value", [-1, 8, True, 1.5])
def test_prefill_chunk_tokens_is_checked(value):
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be 0"):
        BatchingOptions.from_dict({"prefill_chunk_tokens": value})
    assert BatchingOptions.from_dict({"prefill_chunk_tokens": 0}).prefill_chunk_tokens == 0


def test_prompts_that_finish_together_join_lowest_row_first(model, images):
    """Two rows decode; two long prompts sit in the rows above them (the older
    one on top) when chunking is turned off live, so both finish in one step:
    the lower one joins first, in place, and the older one moves down after
    it. The other way round, the older one would overwrite the lower one's row."""
    stops = list(model.tokenizer.stop_ids)
    runners = [GenerationRequest(chat(model, [(0, q)], []), None, max_new_tokens=20, min_new_tokens=20)
               for q in ("Hi", "One")]
    bigs = [long_request(model, images, LONG), long_request(model, images[1:], LONG)]
    want = [reference(model, r, stops) for r in runners + bigs]
    batcher = make(model, "static", 4, stop_ids=stops, options={"prefill_chunk_tokens": CHUNK})
    sinks = [Collector() for _ in want]
    for r, s in zip(runners, sinks):
        batcher.submit(r, s)
    batcher.step()
    for r, s in zip(bigs, sinks[2:]):
        batcher.submit(r, s)
    batcher.step()  # the first chunk of the older prompt
    assert [p.entry.row for p in batcher._prefilling] == [3, 2]
    batcher.options = BatchingOptions(prefill_chunk_tokens=0)
    batcher.step()
    assert not batcher._prefilling and batcher.active == 4
    while not all(s.done.is_set() for s in sinks):
        batcher.step()
    assert [s.tokens for s in sinks] == want


def test_chunk_bench_measures_both_ways_on_the_same_schedule(tmp_path):
    """``bench/chunk_bench.py`` on a short schedule: the long prompts are
    prefilled in one pass, then in chunks of 64 tokens, and answered either way."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import chunk_bench

    out = tmp_path / "chunk.json"
    res = chunk_bench.main(["--steps", "40", "--every", "10", "--long-tokens", "200", "--chunks", "0,64",
                            "--streams", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    off, on = res["results"]
    assert off["prefill_chunks"] == 0 and on["prefill_chunks"] >= 3 * on["long_prompts_answered"]
    assert off["long_prompts_answered"] >= 2 and on["long_prompts_answered"] >= 2
    assert res["long_prompt_tokens"] > 192 and all(r["itl_ms_max"] >= r["itl_ms_p50"] > 0 for r in (off, on))
