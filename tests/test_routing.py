"""Chat affinity routing of the LLM deployment (serve.routing).

The key is the same for every turn of a chat and differs between chats; the
router prefers one replica per key, spreads keys over replicas, moves few
keys when a replica comes or goes, gives up its preference for an overloaded
replica, and, in a real Serve application, sends a key's calls to one replica.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from serve.protocol import Message, Part
from serve.routing import ChatAffinityRouter, affinity_key, rank


def user(text: str, image: bytes | None = None) -> Message:
    return Message("user", ([Part("image", data=image)] if image else []) + [Part("text", text=text)])


def test_every_turn_of_a_chat_has_the_key_of_its_opening():
    img = bytes(range(256)) * 400
    turn1 = [user("What is in the picture?", img)]
    turn3 = turn1 + [Message("assistant", [Part("text", text="A red square.")]), user("Why red?"),
                     Message("assistant", [Part("text", text="It is.")]), user("Sure?")]
    key = affinity_key(turn1)
    assert key is not None and affinity_key(turn3) == key
    assert affinity_key([user("What is in the picture?")]) != key  # no image
    other = bytearray(img)
    other[len(img) // 2] ^= 1  # a change the fingerprint does not read: a routing hint only
    assert affinity_key([user("What is in the picture?", bytes(other))]) == key
    other[0] ^= 1
    assert affinity_key([user("What is in the picture?", bytes(other))]) != key
    assert affinity_key([Message("system", [Part("text", text="Be brief.")])] + turn1) != key
    assert affinity_key([Message("system", [Part("text", text="Be brief.")])]) is None


def test_rank_spreads_keys_and_moves_few_when_a_replica_goes():
    replicas = [f"r{i}" for i in range(4)]
    keys = [f"chat-{i}" for i in range(2000)]
    first = {k: rank(k, replicas)[0] for k in keys}
    counts = Counter(first.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 400  # about 500 each
    assert all(rank(k, replicas) == rank(k, list(reversed(replicas))) for k in keys[:50])  # order-free
    after = {k: rank(k, replicas[:3])[0] for k in keys}
    moved = [k for k in keys if after[k] != first[k]]
    assert all(first[k] == "r3" for k in moved)  # only the chats whose replica went away moved


def replica(uid: str):
    from ray.serve._private.common import DeploymentID, ReplicaID

    return SimpleNamespace(replica_id=ReplicaID(uid, DeploymentID(name="LLM", app_name="t")),
                           max_ongoing_requests=48)


def router(threshold: int = 8) -> ChatAffinityRouter:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    r = ChatAffinityRouter(DeploymentID(name="LLM", app_name="t"), DeploymentHandleSource.UNKNOWN,
                           use_replica_queue_len_cache=True)
    r.initialize_state(imbalanced_threshold=threshold)
    return r


def pending(key: str | None):
    return SimpleNamespace(args=[{"input_ids": [1, 2], "affinity_key": key}], kwargs={})


def test_router_prefers_the_keys_replica_unless_its_queue_is_far_longer():
    async def go():
        r = router(threshold=8)
        reps = [replica(f"r{i}") for i in range(3)]
        ranks = await r.choose_replicas(reps, pending("chat-a"))
        want = rank("chat-a", ["r0", "r1", "r2"])
        assert [[x.replica_id.unique_id for x in rk] for rk in ranks] == [want[:1], want[1:]]
        assert await r.choose_replicas(reps, pending("chat-a")) == ranks  # the same every time
        preferred = next(x for x in reps if x.replica_id.unique_id == want[0])
        for x in reps:
            r.replica_queue_len_cache.update(x.replica_id, 3)
        r.replica_queue_len_cache.update(preferred.replica_id, 10)  # 7 longer: still preferred
        assert (await r.choose_replicas(reps, pending("chat-a")))[0] == [preferred]
        r.replica_queue_len_cache.update(preferred.replica_id, 11)  # 8 longer: the least loaded of all
        assert await r.choose_replicas(reps, pending("chat-a")) == [reps]
        no_key = await r.choose_replicas(reps, pending(None))  # power of two choices
        assert len(no_key) == 1 and len(no_key[0]) == 2
        assert await r.choose_replicas([], pending("chat-a")) == []
        with pytest.raises(ValueError, match="imbalanced_threshold"):
            r.initialize_state(imbalanced_threshold=0)

    asyncio.run(go())


def test_a_serve_deployment_sends_a_keys_calls_to_one_replica():
    """Three replicas of a deployment that answers with its replica id, behind
    the router as the LLM's and the ImageEncoder's configs name it: the key in
    a request dict (``LLM.generate``) or a keyword (``ImageEncoder.encode``),
    one call after another or all at once."""
    import ray
    from ray import serve

    from serve.deployments import AFFINITY_ROUTER

    # room for every call at once: a replica at max_ongoing_requests (Serve's default is 5) is
    # passed over for the next in rank, which is backpressure, not the routing checked here
    @serve.deployment(num_replicas=3, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1},
                      request_router_config=AFFINITY_ROUTER)
    class Who:
        def generate(self, request: dict) -> str:
            return serve.get_replica_context().replica_id.unique_id

        def encode(self, data: bytes, affinity_key: str | None = None) -> str:
            return serve.get_replica_context().replica_id.unique_id

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Front:
        def __init__(self, who):
            self.who = who

        async def __call__(self, keys: list[str | None], kwarg: bool = False, together: bool = False) -> list[str]:
            if together:  # at once, as the ingress encodes a request's images and asks for its n answers
                import asyncio

                return list(await asyncio.gather(*[self.who.encode.remote(b"image", affinity_key=k) for k in keys]))
            if kwarg:
                return [await self.who.encode.remote(b"image", affinity_key=k) for k in keys]
            return [await self.who.generate.remote({"input_ids": [1], "affinity_key": k}) for k in keys]

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        handle = serve.run(Front.bind(Who.bind()), name="affinity", route_prefix=None)
        keys = [f"chat-{i}" for i in range(12)]
        first = handle.remote(keys).result(timeout_s=120)
        again = handle.remote(keys * 2).result(timeout_s=120)
        assert again == first * 2  # every call of a chat went where its first did
        assert len(set(first)) >= 2  # and chats spread over the replicas
        assert handle.remote(keys * 2, kwarg=True).result(timeout_s=120) == first * 2  # a keyword key ranks alike
        # calls made at once while serving one request share Serve's internal request id: each is routed
        assert handle.remote(keys, together=True).result(timeout_s=60) == first
        assert len(set(handle.remote([None] * 30).result(timeout_s=120))) >= 2
    finally:
        serve.shutdown()
        ray.shutdown()
