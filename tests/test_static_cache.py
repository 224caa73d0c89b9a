"""The static KV cache (serve.static_cache): its decoding step against the
Hugging Face forward pass, its sizing, and how the batcher falls back.

The tiny preset in fp32 on CPU: CUDA graphs cannot be captured here, but the
padded bucket shapes they replay are run eagerly (``bucketed``).
"""
from __future__ import annotations

import time

import pytest
import torch

from serve.batching import BatchingOptions, ContinuousBatcher, GenerationRequest
from serve.static_cache import StaticDecoder, _buckets, plan_cache


@pytest.fixture(scope="module")
def llm(tiny_model):
    return tiny_model.llm


def prefill(llm, ids: list[int]):
    from transformers import DynamicCache

    from serve.batching import cache_kwarg

    cache = DynamicCache()
    with torch.no_grad():
        llm(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(llm): cache})
    assert cache.layers[0].keys.shape[-2] == len(ids)  # the model really filled it
    return cache


def full_logits(llm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=torch.tensor([ids])).logits[0, -1]


def sequences(n: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(10, 1000, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("bucketed", [False, True])
def test_decode_steps_equal_the_full_forward(llm, bucketed):
    """Three rows of different lengths decode four tokens each, in place;
    every step's logits equal the whole sequence run through the model."""
    seqs = sequences(0, (5, 23, 11))
    dec = StaticDecoder(llm, rows=8, max_len=128)
    dec.bucketed = bucketed
    for row, s in enumerate(seqs):
        dec.load(row, prefill(llm, s))
    for _ in range(4):
        nxt = sequences(len(seqs[0]), (len(seqs),))[0]
        logits = dec.decode(nxt, [len(s) for s in seqs])
        assert logits.shape == (len(seqs), llm.config.vocab_size)
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        for row, s in enumerate(seqs):
            torch.testing.assert_close(logits[row], full_logits(llm, s), atol=1e-4, rtol=1e-4)


def test_a_bucketed_steps_padding_rows_write_only_the_last_column(llm):
    """Three rows padded to a bucket of four: row 3 (a finished request's
    prefix, kept for reuse) keeps every column a request can use."""
    seqs = sequences(3, (5, 23, 11, 17))
    dec = StaticDecoder(llm, rows=8, max_len=64)
    dec.bucketed = True
    for row, s in enumerate(seqs):
        dec.load(row, prefill(llm, s))
    kept = [(k[3].clone(), v[3].clone()) for k, v in zip(dec.keys, dec.values)]
    dec.decode([7, 8, 9], [len(s) for s in seqs[:3]])
    for (k0, v0), k, v in zip(kept, dec.keys, dec.values):
        assert torch.equal(k[3, :, :-1], k0[:, :-1]) and torch.equal(v[3, :, :-1], v0[:, :-1])
        assert not torch.equal(k[3, :, -1], k0[:, -1])  # the padding row's write: the column no request uses


def test_sliding_window_masks_old_keys(llm):
    cfg = llm.get_base_model().config
    seq = sequences(1, (30,))[0]
    saved = cfg.sliding_window
    try:
        cfg.sliding_window = 7
        dec = StaticDecoder(llm, rows=1, max_len=64)
        dec.load(0, prefill(llm, seq[:-1]))
        windowed = dec.decode([seq[-1]], [len(seq) - 1])[0]
        torch.testing.assert_close(windowed, full_logits(llm, seq), atol=1e-4, rtol=1e-4)
    finally:
        cfg.sliding_window = saved
    unwindowed = full_logits(llm, seq)
    assert (windowed - unwindowed).abs().max() > 1e-3  # the window really cut keys


def test_move_keeps_a_row_intact(llm):
    seqs = sequences(2, (9, 14))
    dec = StaticDecoder(llm, rows=4, max_len=64)
    dec.load(0, prefill(llm, seqs[0][:-1]))
    dec.load(3, prefill(llm, seqs[1][:-1]))
    dec.move(3, 1, len(seqs[1]) - 1)
    logits = dec.decode([seqs[0][-1], seqs[1][-1]], [len(seqs[0]) - 1, len(seqs[1]) - 1])
    torch.testing.assert_close(logits[1], full_logits(llm, seqs[1]), atol=1e-4, rtol=1e-4)
    assert dec.moves == 1


@pytest.mark.parametrize("window", [None, 7])
def test_prefill_after_a_prefix_equals_the_full_forward(llm, window):
    """Rows 2..4 hold 0, 9 and 20 tokens of their sequences; the rest of each
    (3 to 17 tokens, padded together) runs in one pass: each row's last
    logits equal the whole sequence's, its keys and values then decode on,
    and nothing is written outside the rows' own columns."""
    cfg = llm.get_base_model().config
    saved = cfg.sliding_window
    try:
        cfg.sliding_window = window
        seqs = sequences(3, (17, 12, 29))
        starts = [0, 9, 20]
        dec = StaticDecoder(llm, rows=6, max_len=64)
        for row, (s, p) in enumerate(zip(seqs, starts), start=2):
            if p:
                dec.load(row, prefill(llm, s[:p]))
        before = [k.clone() for k in dec.keys]
        embed = llm.get_input_embeddings()
        with torch.no_grad():
            logits = dec.prefill(2, [embed(torch.tensor(s[p:])) for s, p in zip(seqs, starts)], starts)
        for j, s in enumerate(seqs):
            torch.testing.assert_close(logits[j], full_logits(llm, s), atol=1e-4, rtol=1e-4)
        for k0, k1 in zip(before, dec.keys):  # rows 0, 1 and 5 untouched
            assert torch.equal(k0[[0, 1, 5]], k1[[0, 1, 5]])
        nxt = [5, 6, 7]
        step = dec.decode([0, 0] + nxt, [0, 0] + [len(s) for s in seqs])[2:]
        for j, s in enumerate(seqs):
            torch.testing.assert_close(step[j], full_logits(llm, s + [nxt[j]]), atol=1e-4, rtol=1e-4)
    finally:
        cfg.sliding_window = saved
    with pytest.raises(ValueError, match="exceed the KV cache"):
        dec.prefill(5, [embed(torch.tensor([1, 2]))] * 2, [0, 0])


def test_decode_refuses_what_the_cache_cannot_hold(llm):
    dec = StaticDecoder(llm, rows=2, max_len=32)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        dec.decode([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="exceed the KV cache"):
        dec.decode([1], [32])
    with pytest.raises(ValueError, match="does not fit"):
        dec.load(0, prefill(llm, list(range(10, 50))))


def test_cache_plan():
    mib = 2**20
    assert plan_cache(32, 4096, 1, 10**9) == (32, 4096)  # everything fits
    assert plan_cache(4, 1000, 1, 10**9) == (4, 1000)
    rows, length = plan_cache(32, 4096, 1024, 64 * mib)  # shorter rows first
    assert rows == 32 and length == 2048
    assert plan_cache(32, 4096, 1024, 8 * mib) == (4, 2048)  # then fewer rows of 2,048 tokens
    assert plan_cache(32, 4096, 1024, 8 * mib, min_len=512) == (16, 512)
    assert plan_cache(32, 300, 1024, 8 * mib) == (27, 300)  # a shorter context is its own floor
    with pytest.raises(ValueError, match="needs 8 MiB"):
        plan_cache(32, 4096, 4096, mib)


def test_buckets():
    assert _buckets(32, 1) == [1, 2, 4, 8, 16, 32]
    assert _buckets(24, 1) == [1, 2, 4, 8, 16, 24]
    assert _buckets(4096, 64, step_after=1024) == [64, 128, 256, 512, 1024, 2048, 3072, 4096]
    assert _buckets(1000, 64, step_after=1024) == [64, 128, 256, 512, 1000]


def test_batcher_sizes_the_cache_to_free_memory(tiny_model, monkeypatch):
    import serve.static_cache as sc

    per_token = sc.kv_bytes_per_token(tiny_model.llm)
    cfg = tiny_model.llm.get_base_model().config
    assert per_token == 2 * cfg.num_hidden_layers * cfg.hidden_size * 4  # fp32, no grouped heads
    budget = sc.cache_budget(torch.device("cpu"), 0.5)
    assert 0 < budget < 2**50 and sc.gpu_share() == 1.0  # half the free RAM, outside Ray
    asked = []
    monkeypatch.setattr(sc, "cache_budget", lambda device, fraction: asked.append(fraction) or 5 * 1024 * per_token)
    b = ContinuousBatcher(tiny_model, 32, options=BatchingOptions(kv_cache_fraction=0.5), context_length=1024)
    d = b.describe()
    assert asked == [0.5] and (d["kv_cache"], d["rows"], d["max_len"]) == ("static", 5, 1024)
    assert b.max_batch_size == 5
    b.max_batch_size = 64  # a live user_config change cannot add rows
    assert b.max_batch_size == 5
    b.max_batch_size = 2
    assert b.max_batch_size == 2


def test_a_request_longer_than_a_row_fails_alone_and_reports_it(tiny_model):
    b = ContinuousBatcher(tiny_model, 4, options=BatchingOptions(max_seq_len=48), context_length=1024)
    short = GenerationRequest([10, 11, 12], max_new_tokens=4)
    long = GenerationRequest(list(range(10, 50)), max_new_tokens=9)
    assert b.fits(short) and not b.fits(long)
    got = {}
    b.submit(long, lambda item: got.setdefault("long", item))
    b.submit(short, lambda item: got.setdefault("short", item))
    while b.step():
        pass
    assert isinstance(got["long"], ValueError) and "KV cache row of 48 tokens" in str(got["long"])
    assert isinstance(got["short"], list)


def test_models_other_than_phi3_use_the_dynamic_cache(tiny_model, monkeypatch):
    cfg = tiny_model.llm.get_base_model().config
    monkeypatch.setattr(cfg, "model_type", "llama", raising=False)
    b = ContinuousBatcher(tiny_model, 4, options=BatchingOptions(), context_length=1024)
    d = b.describe()
    assert d["kv_cache"] == "dynamic" and "Phi-3" in d["static_error"]
    assert b.fits(GenerationRequest(list(range(10, 2000)), max_new_tokens=9))


def test_served_llm_has_its_adapter_merged(tiny_model, monkeypatch):
    """The LLM deployment's loader merges LoRA into a non-4-bit base: the
    same logits as the model with its (trained, non-zero) adapter apart."""
    import copy

    from models.multimodal import MultimodalPhi3
    from serve.loading import load_llm, resolve
    from serve.settings import ServeSettings

    trained = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in trained.llm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = sequences(3, (12,))[0]
    apart = full_logits(trained.llm, ids)
    assert (apart - full_logits(tiny_model.llm, ids)).abs().max() > 1e-2  # the adapter matters
    monkeypatch.setattr(MultimodalPhi3, "from_config", classmethod(lambda cls, *a, **k: trained))
    settings = ServeSettings.from_dict({"preset": "tiny", "device": "cpu"})
    served = load_llm(resolve(settings), settings)
    assert not hasattr(served.llm, "peft_config")
    torch.testing.assert_close(full_logits(served.llm, ids), apart, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_served_4bit_llm_keeps_its_adapter_apart_and_fused(tiny_cfg, monkeypatch, compute):
    """A 4-bit base keeps its adapter apart: in the compute dtype, every LoRA
    layer on the fused forward, the logits those of PEFT's own forward."""
    import dataclasses

    from models.lora_forward import _fused_forward
    from models.multimodal import MultimodalPhi3
    from serve.loading import load_llm, resolve
    from serve.settings import ServeSettings

    # bitsandbytes' CPU kernel wants every 4-bit row a whole number of 64-value blocks (tiny's MLP has 688)
    shape = {**tiny_cfg.llm.random_init, "intermediate_size": 768}
    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, load_in_4bit=True, compute_dtype=compute,
                                                                random_init=shape))
    torch.manual_seed(0)
    plain = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=False).eval()
    with torch.no_grad():
        for name, p in plain.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = sequences(3, (12,))[0]
    apart = full_logits(plain.llm, ids)
    monkeypatch.setattr(MultimodalPhi3, "from_config", classmethod(lambda cls, *a, **k: plain))
    settings = ServeSettings.from_dict({"preset": "tiny", "device": "cpu",
                                        "overrides": ["llm.load_in_4bit=true", f"llm.compute_dtype={compute}"]})
    served = load_llm(resolve(settings), settings)
    assert hasattr(served.llm, "peft_config")  # not merged
    lora = [p for n, p in served.llm.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == getattr(torch, compute) for p in lora)
    fused = [m for m in served.llm.modules() if getattr(m.__dict__.get("forward"), "__func__", None) is _fused_forward]
    assert len(fused) == tiny_cfg.llm.random_init["num_hidden_layers"] * len(tiny_cfg.llm.lora.target_modules)
    tol = 1e-5 if compute == "float32" else 3e-2
    torch.testing.assert_close(full_logits(served.llm, ids).float(), apart.float(), atol=tol, rtol=tol)
    if compute == "float32":  # the static cache's step over 4-bit layers: generate's greedy answer
        from serve.batching import BatchingOptions, ContinuousBatcher, GenerationRequest

        b = ContinuousBatcher(served, 2, suppress_ids=served.suppressed_ids, options=BatchingOptions(kv_cache="static"),
                              context_length=128)
        got = []
        b.submit(GenerationRequest(ids, None, max_new_tokens=8), lambda item: isinstance(item, list) and got.extend(item))
        while b.active or b.waiting:
            b.step()
        ref = served.generate(torch.tensor([ids]), max_new_tokens=8, suppress_tokens=served.suppressed_ids)[0]
        assert b.describe()["kv_cache"] == "static" and got == ref.tolist()


def test_cache_keyword_follows_the_transformers_release(tiny_model):
    from serve.batching import cache_kwarg

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            pass

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            pass

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    import inspect

    installed = inspect.signature(type(tiny_model.llm.get_base_model()).forward).parameters
    assert cache_kwarg(tiny_model.llm) in installed


def test_llm_deployment_rebuilds_its_cache_and_routes_long_requests():
    """The LLM deployment's class without Ray: user_config changes, and a
    request longer than a static row answered through ``generate``."""
    import asyncio

    from serve.deployments import LLM

    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu"})
    try:
        first = llm.batcher
        assert llm.batching_stats()["kv_cache"] == "static" and first.static.max_len == 1024
        llm.reconfigure({"prefill_batch_tokens": 100, "prefill_chunk_tokens": 64})  # live: same batcher
        assert llm.batcher is first and first.options.prefill_batch_tokens == 100
        assert first.options.prefill_chunk_tokens == 64
        llm.reconfigure({"max_seq_len": 64})  # the cache's shape: a new batcher, the idle one closed
        assert llm.batcher is not first and not first.alive() and llm.batcher.static.max_len == 64
        llm.reconfigure({"max_seq_len": 64, "kv_cache": "dynamic"})
        assert llm.batching_stats()["kv_cache"] == "dynamic"
        llm.reconfigure({"max_seq_len": 64})
        static = llm.batcher

        async def ask(n_prompt: int, max_new: int) -> list[int]:
            req = {"input_ids": list(range(10, 10 + n_prompt)), "max_new_tokens": max_new, "min_new_tokens": max_new}
            return [t async for chunk in llm.generate(req) for t in chunk]

        before = static.stats["prefills"]
        assert len(asyncio.run(ask(60, 8))) == 8  # 68 tokens: longer than a row, so generate answers it
        assert static.stats["prefills"] == before
        assert len(asyncio.run(ask(20, 8))) == 8  # fits: the batching loop answers it
        assert static.stats["prefills"] == before + 1
    finally:
        llm.shutdown()


def test_an_llm_replica_dropped_or_shut_down_stops_its_threads():
    """Nothing the replica starts keeps it alive: dropping the last reference
    frees the model at once (Serve calls ``__del__`` when it stops a replica),
    and its gauge and batching threads end. A thread that held the replica
    freed its tensors while the interpreter exited, and the process aborted."""
    import gc
    import threading
    import weakref

    from serve.deployments import LLM

    def ours() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name in ("llm-gauges", "continuous-batching")]

    before = set(ours())
    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu"})
    started = set(ours()) - before
    assert {t.name for t in started} == {"llm-gauges", "continuous-batching"}
    batcher, ref = llm.batcher, weakref.ref(llm)
    del llm
    gc.collect()
    assert ref() is None  # no thread holds it
    for t in started:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in started) and not batcher.alive()

    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu"})
    started = set(ours()) - before
    llm.shutdown()
    for t in started:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in started) and llm._pool._shutdown
    llm.shutdown()  # again, as __del__ does later: nothing left to stop


def test_llm_stream_sends_what_waits_in_one_message():
    """A reader that falls behind gets the ids decoded meanwhile in one
    message instead of one message per id; the answer is the same."""
    import asyncio

    from serve.deployments import LLM

    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu"})
    req = {"input_ids": list(range(10, 30)), "max_new_tokens": 12, "min_new_tokens": 12}
    try:
        async def read(pause: float) -> list[list[int]]:
            chunks = []
            async for chunk in llm.generate(req):
                chunks.append(chunk)
                await asyncio.sleep(pause)  # a slow reader: the batcher runs on meanwhile
            return chunks

        slow = asyncio.run(read(0.3))
        fast = asyncio.run(read(0.0))
        assert [t for c in slow for t in c] == [t for c in fast for t in c] and len(sum(slow, [])) == 12
        assert len(slow) < 12 and max(map(len, slow)) > 1, slow
    finally:
        llm.shutdown()


def test_streams_that_share_the_loop_send_fewer_messages():
    """While several requests decode together, each stream's messages leave
    ``stream_interval_ms`` apart at the soonest and carry the ids decoded
    meanwhile; a stream's first message and a lone stream's messages are not
    held back. The answers do not change. (A reader that falls behind on a
    busy host may find two ids waiting at once, so the checks below compare
    message counts with what holding back would allow, not with one id each.)"""
    import asyncio

    from serve.deployments import LLM

    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu"})
    reqs = [{"input_ids": list(range(10 + k, 30 + k)), "max_new_tokens": 48, "min_new_tokens": 48} for k in range(4)]

    async def stream(req) -> tuple[list[list[int]], list[float]]:
        chunks, times = [], []
        async for chunk in llm.generate(req):
            chunks.append(chunk)
            times.append(time.perf_counter())
        return chunks, times

    async def together():
        return await asyncio.gather(*(stream(r) for r in reqs))

    try:
        llm.reconfigure({"stream_interval_ms": 0})
        at_once = asyncio.run(together())
        alone = asyncio.run(stream(reqs[0]))[0]
        llm.reconfigure({"stream_interval_ms": 30})
        spaced = asyncio.run(together())
        llm.reconfigure({"stream_interval_ms": 250})
        wide = asyncio.run(together())
        alone_wide, alone_times = asyncio.run(stream(reqs[0]))
        for (a, _), (b, _), (c, _) in zip(at_once, spaced, wide):
            assert sum(a, []) == sum(b, []) == sum(c, []) and len(sum(a, [])) == 48
        assert sum(alone_wide, []) == sum(alone, []) == sum(at_once[0][0], [])
        # decoding alone, nothing is held back: far more messages than one per 250 ms
        held_back_at_most = 1 + (alone_times[-1] - alone_times[0]) / 0.25
        assert len(alone_wide) > 2 * held_back_at_most, (len(alone_wide), held_back_at_most)
        n_at_once, n_spaced = sum(len(c) for c, _ in at_once), sum(len(c) for c, _ in spaced)
        assert n_spaced < n_at_once / 2, (n_spaced, n_at_once)
        gaps = sorted(b - a for _, times in spaced for a, b in zip(times, times[1:]))
        # messages of a stream leave at least the interval apart while the others decode (less a timer's slack)
        assert gaps and gaps[len(gaps) // 2] > 0.025, gaps
        # first ids at once: the first message is not held back, a later one carries 250 ms of ids (a stream
        # whose prefill finished before the others' decodes alone for a step or two, so its second message
        # may leave at once too)
        assert all(len(c) >= 2 and 4 * len(c[0]) <= max(map(len, c[1:])) for c, _ in wide), \
            [list(map(len, c)) for c, _ in wide]
        with pytest.raises(ValueError, match="stream_interval_ms"):
            llm.reconfigure({"stream_interval_ms": -1})
    finally:
        llm.shutdown()
