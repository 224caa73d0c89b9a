"""Log-probabilities of an answer's tokens (the chat API's ``logprobs`` and
``top_logprobs``).

The LLM replica computes, for each token it emits to a request that asked,
the log-softmax of the model's scores over the tokens an answer may hold
(the image placeholder, the embedding rows past the tokenizer and, before
``min_tokens``, the stop ids left out), before penalties, a response
format's mask, temperature and top_p, as the model itself rates the token;
and the ``top_logprobs`` most likely tokens' (``serve.sampling``). The
ingress turns ids into OpenAI's entries here: each token's text and exact
bytes (a token may hold part of a UTF-8 character: the bytes of consecutive
tokens join into the answer's text).
"""
from __future__ import annotations

import functools
import re

FLOOR = -9999.0  # what OpenAI reports for a token the model rules out (JSON has no -Infinity)
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenBytes:
    """Token id -> the bytes it stands for in decoded text, for byte-level
    BPE tokenizers (GPT-2's alphabet, the tiny preset's) and SentencePiece
    ones with byte fallback (Phi-3's: ``▁`` for a space, ``<0x0A>`` tokens)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        decoder = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        if self.byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._unbyte = {c: b for b, c in bytes_to_unicode().items()}
        self._special = {t.content for t in hf_tokenizer.added_tokens_decoder.values()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per ingress replica, kept for its life
    def __call__(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if piece in self._special:
            return piece.encode("utf-8")
        if self.byte_level:
            if all(c in self._unbyte for c in piece):
                return bytes(self._unbyte[c] for c in piece)
            return piece.encode("utf-8")
        m = _SP_BYTE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")


def _value(logprob: float) -> float:
    return max(float(logprob), FLOOR)


def entry(token_bytes: TokenBytes, token: int, logprob: float, top: list) -> dict:
    """One token's entry in OpenAI's ``logprobs.content``: ``top`` is
    ``[[id, logprob], ...]``, most likely first."""
    def one(t: int, lp: float) -> dict:
        b = token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": _value(lp), "bytes": list(b)}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}
