"""Affinity routing: the turns of one conversation go to the same LLM
replica, and every request for one image to the same ImageEncoder replica.

Each LLM replica keeps the rows of finished requests for prefix reuse
(``serve.prefix_cache``), so a chat's next turn prefills only its new tokens
there, and everything again anywhere else. Serve's default router picks the
less loaded of two random replicas, which sends a chat's turns over all of
them: with ``n`` replicas about ``1/n`` of the follow-ups would find their row.

:class:`ChatAffinityRouter` is the LLM deployment's request router
(``request_router_config`` in ``serve/config.yaml``). The ingress labels each
call with an ``affinity_key``, a digest of the conversation's opening (the
system prompt and the first user message, its images by a fingerprint of
their bytes), the same for every turn of a chat. Replicas are ranked by
rendezvous hashing of that key: the first, if it has room, takes the
request, else the others by queue length, as Serve does. A replica whose
queue is longer than the shortest by ``imbalanced_threshold`` requests or
more loses its preference, so that many chats that open the same way ("Hi")
cannot pile up on one replica. Requests without a key go to the less loaded
of two random replicas. Adding or removing a replica moves only the chats
whose first choice it is (rendezvous hashing), about ``1/n`` of them.

The ImageEncoder deployment uses the same router: there the key is a hash of
the image's bytes (the ``affinity_key`` keyword of ``encode``), so the
replica that keeps an image's features (``encoder_cache_mb``) gets every
request for it, from any ingress replica.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

FINGERPRINT_BYTES = 4096  # of each end of an image or audio clip: the key is a routing hint, not an identity


def affinity_key(messages: list) -> str | None:
    """A digest of a conversation's opening: its messages up to and including
    the first user message (``serve.protocol.Message`` objects), or None when
    there is no user message."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(m.role.encode() + b"\x00")
        for p in m.parts:
            h.update(p.kind.encode() + b"\x00")
            if p.kind == "text":
                h.update(p.text.encode("utf-8", "surrogatepass"))
            else:
                data = p.data or (p.url or "").encode()
                h.update(len(data).to_bytes(8, "little") + data[:FINGERPRINT_BYTES] + data[-FINGERPRINT_BYTES:])
            h.update(b"\x01")
        if m.role == "user":
            return h.hexdigest()
    return None


def request_key(pending: PendingRequest | None) -> str | None:
    """The ``affinity_key`` of a call: a keyword argument (``ImageEncoder.encode``),
    or a key of its first argument when that is a dict (``LLM.generate``'s request)."""
    if pending is None:
        return None
    if pending.kwargs and pending.kwargs.get("affinity_key") is not None:
        return pending.kwargs["affinity_key"]
    arg: Any = pending.args[0] if pending.args else None
    return arg.get("affinity_key") if isinstance(arg, dict) else None


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` in the order of preference for ``key`` (rendezvous hashing)."""
    def score(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


class ChatAffinityRouter(RequestRouter):
    """Rendezvous hashing on the request's ``affinity_key``, with a load check."""

    def initialize_state(self, imbalanced_threshold: int = 8, **kwargs) -> None:
        if isinstance(imbalanced_threshold, bool) or not isinstance(imbalanced_threshold, int) \
                or imbalanced_threshold < 1:
            raise ValueError(f"imbalanced_threshold must be a positive integer, got {imbalanced_threshold!r}")
        self.imbalanced_threshold = imbalanced_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = request_key(pending_request)
        if key is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[rid] for rid in rank(key, list(by_id))]
        if self._imbalanced(order[0], candidate_replicas):
            return [candidate_replicas]  # the least loaded of all
        return [order[:1], order[1:]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give ``replica`` to the pending call being routed. Serve's base
        router finds that call by its ``internal_request_id``, which every call
        a replica makes while serving one request shares (Serve copies it from
        the request's context: the ingress encodes a request's images at once,
        and asks for its ``n`` answers at once). Its index keeps the first
        such call only, so the others would never be given a replica and their
        routing tasks would spin, blocking the handle's event loop. Each call
        has metadata of its own, though (the routing task passes the very
        object): the call is found by it, so each goes where its own key sent
        it. This overrides a private method of Serve's router (Ray 2.60) and
        reads its pending queue: ``tests/test_routing.py`` sends such calls
        at once, and fails (a time-out) if an upgrade changes them."""
        pending = self._get_pending_request_matching_internal_request_id(request_metadata)
        if pending is None or pending.metadata is not request_metadata:  # not indexed, or a sibling call's
            pending = next((pr for pr in self._pending_requests_to_fulfill
                            if pr.metadata is request_metadata and not pr.future.done()), None)
        if pending is None:
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    def _imbalanced(self, first: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """Whether ``first``'s known queue is ``imbalanced_threshold`` longer than the shortest known one."""
        cache = self.replica_queue_len_cache
        lens = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        mine = lens.get(first.replica_id)
        known = [v for v in lens.values() if v is not None]
        return mine is not None and bool(known) and mine - min(known) >= self.imbalanced_threshold
