"""What the LLM does with a decoding step's scores besides the model:
OpenAI's penalties and logit bias, nucleus filtering, sampling with a
request's own generator, and the log-probabilities a request asked for.

The batching loop (``serve.batching``) applies them to all its rows at once;
the logits processors here (``Penalties``, ``SeededSampler``,
``LogprobRecorder``) do the same for one request through ``generate`` (the
LLM deployment's per-request path), so both paths give the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .batching import GenerationRequest


@dataclass
class TokenLogprob:
    """What a request that asked for logprobs receives in place of a bare
    token id: the id, its log-probability (``serve.logprobs`` says of what)
    and the ``logprobs`` most likely tokens' as ``[id, logprob]``, most likely first."""
    token: int
    logprob: float
    top: list


def rate(logprobs: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its ``tops[j]`` most
    likely tokens' (one top-k for all rows, then cut per row)."""
    picked = torch.tensor(tokens, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, picked).squeeze(1).tolist()
    k = min(max(tops), logprobs.shape[1])
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (None, None)
    top_v = top_v.tolist() if k else None
    top_i = top_i.tolist() if k else None
    return [TokenLogprob(t, lp, [[i, v] for i, v in zip(top_i[j][:n], top_v[j][:n])] if n else [])
            for j, (t, lp, n) in enumerate(zip(tokens, chosen, tops))]


class LogprobRecorder:
    """A logits processor for ``generate`` (the LLM's per-request path),
    first of the deployment's own: keeps the step's log-probabilities (the
    scores as ``generate``'s suppression and ``min_new_tokens`` left them,
    as the batching loop takes them) for the streamer to pair with the
    token chosen, and changes nothing."""

    def __init__(self, top: int):
        self.top = top
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def rate(self, token: int) -> TokenLogprob:
        return rate(self.logprobs, [token], [self.top])[0]


def penalise(scores: torch.Tensor, rows: list[int], reqs: list[GenerationRequest], answers: list[list[int]]) -> None:
    """OpenAI's frequency and presence penalties and logit bias, in place:
    row ``rows[j]``'s score of token ``t`` loses ``frequency_penalty x c +
    presence_penalty x (c > 0)``, ``c`` the count of ``t`` in ``answers[j]``
    (the answer so far, never the prompt), and gains ``logit_bias[t]``."""
    biased = [(j, q.logit_bias) for j, q in enumerate(reqs) if q.logit_bias]
    if biased:
        which = torch.tensor([rows[j] for j, b in biased for _ in b], device=scores.device)
        tokens = torch.tensor([t for _, b in biased for t in b], dtype=torch.long, device=scores.device)
        values = torch.tensor([v for _, b in biased for v in b.values()], device=scores.device)
        scores.index_put_((which, tokens), values, accumulate=True)
    if not any(q.frequency_penalty or q.presence_penalty for q in reqs):
        return
    counts = scores.new_zeros(len(rows), scores.shape[1])
    lengths = [len(a) for a in answers]
    if sum(lengths):
        which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths)).to(scores.device)
        tokens = torch.tensor([t for a in answers for t in a], dtype=torch.long, device=scores.device)
        counts.index_put_((which, tokens), torch.ones_like(tokens, dtype=counts.dtype), accumulate=True)
    freq = torch.tensor([q.frequency_penalty for q in reqs], device=scores.device).unsqueeze(1)
    pres = torch.tensor([q.presence_penalty for q in reqs], device=scores.device).unsqueeze(1)
    idx = torch.tensor(rows, device=scores.device)
    scores[idx] -= freq * counts + pres * (counts > 0).to(counts.dtype)


class Penalties:
    """A logits processor for ``generate`` (the LLM's per-request path) that
    applies a request's penalties and logit bias as the batching loop does. The answer so
    far is the request's ``prior`` and then ``input_ids`` after its first
    ``prompt_ids`` columns: 0 for ``MultimodalPhi3.generate``, which passes
    the prompt as embeddings, so ``generate`` hands its processors the new
    tokens only."""

    def __init__(self, request: GenerationRequest, prompt_ids: int = 0):
        self.request = request
        self.start = prompt_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float().clone()
        penalise(scores, [0], [self.request], [self.request.prior + input_ids[0, self.start:].tolist()])
        return scores


def top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering with per-row ``top_p`` (rows, 1), as Hugging Face's
    ``TopPLogitsWarper``: keep the smallest set of most likely tokens whose
    probability reaches ``top_p``, and always the most likely one."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def sampling_probabilities(scores: torch.Tensor, temperature, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution a row's token is drawn from: its scores over
    ``temperature`` (a number, or one per row as (rows, 1)), nucleus-filtered
    to ``top_p`` (rows, 1). The batching loop and ``SeededSampler`` both
    draw from it, so a seeded request gets the same tokens on either path."""
    return torch.softmax(top_p_filter(scores / temperature, top_p), dim=-1)


class SeededSampler:
    """A logits processor for ``generate`` that samples one token per step
    with a request's own generator (temperature, then top-p, as the batching
    loop does) and leaves only that token's score finite, so greedy search
    picks it: ``generate``'s own sampling draws from the global generator,
    which every thread of the replica shares."""

    def __init__(self, request: GenerationRequest):
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        req = self.request
        top_p = torch.full((scores.shape[0], 1), req.top_p, device=scores.device)
        probs = sampling_probabilities(scores.float(), req.temperature, top_p)
        picked = torch.multinomial(probs, 1, generator=req.rng(scores.device))
        return torch.full_like(scores, -float("inf")).scatter_(1, picked, 0.0)
