"""Long prompts arriving while streams decode: the LLM's batching loop
in-process (no Ray), prompts prefilled in one pass against in chunks
(``prefill_chunk_tokens``), same requests and schedule, one run.

``--streams`` requests decode all the time (short prompts, ``--max-tokens``
each, a new one as one ends); every ``--every`` steps a long prompt of about
``--long-tokens`` tokens arrives (text, or ``--images`` pictures and text).
For each setting it reports the running streams' time between tokens (p50,
p99 and the longest: what a long prompt's prefill adds to every stream) and
the long prompts' time to first token. Prints a table and writes JSON.

    python bench/chunk_bench.py                                   # tiny preset, CPU
    python bench/chunk_bench.py --preset phi3-mini --gpu --long-tokens 3000 --chunks 0,512,1024
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.inprocess import chat_prompt, load_model, parser, percentile  # noqa: E402


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--chunks", default="0,64,256", help="prefill_chunk_tokens settings, comma-separated (0: one pass)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--long-tokens", type=int, default=900)
    ap.add_argument("--every", type=int, default=12, help="steps between long prompts")
    ap.add_argument("--steps", type=int, default=240)
    return ap.parse_args(argv)


def run(model, chunk: int, args, short: list[int], long_ids: list[int]) -> dict:
    import torch

    from serve.batching import BatchingOptions, ContinuousBatcher, GenerationRequest

    opts = BatchingOptions(prefill_chunk_tokens=chunk, prefix_cache=False)
    b = ContinuousBatcher(model, args.streams + 4, suppress_ids=model.suppressed_ids, options=opts,
                          context_length=model.cfg.tokenizer.max_length)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    last_token: dict[int, float] = {}
    gaps: list[float] = []
    ttft: list[float] = []
    live: dict[int, dict] = {}
    ids_ = itertools.count()

    def submit(ids, kind):
        k = next(ids_)
        state = {"kind": kind, "t0": time.perf_counter(), "first": None, "done": False}

        def emit(item, k=k, state=state):
            now = time.perf_counter()
            if isinstance(item, list):
                if state["first"] is None:
                    state["first"] = now
                    if kind == "long":
                        ttft.append(now - state["t0"])
                elif kind == "short":
                    gaps.append(now - last_token[k])
                last_token[k] = now
            else:
                state["done"] = True
        live[k] = state
        b.submit(GenerationRequest(ids, None, max_new_tokens=args.max_tokens if kind == "short" else 4,
                                   min_new_tokens=args.max_tokens if kind == "short" else 0), emit)

    for _ in range(args.streams):
        submit(short, "short")
    t = time.perf_counter()
    for step in range(args.steps):
        if step and step % args.every == 0:
            submit(long_ids, "long")
        b.step()
        sync()
        for k, st in list(live.items()):
            if st["done"]:
                del live[k]
                if st["kind"] == "short":
                    submit(short, "short")
    wall = time.perf_counter() - t
    ms = [g * 1000 for g in gaps]
    return {"prefill_chunk_tokens": chunk, "itl_ms_p50": statistics.median(ms), "itl_ms_p99": percentile(ms, 0.99),
            "itl_ms_max": max(ms), "long_ttft_ms_p50": statistics.median(ttft) * 1000 if ttft else None,
            "long_prompts_answered": len(ttft), "steps_per_s": args.steps / wall,
            "prefill_chunks": b.stats.get("prefill_chunks", 0)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, device = load_model(args)
    cfg = model.cfg

    short = chat_prompt(model, "Hi")
    sentence = "The small red circle sits left of the large blue square on a grey table. "
    text = sentence
    while len(chat_prompt(model, text + sentence)) <= args.long_tokens:
        text += sentence
    long_ids = chat_prompt(model, text)
    limit = cfg.tokenizer.max_length - 8
    if len(long_ids) > limit:
        sys.exit(f"--long-tokens {args.long_tokens}: the prompt must leave room in a "
                 f"{cfg.tokenizer.max_length}-token row")
    chunks = [int(c) for c in args.chunks.split(",")]
    run(model, chunks[0], argparse.Namespace(**{**vars(args), "steps": 20}), short, long_ids)  # warm-up
    rows = [run(model, c, args, short, long_ids) for c in chunks]
    res = {"benchmark": "chunked prefill", "preset": args.preset, "device": device, "streams": args.streams,
           "long_prompt_tokens": len(long_ids), "every_steps": args.every, "steps": args.steps, "results": rows}
    print(f"{args.streams} streams decoding, a {len(long_ids)}-token prompt every {args.every} steps ({device}, "
          f"{args.preset})")
    print(f"{'chunk':>6} {'ITL p50 ms':>11} {'p99':>8} {'max':>8} {'long TTFT p50 ms':>17} {'chunks':>7}")
    for r in rows:
        print(f"{r['prefill_chunk_tokens'] or 'off':>6} {r['itl_ms_p50']:>11.2f} {r['itl_ms_p99']:>8.2f} "
              f"{r['itl_ms_max']:>8.2f} {r['long_ttft_ms_p50'] or 0:>17.1f} {r['prefill_chunks']:>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
