"""CLIP features of recently seen images, kept by the ingress.

A chat about an image sends that image again with every turn (the API is
stateless: each request carries the whole history, and the Gradio page does
the same). Without a cache each turn decodes and encodes it again, a round
trip to the ImageEncoder deployment and back with features of 2.4 MB
(ViT-L/14-336). The ingress keeps the features of the images it saw last,
keyed by a hash of the image's bytes, up to ``image_cache_mb`` of them.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

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
