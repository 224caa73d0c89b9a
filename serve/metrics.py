"""Prometheus metrics of the serving path, through Ray's metrics agent.

Ray exports them on every node's metrics port (``ray start
--metrics-export-port``) with a ``ray_`` prefix and the Serve tags
(``application``, ``deployment``, ``replica``), beside Ray Serve's own
request counts and latencies. Names follow vLLM's where they mean the same:

========================================  =========  =============================================
``mmphi_llm_requests_total``              counter    finished generations, by ``outcome``: stop
                                                     (a stop token), length (``max_tokens``),
                                                     cancelled (the client left), error
``mmphi_llm_prompt_tokens_total``         counter    prompt tokens of the requests taken (image
                                                     placeholders included)
``mmphi_llm_generation_tokens_total``     counter    tokens generated
``mmphi_llm_prefix_cache_tokens_total``   counter    prompt tokens whose keys and values came from
                                                     a row an earlier request left (the prefix
                                                     cache), not prefilled
``mmphi_llm_time_to_first_token_seconds`` histogram  from the LLM replica taking a request to its
                                                     first token: queueing for a row and prefill
``mmphi_llm_time_per_output_token_seconds`` histogram  mean gap between a request's later tokens
``mmphi_llm_running_requests``            gauge      requests decoding in the replica's batch
``mmphi_llm_waiting_requests``            gauge      requests waiting for a row
``mmphi_api_errors_total``                counter    API errors returned, by ``code`` (e.g.
                                                     invalid_image, context_length_exceeded)
                                                     and HTTP ``status``
``mmphi_image_cache_lookups_total``       counter    the ingress's image feature cache, by
                                                     ``outcome``: hit (features kept from an
                                                     earlier request), miss (sent to the
                                                     ImageEncoder)
========================================  =========  =============================================
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

OUTCOMES = ("stop", "length", "cancelled", "error")
# seconds: a tiny model on a CPU answers in milliseconds, a 4-bit one behind a long queue in tens of seconds
TTFT_BOUNDS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0]
TPOT_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


class _Off:
    """Stands in for a metric when Ray's metrics cannot be made (then serving
    goes on without them)."""

    def inc(self, *a, **kw) -> None:
        pass

    observe = set = inc


def _make(kind: str, name: str, description: str, **kw):
    try:
        from ray.serve import metrics

        return getattr(metrics, kind)(name, description, **kw)
    except Exception as e:  # noqa: BLE001 - metrics are never worth a failed replica
        log.warning("metric %s is off: %s", name, e)
        return _Off()


class LLMMetrics:
    """The LLM replica's metrics; :meth:`track` follows one request."""

    def __init__(self) -> None:
        self.requests = _make("Counter", "mmphi_llm_requests_total", "finished generations by outcome",
                              tag_keys=("outcome",))
        self.prompt_tokens = _make("Counter", "mmphi_llm_prompt_tokens_total", "prompt tokens taken")
        self.generation_tokens = _make("Counter", "mmphi_llm_generation_tokens_total", "tokens generated")
        self.prefix_tokens = _make("Counter", "mmphi_llm_prefix_cache_tokens_total",
                                   "prompt tokens taken from the prefix cache instead of prefilled")
        self._prefix_seen = 0  # the batcher's prefix_tokens count already added to the counter
        self.ttft = _make("Histogram", "mmphi_llm_time_to_first_token_seconds",
                          "seconds from the replica taking a request to its first token", boundaries=TTFT_BOUNDS)
        self.tpot = _make("Histogram", "mmphi_llm_time_per_output_token_seconds",
                          "mean seconds between a request's later tokens", boundaries=TPOT_BOUNDS)
        self.running = _make("Gauge", "mmphi_llm_running_requests", "requests decoding in the batch")
        self.waiting = _make("Gauge", "mmphi_llm_waiting_requests", "requests waiting for a batch row")

    def queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prefix_reused(self, total: int) -> None:
        """The batcher's running count of prompt tokens taken from the prefix
        cache: what it gained since the last call goes to the counter (a
        rebuilt batcher counts from 0 again)."""
        if total < self._prefix_seen:
            self._prefix_seen = 0
        if total > self._prefix_seen:
            self.prefix_tokens.inc(total - self._prefix_seen)
            self._prefix_seen = total

    def track(self, prompt_tokens: int, stop_ids, max_new_tokens: int) -> "RequestTrack":
        self.prompt_tokens.inc(prompt_tokens)
        return RequestTrack(self, set(stop_ids), max_new_tokens)


class RequestTrack:
    """One request's tokens and times; :meth:`finish` records them once."""

    def __init__(self, m: LLMMetrics, stop_ids: set, max_new_tokens: int):
        self.m, self.stop_ids, self.max_new_tokens = m, stop_ids, max_new_tokens
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last_id: int | None = None
        self.tokens = 0
        self.done = False

    def tokens_out(self, ids: list[int]) -> None:
        if not ids:
            return
        if self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.observe(self.first - self.start)
        self.tokens += len(ids)
        self.last_id = ids[-1]

    def outcome(self, error: bool) -> str:
        if error:
            return "error"
        if self.last_id is not None and self.last_id in self.stop_ids:
            return "stop"
        return "length" if self.tokens >= self.max_new_tokens else "cancelled"

    def finish(self, error: bool = False) -> str:
        outcome = self.outcome(error)
        if self.done:
            return outcome
        self.done = True
        self.m.requests.inc(1, tags={"outcome": outcome})
        if self.tokens:
            self.m.generation_tokens.inc(self.tokens)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.observe((time.perf_counter() - self.first) / (self.tokens - 1))
        return outcome


class APIMetrics:
    """The ingress's count of the errors it answers, by code and status."""

    def __init__(self) -> None:
        self.errors = _make("Counter", "mmphi_api_errors_total", "API errors returned by code and HTTP status",
                            tag_keys=("code", "status"))

    def error(self, code: str | None, status: int) -> None:
        self.errors.inc(1, tags={"code": code or "none", "status": str(status)})


class ImageCacheMetrics:
    """An image feature cache's lookups by outcome (hit or miss): the ingress's
    (``mmphi_image_cache_lookups_total``) or the ImageEncoder's
    (``mmphi_encoder_cache_lookups_total``)."""

    def __init__(self, where: str = "ingress") -> None:
        name = {"ingress": "mmphi_image_cache_lookups_total", "encoder": "mmphi_encoder_cache_lookups_total"}[where]
        self.lookups = _make("Counter", name, f"image feature cache lookups in the {where} by outcome",
                             tag_keys=("outcome",))

    def lookup(self, hit: bool) -> None:
        self.lookups.inc(1, tags={"outcome": "hit" if hit else "miss"})
