"""Continuous batching (serve.batching) against one-at-a-time ``generate``.

The tiny preset in fp32 on CPU, no Ray: requests of different lengths, with
and without images, join the running batch at different steps and leave it
early (their own length, a stop id, a cancelled caller); every greedy answer
must equal, token for token, what ``MultimodalPhi3.generate`` gives that
request alone with the processors the LLM deployment uses. Each scheduling
test runs with both KV caches: the dynamic one, and the static one (a row per
request) with exact shapes and with the padded bucket shapes its CUDA graphs
use on a GPU.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from conftest import answer_ids, streamed
from serve.batching import DONE, BatchingOptions, ContinuousBatcher, GenerationRequest

QUESTIONS = ["What is seven plus five?", "Hi", "Count from one to ten, slowly, and then say the colours of the sky.",
             "Where is the circle?", "Name three colours.", "What shape has three sides and one corner?"]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(params=["static", "static-bucketed", "dynamic"])
def kv(request):
    return request.param


def make(model, kv: str, max_batch_size: int = 32, **kwargs) -> ContinuousBatcher:
    """A batcher with the cache ``kv`` names."""
    opts = BatchingOptions(kv_cache=kv.split("-")[0], **kwargs.pop("options", {}))
    b = ContinuousBatcher(model, max_batch_size, suppress_ids=model.suppressed_ids, options=opts,
                          context_length=model.cfg.tokenizer.max_length, **kwargs)
    assert b.describe()["kv_cache"] == opts.kv_cache, b.describe()
    if kv == "static-bucketed":
        b.static.bucketed = True
    return b


@pytest.fixture(scope="module")
def images(model):
    from PIL import Image

    pics = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    pics[1].paste((250, 250, 0), (8, 8, 40, 30))
    return model.encode_images(pics).float().numpy()


def prompt(model, i: int, n_images: int) -> list[int]:
    from models.conversation import encode_conversation

    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    return encode_conversation(model.tokenizer, [{"role": "user", "content": parts}], model.num_image_tokens,
                               add_generation_prompt=True, system_prompt=model.cfg.tokenizer.system_prompt).input_ids


def make_requests(model, images) -> list[GenerationRequest]:
    """Six requests: text only, one image, two images; lengths 3 to 20."""
    specs = [(0, 0, 20), (1, 1, 12), (2, 0, 16), (3, 2, 9), (4, 1, 20), (5, 0, 3)]
    out = []
    for i, n_img, max_new in specs:
        feats = images[[k % len(images) for k in range(n_img)]] if n_img else None
        out.append(GenerationRequest(prompt(model, i, n_img), feats, max_new_tokens=max_new))
    return out


def reference(model, req: GenerationRequest, stop_ids: list[int]) -> list[int]:
    """The request alone through ``generate``, as the LLM deployment's
    per-request path calls it (greedy, image slots suppressed)."""
    gen = {"max_new_tokens": req.max_new_tokens, "suppress_tokens": model.suppressed_ids,
           "eos_token_id": stop_ids}
    if req.min_new_tokens:
        gen["min_new_tokens"] = req.min_new_tokens
    out = model.generate(torch.tensor([req.input_ids]), None, req.features_tensor(), **gen)
    ids = out[0].tolist()
    for k, t in enumerate(ids):  # generate pads rows that stopped; this batch has one row
        if t in stop_ids:
            return ids[:k + 1]
    return ids


class Collector:
    """Records what a request's ``emit`` receives."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.items_after_done = 0

    def __call__(self, item):
        if self.done.is_set():
            self.items_after_done += 1
        elif item is DONE:
            self.done.set()
        elif isinstance(item, BaseException):
            self.error = item
            self.done.set()
        else:
            assert isinstance(item, list) and len(item) == 1, item
            self.tokens.extend(item)


def run_schedule(batcher: ContinuousBatcher, joins: dict[int, list[int]], reqs, cancel_after: dict[int, int] | None = None):
    """Step the batcher by hand: request ``j`` is submitted before step ``s``
    for ``j`` in ``joins[s]``; request ``j`` in ``cancel_after`` is cancelled
    once it has that many tokens."""
    cancel_after = cancel_after or {}
    sinks = [Collector() for _ in reqs]
    tickets = {}
    step, last_join = 0, max(joins)
    while step <= last_join or batcher.active or batcher.waiting:
        for j in joins.get(step, []):
            tickets[j] = batcher.submit(reqs[j], sinks[j])
        batcher.step()
        for j, n in cancel_after.items():
            if j in tickets and len(sinks[j].tokens) >= n:
                tickets[j].cancel()
        step += 1
        assert step < 500, "the batcher does not finish"
    return sinks


def test_staggered_greedy_requests_equal_one_at_a_time_generate(model, images, kv):
    reqs = make_requests(model, images)
    stops = list(model.tokenizer.stop_ids)
    # a stop id the model really produces: the 6th token request 2 generates
    # alone, so one row leaves the batch at a stop id...
    probe = reference(model, reqs[2], stops)
    extra = next(t for t in probe[5:] if t not in probe[:5])
    stops = stops + [extra]
    # ...and the same request with min_new_tokens must go on past it
    reqs.append(GenerationRequest(reqs[2].input_ids, None, max_new_tokens=16, min_new_tokens=12))
    expected = [reference(model, r, stops) for r in reqs]
    assert len(expected[2]) < reqs[2].max_new_tokens and expected[2][-1] == extra
    assert len(expected[6]) >= 12 and expected[6][:5] == expected[2][:5]
    assert len({len(e) for e in expected}) >= 4  # rows leave at different steps

    batcher = make(model, kv, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0, 1], 2: [2], 3: [3, 6], 7: [4], 8: [5]}, reqs)
    for k, (s, e) in enumerate(zip(sinks, expected)):
        assert s.done.is_set() and s.error is None and s.items_after_done == 0, k
        assert s.tokens == e, f"request {k}: batched {s.tokens} != alone {e}"
    assert batcher.stats["largest_batch"] >= 4  # rows really shared forward passes
    assert batcher.stats["batched_prefills"] >= 2  # requests that arrived together were prefilled together
    assert batcher.stats["steps"] < sum(len(e) for e in expected) - len(expected)
    assert batcher.active == 0 and batcher._cache is None
    if batcher.static is not None:  # rows that left below others had the last row moved into their place
        assert batcher.static.moves >= 1


def test_max_batch_size_and_cancelled_rows(model, images, kv):
    reqs = make_requests(model, images)
    stops = list(model.tokenizer.stop_ids)
    expected = [reference(model, r, stops) for r in reqs]
    batcher = make(model, kv, 3, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0, 1, 2, 3, 4, 5]}, reqs, cancel_after={4: 5, 1: 2})
    assert batcher.stats["largest_batch"] == 3  # the rest waited for a free row
    for k in (0, 2, 3, 5):
        assert sinks[k].tokens == expected[k], k
    for k, n in ((4, 5), (1, 2)):  # cancelled: a prefix of the answer, then nothing more
        got = sinks[k].tokens
        assert got == expected[k][:len(got)] and n <= len(got) <= n + 1, k
        if len(got) < len(expected[k]):
            assert not sinks[k].done.is_set()


def test_background_loop_with_concurrent_callers(model, images, kv):
    reqs = make_requests(model, images)
    stops = list(model.tokenizer.stop_ids)
    expected = [reference(model, r, stops) for r in reqs]
    batcher = make(model, kv, 4, stop_ids=stops).start()
    sinks = [Collector() for _ in reqs]
    gate = threading.Barrier(len(reqs))

    def caller(k):
        gate.wait()
        batcher.submit(reqs[k], sinks[k])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, s in enumerate(sinks):
        assert s.done.wait(120), k
        assert s.error is None and s.tokens == expected[k], k
    assert batcher.alive() and batcher.stats["largest_batch"] >= 2
    batcher.close()
    assert not batcher.alive()
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit(reqs[0], Collector())


def test_a_bad_request_fails_alone(model, images, kv):
    reqs = make_requests(model, images)
    stops = list(model.tokenizer.stop_ids)
    bad = GenerationRequest(reqs[1].input_ids, None, max_new_tokens=5)  # image slots, no features
    batcher = make(model, kv, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0], 2: [1]}, [reqs[0], bad])
    assert isinstance(sinks[1].error, ValueError) and "no image features" in str(sinks[1].error)
    assert sinks[0].error is None and sinks[0].tokens == reference(model, reqs[0], stops)


def test_replies_never_hold_embedding_rows_past_the_tokenizer(tiny_cfg):
    """Phi-3 pads its vocabulary to more embedding rows than the tokenizer has
    tokens; those rows decode to nothing. With them made the likeliest next
    token, neither the batcher nor the per-request ``generate`` path picks one."""
    import dataclasses

    from models.multimodal import MultimodalPhi3

    n_tok = len(MultimodalPhi3.from_config(tiny_cfg, device="cpu", trainable=False, with_vision=False).tokenizer)
    llm_cfg = dataclasses.replace(tiny_cfg.llm, random_init={**tiny_cfg.llm.random_init, "vocab_size": n_tok + 64})
    cfg = dataclasses.replace(tiny_cfg, llm=llm_cfg)
    model = MultimodalPhi3.from_config(cfg, device="cpu", trainable=False, with_vision=False).eval()
    assert set(range(n_tok, n_tok + 64)) <= set(model.suppressed_ids)
    assert model.tokenizer.ids.image in model.suppressed_ids
    req = GenerationRequest(prompt(model, 0, 0), None, max_new_tokens=8)
    with torch.no_grad():  # every padding row along the prompt's last hidden state: they win the first step
        out = model(torch.tensor([req.input_ids]), output_hidden_states=True)
        last = out.hidden_states[-1][0, -1]
        head = model.llm.get_output_embeddings().weight
        head[n_tok:] = 50 * last / last.norm() * head[:n_tok].norm(dim=1).max()
    plain = model.generate(torch.tensor([req.input_ids]), max_new_tokens=8)[0].tolist()
    assert plain[0] >= n_tok, plain  # without suppression a padding row is the first token
    for kv in ("static", "dynamic"):
        sinks = run_schedule(make(model, kv), {0: [0]}, [req])
        assert sinks[0].error is None and len(sinks[0].tokens) == 8
        assert all(t < n_tok for t in sinks[0].tokens), sinks[0].tokens
        assert sinks[0].tokens == reference(model, req, []), kv


def test_sampling_settings_per_row(model, images, kv):
    reqs = make_requests(model, images)[:4]
    stops = list(model.tokenizer.stop_ids)
    greedy = [reference(model, r, stops) for r in reqs]
    torch.manual_seed(0)
    # top_p near 0 keeps only the most likely token: sampled rows must equal greedy ones
    reqs[1].temperature, reqs[1].top_p = 1.3, 1e-6
    # a hot row: any token but image slots, and no stop id before min_new_tokens
    reqs[2].temperature, reqs[2].top_p, reqs[2].min_new_tokens = 2.0, 1.0, reqs[2].max_new_tokens
    batcher = make(model, kv, stop_ids=stops)
    sinks = run_schedule(batcher, {0: [0, 1, 2, 3]}, reqs)
    assert sinks[0].tokens == greedy[0] and sinks[3].tokens == greedy[3]
    assert sinks[1].tokens == greedy[1]
    hot = sinks[2].tokens
    assert len(hot) == reqs[2].max_new_tokens and model.tokenizer.ids.image not in hot
    assert not set(hot) & set(stops) and hot != greedy[2][:len(hot)]


def test_a_seeded_row_draws_the_same_answer_whatever_shares_its_batch(model, images, kv):
    """A request with a ``seed`` samples with its own generator: alone, or
    joining later beside sampled rows with no seed and with another seed, it
    draws the same tokens; another seed draws others; the rows with no seed
    still sample (with the global generator)."""
    from dataclasses import replace

    stops = list(model.tokenizer.stop_ids)
    base = make_requests(model, images)
    hot = {"temperature": 1.5, "top_p": 0.95, "max_new_tokens": 16, "min_new_tokens": 16}

    def seeded(seed, i=1):
        return replace(base[i], seed=seed, **hot)

    alone = run_schedule(make(model, kv, stop_ids=stops), {0: [0]}, [seeded(7)])[0].tokens
    assert len(alone) == 16 and model.tokenizer.ids.image not in alone
    torch.manual_seed(1)
    crowd = [replace(base[0], **hot), replace(base[2], **hot), seeded(8, 4), seeded(7)]
    sinks = run_schedule(make(model, kv, stop_ids=stops), {0: [0, 1], 2: [2], 3: [3]}, crowd)
    assert sinks[3].tokens == alone
    assert sinks[2].tokens != alone and len(sinks[2].tokens) == 16
    torch.manual_seed(1)  # the unseeded rows are drawn by the global generator: seeding it repeats them
    again = run_schedule(make(model, kv, stop_ids=stops), {0: [0, 1], 2: [2], 3: [3]},
                         [replace(base[0], **hot), replace(base[2], **hot), seeded(8, 4), seeded(7)])
    assert [s.tokens for s in again] == [s.tokens for s in sinks]
    assert sinks[0].tokens != reference(model, base[0], stops)[:16]


def test_generate_path_samples_a_seeded_request_with_its_own_generator(model, images):
    """The deployment's ``generate`` path (continuous batching off, or a
    request longer than a cache row) samples a seeded request with
    ``SeededSampler``: the same seed repeats the answer, with the global
    generator moved in between; a vanishing top_p leaves greedy's answer."""
    from dataclasses import replace

    from transformers import LogitsProcessorList

    from serve.sampling import SeededSampler

    stops = list(model.tokenizer.stop_ids)
    req = replace(make_requests(model, images)[1], max_new_tokens=12, min_new_tokens=12)

    def run(r):
        gen = {"max_new_tokens": r.max_new_tokens, "suppress_tokens": model.suppressed_ids, "eos_token_id": stops,
               "min_new_tokens": r.min_new_tokens, "logits_processor": LogitsProcessorList([SeededSampler(r)])}
        return model.generate(torch.tensor([r.input_ids]), None, r.features_tensor(), **gen)[0].tolist()

    first = run(replace(req, temperature=1.5, seed=3))
    torch.rand(5)
    assert run(replace(req, temperature=1.5, seed=3)) == first and len(first) == 12
    assert run(replace(req, temperature=1.5, seed=4)) != first
    assert model.tokenizer.ids.image not in first and not set(first) & set(stops)
    assert run(replace(req, temperature=1.0, top_p=1e-6, seed=3)) == reference(model, req, stops)


def test_prefill_groups_stay_within_their_token_budget(model, images):
    reqs = make_requests(model, images)  # prompt lengths 12 to 45 tokens
    stops = list(model.tokenizer.stop_ids)
    expected = [reference(model, r, stops) for r in reqs]
    longest = max(len(r.input_ids) for r in reqs)
    for budget, batched in ((1, False), (2 * longest, True)):
        batcher = make(model, "static", stop_ids=stops, options={"prefill_batch_tokens": budget})
        groups = batcher._prefill_groups([(None, torch.zeros(1, len(r.input_ids), 4)) for r in reqs])
        assert all(len(g) * max(e.shape[1] for _, e in g) <= budget or len(g) == 1 for g in groups)
        assert sum(len(g) for g in groups) == len(reqs) and (max(map(len, groups)) > 1) == batched
        sinks = run_schedule(batcher, {0: list(range(len(reqs)))}, reqs)
        assert [s.tokens for s in sinks] == expected, budget
        assert (batcher.stats.get("batched_prefills", 0) > 0) == batched


def test_top_p_keeps_the_smallest_likely_set():
    from serve.sampling import top_p_filter

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = top_p_filter(scores, torch.tensor([[0.7], [0.9]]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, True, False]]


def test_batching_options():
    assert BatchingOptions.from_dict({}) == BatchingOptions(True, 32)
    assert BatchingOptions.from_dict({}).kv_cache == "static"
    assert BatchingOptions.from_dict({"max_batch_size": 4, "continuous_batching": False}).max_batch_size == 4
    assert BatchingOptions.from_dict({"kv_cache": "dynamic", "max_seq_len": 512}).max_seq_len == 512
    for bad in ({"max_batch_size": 0}, {"max_batch_size": True}, {"continuous_batching": "yes"}, {"batch": 2},
                {"kv_cache": "paged"}, {"max_seq_len": 8}, {"max_seq_len": "long"}, {"kv_cache_fraction": 0},
                {"kv_cache_fraction": 1.5}, {"cuda_graphs": "auto"}, {"prefill_batch_tokens": 0}):
        with pytest.raises(ValueError):
            BatchingOptions.from_dict(bad)


def test_request_from_the_ingress_dict():
    feats = np.zeros((1, 4, 8), np.float32)
    r = GenerationRequest.from_dict({"input_ids": [1, 2], "image_features": feats, "max_new_tokens": 4,
                                     "min_new_tokens": 9, "temperature": None, "top_p": None})
    assert (r.min_new_tokens, r.temperature, r.top_p, r.seed) == (4, 0.0, 1.0, None)
    assert GenerationRequest.from_dict({"input_ids": [1], "max_new_tokens": 1, "seed": -1}).seed == -1
    assert r.features_tensor().shape == (1, 4, 8)
    # features from Ray's object store are read-only arrays: the tensor is a writable copy, with no warning
    sent = np.arange(32, dtype=np.float32).reshape(1, 4, 8)
    sent.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = GenerationRequest.from_dict({"input_ids": [1], "image_features": sent, "max_new_tokens": 1}).features_tensor()
    t += 1  # writable, and not the sender's memory
    assert float(sent[0, 0, 0]) == 0.0 and float(t[0, 0, 0]) == 1.0
    assert GenerationRequest.from_dict({"input_ids": [1], "image_features": np.zeros((0,)),
                                        "max_new_tokens": 1}).image_features is None
    with pytest.raises(ValueError):
        GenerationRequest.from_dict({"input_ids": [1], "max_new_tokens": 0})


def test_the_llm_deployment_repeats_a_seeded_answer_with_batching_on_and_off(model, replica):
    """The LLM deployment's own ``generate`` (no Ray: the class behind the
    deployment), fed the ingress's dict: a seeded sampled request gives the
    same ids twice through the batching loop and twice through the
    one-``generate``-per-request path."""
    call = {"input_ids": prompt(model, 0, 0), "image_features": None, "max_new_tokens": 10, "min_new_tokens": 10,
            "temperature": 1.5, "top_p": 0.95}
    for batching in (True, False):
        replica.reconfigure({"continuous_batching": batching})
        first = answer_ids(replica, call, seed=5)
        assert len(first) == 10 and answer_ids(replica, call, seed=5) == first, batching
        assert answer_ids(replica, call, seed=6) != first, batching
        assert answer_ids(replica, call) != first and answer_ids(replica, call) != answer_ids(replica, call), batching


def test_the_asr_and_image_encoder_batch_windows():
    """Their user_config sets a @serve.batch method's size and wait (live on
    serve deploy), checked with the key named; serve/config.yaml's values
    are the deployments' own defaults."""
    from ray import serve

    from serve.app import read_serve_config
    from serve.deployments import ASR_BATCH, IMAGE_BATCH, BatchWindow

    w = IMAGE_BATCH.update("ImageEncoder", {"batch_wait_timeout_s": 0.02})
    assert (w.max_batch_size, w.batch_wait_timeout_s) == (16, 0.02) and IMAGE_BATCH.batch_wait_timeout_s == 0.005
    for bad, words in [({"max_batch_size": 0}, "ImageEncoder max_batch_size must be a positive integer"),
                       ({"max_batch_size": True}, "max_batch_size must be a positive integer"),
                       ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s must be a number of seconds"),
                       ({"batch_wait_timeout_s": "1"}, "batch_wait_timeout_s must be a number of seconds"),
                       ({"max_batch": 4}, "unknown ImageEncoder user_config key(s) max_batch; valid: max_batch_size")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            IMAGE_BATCH.update("ImageEncoder", bad)

    class Holder:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.5)
        async def run(self, xs):
            return xs

    BatchWindow(5, 0.001).apply(Holder().run)
    assert Holder.run._get_max_batch_size() == 5 and Holder.run._get_batch_wait_timeout_s() == 0.001
    _, opts = read_serve_config()
    assert opts["ImageEncoder"]["user_config"] == IMAGE_BATCH.to_dict()
    assert opts["ASR"]["user_config"] == ASR_BATCH.to_dict()


# ------------------------------------------------------------- penalties

def test_penalties_follow_openais_formula():
    from serve.sampling import penalise

    scores = torch.zeros(3, 5)
    reqs = [GenerationRequest([1], frequency_penalty=0.5, presence_penalty=1.0),
            GenerationRequest([1], frequency_penalty=-1.0)]
    penalise(scores, [0, 2], reqs, [[1, 1, 3], [4]])
    assert scores.tolist() == [[0, -2.0, 0, -1.5, 0], [0] * 5, [0, 0, 0, 0, 1.0]]
    empty = torch.zeros(1, 5)
    penalise(empty, [0], reqs[:1], [[]])  # nothing said yet: nothing to penalise
    assert not empty.any()


def reference_penalised(model, req: GenerationRequest, stop_ids: list[int]) -> list[int]:
    """``reference`` with the deployment's ``Penalties`` processor (greedy)."""
    from transformers import LogitsProcessorList

    from serve.sampling import Penalties

    gen = {"max_new_tokens": req.max_new_tokens, "suppress_tokens": model.suppressed_ids, "eos_token_id": stop_ids,
           "min_new_tokens": req.min_new_tokens, "logits_processor": LogitsProcessorList([Penalties(req)])}
    ids = model.generate(torch.tensor([req.input_ids]), None, req.features_tensor(), **gen)[0].tolist()
    return next((ids[:k + 1] for k, t in enumerate(ids) if t in stop_ids), ids)


def test_penalised_rows_repeat_less_and_equal_the_generate_path(model, images, kv):
    """Greedy rows with a frequency or presence penalty, joining a batch beside
    rows without: each penalised answer equals ``generate`` alone with the
    deployment's ``Penalties`` processor and repeats its most frequent token
    less often than the same request unpenalised; the other rows are as alone."""
    from dataclasses import replace

    stops = list(model.tokenizer.stop_ids)
    base = [replace(r, max_new_tokens=20, min_new_tokens=20) for r in make_requests(model, images)[:4]]
    reqs = [replace(base[0], frequency_penalty=1.5), base[1], replace(base[2], presence_penalty=2.0), base[3]]
    sinks = run_schedule(make(model, kv, stop_ids=stops), {0: [0, 1], 2: [2, 3]}, reqs)
    for i in (1, 3):
        assert sinks[i].tokens == reference(model, reqs[i], stops), i
    for i in (0, 2):
        assert sinks[i].tokens == reference_penalised(model, reqs[i], stops), i
        free = reference(model, base[i], stops)
        assert max(sinks[i].tokens.count(t) for t in sinks[i].tokens) < max(free.count(t) for t in free), i


def test_the_llm_deployment_penalises_the_answer_so_far_with_batching_on_and_off(model, replica):
    """Through the deployment's ``generate``: a penalised answer is the same
    with batching on and off (greedy, and seeded sampling); continued from
    its first tokens (``answer_start``: the earlier tokens count) it ends as
    the whole one, and not when they are taken for prompt."""
    ids = prompt(model, 2, 0)
    call = {"input_ids": ids, "image_features": None, "max_new_tokens": 16, "min_new_tokens": 16,
            "frequency_penalty": 1.0, "presence_penalty": 0.5}
    seen = {}
    for batching in (False, True):
        replica.reconfigure({"continuous_batching": batching})
        for kw in ({}, {"temperature": 1.0, "seed": 4}):
            seen.setdefault(str(kw), set()).add(tuple(answer_ids(replica, call, **kw)))
        whole = answer_ids(replica, call)
        rest = dict(input_ids=ids + whole[:6], max_new_tokens=10, min_new_tokens=10)
        assert whole[:6] + answer_ids(replica, call, **rest, answer_start=len(ids)) == whole, batching
        assert whole[:6] + answer_ids(replica, call, **rest) != whole, batching  # the first 6 tokens not counted
    assert all(len(v) == 1 for v in seen.values()), seen
    with pytest.raises(ValueError, match="answer_start 99 is outside"):
        answer_ids(replica, call, answer_start=99)


def test_the_generate_paths_penalties_count_the_answer_before_the_call():
    """``Penalties`` (the per-request path): the request's ``prior`` (an
    answer continued after a replica died) and the tokens generated since
    count; the prompt does not."""
    from serve.sampling import Penalties

    req = GenerationRequest([5, 6, 1, 2], frequency_penalty=1.0, prior=[1, 2])
    expected = [[0, -1.0, -2.0, -1.0, 0, 0, 0, 0]]
    assert Penalties(req)(torch.tensor([[2, 3]]), torch.zeros(1, 8)).tolist() == expected  # embeddings in
    assert Penalties(req, prompt_ids=4)(torch.tensor([[5, 6, 1, 2, 2, 3]]), torch.zeros(1, 8)).tolist() == expected


# ------------------------------------------------------------- logprobs

def rated_tokens(sink) -> tuple[list[int], list]:
    """A logprobs request's tokens and TokenLogprob items, as a Collector recorded them."""
    return [x.token for x in sink.tokens], sink.tokens


def model_logprobs(model, req: GenerationRequest, answer: list[int], stop_ids: list[int]) -> torch.Tensor:
    """The log-probabilities the model gives each answer token's position,
    from one forward pass over prompt + answer, with the deployment's
    suppression (and stop ids ruled out before ``min_new_tokens``)."""
    ids = torch.tensor([req.input_ids + answer[:-1]])
    with torch.no_grad():
        logits = model.llm(inputs_embeds=model.embed(ids, req.features_tensor())).logits[0, len(req.input_ids) - 1:]
    scores = logits.float().clone()
    scores[:, model.suppressed_ids] = -float("inf")
    scores[:req.min_new_tokens, stop_ids] = -float("inf")
    return torch.log_softmax(scores, dim=-1)


def test_logprobs_are_the_models_own_ratings(model, images, kv):
    """Requests with logprobs (0 and 3 alternatives, greedy, one sampled and
    penalised) beside ones without, joining at different steps: each emitted
    rating equals the model's log-softmax at that position from one forward
    pass over the whole answer (before penalties and temperature), the top
    list is sorted and as long as asked, greedy's token is its first; the
    requests without are as alone."""
    from dataclasses import replace

    stops = list(model.tokenizer.stop_ids)
    base = [replace(r, max_new_tokens=10) for r in make_requests(model, images)[:4]]
    reqs = [replace(base[0], logprobs=3), base[1],
            replace(base[2], logprobs=0, min_new_tokens=10),
            replace(base[3], logprobs=5, temperature=1.0, seed=2, frequency_penalty=1.0)]
    sinks = run_schedule(make(model, kv, stop_ids=stops), {0: [0, 1], 2: [2, 3]}, reqs)
    assert sinks[1].tokens == reference(model, reqs[1], stops)
    for i, k in ((0, 3), (2, 0), (3, 5)):
        tokens, items = rated_tokens(sinks[i])
        if reqs[i].temperature == 0:
            assert tokens == reference(model, reqs[i], stops), i
        want = model_logprobs(model, reqs[i], tokens, stops)
        for pos, item in enumerate(items):
            assert item.logprob == pytest.approx(float(want[pos, item.token]), abs=1e-4), (i, pos)
            assert len(item.top) == k and [v for _, v in item.top] == sorted((v for _, v in item.top), reverse=True)
            for t, v in item.top:
                assert v == pytest.approx(float(want[pos, t]), abs=1e-4)
            if k and reqs[i].temperature == 0:
                assert item.top[0][0] == item.token


def test_the_llm_deployment_rates_tokens_alike_with_batching_on_and_off(model, replica):
    """The deployment's ``generate`` with ``logprobs``: messages carry one
    rating per id; the batching loop and the per-request ``generate`` path
    give the same tokens and ratings (greedy, and seeded sampling)."""
    call = {"input_ids": prompt(model, 0, 0), "image_features": None, "max_new_tokens": 8, "min_new_tokens": 8,
            "logprobs": 4}
    got = {}
    for batching in (True, False):
        replica.reconfigure({"continuous_batching": batching})
        for kw in ({}, {"temperature": 1.0, "seed": 9}):
            msgs = streamed(replica, call, **kw)
            assert all(len(m["ids"]) == len(m["logprobs"]) for m in msgs)
            got.setdefault(str(kw), []).append(([t for m in msgs for t in m["ids"]],
                                                [r for m in msgs for r in m["logprobs"]]))
    for (ids_on, rates_on), (ids_off, rates_off) in got.values():
        assert ids_on == ids_off and len(ids_on) == 8
        for (lp_on, top_on), (lp_off, top_off) in zip(rates_on, rates_off):
            assert lp_on == pytest.approx(lp_off, abs=1e-4) and len(top_on) == 4
            assert [t for t, _ in top_on] == [t for t, _ in top_off]
    plain = streamed(replica, call, logprobs=None)
    assert plain and all(isinstance(m, list) for m in plain)


def test_logit_bias_bans_and_forces_tokens_alike_in_both_paths(model, replica):
    """``logit_bias``: -100 on every token greedy's answer used keeps them
    all out of the new answer, +100 on one token makes it the whole answer;
    the batching loop and the per-request ``generate`` path agree; the
    ratings (logprobs) are the model's own, before the bias."""
    stops = list(model.tokenizer.stop_ids)
    req = GenerationRequest(prompt(model, 1, 0), max_new_tokens=8, min_new_tokens=8)
    free = reference(model, req, stops)
    call = {"input_ids": req.input_ids, "image_features": None, "max_new_tokens": 8, "min_new_tokens": 8}
    for batching in (True, False):
        replica.reconfigure({"continuous_batching": batching})
        assert answer_ids(replica, call) == free, batching
        away = answer_ids(replica, call, logit_bias={t: -100.0 for t in free})
        assert len(away) == 8 and not set(away) & set(free), (batching, away)
        forced = answer_ids(replica, call, logit_bias={300: 100.0})
        assert forced == [300] * 8, batching
        rated = streamed(replica, call, logit_bias={300: 100.0}, logprobs=1)
        first = rated[0]["logprobs"][0]
        assert rated[0]["ids"][0] == 300 and first[1][0][0] == free[0] and first[0] < first[1][0][1], batching
