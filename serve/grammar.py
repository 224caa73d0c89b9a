"""Structured output: answers held to JSON, or to a JSON schema, token by token.

The chat API's ``response_format`` (``{"type": "json_object"}`` or
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``)
becomes a *format spec*, ``{"type": "json_object"}`` or ``{"type":
"json_schema", "schema": "<the schema as JSON text>"}``, which travels with
the request to the LLM replica. There xgrammar compiles it against the
tokenizer (once per spec: the compiler keeps what it compiled) into a
grammar, and each request gets a :class:`Constraint`: a matcher that says,
before every token, which tokens may come next. The batching loop (and the
``generate`` path, through :class:`GrammarMask`) sets every other token's
score to minus infinity before greedy choice or sampling, then feeds the
chosen token to the matcher. The answer can end (a stop id) only where the
JSON is complete, so an answer that stops is valid JSON, and with a schema,
valid against it; one cut short by ``max_tokens`` is not (finish reason
``length``, as OpenAI's).

Answers are compact: no whitespace beyond one space after ``:`` and ``,``,
so a weak model cannot pad an answer with blank lines until ``max_tokens``;
but one space may come first: a SentencePiece tokenizer (Phi-3's) starts a
text encoded on its own with a word-start mark ("\u2581{"), and a model
tuned on such encodings answers that way. (``models.conversation`` encodes
an answer as Phi-3's chat template does, right after its role's newline,
without the mark.)
``json_object`` is any JSON object.

Tool calls use the same machinery: a request that offers ``tools`` the
model may call gets the spec ``{"type": "structural_tag", "tag": "<JSON
text>"}``, an xgrammar structural tag (``models.tools.structural_tag``)
that holds each call to ``models.tools``'s form and its arguments to the
function's parameter schema, and leaves any other text free (``auto``) or
allows calls only (``required``, or a named function).

The ingress checks a schema with :func:`check_spec` before anything runs, so
an unsupported or malformed schema is a 400 naming the problem, and one that
takes longer than ``limits.max_schema_seconds`` to compile is refused there.
The replica's compile against the tokenizer then costs about what that check
did: with Phi-3's 32,064-token vocabulary, a pattern ``(a|b|c){1,2000}``
took 1.6 s to check and 1.5 s to compile, a 1,500-word enum or 200
properties 0.05-0.08 s to compile, so the ingress's limit bounds the
replica's time too.
"""
from __future__ import annotations

import functools

import torch

from .schema_check import compile_kwargs, message, problem

OBJECT_SCHEMA = '{"type": "object"}'  # json_object: any JSON object


class FormatError(ValueError):
    """A response format that cannot be compiled; the message names the problem."""


def schema_text(spec: dict) -> str:
    """The JSON schema a format spec holds to (JSON text)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return OBJECT_SCHEMA
    if kind == "json_schema" and isinstance(spec.get("schema"), str):
        return spec["schema"]
    raise FormatError(f"not a response format spec: {spec!r}")


def _source(spec: dict) -> tuple[str, str]:
    """(kind, JSON text): ("tag", a structural tag) or ("schema", a JSON schema)."""
    if isinstance(spec, dict) and spec.get("type") == "structural_tag" and isinstance(spec.get("tag"), str):
        return "tag", spec["tag"]
    return "schema", schema_text(spec)


def check_spec(spec: dict, timeout_s: float | None = None) -> None:
    """Raise :class:`FormatError` if xgrammar cannot turn the spec's schema
    into a grammar (unknown types, bad ``$ref``, a bad ``pattern`` ...) or,
    given ``timeout_s``, cannot within that time (``serve.schema_check``
    compiles it in a child process it stops then). Needs no tokenizer: the
    ingress calls it. The last 256 verdicts are kept."""
    found = _problem(*_source(spec), timeout_s)
    if found is not None:
        raise FormatError(found)


@functools.lru_cache(maxsize=256)
def _problem(kind: str, text: str, timeout_s: float | None) -> str | None:
    return problem(kind, text, timeout_s)


def _led(schema: str):
    """The grammar of a JSON schema's compact answers, after an optional space."""
    import xgrammar as xgr

    return xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "?'),
                              xgr.Grammar.from_json_schema(schema, **compile_kwargs()))


class Constraint:
    """One answer's grammar state: which tokens may come next, and the
    tokens accepted so far. ``error`` is set (and the answer must end) if a
    token the grammar does not allow was fed, which the masks prevent."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size  # the bitmask's width
        self.error: str | None = None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        if self.error is None and not self.matcher.accept_token(int(token)):
            self.error = f"token {int(token)} does not continue the answer's response_format"
        return self.error is None

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: the answer is complete."""
        return self.matcher.is_terminated()


class Grammars:
    """An LLM replica's compiler: format specs -> :class:`Constraint`.
    ``vocab_size`` is the model's logits width (the tokenizer's tokens and
    the embedding rows past them, which no grammar allows); answers end at
    ``stop_ids``. Compiled grammars are kept (up to ``cache_mb``), so the
    same schema compiles once per replica."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_ids, cache_mb: int = 64, threads: int = 2):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(set(stop_ids)))
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=True,
                                             cache_limit_bytes=cache_mb * 2**20)
        self._led = functools.lru_cache(maxsize=256)(_led)  # this replica's, gone with it

    def compile(self, spec: dict):
        """The spec's compiled grammar (from the compiler's cache after the first time)."""
        try:  # thread-safe: requests with different schemas compile side by side, a repeated one is a lookup
            kind, text = _source(spec)
            if kind == "tag":
                return self._compiler.compile_structural_tag(text)
            return self._compiler.compile_grammar(self._led(text))
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001
            raise FormatError(message(e)) from None

    def constraint(self, spec: dict, accepted=()) -> Constraint:
        """A fresh constraint for ``spec``, advanced past ``accepted`` (the
        tokens of an answer continued on this replica after another failed)."""
        import xgrammar as xgr

        c = Constraint(xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)
        for i, t in enumerate(accepted):
            if not c.accept(t):
                raise FormatError(f"the answer so far (token {i}) does not follow its response_format")
        return c


def bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask buffer for ``rows`` rows (xgrammar's layout: bit
    ``t % 32`` of word ``t // 32`` set means token ``t`` is allowed)."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


_BITS = {}


def mask_scores(scores: torch.Tensor, words: torch.Tensor, rows: list[int]) -> None:
    """Set ``scores[r, t]`` to minus infinity for every token ``t`` that the
    bitmask's row ``r`` disallows, for ``r`` in ``rows`` (in place; torch
    ops, so the same on any device)."""
    device = scores.device
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, device=device, dtype=torch.int32)
    idx = torch.tensor(rows, device=device)
    w = words[rows].to(device, non_blocking=True)
    allowed = ((w.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :scores.shape[1]]
    if allowed.shape[1] < scores.shape[1]:  # logits wider than the grammar's vocabulary: the rest is never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), scores.shape[1] - allowed.shape[1])], dim=1)
    scores[idx] = scores[idx].masked_fill(~allowed, -float("inf"))


class GrammarMask:
    """A logits processor for ``generate`` (the LLM's per-request path):
    masks each step's scores to what the constraint allows, feeding it the
    token chosen at the step before."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.words = bitmask(1, constraint.vocab_size)
        self._started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._started and not self.constraint.accept(int(input_ids[0, -1])):
            raise FormatError(self.constraint.error)
        self._started = True
        self.constraint.fill(self.words, 0)
        scores = scores.clone()
        mask_scores(scores, self.words, [0])
        return scores

