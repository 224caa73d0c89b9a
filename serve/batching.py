"""Continuous batching for the LLM deployment.

One :class:`ContinuousBatcher` per LLM replica owns the model in one
background thread. Requests join and leave the running batch at step
boundaries; every step

1. admits waiting requests (up to ``max_batch_size`` rows in all): each is
   embedded through the model's own path (image features spliced over the
   placeholders, ``MultimodalPhi3.embed``) and prefilled, a lone request as a
   single ``generate`` call prefills it, several waiting ones together in
   groups of similar length (right-padded, so each row sees only its own
   tokens; ``prefill_batch_tokens`` bounds a group); each one's first token is
   sampled and streamed, and its KV cache joins the batch's. With the static
   cache, a request whose prompt starts with the tokens and images of a row
   an earlier request left (``serve.prefix_cache``) continues that row
   instead: the requests that do run only their new tokens, together, in
   their rows (``StaticDecoder.prefill``). A prompt with more than
   ``prefill_chunk_tokens`` tokens to prefill (after its retained prefix,
   if any; static cache) is prefilled in chunks instead,
   in a row of its own above the running ones, at most that many prompt
   tokens per step across such prompts: a long prompt delays each step a
   little instead of stalling every running stream for its whole prefill;
2. decodes one token for every row in one forward pass;
3. applies each row's own sampling settings (penalties, logit bias,
   temperature, top-p, its seed: ``serve.sampling``) and streams each row's
   token to its caller;
4. drops rows that finished (a stop id, or ``max_new_tokens``) or whose
   caller went away.

Two KV caches (``BatchingOptions.kv_cache``):

- ``static`` (the default for Phi-3): one cache allocated when the replica
  starts, a row per running request (``serve.static_cache``): a request's
  prefilled keys and values are copied into a free row and every step writes
  each row's new token in place. On a GPU each step is a replayed CUDA
  graph. Its size comes from ``max_batch_size`` rows of ``max_seq_len``
  tokens, shrunk (length first, down to 2,048, then rows) to fit
  ``kv_cache_fraction`` of the replica's part of the card
  (``serve.static_cache.cache_budget``). A request
  longer than a row (prompt + ``max_new_tokens``) does not join the batch: the
  deployment runs it through ``generate`` alone (``fits``).
- ``dynamic``: a Hugging Face ``DynamicCache`` whose rows are left-padded to
  a common length: every row's real tokens are contiguous and end at the
  last column, a 2D attention mask hides the padding, and each row gets its
  own position ids (the count of its real tokens), so rotary embeddings and
  causal (or sliding-window) masks see each row as if it ran alone. Columns
  that only padding uses are cut when rows leave. Every step concatenates a
  column, so a step costs more as answers grow.

Greedy answers equal those of one-at-a-time ``generate`` token for token
(``tests/test_batching.py``); logits agree to float rounding only, because a
matrix product over several rows sums in another order than over one (BLAS
picks its kernel by shape) and attention over padded keys reduces over a
longer row.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .sampling import TokenLogprob, penalise, rate, sampling_probabilities

log = logging.getLogger("ray.serve")

DONE = object()  # the last item a request's ``emit`` receives after its tokens


@dataclass
class GenerationRequest:
    """What the LLM deployment's ``generate`` receives (as a dict, see
    ``LLM.generate``)."""

    input_ids: list[int]
    image_features: Any = None  # float32 (images, tokens, dim) array or tensor, or None
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # stop ids are suppressed until this many tokens
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling with this request's own generator: the same seed, the same answer
    # structured output (serve.grammar.Constraint): only the tokens it allows are chosen; set by the LLM replica
    constraint: Any = field(default=None, repr=False, compare=False)
    # OpenAI's penalties: a token's logit loses frequency_penalty x its count in the answer so far, and
    # presence_penalty once it occurs; ``prior`` is the answer before this call (continued after a replica died)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    prior: list[int] = field(default_factory=list)
    # the chat API's logprobs: None, or how many most likely tokens to report beside each chosen one (0-20)
    logprobs: int | None = None
    # token id -> added to its logit (the chat API's logit_bias, -100 to 100)
    logit_bias: dict[int, float] | None = None
    # one digest per image (serve.prefix_cache.feature_digests); computed when first needed
    image_digests: tuple[bytes, ...] | None = field(default=None, repr=False, compare=False)
    _rng: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def digests(self) -> tuple[bytes, ...]:
        """This request's image digests, the prefix cache's key for its images."""
        if self.image_digests is None:
            from .prefix_cache import feature_digests

            self.image_digests = feature_digests(self.image_features)
        return self.image_digests

    def rng(self, device: torch.device) -> torch.Generator:
        """This request's sampling generator, seeded with ``seed`` at its first token."""
        if self._rng is None:
            self._rng = torch.Generator(device=device)
            self._rng.manual_seed(self.seed % 2**64)
        return self._rng

    @classmethod
    def from_dict(cls, d: dict) -> GenerationRequest:
        max_new = int(d["max_new_tokens"])
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new}")
        feats = d.get("image_features")
        if feats is not None and not len(feats):
            feats = None
        ids = [int(t) for t in d["input_ids"]]
        start = int(d.get("answer_start", len(ids)))
        if not 0 <= start <= len(ids):
            raise ValueError(f"answer_start {start} is outside the {len(ids)} input ids")
        return cls(input_ids=ids, image_features=feats, max_new_tokens=max_new,
                   min_new_tokens=min(int(d.get("min_new_tokens") or 0), max_new),
                   temperature=float(d.get("temperature") or 0.0), top_p=float(d.get("top_p") or 1.0),
                   seed=None if d.get("seed") is None else int(d["seed"]),
                   frequency_penalty=float(d.get("frequency_penalty") or 0.0),
                   presence_penalty=float(d.get("presence_penalty") or 0.0), prior=ids[start:],
                   logprobs=None if d.get("logprobs") is None else int(d["logprobs"]),
                   logit_bias={int(t): float(b) for t, b in d["logit_bias"].items()} if d.get("logit_bias") else None)

    @property
    def penalised(self) -> bool:
        """Whether penalties or a logit bias change this request's scores."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

    def features_tensor(self) -> torch.Tensor | None:
        f = self.image_features
        if f is None:
            return None
        if isinstance(f, torch.Tensor):
            return f
        a = np.ascontiguousarray(f)
        # features that came through Ray's object store are read-only: a copy, not a tensor torch warns about
        return torch.from_numpy(a if a.flags.writeable else a.copy())


@dataclass
class BatchingOptions:
    """The LLM deployment's ``user_config`` (``serve/config.yaml``)."""

    # off: every request runs its own `generate` call in a worker thread
    continuous_batching: bool = True
    # rows decoded together per step; more requests wait for a free row
    max_batch_size: int = 32
    # static: a preallocated cache, a row per request, CUDA graphs on a GPU;
    # dynamic: Hugging Face's DynamicCache, left-padded rows (see the module text)
    kv_cache: str = "static"
    # tokens per static row (prompt + answer); null: the model's context length
    max_seq_len: int | None = None
    # share of the replica's part of its GPU (num_gpus x the card's memory,
    # less the weights) the static cache may take; on the CPU, of the free RAM
    kv_cache_fraction: float = 0.9
    # capture the static cache's decoding step as CUDA graphs (GPU only)
    cuda_graphs: bool = True
    # waiting requests are prefilled together, up to this many padded tokens per forward pass
    prefill_batch_tokens: int = 8192
    # while several requests decode together, a stream's next message leaves
    # this long after its previous one at the soonest, with every token
    # decoded meanwhile: fewer messages through Ray and HTTP per token when
    # the replica is busy. A lone stream and first tokens are sent at once; 0: always at once
    stream_interval_ms: float = 40.0
    # static cache only: a finished request's row stays in the cache while no
    # request needs it, and a later prompt that starts with the same tokens
    # and images (a chat's next turn) prefills only the rest (serve.prefix_cache)
    prefix_cache: bool = True
    # static cache only: a prompt with more tokens than this to prefill (after a retained prefix, if any) is
    # prefilled in chunks, at most this many prompt tokens per step across such prompts, between decoding
    # steps (0: in one pass at admission)
    prefill_chunk_tokens: int = 1024

    @classmethod
    def from_dict(cls, data: dict | None) -> BatchingOptions:
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LLM user_config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        opts = cls(**data)
        if not isinstance(opts.continuous_batching, bool):
            raise ValueError(f"continuous_batching must be true or false, got {opts.continuous_batching!r}")
        if isinstance(opts.max_batch_size, bool) or not isinstance(opts.max_batch_size, int) or opts.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {opts.max_batch_size!r}")
        if opts.kv_cache not in ("static", "dynamic"):
            raise ValueError(f"kv_cache must be 'static' or 'dynamic', got {opts.kv_cache!r}")
        if opts.max_seq_len is not None and (isinstance(opts.max_seq_len, bool) or not isinstance(opts.max_seq_len, int)
                                             or opts.max_seq_len < 16):
            raise ValueError(f"max_seq_len must be null or an integer of at least 16, got {opts.max_seq_len!r}")
        frac = opts.kv_cache_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 0.95:
            raise ValueError(f"kv_cache_fraction must be a number in (0, 0.95], got {frac!r}")
        if not isinstance(opts.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {opts.cuda_graphs!r}")
        if not isinstance(opts.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be true or false, got {opts.prefix_cache!r}")
        pct = opts.prefill_chunk_tokens
        if isinstance(pct, bool) or not isinstance(pct, int) or not (pct == 0 or pct >= 16):
            raise ValueError(f"prefill_chunk_tokens must be 0 (off) or an integer of at least 16, got {pct!r}")
        pbt = opts.prefill_batch_tokens
        if isinstance(pbt, bool) or not isinstance(pbt, int) or pbt < 1:
            raise ValueError(f"prefill_batch_tokens must be a positive integer, got {pbt!r}")
        si = opts.stream_interval_ms
        if isinstance(si, bool) or not isinstance(si, (int, float)) or not 0 <= si <= 1000:
            raise ValueError(f"stream_interval_ms must be a number of milliseconds in [0, 1000], got {si!r}")
        return opts

    def cache_key(self) -> tuple:
        """The options fixed when a batcher is built (the others apply live)."""
        static = self.kv_cache == "static"
        return (self.kv_cache, self.max_seq_len, self.kv_cache_fraction, self.cuda_graphs,
                self.max_batch_size if static else None)


class Ticket:
    """A submitted request; ``cancel()`` drops it at the next step boundary."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Any], None]):
        self.request, self.emit = request, emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    ticket: Ticket
    position: int  # position id of the token fed next (= real tokens already in the cache)
    last: int  # the token fed next
    generated: int = 1
    done: bool = field(default=False)
    tokens: list[int] = field(default_factory=list)  # generated so far; all but the last are in the cache


@dataclass(eq=False)  # compared by identity
class _Prefill:
    """A long prompt prefilled in chunks, in its own (pinned) row."""
    ticket: Ticket
    entry: Any  # serve.prefix_cache.Retained, pinned: its row moves when running rows need it
    embeds: torch.Tensor  # (tokens, hidden): the prompt after its kept prefix (all of it without one), images in
    done: int = 0  # columns 0..done-1 of the row hold the prompt's first done tokens
    base: int = 0  # the kept prefix's tokens (columns 0..base-1, from a retained row): embeds starts after them

    @property
    def size(self) -> int:
        """The prompt's tokens."""
        return self.base + self.embeds.shape[0]

    def chunk(self, take: int) -> torch.Tensor:
        """The embeddings of the next ``take`` prompt tokens."""
        return self.embeds[self.done - self.base:self.done - self.base + take]


class _RowCache:
    """Row ``i``'s first ``n`` columns of a batch's KV cache, shaped like a
    one-request cache (``layers[k].keys`` of shape (1, heads, n, dim))."""

    def __init__(self, cache, i: int, n: int):
        self.layers = [_Layer(layer.keys[i:i + 1, :, :n], layer.values[i:i + 1, :, :n]) for layer in cache.layers]


@dataclass
class _Layer:
    keys: torch.Tensor
    values: torch.Tensor


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros before the sequence axis (-2) of a (batch, heads, seq, dim) cache tensor."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2)


class ContinuousBatcher:
    """Continuous batching over a :class:`models.multimodal.MultimodalPhi3`.

    ``submit(request, emit)`` is thread-safe; ``emit`` is called from the
    batching thread with a list of new token ids per step, then ``DONE``, or
    with an exception when the request failed. ``start()`` runs the loop in a
    daemon thread; tests may call ``step()`` directly instead."""

    def __init__(self, model, max_batch_size: int = 32, *, suppress_ids=(), stop_ids=None,
                 options: BatchingOptions | None = None, context_length: int | None = None):
        from transformers import DynamicCache

        self._cache_class = DynamicCache
        self._cache_arg = cache_kwarg(model.llm)
        self.model = model
        self.options = replace(options or BatchingOptions(), max_batch_size=max_batch_size)
        self._max_batch_size = max_batch_size
        self.stop_ids = sorted(set(model.tokenizer.stop_ids if stop_ids is None else stop_ids))
        self.suppress_ids = sorted(set(suppress_ids))
        self.device = model.device
        self._stop_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        self._suppress_tensor = torch.tensor(self.suppress_ids, dtype=torch.long, device=self.device)
        self._pending: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._prefilling: list[_Prefill] = []  # long prompts prefilled in chunks, oldest first
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, cache length), 1 = real token
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None  # why the loop stopped, if it did
        self._format_words: torch.Tensor | None = None  # the response formats' bitmask buffer (serve.grammar)
        self._format_vocab = 0
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "largest_batch": 0,
                      "prompt_tokens": 0, "prefix_hits": 0, "prefix_tokens": 0, "prefill_chunks": 0}
        self.static = None  # serve.static_cache.StaticDecoder when kv_cache is static
        self.static_error: str | None = None  # why the static cache was not built, if it was asked for
        self.prefix = None  # serve.prefix_cache.PrefixIndex of the static cache's retained rows
        if self.options.kv_cache == "static":
            self._build_static(context_length)
        if self.static is not None:
            from .prefix_cache import PrefixIndex

            self.prefix = PrefixIndex(model.tokenizer.ids.image, model.num_image_tokens)

    def _build_static(self, context_length: int | None) -> None:
        from models.language import base_causal_lm

        from . import static_cache as sc

        opts, llm = self.options, self.model.llm
        try:
            config = base_causal_lm(llm).config
            context = opts.max_seq_len or context_length or config.max_position_embeddings
            context = min(int(context), int(config.max_position_embeddings))
            budget = sc.cache_budget(self.device, opts.kv_cache_fraction)
            rows, length = sc.plan_cache(self._max_batch_size, context, sc.kv_bytes_per_token(llm), budget)
            self.static = sc.StaticDecoder(llm, rows, length, cuda_graphs=opts.cuda_graphs)
            self.static.capture_all()
        except Exception as e:  # noqa: BLE001 - e.g. not a Phi-3, or no memory: the dynamic cache serves
            self.static_error = f"{type(e).__name__}: {e}"
            log.warning("static KV cache unavailable, using the dynamic cache: %s", self.static_error)
            return
        if rows < self._max_batch_size:
            log.warning("static KV cache: %d rows of %d tokens fit in %.1f GiB (kv_cache_fraction %g), "
                        "not max_batch_size %d", rows, length, budget / 2**30, opts.kv_cache_fraction,
                        self._max_batch_size)
        self._max_batch_size = rows
        log.info("static KV cache: %d rows x %d tokens (%.2f GiB), CUDA graphs %s", rows, length,
                 self.static.nbytes / 2**30, "on" if self.static.use_graphs else "off")

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, n: int) -> None:
        """Rows per step from now on; at most the static cache's rows."""
        self._max_batch_size = min(n, self.static.rows) if self.static is not None else n

    def fits(self, request: GenerationRequest) -> bool:
        """Whether ``request`` (prompt + ``max_new_tokens``) fits one row of
        the static cache; always with the dynamic cache."""
        return self.static is None or len(request.input_ids) + request.max_new_tokens <= self.static.max_len

    def describe(self) -> dict:
        """The cache this batcher decodes with, for ``batching_stats``."""
        if self.static is None:
            return {"kv_cache": "dynamic", **({"static_error": self.static_error} if self.static_error else {})}
        return {"kv_cache": "static", **self.static.describe(), "prefix_cache": self._prefix_on(),
                "retained_rows": len(self.prefix)}

    @property
    def reuses_prefixes(self) -> bool:
        """Whether finished rows are kept for prefix reuse (the static cache and ``prefix_cache``)."""
        return self.prefix is not None and self.options.prefix_cache

    def _prefix_on(self) -> bool:
        """``reuses_prefixes``, dropping what was kept when it was turned off live."""
        if self.prefix is not None and not self.options.prefix_cache and len(self.prefix):
            self.prefix.clear()
        return self.reuses_prefixes

    # ----------------------------------------------------------- interface
    def submit(self, request: GenerationRequest, emit: Callable[[Any], None]) -> Ticket:
        ticket = Ticket(request, emit)
        with self._cond:
            if self._closed or self.error is not None:
                raise RuntimeError(f"the batching loop is not running ({self.error or 'closed'})")
            self._pending.append(ticket)
            self._cond.notify()
        return ticket

    @property
    def active(self) -> int:
        """Requests holding a row: decoding, or prefilling a long prompt in chunks."""
        return len(self._rows) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def alive(self) -> bool:
        return self.error is None and not self._closed and (self._thread is None or self._thread.is_alive())

    def start(self) -> ContinuousBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="continuous-batching", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._prefilling and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                self.step()
        except BaseException as e:  # a bug in the loop: fail everyone; check_health reports it
            self.error = e
            log.exception("continuous batching loop stopped")
        finally:
            with self._cond:
                waiting, self._pending = list(self._pending), deque()
            err = self.error or RuntimeError("the LLM replica is shutting down")
            for t in waiting + [r.ticket for r in self._rows] + [p.ticket for p in self._prefilling]:
                _emit(t, err)
            self._reset()

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, then decode one token for every row.
        False when there was nothing to do."""
        self._drop([r for r in self._rows if r.ticket.cancelled])
        admitted = self._admit()
        chunked = self._advance_prefills()
        if not self._rows:
            return admitted or chunked
        try:
            tokens, infos = self._decode()
        except Exception as e:  # e.g. out of memory: these rows fail, the replica goes on
            log.exception("decode step failed for %d request(s)", len(self._rows))
            for t in [r.ticket for r in self._rows] + [p.ticket for p in self._prefilling]:
                _emit(t, e)
            self._reset()
            return True
        for r, t, info in zip(self._rows, tokens, infos):
            r.last, r.position, r.generated = t, r.position + 1, r.generated + 1
            self._deliver(r, t, info)
        self._drop([r for r in self._rows if r.done or r.ticket.cancelled])
        return True

    def _admit(self) -> bool:
        """Take waiting requests into free rows. Their prompts are prefilled
        together, in groups of similar length of at most
        ``prefill_batch_tokens`` padded tokens (one forward pass each); a
        request that fails (bad input) fails alone."""
        tickets = []
        with self._cond:
            while len(self._rows) + len(self._prefilling) + len(tickets) < self.max_batch_size and self._pending:
                ticket = self._pending.popleft()
                if not ticket.cancelled:
                    tickets.append(ticket)
        ready, resumed, long, long_resumed = [], [], [], []
        reuse = self._prefix_on()
        chunk = self.options.prefill_chunk_tokens if self.prefix is not None else 0
        for ticket in tickets:
            try:
                req = ticket.request
                if not self.fits(req):
                    raise ValueError(f"{len(req.input_ids)} prompt tokens + max_new_tokens {req.max_new_tokens} "
                                     f"exceed a KV cache row of {self.static.max_len} tokens")
                found = self.prefix.match(req.input_ids, req.digests()) if reuse else None
                feats = req.features_tensor()
                if found is None:
                    ids = torch.tensor([req.input_ids], dtype=torch.long, device=self.device)
                    queue = long if chunk and len(req.input_ids) > chunk else ready
                    queue.append((ticket, self.model.embed(ids, feats)))
                    continue
                ids = torch.tensor([req.input_ids[found.tokens:]], dtype=torch.long, device=self.device)
                rest = feats[found.images:] if feats is not None and len(feats) > found.images else None
                queue = long_resumed if chunk and len(req.input_ids) - found.tokens > chunk else resumed
                queue.append((ticket, self.model.embed(ids, rest)[0], found.entry, found.tokens))
            except Exception as e:  # bad input: this request fails alone
                _emit(ticket, e)
        if long_resumed:  # before _make_room moves or forgets their sources
            resumed += self._pin_resumed(long_resumed, resumed, len(ready))
        claims = self._make_room(resumed, len(ready)) if self.prefix is not None else {}
        if resumed:
            self._resume(resumed, claims)
        for group in self._prefill_groups(ready):
            try:
                results = self._prefill(group)
            except Exception as e:  # e.g. out of memory for the group: each alone, each failing alone
                if len(group) == 1:
                    _emit(group[0][0], e)
                    continue
                log.warning("prefill of %d requests together failed (%s); prefilling them one by one", len(group), e)
                results = []
                for one in group:
                    try:
                        results += self._prefill([one])
                    except Exception as e1:  # noqa: BLE001
                        _emit(one[0], e1)
            for ticket, cache, logits in results:
                self._start(ticket, cache, logits)
        for ticket, embeds in long:  # a row of its own above the running ones; _advance_prefills fills it
            row = self.prefix.free_row(len(self._rows), self.static.rows, set())
            self._prefilling.append(_Prefill(ticket, self.prefix.pin(row), embeds[0]))
        return bool(tickets)

    def _advance_prefills(self) -> bool:
        """The next chunks of the long prompts being prefilled: the oldest
        first, ``prefill_chunk_tokens`` prompt tokens in all (every one that
        is left when chunking was turned off live), each written in its own
        row; a prompt whose last chunk ran starts like any prefilled one
        (first token, then a running row). False when there was none."""
        live = []
        for p in self._prefilling:
            if p.ticket.cancelled:
                self.prefix.unpin(p.entry)
            else:
                live.append(p)
        self._prefilling = live
        if not live:
            return False
        budget = self.options.prefill_chunk_tokens or sum(p.size - p.done for p in live)
        plan = []
        for p in live:
            take = min(budget, p.size - p.done)
            if take <= 0:
                break
            plan.append((p, take))
            budget -= take
        ending = [p for p, take in plan if p.done + take == p.size]
        # the rows the finishing prompts join (t0..t0+f-1) must be clear. A prompt still being prefilled
        # there trades rows with a finishing prompt above them (there are at least as many of those)
        t0, f = len(self._rows), len(ending)
        above = [p for p in ending if p.entry.row >= t0 + f]
        for p in self._prefilling:
            if t0 <= p.entry.row < t0 + f and p not in ending and above:
                q = above.pop()
                a, b = p.entry.row, q.entry.row
                self.static.swap(a, b, len(p.entry), len(q.entry))
                self.prefix.swap_rows(a, b)
        finishing = {p.entry.row for p in ending}
        # what else is there moves up (retained rows); the finishing prompts' own rows stay, and each moves
        # down after the chunks, lowest first
        for src, dst, length in self.prefix.relocate(len(self._rows) + len(finishing), self.static.rows, set(), set(),
                                                     stay=frozenset(finishing)):
            self.static.move(src, dst, length)
        self._requeue_lost_prefills()
        started = []
        for p, take in plan:
            if p.entry.row < 0:  # requeued
                continue
            try:
                logits = self.static.prefill(p.entry.row, [p.chunk(take)], [p.done])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails, the others go on
                log.warning("prefill of a %d-token prompt's chunk failed: %s", p.size, e)
                _emit(p.ticket, e)
                self._prefilling.remove(p)
                self.prefix.unpin(p.entry)
                continue
            p.done += take
            p.entry.ids = np.asarray(p.ticket.request.input_ids[:p.done], dtype=np.int64)  # what a move copies
            self.stats["prompt_tokens"] += take
            self.stats["prefill_chunks"] += 1
            if p.done == p.size:
                started.append((p, logits))
        # lowest row first: each moves to the next running row, at or below its own and above every later one's target
        for p, logits in sorted(started, key=lambda x: x[0].entry.row):
            self._prefilling.remove(p)
            self.prefix.unpin(p.entry)
            self._start(p.ticket, None, logits, at_row=p.entry.row)
        return True

    def _pin_resumed(self, long_resumed: list[tuple], resumed: list[tuple], fresh: int) -> list[tuple]:
        """Requests whose suffix after a retained prefix is longer than a
        chunk: each gets a pinned row above the rows this step's new requests
        take, holding its prefix, and is prefilled in chunks from there
        (``_advance_prefills``). The retained row itself when the request
        continues all of it and nobody else reads it (no copy), else a copy of
        the prefix in a free row. Returns those that find no row: they are
        prefilled whole with the other ``resumed`` ones."""
        everyone = resumed + long_resumed
        floor = len(self._rows) + len(resumed) + fresh  # the rows this step's new requests take
        sources = {item[2].row for item in everyone}
        whole = []
        for item in long_resumed:
            ticket, embeds, entry, tokens = item
            shared = sum(other[2] is entry for other in everyone) > 1
            if entry.row >= floor and tokens == len(entry) and not shared:
                row = entry.row
            else:
                row = self.prefix.free_row(floor, self.static.rows, sources)
                if row is None:
                    whole.append(item)
                    floor += 1  # a row taken at the old floor moves up (_make_room)
                    continue
                self.static.move(entry.row, row, tokens)
            pinned = self.prefix.pin(row, ticket.request.input_ids[:tokens])
            self._prefilling.append(_Prefill(ticket, pinned, embeds, done=tokens, base=tokens))
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens"] += tokens
        return whole

    def _prefill_groups(self, ready: list) -> list[list]:
        """Requests of similar prompt length together, each group padding to
        at most ``prefill_batch_tokens`` tokens (a longer prompt goes alone)."""
        budget = self.options.prefill_batch_tokens
        groups: list[list] = []
        for item in sorted(ready, key=lambda x: x[1].shape[1]):
            n = item[1].shape[1]
            if groups and (len(groups[-1]) + 1) * n <= budget:
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    def _make_room(self, resumed: list[tuple], fresh: int) -> dict[int, int]:
        """Before new requests take rows ``n..``: the first ``len(resumed)``
        go to the requests that continue a retained row (``_resume``), which
        keep theirs in place when it is among them (the first to claim it);
        every other retained row below the rows the new step runs moves up
        (``PrefixIndex.relocate``). Returns the claims: resumed index -> row."""
        n, k = len(self._rows), len(resumed)
        claims: dict[int, int] = {}
        for j, (_, _, entry, _) in enumerate(resumed):
            if n <= entry.row < n + k and entry.row not in claims.values():
                claims[j] = entry.row
        protect = {entry.row for _, _, entry, _ in resumed}
        for src, dst, length in self.prefix.relocate(n + k + fresh, self.static.rows, set(claims.values()), protect):
            self.static.move(src, dst, length)
        self._requeue_lost_prefills()
        return claims

    def _requeue_lost_prefills(self) -> None:
        """Long prompts whose rows had nowhere to go (every row above the
        running ones taken or about to be read) start over, first in line."""
        lost = [p for p in self._prefilling if p.entry.row < 0]
        if lost:
            self.stats["prefill_restarts"] = self.stats.get("prefill_restarts", 0) + len(lost)
            self._prefilling = [p for p in self._prefilling if p.entry.row >= 0]
            with self._cond:
                self._pending.extendleft(reversed([p.ticket for p in lost]))

    def _resume(self, resumed: list[tuple], claims: dict[int, int]) -> None:
        """Requests whose prompts start with a retained row's columns: each
        takes one of the next free rows (its source row itself when
        ``_make_room`` let it claim that, else a copy of the source's
        prefix), then every one's remaining tokens run through the static
        cache together (``StaticDecoder.prefill``). Copies first: a copy never
        lands on a row another request reads (every source among the new
        rows is claimed)."""
        n, k = len(self._rows), len(resumed)
        dest = dict(claims)
        free = iter(sorted(set(range(n, n + k)) - set(dest.values())))
        for j in range(k):
            if j not in dest:
                dest[j] = next(free)
                self.static.move(resumed[j][2].row, dest[j], resumed[j][3])
        order = sorted(range(k), key=dest.__getitem__)
        try:
            logits = self.static.prefill(n, [resumed[j][1] for j in order], [resumed[j][3] for j in order])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: these requests fail
            log.warning("prefill of %d request(s) after their cached prefixes failed: %s", k, e)
            for j in order:
                _emit(resumed[j][0], e)
            return
        for i, j in enumerate(order):
            ticket, embeds, _, reused = resumed[j]
            self.stats["prompt_tokens"] += embeds.shape[0]
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens"] += reused
            self._start(ticket, None, logits[i:i + 1], at_row=n + i)

    def _prefill(self, group: list) -> list[tuple]:
        """Prompts (embedded) through the model in one forward pass, right-
        padded to the longest: padding comes after every real token, so causal
        attention gives each row what it gets alone. Per request: its KV cache
        (a view of its row's real columns) and the logits of its last token."""
        if len(group) == 1:
            ticket, embeds = group[0]
            cache = self._cache_class()
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1,
                                 **{self._cache_arg: cache})
            self.stats["prompt_tokens"] += embeds.shape[1]
            return [(ticket, cache, out.logits[:, -1])]
        lengths = [e.shape[1] for _, e in group]
        width, first = max(lengths), group[0][1]
        embeds = first.new_zeros(len(group), width, first.shape[-1])
        mask = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for i, (_, e) in enumerate(group):
            embeds[i, : lengths[i]] = e[0]
            mask[i, : lengths[i]] = 1
        keep = sorted({n - 1 for n in lengths})  # only the last positions' logits
        cache = self._cache_class()
        out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                             logits_to_keep=torch.tensor(keep, device=self.device), **{self._cache_arg: cache})
        self.stats["batched_prefills"] = self.stats.get("batched_prefills", 0) + 1
        self.stats["prompt_tokens"] += sum(lengths)
        return [(ticket, _RowCache(cache, i, n), out.logits[i, keep.index(n - 1)].unsqueeze(0))
                for i, ((ticket, _), n) in enumerate(zip(group, lengths))]

    def _start(self, ticket: Ticket, cache, logits: torch.Tensor, at_row: int | None = None) -> None:
        """A prefilled request: its first token, then a row unless it is done.
        ``at_row``: its keys and values are in that static cache row already
        (``cache`` is None), at or after the next free one."""
        try:
            tokens, infos = self._sample(logits, [ticket.request], [0], [[]])
        except Exception as e:  # noqa: BLE001
            _emit(ticket, e)
            return
        token = tokens[0]
        self.stats["prefills"] += 1
        row = _Row(ticket, position=len(ticket.request.input_ids), last=token)
        self._deliver(row, token, infos[0])
        if row.done or ticket.cancelled:
            return
        if at_row is None:
            self._join(row, cache)
            return
        if at_row != len(self._rows):  # a request before it left at its first token, or a chunked prompt's row
            self.static.move(at_row, len(self._rows), row.position)
        self._rows.append(row)

    def _decode(self) -> tuple[list[int], list]:
        rows = self._rows
        if self.static is not None:
            logits = self.static.decode([r.last for r in rows], [r.position for r in rows])
        else:
            ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)
            positions = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=self.device)
            mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
            out = self.model.llm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{self._cache_arg: self._cache})
            self._mask = mask
            logits = out.logits[:, -1]
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        return self._sample(logits, [r.ticket.request for r in rows], [r.generated for r in rows],
                            [r.tokens for r in rows])

    def _deliver(self, row: _Row, token: int, info: TokenLogprob | None = None) -> None:
        req = row.ticket.request
        if req.constraint is not None and req.constraint.error is not None:  # the masks prevent it; said if not
            from .grammar import FormatError

            row.done = True
            _emit(row.ticket, FormatError(req.constraint.error))
            return
        self.stats["tokens"] += 1
        row.tokens.append(token)
        _emit(row.ticket, [token if info is None else info])
        if token in self.stop_ids or row.generated >= req.max_new_tokens:
            row.done = True
            _emit(row.ticket, DONE)

    # ------------------------------------------------------------- sampling
    def _sample(self, logits: torch.Tensor, reqs: list[GenerationRequest], generated: list[int],
                answers: list[list[int]]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next token per row with the processors ``generate`` applies:
        image slots suppressed, stop ids suppressed before ``min_new_tokens``,
        (the log-probabilities of the rows that asked, taken here), the
        penalties (``answers``: each row's tokens so far), a response
        format's mask, then greedy, or temperature + top-p sampling: with the
        global generator in one draw, and a row with a ``seed`` with its own
        generator, so its draws do not depend on the other rows. Returns the
        tokens, and per row its :class:`TokenLogprob` or None."""
        scores = logits.to(torch.float32, copy=True)
        if len(self.suppress_ids):
            scores[:, self._suppress_tensor] = -float("inf")
        early = [i for i, (q, n) in enumerate(zip(reqs, generated))
                 if n < q.min_new_tokens and q.constraint is None]  # a format decides where its answer ends
        if early and len(self.stop_ids):
            rows = torch.tensor(early, device=scores.device)
            scores[rows.unsqueeze(1), self._stop_tensor.unsqueeze(0)] = -float("inf")
        rated = [i for i, q in enumerate(reqs) if q.logprobs is not None]
        logprobs = torch.log_softmax(scores[rated], dim=-1) if rated else None
        penalised = [i for i, q in enumerate(reqs) if q.penalised]
        if penalised:
            penalise(scores, penalised, [reqs[i] for i in penalised], [reqs[i].prior + answers[i] for i in penalised])
        constrained = [i for i, q in enumerate(reqs) if q.constraint is not None]
        if constrained:
            self._mask_to_formats(scores, reqs, constrained)
        tokens = scores.argmax(dim=-1)
        sampled = [i for i, q in enumerate(reqs) if q.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=scores.device)
            temps = torch.tensor([reqs[i].temperature for i in sampled], device=scores.device).unsqueeze(1)
            top_p = torch.tensor([reqs[i].top_p for i in sampled], device=scores.device).unsqueeze(1)
            probs = sampling_probabilities(scores[idx], temps, top_p)
            seeded = [j for j, i in enumerate(sampled) if reqs[i].seed is not None]
            if len(seeded) < len(sampled):
                tokens[idx] = torch.multinomial(probs, num_samples=1).squeeze(1)
            for j in seeded:
                tokens[sampled[j]] = torch.multinomial(probs[j], 1, generator=reqs[sampled[j]].rng(probs.device))[0]
        out = tokens.tolist()
        for i in constrained:  # the grammar moves on (an error, if any, ends that answer in _deliver)
            reqs[i].constraint.accept(out[i])
        infos: list[TokenLogprob | None] = [None] * len(reqs)
        if rated:
            infos_for = rate(logprobs, [out[i] for i in rated], [reqs[i].logprobs for i in rated])
            for i, info in zip(rated, infos_for):
                infos[i] = info
        return out, infos

    def _mask_to_formats(self, scores: torch.Tensor, reqs: list[GenerationRequest], rows: list[int]) -> None:
        """Rows with a response format: every token their grammar does not allow next gets minus infinity."""
        from .grammar import bitmask, mask_scores

        vocab = reqs[rows[0]].constraint.vocab_size
        words = self._format_words
        if words is None or words.shape[0] < len(reqs) or self._format_vocab != vocab:
            words = self._format_words = bitmask(max(len(reqs), self.max_batch_size), vocab)
            self._format_vocab = vocab
        for i in rows:
            reqs[i].constraint.fill(words, i)
        mask_scores(scores, words, rows)

    # ---------------------------------------------------------------- cache
    def _join(self, row: _Row, cache) -> None:
        """Add a prefilled request's cache to the batch, left-padding the
        shorter side to a common length."""
        length = row.position
        if self.static is not None:
            self.static.load(len(self._rows), cache)
            self._rows.append(row)
            return
        if isinstance(cache, _RowCache):  # a row of a batched prefill: its own cache, not views
            own = self._cache_class()
            for i, layer in enumerate(cache.layers):
                own.update(layer.keys.contiguous(), layer.values.contiguous(), i)
            cache = own
        if self._cache is None or not self._rows:
            self._cache = cache
            self._mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        else:
            have = self._mask.shape[1]
            total = max(have, length)
            for mine, new in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, total - have), _pad_left(new.keys, total - length)])
                mine.values = torch.cat([_pad_left(mine.values, total - have), _pad_left(new.values, total - length)])
            old = torch.cat([self._mask.new_zeros(len(self._rows), total - have), self._mask], dim=1)
            one = torch.cat([self._mask.new_zeros(1, total - length), self._mask.new_ones(1, length)], dim=1)
            self._mask = torch.cat([old, one])
        self._rows.append(row)

    def _drop(self, gone: list[_Row]) -> None:
        if not gone:
            return
        ids = {id(r) for r in gone}
        if self.static is not None:
            self._drop_static(ids)
            return
        keep = [i for i, r in enumerate(self._rows) if id(r) not in ids]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask[index]
        start = int(mask.any(dim=0).to(torch.int8).argmax())  # columns before this are padding in every row
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _drop_static(self, gone: set[int]) -> None:
        """Keep the static cache's rows dense: a row past the new count moves
        into each hole a leaving row opens below it."""
        rows = self._rows
        n = len(rows) - sum(id(r) in gone for r in rows)
        if self._prefix_on():
            self._retain([i for i, r in enumerate(rows) if id(r) in gone], n)
        holes = [i for i in range(n) if id(rows[i]) in gone]
        movers = [i for i in range(n, len(rows)) if id(rows[i]) not in gone]
        for hole, mover in zip(holes, movers, strict=True):
            self.static.move(mover, hole, rows[mover].position)
            rows[hole] = rows[mover]
        self._rows = rows[:n]

    def _retain(self, leaving: list[int], n: int) -> None:
        """Keep leaving rows' keys and values for prefix reuse, in place when
        the row stays clear of the ``n`` rows that go on decoding (a bucketed
        step's padding rows write only the last column, which no request
        uses), else copied to a free row above every current one."""
        busy = set(range(len(self._rows)))
        for i in leaving:
            row = self._rows[i]
            length = row.position
            if length < 1 or len(row.tokens) < 1:
                continue
            if i >= n:
                target = i
            else:
                target = self.prefix.free_row(n, self.static.rows, busy)
                if target is None:
                    continue
                self.static.move(i, target, length)
            busy.discard(i)
            self.prefix.add(target, row.ticket.request.input_ids + row.tokens[:-1], row.ticket.request.digests())

    def _reset(self) -> None:
        self._rows, self._prefilling, self._cache, self._mask = [], [], None, None
        if self.prefix is not None:  # a failed step may have written anywhere
            self.prefix.clear(pinned=True)


def cache_kwarg(llm) -> str:
    """The name the causal LM's ``forward`` gives its KV cache argument:
    ``cache`` in recent transformers releases, ``past_key_values`` before (an
    unknown keyword would be swallowed by ``**kwargs`` and the cache left empty)."""
    import inspect

    from models.language import base_causal_lm

    params = inspect.signature(type(base_causal_lm(llm)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _emit(ticket: Ticket, item) -> None:
    try:
        ticket.emit(item)
    except Exception:  # a caller that went away must not stop the loop
        log.debug("could not deliver to a request", exc_info=True)
