"""CLIP features of recently seen images, kept by the ingress and by the
ImageEncoder replicas.

A chat about an image sends that image again with every turn (the API is
stateless: each request carries the whole history, and the Gradio page does
the same). Without a cache each turn decodes and encodes it again, a round
trip to the ImageEncoder deployment and back with features of 2.4 MB
(ViT-L/14-336). Each ingress replica keeps the features of the images it saw
last, keyed by a hash of the image's bytes, up to ``image_cache_mb`` of them.
The HTTP proxy spreads a chat's turns over the ingress replicas, though, so
the ImageEncoder keeps features too (``encoder_cache_mb``): the ingress sends
each image with that hash as its ``affinity_key``, and the encoder's request
router (``serve.routing``) sends every call for one image to the same
replica, whichever ingress replica makes it. A hit there skips decoding and
encoding; only the features travel.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np


class FeatureCache:
    """Least recently used features by image content, bounded in bytes (0:
    keeps nothing). Stored arrays are read-only: a caller that would change
    one fails instead of changing what the next turn gets."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0
        self._making: dict[bytes, asyncio.Future] = {}  # features being made now, by key (``fetch``)

    @staticmethod
    def key(data: bytes) -> bytes:
        """The image's identity: a 128-bit BLAKE2b digest of its bytes."""
        return hashlib.blake2b(data, digest_size=16).digest()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: bytes, arr: np.ndarray) -> np.ndarray:
        """Keep a read-only copy of ``arr``, dropping the least recently used
        entries to stay within the bound; returns what is kept (``arr``
        itself when it does not fit). A copy, because an array that arrived
        through Ray's object store would otherwise hold its buffer there."""
        if arr.nbytes > self.max_bytes:
            return arr
        arr = np.array(arr, copy=True)
        arr.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = arr
            self.bytes += arr.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes
        return arr

    def fetch(self, key: bytes, make: Callable[[], Awaitable[np.ndarray]]) -> tuple[Awaitable[np.ndarray], bool]:
        """The features under ``key`` (to await) and whether they are a hit:
        the kept ones, else those of the ``make()`` another caller started for
        the same key (a hit: one encoding serves both), else ``make()``'s,
        kept. The encoding runs in a task of its own, so a caller that goes
        away does not cancel it for the others; one that fails is not kept,
        and every caller waiting for it gets its error. Call it from the event
        loop that runs the encodings."""
        arr = self.get(key)
        if arr is not None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(arr)
            return done, True
        task = self._making.get(key)
        hit = task is not None
        if hit:  # get() counted a miss: it is a hit
            with self._lock:
                self.misses, self.hits = self.misses - 1, self.hits + 1
        else:
            task = self._making[key] = asyncio.ensure_future(self._make_and_keep(key, make))
            task.add_done_callback(lambda t, key=key: self._made(key, t))
        return asyncio.shield(task), hit

    async def _make_and_keep(self, key: bytes, make: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
        return self.put(key, await make())

    def _made(self, key: bytes, task: asyncio.Future) -> None:
        """A ``make`` ended: later callers find its features kept (or make them again after a failure)."""
        if self._making.get(key) is task:
            del self._making[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody waits for any more is not reported as lost

    @property
    def making(self) -> int:
        """Encodings in flight."""
        return len(self._making)
