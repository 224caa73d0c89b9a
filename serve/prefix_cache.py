"""Prefix reuse for the static KV cache: a finished request's keys and
values stay in a free row, and a later request that starts with the same
tokens (and the same images) prefills only what follows them.

A chat sends its whole history every turn: the system prompt, each earlier
question (with its image's 576 placeholder tokens at 336 px) and each answer,
then the new question. Without reuse every turn prefills all of it again.
With it, the next turn of a conversation finds the row its previous turn
left, copies the longest common prefix and runs the model over the new
tokens only.

Where the rows live. The static cache keeps its running rows dense
(``0..n-1``); a decoding step padded to a row bucket (CUDA graphs) writes
its padding rows ``n..b-1`` only at the last column, which no request uses.
A retained row therefore sits anywhere at or above ``n``: a row that
finishes there stays where it is (no copy), one below it is copied to a free
row above the current rows first (its place is about to be taken by the last
running row).
When the running rows grow into retained rows, those move up to free rows
(the most recently used first) unless a new request continues one in place;
when no row is free, the least recently used retained row makes room. Retention
takes no memory the cache does not have already: it lives in rows that no
request is using.

What a row may be reused for. The key is the token ids the row holds (the
prompt and every generated token but the last, which was never fed) and, for
each image, a digest of its features: a placeholder token says nothing about
the picture. The reusable prefix is the longest common prefix of the token
ids, cut back to the start of the first image whose features differ, or
whose placeholders the prefix only partly covers, and to one token short of
the whole prompt (the last prompt token's logits give the first answer
token). Prefixes shorter than ``MIN_TOKENS`` are prefilled with the rest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

MIN_TOKENS = 16  # shorter common prefixes are not worth a prefill of their own


def feature_digests(features) -> tuple[bytes, ...]:
    """One 128-bit BLAKE2b digest per image of ``features`` (images, tokens, dim)."""
    if features is None:
        return ()
    a = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    if a.ndim == 2:
        a = a[None]
    return tuple(hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest() for img in a)


@dataclass
class Retained:
    row: int
    ids: np.ndarray  # int64: the tokens whose keys and values columns 0..len-1 hold
    images: tuple[bytes, ...]  # digests of the images whose placeholders are among ids, in order
    used: int = 0  # the index's clock at the last use
    pinned: bool = False  # a long prompt's row being prefilled in chunks: moved when in the way, never forgotten

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Match:
    entry: Retained
    tokens: int  # columns 0..tokens-1 of entry.row serve the new request
    images: int  # images whose placeholders lie within those columns


@dataclass
class PrefixIndex:
    """The retained rows of one static cache, and the prefix lookup."""

    image_id: int
    image_tokens: int  # placeholders per image
    entries: dict[int, Retained] = field(default_factory=dict)  # row -> entry
    clock: int = 0

    def __len__(self) -> int:
        """Retained rows (pinned ones apart)."""
        return sum(not e.pinned for e in self.entries.values())

    def clear(self, pinned: bool = False) -> None:
        """Forget the retained rows; the pinned ones too with ``pinned``."""
        for r, e in list(self.entries.items()):
            if pinned or not e.pinned:
                del self.entries[r]

    def pin(self, row: int, ids=()) -> Retained:
        """Reserve ``row`` (at or above the running rows, not pinned) for a
        prompt prefilled in chunks, whose first ``ids`` its columns hold
        already (a kept prefix); a retained entry there is replaced. ``unpin``
        releases it."""
        assert not getattr(self.entries.get(row), "pinned", False), row
        entry = Retained(row, np.asarray(ids, dtype=np.int64), (), self.clock, pinned=True)
        self.entries[row] = entry
        return entry

    def unpin(self, entry: Retained) -> None:
        if self.entries.get(entry.row) is entry:
            del self.entries[entry.row]

    def match(self, ids: list[int], images: tuple[bytes, ...]) -> Match | None:
        """The retained row sharing the longest usable prefix with a request's
        ``ids`` (``images``: its images' digests), if that prefix has at least
        ``MIN_TOKENS`` tokens."""
        if not self.entries:
            return None
        want = np.asarray(ids, dtype=np.int64)
        best: Match | None = None
        for e in self.entries.values():
            if e.pinned:
                continue
            n = min(len(e.ids), len(want) - 1)
            if n < MIN_TOKENS or (best is not None and n <= best.tokens):
                continue
            diff = np.flatnonzero(e.ids[:n] != want[:n])
            common = int(diff[0]) if len(diff) else n
            tokens, n_img = self._cut(want, common, images, e.images)
            if tokens >= MIN_TOKENS and (best is None or tokens > best.tokens):
                best = Match(e, tokens, n_img)
        if best is not None:
            self.clock += 1
            best.entry.used = self.clock
        return best

    def _cut(self, ids: np.ndarray, common: int, mine: tuple, theirs: tuple) -> tuple[int, int]:
        """``common`` cut back so that it covers whole images only, and only
        images both sides share; with the count of those images."""
        slots = np.flatnonzero(ids[:common] == self.image_id)
        whole = len(slots) // self.image_tokens
        same = 0
        while same < whole and same < len(mine) and same < len(theirs) and mine[same] == theirs[same]:
            same += 1
        if same * self.image_tokens < len(slots):  # the prefix ends inside, or before a differing, image
            common = int(slots[same * self.image_tokens])
        return common, same

    def relocate(self, floor: int, rows: int, keep: set[int], protect: set[int],
                 stay: frozenset[int] = frozenset()) -> list[tuple[int, int, int]]:
        """Make rows below ``floor`` free for running requests. Entries at rows
        in ``keep`` leave the index (requests continue them in place); every
        other entry below ``floor`` moves to a free row at or above it, the
        most recently used first, taking the row of a less recently used
        entry there when none is free (never one in ``protect``: rows that
        requests are about to copy from), or is forgotten (a pinned one's
        ``row`` set to -1). Pinned entries move first, taking any unpinned
        entry's row when none is free. The copies to make, in order:
        ``(source row, target row, columns)``. Entries at rows in ``stay``
        (pinned rows about to join the running ones) stay where they are."""
        for r in keep:
            self.entries.pop(r, None)
        low = sorted((e for e in self.entries.values() if e.row < floor and e.row not in stay),
                     key=lambda e: (e.pinned, e.used), reverse=True)
        for e in low:
            del self.entries[e.row]
        free = [r for r in range(rows - 1, floor - 1, -1) if r not in self.entries]
        moves = []
        for e in low:
            if free:
                target = free.pop(0)
            else:
                older = [x for x in self.entries.values() if not x.pinned and x.row not in protect
                         and (e.pinned or x.used < e.used)]
                if not older:  # forgotten: its columns stay readable until a running row takes them
                    if e.pinned:  # its prompt starts over (the batcher requeues it)
                        e.row = -1
                    continue
                target = min(older, key=lambda x: x.used).row
                del self.entries[target]
            moves.append((e.row, target, len(e)))
            e.row = target
            self.entries[target] = e
        return moves

    def swap_rows(self, a: int, b: int) -> None:
        """The entries at rows ``a`` and ``b`` trade places (after their rows' contents did)."""
        ea, eb = self.entries.pop(a, None), self.entries.pop(b, None)
        for e, row in ((ea, b), (eb, a)):
            if e is not None:
                e.row = row
                self.entries[row] = e

    def free_row(self, floor: int, rows: int, busy: set[int]) -> int | None:
        """A row at or above ``floor`` that neither a running request (``busy``)
        nor a retained one holds; else the least recently used retained row
        there (forgotten now); None when there is no row above ``floor``."""
        for r in range(rows - 1, floor - 1, -1):
            if r not in self.entries and r not in busy:
                return r
        mine = [e for e in self.entries.values() if e.row >= floor and e.row not in busy and not e.pinned]
        if not mine:
            return None
        oldest = min(mine, key=lambda e: e.used)
        del self.entries[oldest.row]
        return oldest.row

    def add(self, row: int, ids: list[int], images: tuple[bytes, ...]) -> Retained:
        """Retain ``row`` holding ``ids``; an entry whose tokens and images
        are a prefix of these is forgotten (this one serves every request it
        would)."""
        a = np.asarray(ids, dtype=np.int64)
        n_img = int((a == self.image_id).sum()) // self.image_tokens
        images = tuple(images[:n_img])
        for r, e in list(self.entries.items()):
            if (r != row and not e.pinned and len(e) <= len(a) and e.images == images[:len(e.images)]
                    and np.array_equal(e.ids, a[:len(e)])):
                del self.entries[r]
        self.clock += 1
        entry = self.entries[row] = Retained(row, a, images, self.clock)
        return entry
