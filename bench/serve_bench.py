"""Serving load benchmark: the Ray Serve application under concurrent users,
against the same model called in-process.

Two parts, one run, same weights, same prompts, same token counts:

- **in-process baseline**: the LLM loaded with the serving code's own loader
  (``serve.loading``), called through ``MultimodalPhi3.generate`` as the LLM
  deployment calls it (greedy, image slots suppressed): prefill time per
  prompt kind (``max_new_tokens=1``), the vision tower's time for one image,
  and tokens/s of Hugging Face ``generate`` on a left-padded batch of N
  prompts for every N in ``--users`` (image features precomputed).
- **served**: the application started as ``mmphi serve`` starts it
  (``serve.app.run_local`` with ``serve/config.yaml``'s deployment options,
  fixed replica counts unless ``--autoscale``), then an asyncio load
  generator with N users for each N in ``--users``; each user sends streaming
  ``/v1/chat/completions`` requests back to back (``--requests-per-user``
  each, or for ``--duration`` seconds). Time to first token is measured at
  the client: the first SSE chunk carrying text. With ``--turns T`` each
  user's requests are the turns of chats of ``T`` turns: the first turn is a
  prompt as above, each later one sends the whole history (the earlier
  questions, the image, the answers the server gave) and a follow-up
  question, as a chat page does; the table adds time to first token by turn
  (the LLM's prefix cache, ``LLM.user_config.prefix_cache``, serves the
  repeated history).

Every request asks for ``--max-tokens`` tokens with ``min_tokens`` equal to
it and temperature 0, so no answer stops early at a stop token; the token
counts come from the response's ``usage`` (the JSON records the range).
Inter-token latency is per request (last text chunk - first) / (tokens - 1)
(none for an answer whose text came in one chunk; while several requests
decode together a stream's messages leave ``stream_interval_ms`` apart, so
the last tokens may wait up to that long, which adds at most that over
tokens - 1 to the figure).
The serving-overhead ratio is served tokens/s at N users / in-process
tokens/s at batch N. Prints a table and writes JSON (``--out``).

    python bench/serve_bench.py                                   # tiny preset, CPU
    python bench/serve_bench.py --users 1,8 --requests-per-user 4 --mix text
    python bench/serve_bench.py --preset phi3-mini --gpu --max-tokens 128 \\
        --set llm.load_in_4bit=false --set llm.dtype=bfloat16 --out bench/results/serve-h100.json
    python bench/serve_bench.py --checkpoint runs/demo/runs/stage2/final
    python bench/serve_bench.py --option LLM.max_ongoing_requests=32 --llm-replicas 2   # deployment options
    python bench/serve_bench.py --option LLM.user_config.continuous_batching=false      # one generate per request
    python bench/serve_bench.py --turns 4 --users 1,8 --max-tokens 64 --option LLM.user_config.prefix_cache=false
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profiling import sync  # noqa: E402

KINDS = {"text": ["text"], "image": ["image"], "both": ["text", "image"]}
TEXT_QUESTIONS = ["What is seven plus five?", "Name three colours.", "Count from one to ten.",
                  "What shape has three sides?"]
IMAGE_QUESTIONS = ["What colour is the large object?", "How many objects are in the image?",
                   "Where is the circle?", "Describe the image."]
FOLLOW_UPS = ["Tell me more about that.", "Why do you say so?", "Could you say it in other words?",
              "What else can you tell me?"]
N_IMAGES = 8
# deployment options --gpu sets (one card shared: fractions add up to 1; LLM replicas split theirs)
GPU_SHARES = {"LLM": 0.7, "ImageEncoder": 0.2, "ASR": 0.1}


# ------------------------------------------------------------------ prompts

class Prompts:
    """Deterministic prompts shared by the served and in-process runs:
    prompt ``i`` has kind ``kinds[i % len(kinds)]``, a question and (for
    images) one of ``n_images`` synthetic scenes (or photo-like JPEGs)."""

    def __init__(self, mix: str, image_size: int = 128, seed: int = 0, photo: tuple[int, int] | None = None,
                 n_images: int = N_IMAGES):
        from data_pipelines.synthetic import make_scene

        self.kinds = KINDS[mix]
        self.images = []
        self.mime = "image/jpeg" if photo else "image/png"
        for k in range(n_images):
            if photo:  # a photo-like JPEG of that size, as a phone uploads (bench/decode_bench.py)
                from bench.decode_bench import photo as make_photo

                self.images.append(make_photo(*photo, seed=seed + k))
                continue
            img, _ = make_scene(random.Random(seed + k), image_size)
            buf = io.BytesIO()
            img.save(buf, "PNG")
            self.images.append(buf.getvalue())

    def kind(self, i: int) -> str:
        return self.kinds[i % len(self.kinds)]

    def question(self, i: int) -> str:
        qs = IMAGE_QUESTIONS if self.kind(i) == "image" else TEXT_QUESTIONS
        return qs[(i // len(self.kinds)) % len(qs)]

    def image(self, i: int) -> bytes:
        return self.images[(i // len(self.kinds)) % len(self.images)]

    def messages(self, i: int) -> list[dict]:
        """The model's message format (``models.conversation``)."""
        parts = [{"type": "image"}] if self.kind(i) == "image" else []
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.question(i)}]}]

    def api_messages(self, i: int) -> list[dict]:
        """The same conversation as OpenAI API messages."""
        parts = []
        if self.kind(i) == "image":
            uri = f"data:{self.mime};base64," + base64.b64encode(self.image(i)).decode()
            parts.append({"type": "image_url", "image_url": {"url": uri}})
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.question(i)}]}]


# --------------------------------------------------------------- in-process

def in_process(settings, prompts: Prompts, batches: list[int], max_tokens: int, repeats: int,
               engines: tuple[str, ...] = ("static", "dynamic")) -> dict:
    """Prefill time per prompt kind and ``generate`` tokens/s at each batch
    size, with the LLM deployment's loader, thread count and generate call;
    then the deployment's own batching loop in this process for each KV cache
    in ``engines`` (``engine``)."""
    import torch

    from models.conversation import collate, encode_conversation
    from models.vision import DTYPES
    from serve.loading import load_llm, load_vision, resolve, set_threads

    set_threads(settings)
    source = resolve(settings)
    t = time.perf_counter()
    model = load_llm(source, settings)
    device = str(model.device)
    vision = load_vision(source, settings.device or device) if "image" in prompts.kinds else None
    load_s = time.perf_counter() - t
    tok = model.tokenizer
    gen = {"suppress_tokens": model.suppressed_ids}

    def encode(i: int):
        return encode_conversation(tok, prompts.messages(i), model.num_image_tokens, add_generation_prompt=True,
                                   system_prompt=source.cfg.tokenizer.system_prompt)

    def features(idx: list[int]):
        imgs = [prompts.image(i) for i in idx if prompts.kind(i) == "image"]
        if not imgs:
            return None
        crops = np.stack([vision.pipeline.crop(b, settings.limits.max_image_pixels) for b in imgs])
        return vision(vision.pipeline.normalize(crops, vision.device, DTYPES[vision.cfg.dtype])).float().cpu()

    def timed(fn, n: int) -> tuple[float, object]:
        times, out = [], None
        for _ in range(n):
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    def run(idx: list[int], new_tokens: int, feats):
        batch = collate([encode(i) for i in idx], tok.ids.pad, padding_side="left")
        return model.generate(batch["input_ids"], batch["attention_mask"], feats, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, **gen)

    res: dict = {"device": device, "load_s": round(load_s, 1), "prefill_ms": {}, "prompt_tokens": {}}
    first = {k: next(i for i in range(len(prompts.kinds)) if prompts.kind(i) == k) for k in prompts.kinds}
    with torch.inference_mode():
        if vision is not None:
            features([first["image"]])  # warm-up
            res["vision_ms"] = round(1000 * timed(lambda: features([first["image"]]), 5)[0], 2)
        for kind, i in first.items():
            feats = features([i])
            run([i], 2, feats)  # warm-up
            res["prefill_ms"][kind] = round(1000 * timed(lambda: run([i], 1, feats), 5)[0], 2)
            res["prompt_tokens"][kind] = len(encode(i).input_ids)
        # single stream: decode time per token after the first. One untimed
        # full-length run first: eager attention meets a new key length at
        # every step, and the first call at each length is slow (on an H200 a
        # lone timed run gave 79 ms a token, the next run 23 ms)
        i = first[prompts.kinds[0]]
        feats = features([i])
        run([i], max_tokens, feats)
        full, out = timed(lambda: run([i], max_tokens, feats), repeats)
        assert out.shape[1] == max_tokens, f"in-process generate made {out.shape[1]} tokens, not {max_tokens}"
        first_answer = out[0].tolist()  # the reference greedy answer for the batching loop (engine)
        res["itl_ms_batch1"] = round(1000 * (full - res["prefill_ms"][prompts.kinds[0]] / 1000) / (max_tokens - 1), 3)
        res["tok_s"] = {}
        for b in batches:
            idx = list(range(b))
            feats = features(idx)
            run(idx, 2, feats)  # warm-up at this batch shape
            secs, out = timed(lambda: run(idx, max_tokens, feats), repeats)
            assert tuple(out.shape) == (b, max_tokens), f"in-process generate gave {tuple(out.shape)}"
            res["tok_s"][str(b)] = round(b * max_tokens / secs, 1)
    res["engine"] = {kv: engine(model, prompts, encode, features, batches, max_tokens, kv, device,
                                source.context_length, first_answer) for kv in engines}
    del model, vision
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def engine(model, prompts: Prompts, encode, features, batches: list[int], max_tokens: int, kv: str, device: str,
           context: int, reference: list[int]) -> dict:
    """The LLM deployment's continuous batcher (``serve.batching``) driven in
    this thread, without Ray: N requests submitted together for each N in
    ``batches``, each ``max_tokens`` long. Tokens/s over the whole batch
    (prefills included), the inter-token time of a single stream, and how
    many leading tokens of the first prompt's greedy answer equal
    ``generate``'s (``reference``; bf16 rounding may part them late).
    The prefix cache is off for these (the timed runs repeat their warm-ups'
    prompts); with the static cache, ``prefix_turn`` then times a chat's
    second turn with and without it."""
    import torch

    from serve.batching import DONE, BatchingOptions, ContinuousBatcher, GenerationRequest

    t = time.perf_counter()
    batcher = ContinuousBatcher(model, max(batches), suppress_ids=model.suppressed_ids,
                                options=BatchingOptions(kv_cache=kv, prefix_cache=False), context_length=context)
    out: dict = {"build_s": round(time.perf_counter() - t, 2), **batcher.describe(), "tok_s": {}}

    def go(idx: list[int]) -> tuple[float, list[list[float]], list[list[int]]]:
        feats = {i: features([i]) for i in idx}
        stamps: list[list[float]] = [[] for _ in idx]
        tokens: list[list[int]] = [[] for _ in idx]
        errors: list[BaseException] = []
        for k, i in enumerate(idx):
            def emit(item, k=k):
                if isinstance(item, BaseException):
                    errors.append(item)
                elif item is not DONE:
                    stamps[k].append(time.perf_counter())
                    tokens[k].extend(item)
            req = GenerationRequest(list(encode(i).input_ids), feats[i], max_new_tokens=max_tokens,
                                    min_new_tokens=max_tokens)
            batcher.submit(req, emit)
        sync(device)
        t0 = time.perf_counter()
        while batcher.step():
            pass
        sync(device)
        if errors:
            raise errors[0]
        return time.perf_counter() - t0, stamps, tokens

    with torch.no_grad():
        go([0])  # warm-up
        secs, stamps, tokens = go([0])
        out["itl_ms_batch1"] = round(1000 * (stamps[0][-1] - stamps[0][0]) / (max_tokens - 1), 3)
        same = next((k for k, (a, b) in enumerate(zip(tokens[0], reference)) if a != b), min(len(tokens[0]), len(reference)))
        out["agrees_with_generate"] = f"{same}/{len(reference)}"
        for b in batches:
            go(list(range(b)))  # warm-up at this batch size
            secs, _, tokens = go(list(range(b)))
            assert all(len(x) == max_tokens for x in tokens), [len(x) for x in tokens]
            out["tok_s"][str(b)] = round(b * max_tokens / secs, 1)
        if batcher.prefix is not None:
            try:
                out["prefix"] = prefix_turn(model, batcher, prompts, encode, features, device)
            except Exception as e:  # noqa: BLE001 - an extra figure: its failure is reported, the stage goes on
                out["prefix"] = {"error": f"{type(e).__name__}: {e}"}
    out["graphs_captured"] = batcher.describe().get("graphs_captured")
    batcher.close()
    return out


def prefix_turn(model, batcher, prompts: Prompts, encode, features, device: str, new_tokens: int = 8) -> dict:
    """A chat's second turn (the first turn, its answer, a follow-up
    question) through ``batcher`` alone: time to its first token prefilled
    whole (prefix cache off) and continuing the first turn's kept row (on),
    each after an untimed run of the same path, and how many of the greedy
    tokens of the two agree."""
    from dataclasses import replace

    from models.conversation import encode_conversation
    from serve.batching import DONE, GenerationRequest

    i = next((k for k in range(len(prompts.kinds)) if prompts.kind(k) == "image"), 0)
    first_ids, feats = list(encode(i).input_ids), features([i])

    def one(ids: list[int]) -> tuple[float, list[int]]:
        tokens: list[int] = []
        stamps: list[float] = []

        def emit(item):
            if isinstance(item, BaseException):
                raise item
            if item is not DONE:
                stamps.append(time.perf_counter())
                tokens.extend(item)

        sync(device)
        t0 = time.perf_counter()
        batcher.submit(GenerationRequest(ids, feats, max_new_tokens=new_tokens, min_new_tokens=new_tokens), emit)
        while batcher.step():
            pass
        return stamps[0] - t0, tokens

    def prefix_cache(on: bool) -> None:
        batcher.options = replace(batcher.options, prefix_cache=on)
        batcher.prefix.clear()

    prefix_cache(False)
    answer = one(first_ids)[1]
    tok = model.tokenizer
    messages = prompts.messages(i) + [{"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)},
                                      {"role": "user", "content": [{"type": "text", "text": FOLLOW_UPS[0]}]}]
    second = encode_conversation(tok, messages, model.num_image_tokens, add_generation_prompt=True,
                                 system_prompt=model.cfg.tokenizer.system_prompt).input_ids
    one(second)  # warm-up: the whole prompt
    whole_s, whole = one(second)
    runs = []
    for _ in range(2):  # the first continues the row untimed (warm-up), the second is timed
        prefix_cache(True)
        one(first_ids)
        before = dict(batcher.stats)
        runs.append(one(second))
    cached_s, cached = runs[-1]
    prefix_cache(False)
    same = next((k for k, (a, b) in enumerate(zip(cached, whole)) if a != b), len(whole))
    return {"prompt_tokens": len(second), "reused_tokens": batcher.stats["prefix_tokens"] - before["prefix_tokens"],
            "ttft_ms_whole": round(1000 * whole_s, 2), "ttft_ms_cached": round(1000 * cached_s, 2),
            "ratio": round(whole_s / cached_s, 2) if cached_s > 0 else None, "agrees": f"{same}/{len(whole)}"}


# ------------------------------------------------------------------ serving

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_nested(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise SystemExit(f"--option: {k!r} in {dotted!r} is not a mapping")
    d[keys[-1]] = value


def deployment_options(args) -> tuple[dict, dict[str, dict]]:
    """``serve/config.yaml``'s application args and deployment options with
    this benchmark's changes: fixed replicas, GPU shares, ``--option``."""
    import yaml

    from serve.app import read_serve_config

    app_args, opts = read_serve_config()
    for name in ("Ingress", "ASR", "ImageEncoder", "LLM"):
        o = opts.setdefault(name, {})
        if not args.autoscale:
            o.pop("autoscaling_config", None)
            o["num_replicas"] = args.llm_replicas if name == "LLM" else 1
        if args.gpu and name in GPU_SHARES:
            share = GPU_SHARES[name] / (args.llm_replicas if name == "LLM" and not args.autoscale else 1)
            o.setdefault("ray_actor_options", {})["num_gpus"] = round(share, 4)
    for item in args.option:
        key, sep, value = item.partition("=")
        name, _, path = key.partition(".")
        if not sep or not path or name not in opts:
            raise SystemExit(f"--option {item!r}: expected DEPLOYMENT.key=value with DEPLOYMENT one of {sorted(opts)}")
        set_nested(opts[name], path, yaml.safe_load(value))
    return app_args, opts


def start_server(args, settings: dict, port: int) -> tuple[str, float]:
    """``run_local`` with a Serve config holding this run's deployment options."""
    import yaml

    from serve.app import APP_NAME, run_local

    app_args, opts = deployment_options(args)
    cfg = {"applications": [{"name": APP_NAME, "args": app_args,
                             "deployments": [{"name": n, **o} for n, o in opts.items()]}]}
    path = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    url = run_local(None, port, blocking=False, settings=settings, config=path, num_cpus=args.num_cpus)
    return url, time.perf_counter() - t


async def one_request(client, body: dict, kind: str) -> dict:
    """One streaming chat completion; timestamps at the client."""
    rec = {"kind": kind, "ok": False, "tokens": 0, "chunks": 0, "error": None, "text": ""}
    t0 = time.perf_counter()
    first = last = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = f"stream error: {obj['error'].get('message')}"
                    return rec
                for ch in obj.get("choices") or []:
                    if ch.get("delta", {}).get("content"):
                        rec["text"] += ch["delta"]["content"]
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                        rec["chunks"] += 1
                    if ch.get("finish_reason"):
                        rec["finish_reason"] = ch["finish_reason"]
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as an error
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    end = time.perf_counter()
    if not done:
        rec["error"] = "stream ended without [DONE]"
    elif first is None:
        rec["error"] = "no text in the answer"
    else:
        rec.update(ok=True, ttft_s=first - t0, latency_s=end - t0, start=t0, end=end,
                   # one text chunk (the stream coalesced the rest with it): no gap to measure
                   itl_s=(last - first) / (rec["tokens"] - 1) if rec["tokens"] > 1 and rec["chunks"] > 1 else None)
    return rec


def request_body(prompts: Prompts, i: int, args, model_name: str, messages: list[dict] | None = None) -> dict:
    return {"model": model_name, "messages": messages or prompts.api_messages(i), "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def load_level(url: str, prompts: Prompts, users: int, args, model_name: str, headers: dict) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=headers) as client:
        deadline = time.perf_counter() + args.duration if args.duration else None

        async def user(u: int) -> list[dict]:
            out, j, history, first = [], 0, [], 0
            while (j < args.requests_per_user) if deadline is None else (time.perf_counter() < deadline):
                turn = j % args.turns
                if turn == 0:  # a new chat: user u's j-th prompt; kinds alternate across users and requests
                    first = u + users * j
                    messages = prompts.api_messages(first)
                else:  # the chat so far and a follow-up question
                    messages = history + [{"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]}]
                rec = await one_request(client, request_body(prompts, first, args, model_name, messages),
                                        prompts.kind(first))
                rec["turn"] = turn + 1
                out.append(rec)
                history = messages + [{"role": "assistant", "content": rec["text"]}]
                j += 1
            return out

        t = time.perf_counter()
        recs = [r for rs in await asyncio.gather(*[user(u) for u in range(users)]) for r in rs]
        for r in recs:
            r["level_start"] = t
        return recs


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def summarise(users: int, recs: list[dict], baseline: dict | None, kinds: list[str]) -> dict:
    if not recs:
        raise SystemExit(f"{users} users sent no request (is --duration too short?)")
    ok = [r for r in recs if r["ok"]]
    errors = [r for r in recs if not r["ok"]]
    wall = (max(r["end"] for r in ok) - recs[0]["level_start"]) if ok else None
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok]
    itl = [r["itl_s"] for r in ok if r["itl_s"] is not None]
    row = {
        "users": users, "requests": len(recs), "ok": len(ok), "errors": len(errors),
        "error_samples": sorted({r["error"] for r in errors})[:5],
        "wall_s": round(wall, 3) if wall else None,
        "ttft_ms_p50": ms(pct(ttft, 50)), "ttft_ms_p95": ms(pct(ttft, 95)),
        "itl_ms_p50": ms(pct(itl, 50)),
        "latency_ms_p50": ms(pct([r["latency_s"] for r in ok], 50)),
        "output_tok_s": round(tokens / wall, 1) if wall else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "completion_tokens": tokens,
        "tokens_per_request": [min(r["tokens"] for r in ok), max(r["tokens"] for r in ok)] if ok else None,
        "ttft_ms_p50_by_kind": {k: ms(pct([r["ttft_s"] for r in ok if r["kind"] == k], 50)) for k in kinds},
        "ttft_ms_p50_by_turn": {t: ms(pct([r["ttft_s"] for r in ok if r.get("turn", 1) == t], 50))
                                for t in sorted({r.get("turn", 1) for r in recs})},
        "per_request": [{"kind": r["kind"], "turn": r.get("turn", 1), "ok": r["ok"], "tokens": r["tokens"],
                         "chunks": r["chunks"],
                         "ttft_ms": ms(r.get("ttft_s")), "itl_ms": ms(r.get("itl_s")),
                         "latency_ms": ms(r.get("latency_s")), "finish_reason": r.get("finish_reason")}
                        for r in recs],
    }
    if baseline and wall:
        ref = baseline["tok_s"].get(str(users))
        row["inproc_tok_s"] = ref
        row["overhead_ratio"] = round(row["output_tok_s"] / ref, 3) if ref else None
        row["ttft_vs_prefill"] = {k: round(row["ttft_ms_p50_by_kind"][k] / baseline["prefill_ms"][k], 2)
                                  for k in kinds if row["ttft_ms_p50_by_kind"][k] is not None}
    return row


async def serve_load(url: str, prompts: Prompts, args, model_name: str, headers: dict, baseline) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, headers=headers) as client:
        for i in range(args.warmup):  # every kind, through every deployment, before timing
            r = await one_request(client, request_body(prompts, i, args, model_name), prompts.kind(i))
            if not r["ok"]:
                raise SystemExit(f"warm-up request failed: {r['error']}")
    rows = []
    replicas = args.llm_replicas if not args.autoscale else 1
    for users in args.users:
        before, before_all = await llm_stats(), await llm_stats_all(replicas)
        recs = await load_level(url, prompts, users, args, model_name, headers)
        rows.append(summarise(users, recs, baseline, prompts.kinds))
        after, after_all = await llm_stats(), await llm_stats_all(replicas)
        rows[-1]["llm_rows_per_step"] = rows_per_step(before, after)
        rows[-1]["llm_prefix"] = {k: after_all.get(k, 0) - before_all.get(k, 0)
                                  for k in ("prompt_tokens", "prefix_tokens", "prefix_hits")}
        rows[-1]["llm_cache"] = {k: after[k] for k in ("kv_cache", "rows", "max_len", "cuda_graphs", "graphs_captured",
                                                       "capture_s", "graph_error", "static_error") if k in after}
        print(f"  {users} users: {rows[-1]['ok']}/{rows[-1]['requests']} ok, "
              f"{rows[-1]['output_tok_s']} tokens/s", flush=True)
    return rows


async def llm_stats() -> dict:
    """The LLM deployment's batching counters (one replica's when there are several)."""
    from ray import serve

    from serve.app import APP_NAME

    return await serve.get_deployment_handle("LLM", APP_NAME).batching_stats.remote()


async def llm_stats_all(replicas: int) -> dict:
    """The prompt and prefix cache counters summed over the LLM's replicas:
    each call reaches a replica at random, so enough calls reach every one
    (``replicas`` of them, fixed) with near certainty; one reply per replica counts."""
    from ray import serve

    from serve.app import APP_NAME

    handle = serve.get_deployment_handle("LLM", APP_NAME)
    seen: dict = {}
    for _ in range(1 if replicas <= 1 else 12 * replicas):
        s = await handle.batching_stats.remote()
        seen[s.get("replica")] = s
        if len(seen) >= replicas:
            break
    keys = ("prompt_tokens", "prefix_tokens", "prefix_hits")
    return {k: sum(s.get(k, 0) for s in seen.values()) for k in keys} | {"replicas_seen": len(seen)}


def rows_per_step(before: dict, after: dict) -> float | None:
    """Mean requests decoded together per forward pass over a level (None
    without continuous batching)."""
    steps = after.get("steps", 0) - before.get("steps", 0)
    decoded = (after.get("tokens", 0) - before.get("tokens", 0)) - (after.get("prefills", 0) - before.get("prefills", 0))
    return round(decoded / steps, 2) if steps > 0 else None


# --------------------------------------------------------------------- main

def card_name(gpu: bool) -> str:
    import torch

    if gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({os.cpu_count()} cores{', ' + model if model else ''})"


def fmt(v, width: int, digits: int = 1) -> str:
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width},.{digits}f}" if isinstance(v, float) else f"{v:>{width}}"


def print_table(res: dict) -> None:
    b = res.get("inprocess")
    print(f"\nserving benchmark: {res['card']}, preset {res['preset']}, {res['max_tokens']} tokens per answer, "
          f"mix {res['mix']}, LLM replicas {res['llm_replicas']}, LLM user_config {res['llm_user_config']}")
    if b:
        pre = ", ".join(f"{k} {v:.1f} ms ({b['prompt_tokens'][k]} tokens)" for k, v in b["prefill_ms"].items())
        print(f"in-process ({b['device']}): prefill {pre}" + (f"; vision {b['vision_ms']:.1f} ms/image"
                                                              if "vision_ms" in b else "")
              + f"; inter-token {b['itl_ms_batch1']:.2f} ms at batch 1")
        for kv, e in (b.get("engine") or {}).items():
            rates = ", ".join(f"{v:,.0f} at {n}" for n, v in e["tok_s"].items())
            gen = ", ".join(f"{v:,.0f} at {n}" for n, v in b["tok_s"].items())
            print(f"in-process batching loop, {kv} KV cache{' + CUDA graphs' if e.get('cuda_graphs') else ''}: "
                  f"inter-token {e['itl_ms_batch1']:.2f} ms at batch 1; tokens/s {rates} (generate: {gen}); "
                  f"greedy tokens equal to generate's {e['agrees_with_generate']}")
            if e.get("prefix", {}).get("error"):
                print(f"  a chat's second turn: failed ({e['prefix']['error']})")
            elif e.get("prefix"):
                p = e["prefix"]
                print(f"  a chat's second turn ({p['prompt_tokens']} tokens): first token {p['ttft_ms_whole']:.1f} ms "
                      f"prefilled whole, {p['ttft_ms_cached']:.1f} ms continuing the first turn's row "
                      f"({p['reused_tokens']} tokens kept, {p['ratio']}x); greedy tokens agree {p['agrees']}")
    head = (f"{'users':>5} {'ok/req':>7} {'err':>4} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'tok/s':>9} "
            f"{'req/s':>7} {'in-proc':>9} {'served/':>8} {'TTFT/prefill':>13} {'rows/':>6}")
    print(head)
    print(f"{'':>5} {'':>7} {'':>4} {'ms':>9} {'ms':>9} {'ms':>8} {'served':>9} {'':>7} {'tok/s@N':>9} "
          f"{'in-proc':>8} {'(p50, by kind)':>13} {'step':>6}")
    for r in res["levels"]:
        tvp = " ".join(f"{k[0]}{v:.1f}" for k, v in (r.get("ttft_vs_prefill") or {}).items())
        print(f"{r['users']:>5} {str(r['ok']) + '/' + str(r['requests']):>7} {r['errors']:>4} "
              f"{fmt(r['ttft_ms_p50'], 9)} {fmt(r['ttft_ms_p95'], 9)} {fmt(r['itl_ms_p50'], 8, 2)} "
              f"{fmt(r['output_tok_s'], 9)} {fmt(r['requests_per_s'], 7, 2)} {fmt(r.get('inproc_tok_s'), 9)} "
              f"{fmt(r.get('overhead_ratio'), 8, 2)} {tvp:>13} {fmt(r.get('llm_rows_per_step'), 6, 1)}")
    if res.get("turns", 1) > 1:
        for r in res["levels"]:
            by_turn = ", ".join(f"turn {t} {fmt(v, 0)} ms" for t, v in r["ttft_ms_p50_by_turn"].items())
            p = r.get("llm_prefix") or {}
            print(f"{r['users']:>5} users, TTFT p50 by turn: {by_turn}; prompt tokens prefilled "
                  f"{p.get('prompt_tokens')}, from the prefix cache {p.get('prefix_tokens')} "
                  f"({p.get('prefix_hits')} hits)")
    print("TTFT/prefill: served TTFT p50 over in-process prefill, t = text, i = image + text "
          "(image: prefill without the vision tower); rows/step: requests the LLM decoded together "
          "per forward pass (continuous batching)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--checkpoint", default=None, help="a training checkpoint folder (default: the preset)")
    ap.add_argument("--gpu", action="store_true",
                    help=f"give the deployments GPU shares of one card ({GPU_SHARES}); the baseline runs on it too")
    ap.add_argument("--users", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument("--requests-per-user", type=int, default=4, help="back-to-back requests per user")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds each level runs instead of a request count")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (min_tokens too)")
    ap.add_argument("--mix", choices=sorted(KINDS), default="both",
                    help="prompt kinds: text only, image + text only, or both alternating")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests before the first level")
    ap.add_argument("--turns", type=int, default=1,
                    help="turns per chat: each user's requests continue a chat this long (history resent each turn)")
    ap.add_argument("--images", type=int, default=N_IMAGES,
                    help="distinct images the image requests cycle through (1: every one sends the same image, "
                         "as the turns of one chat about it do)")
    ap.add_argument("--image-cache-mb", type=float, default=None,
                    help="the ingress's image feature cache (serving setting image_cache_mb; 0: off)")
    ap.add_argument("--encoder-cache-mb", type=float, default=None,
                    help="each ImageEncoder replica's image feature cache (serving setting encoder_cache_mb; 0: off)")
    ap.add_argument("--photo", default=None, metavar="WxH",
                    help="image requests carry photo-like JPEGs of this size (e.g. 4032x3024, a phone's) instead of "
                         "128 px synthetic scenes")
    ap.add_argument("--llm-replicas", type=int, default=1, help="fixed LLM replica count (others: 1)")
    ap.add_argument("--autoscale", action="store_true",
                    help="keep serve/config.yaml's autoscaling instead of fixed replica counts")
    ap.add_argument("--option", action="append", default=[],
                    help="deployment option, e.g. LLM.max_ongoing_requests=32 (value is YAML)")
    ap.add_argument("--baseline-repeats", type=int, default=2, help="timed generate calls per batch size")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process baseline")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    ap.add_argument("--no-ui", action="store_true",
                    help="serve the HTTP API without the Gradio page (machines without gradio)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--out", default="runs/bench/serve_bench.json")
    args = ap.parse_args(argv)
    args.users = [int(u) for u in args.users.split(",") if u.strip()]
    if not args.users or min(args.users) < 1:
        ap.error("--users needs positive integers")
    if args.turns < 1:
        ap.error("--turns must be at least 1")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be at least 2 (inter-token latency needs two tokens)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import ray
    import torch
    from ray import serve

    from serve.app import read_serve_config
    from serve.settings import ServeSettings

    logging.basicConfig(level=logging.WARNING)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    app_args = read_serve_config()[0]
    limits = dict(app_args.get("limits") or {})
    limits["max_new_tokens"] = max(limits.get("max_new_tokens", 0), args.max_tokens)
    # a key set for `mmphi serve` (MMPHI_API_KEY) does not guard this private instance
    settings = {"preset": args.preset, "overrides": list(args.overrides), "limits": limits,
                "device": None if args.gpu else "cpu", "api_key_env": "MMPHI_BENCH_API_KEY", "ui": not args.no_ui}
    if args.checkpoint:
        settings["checkpoint"] = str(Path(args.checkpoint).expanduser().resolve())
    if args.image_cache_mb is not None:
        settings["image_cache_mb"] = args.image_cache_mb
    if args.encoder_cache_mb is not None:
        settings["encoder_cache_mb"] = args.encoder_cache_mb
    resolved = ServeSettings.from_dict({**app_args, **settings})
    prompts = Prompts(args.mix, photo=tuple(map(int, args.photo.lower().split("x"))) if args.photo else None,
                      n_images=args.images)

    baseline = None
    if not args.no_baseline:
        print(f"in-process baseline: batches {args.users}, {args.max_tokens} tokens ...", flush=True)
        baseline = in_process(resolved, prompts, args.users, args.max_tokens, args.baseline_repeats)
        print(f"  {baseline}", flush=True)

    port = args.port or free_port()
    print(f"starting the Serve application on port {port} ...", flush=True)
    url, startup = start_server(args, settings, port)
    print(f"  ready in {startup:.0f} s at {url}", flush=True)
    headers = {}
    key = os.environ.get("MMPHI_BENCH_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        levels = asyncio.run(serve_load(url.rstrip("/"), prompts, args, resolved.model_name, headers, baseline))
    finally:
        serve.shutdown()
        ray.shutdown()

    by_users = {r["users"]: r for r in levels}
    one = by_users.get(1, {})
    # single stream: the decode rate between tokens, and tokens over whole requests (prefill and HTTP included)
    summary = {"decode_tok_s_batch1": round(1000 / one["itl_ms_p50"], 1) if one.get("itl_ms_p50") else None,
               "tok_s_batch1": one.get("output_tok_s")}
    if 32 in by_users:
        summary["ratio_vs_hf_batch32"] = by_users[32].get("overhead_ratio")
        summary["tok_s_batch32"] = by_users[32].get("output_tok_s")
    for kv, e in ((baseline or {}).get("engine") or {}).items():
        summary[f"engine_{kv}_decode_tok_s_batch1"] = round(1000 / e["itl_ms_batch1"], 1) if e["itl_ms_batch1"] else None
        top = str(max(int(n) for n in e["tok_s"]))
        summary[f"engine_{kv}_ratio_vs_hf_batch{top}"] = round(e["tok_s"][top] / baseline["tok_s"][top], 3)
    summary["llm_cache"] = one.get("llm_cache") or next((r.get("llm_cache") for r in levels), None)
    if "image" in prompts.kinds and 1 in by_users:
        summary["ttft_ms_p50"] = by_users[1]["ttft_ms_p50_by_kind"]["image"]
    res = {
        "benchmark": "serve", "card": card_name(args.gpu), "device": "cuda" if args.gpu else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": args.preset, "checkpoint": args.checkpoint,
        "overrides": args.overrides, "torch": torch.__version__, "ray": ray.__version__,
        "max_tokens": args.max_tokens, "temperature": 0, "mix": args.mix, "turns": args.turns, "photo": args.photo,
        "images": args.images,
        "image_cache_mb": resolved.image_cache_mb, "encoder_cache_mb": resolved.encoder_cache_mb, "users": args.users,
        "requests_per_user": None if args.duration else args.requests_per_user, "duration_s": args.duration,
        "llm_replicas": "autoscaled" if args.autoscale else args.llm_replicas, "options": args.option,
        "llm_user_config": deployment_options(args)[1]["LLM"].get("user_config"),
        "torch_threads": resolved.torch_threads, "serve_startup_s": round(startup, 1),
        "summary": summary, "inprocess": baseline, "levels": levels,
    }
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
