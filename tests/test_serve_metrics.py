"""serve.metrics without Ray: what one request records, by how it ended."""
from __future__ import annotations

import pytest

from serve.metrics import LLMMetrics


class Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value=1, tags=None):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


@pytest.fixture
def m():
    metrics = LLMMetrics()
    for name in ("requests", "prompt_tokens", "generation_tokens", "ttft", "tpot", "running", "waiting"):
        setattr(metrics, name, Recorder())
    return metrics


@pytest.mark.parametrize("chunks, error, outcome", [
    ([[5], [6, 7], [2]], False, "stop"),      # ends with a stop id
    ([[5], [6, 7], [8]], False, "length"),    # max_new_tokens (4) reached
    ([[5]], False, "cancelled"),              # the reader left early
    ([[5], [6]], True, "error"),
])
def test_one_request_records_tokens_times_and_how_it_ended(m, chunks, error, outcome):
    t = m.track(11, stop_ids=[2], max_new_tokens=4)
    for ids in chunks:
        t.tokens_out(ids)
    t.tokens_out([])  # an empty message counts nothing
    assert t.finish(error) == outcome
    assert t.finish(error) == outcome  # a second finish records nothing more
    n = sum(len(c) for c in chunks)
    assert m.prompt_tokens.calls == [("inc", 11, None)]
    assert m.requests.calls == [("inc", 1, {"outcome": outcome})]
    assert m.generation_tokens.calls == [("inc", n, None)]
    assert len(m.ttft.calls) == 1 and m.ttft.calls[0][1] >= 0
    assert len(m.tpot.calls) == (1 if n > 1 else 0)


def test_a_request_that_never_produced_a_token_has_no_time_to_first_token(m):
    t = m.track(3, stop_ids=[2], max_new_tokens=4)
    assert t.finish(error=True) == "error"
    assert m.ttft.calls == [] and m.generation_tokens.calls == [] and m.tpot.calls == []
    m.queue(3, 1)
    assert m.running.calls == [("set", 3, None)] and m.waiting.calls == [("set", 1, None)]


def test_prefix_cache_tokens_count_what_the_batcher_gained_since_last_time(m):
    m.prefix_tokens = Recorder()
    for total in (0, 40, 40, 100, 30, 30):  # 30 after 100: a rebuilt batcher counts from zero again
        m.prefix_reused(total)
    assert m.prefix_tokens.calls == [("inc", 40, None), ("inc", 60, None), ("inc", 30, None)]
