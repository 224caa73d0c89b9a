"""Structured output's cost (``response_format``), in two parts, one run.

1. The LLM's batching loop in-process (no Ray): ``--rows`` streams decoding
   free, then the same streams held to a JSON schema (a list of strings, so
   a random model's answers run long), each as many steps; a stream that
   ends is replaced. Reported per setting: milliseconds per decoding step
   (steps that admitted a request left out), of which the format's work
   (xgrammar's masks, their application, the matchers' advance), and the
   ratio of held to free.
2. xgrammar alone with a vocabulary of real size: the GPT-2 BPE that
   openai-whisper ships (with Whisper's special tokens, 51,864; Phi-3's
   32,064-token vocabulary cannot be fetched offline). Compiling the schema (first time
   and cached), and per token: filling one row's mask and advancing the
   matcher, along answers drawn at random from the allowed tokens.

Prints a table and writes JSON.

    python bench/format_bench.py                          # tiny preset, CPU
    python bench/format_bench.py --gpu --preset phi3-mini --set llm.dtype=bfloat16 ...
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.inprocess import chat_prompt, load_model, parser, percentile  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "notes"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "notes": {"type": "array", "items": {"type": "string"}}}}
SPEC = {"type": "json_schema", "schema": json.dumps(SCHEMA)}


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--rows", default="1,8,32", help="streams decoding at once, comma-separated")
    ap.add_argument("--steps", type=int, default=60, help="decoding steps timed per setting")
    ap.add_argument("--max-tokens", type=int, default=96, help="each answer's max_tokens")
    ap.add_argument("--vocab-answers", type=int, default=20, help="random answers for part 2")
    return ap.parse_args(argv)


def loop_run(model, grammars, prompt: list[int], rows: int, held: bool, args) -> dict:
    """``rows`` streams for ``args.steps`` decoding steps; held to SCHEMA or free."""
    import torch

    from serve.batching import BatchingOptions, ContinuousBatcher, GenerationRequest

    b = ContinuousBatcher(model, rows, suppress_ids=model.suppressed_ids,
                          options=BatchingOptions(prefix_cache=False), context_length=model.cfg.tokenizer.max_length)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    format_s = [0.0]
    restore = None
    if held:  # the format's share of each step: the masks (filled and applied) and the matchers' advance
        from serve.grammar import Constraint

        inner, accept = b._mask_to_formats, Constraint.accept

        def timed_mask(*a, **k):
            t = time.perf_counter()
            inner(*a, **k)
            sync()
            format_s[0] += time.perf_counter() - t

        def timed_accept(self, token):
            t = time.perf_counter()
            ok = accept(self, token)
            format_s[0] += time.perf_counter() - t
            return ok

        b._mask_to_formats = timed_mask
        Constraint.accept = timed_accept

        def restore():
            Constraint.accept = accept
    done = {}

    def submit(k: int) -> None:
        c = grammars.constraint(SPEC) if held else None
        # free streams run their whole length (as a held answer would if the model kept writing)
        req = GenerationRequest(prompt, None, max_new_tokens=args.max_tokens,
                                min_new_tokens=0 if held else args.max_tokens, constraint=c)
        done[k] = False
        b.submit(req, lambda item, k=k: done.__setitem__(k, True) if not isinstance(item, list) else None)

    for k in range(rows):
        submit(k)
    nxt = rows
    step_ms, format_ms, tokens = [], [], 0
    steps = 0
    while steps < args.steps:
        before = b.stats["prefills"]
        format_s[0] = 0.0
        t = time.perf_counter()
        b.step()
        sync()
        dt = time.perf_counter() - t
        if b.stats["prefills"] == before:  # a pure decoding step
            step_ms.append(dt * 1000)
            format_ms.append(format_s[0] * 1000)
            tokens += b.active
            steps += 1
        for k in [k for k, d in done.items() if d]:
            del done[k]
            submit(nxt)
            nxt += 1
    b.close()
    if restore is not None:
        restore()
    return {"rows": rows, "format": "json_schema" if held else None, "step_ms_p50": statistics.median(step_ms),
            "step_ms_mean": statistics.fmean(step_ms), "format_ms_mean": statistics.fmean(format_ms),
            "answers_started": nxt, "tokens_per_s": tokens / (sum(step_ms) / 1000)}


def vocab_run(args) -> dict:
    """xgrammar with Whisper's GPT-2 vocabulary: compile, mask fill and advance per token."""
    import numpy as np
    import xgrammar as xgr
    from whisper.tokenizer import get_encoding

    enc = get_encoding("gpt2")
    vocab = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    eos = enc.eot_token
    t = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
    info_s = time.perf_counter() - t
    from serve.schema_check import compile_kwargs

    comp = xgr.GrammarCompiler(info, max_threads=2)
    t = time.perf_counter()
    grammar = comp.compile_json_schema(SPEC["schema"], **compile_kwargs())
    compile_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    comp.compile_json_schema(SPEC["schema"], **compile_kwargs())
    cached_ms = (time.perf_counter() - t) * 1000
    words = xgr.allocate_token_bitmask(1, len(vocab))
    rng = random.Random(0)
    fill_us, accept_us, lengths = [], [], []
    for _ in range(args.vocab_answers):
        m = xgr.GrammarMatcher(grammar)
        n = 0
        while not m.is_terminated() and n < args.max_tokens:
            t = time.perf_counter()
            m.fill_next_token_bitmask(words, 0)
            fill_us.append((time.perf_counter() - t) * 1e6)
            bits = np.unpackbits(words[0].numpy().view(np.uint8), bitorder="little")[:len(vocab)]
            allowed = np.flatnonzero(bits)
            token = int(allowed[rng.randrange(len(allowed))])
            t = time.perf_counter()
            assert m.accept_token(token)
            accept_us.append((time.perf_counter() - t) * 1e6)
            n += 1
        lengths.append(n)
    return {"vocab": "gpt2 (whisper)", "vocab_size": len(vocab), "tokenizer_info_s": info_s,
            "compile_ms": compile_ms, "compile_cached_ms": cached_ms, "tokens": len(fill_us),
            "answer_tokens_p50": statistics.median(lengths), "fill_us_p50": statistics.median(fill_us),
            "fill_us_p99": percentile(fill_us, 0.99), "accept_us_p50": statistics.median(accept_us)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from serve.grammar import Grammars

    model, device = load_model(args)
    tok = model.tokenizer
    grammars = Grammars(tok.hf, model.llm.get_output_embeddings().weight.shape[0], tok.stop_ids)
    prompt = chat_prompt(model, "List what you see as JSON: the main colour and a few notes.")
    sizes = [int(r) for r in args.rows.split(",")]
    loop_run(model, grammars, prompt, sizes[0], True, argparse.Namespace(**{**vars(args), "steps": 5}))  # warm-up
    rows = []
    for n in sizes:
        free = loop_run(model, grammars, prompt, n, False, args)
        held = loop_run(model, grammars, prompt, n, True, args)
        held["step_ratio_vs_free"] = held["step_ms_mean"] / free["step_ms_mean"]
        rows += [free, held]
    vocab = vocab_run(args)
    res = {"benchmark": "structured output", "preset": args.preset, "device": device, "schema": SCHEMA,
           "tokenizer_vocab": len(tok), "steps": args.steps, "loop": rows, "xgrammar_gpt2_vocab": vocab}
    print(f"batching loop, {args.steps} decoding steps per row ({device}, {args.preset}, "
          f"{len(tok)}-token tokenizer)")
    print(f"{'rows':>5} {'format':>12} {'ms/step p50':>12} {'mean':>8} {'format ms':>10} {'x free':>7} "
          f"{'tokens/s':>9}")
    for r in rows:
        ratio = f"{r['step_ratio_vs_free']:.2f}" if "step_ratio_vs_free" in r else "-"
        print(f"{r['rows']:>5} {r['format'] or 'free':>12} {r['step_ms_p50']:>12.2f} {r['step_ms_mean']:>8.2f} "
              f"{r['format_ms_mean']:>10.2f} {ratio:>7} {r['tokens_per_s']:>9.0f}")
    print(f"xgrammar, {vocab['vocab_size']:,}-token vocabulary: compile {vocab['compile_ms']:.1f} ms "
          f"(cached {vocab['compile_cached_ms']:.2f} ms); per token: mask {vocab['fill_us_p50']:.0f} us p50, "
          f"{vocab['fill_us_p99']:.0f} p99; advance {vocab['accept_us_p50']:.0f} us ({vocab['tokens']} tokens)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
