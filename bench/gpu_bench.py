"""Every stage against its plain baseline, on one device, in one run
(``make bench-gpu``).

- **embed** (``bench/embed_bench.py``): the Ray Data embedding job's steady
  images/s against a bare single-process loop (read, decode, crop, encode)
  and against the encoder alone on decoded images;
- **train** (``bench/train_bench.py``): the stage-2 (QLoRA) job's step
  against a bare Hugging Face + PEFT loop, same model, conversations and
  batch size: real tokens/s and peak memory;
- **serve** (``bench/serve_bench.py``): the Ray Serve application (API only,
  no Gradio page) at 1 and 32 concurrent users against Hugging Face
  ``generate`` in-process at batch 1 and 32: decode tokens/s of one stream,
  served / in-process tokens/s at 32, time to first token (p50) of an image +
  text request at 1 user.

On CUDA every stage uses ``phi3-mini`` shapes with random weights (no
downloads; the embed stage CLIP ViT-L/14 at 224 px, as in
``bench/gpu_embed.sh``); on the CPU the same stages run the ``tiny`` preset
at toy sizes so the command stays tested. Each stage runs in its own
``try``: a failing stage records its error and the others still run. Each
ratio is written next to its numerator and denominator. Prints a table and
writes JSON (``--out``, default ``bench/results/gpu-bench-<device>.json``),
with every stage's own full result under ``details``.

    python bench/gpu_bench.py                      # on a GPU machine (predicted 6-8 minutes; bench/NOTES.md)
    python bench/gpu_bench.py --stages train,serve --budget-s 540   # a subset, in this order, within 9 minutes
    python bench/gpu_bench.py --cpu                # the CPU rehearsal (tiny preset), even where CUDA is present
    python bench/gpu_bench.py --stages chunk       # an extra stage alone (serve4bit, chunk, turns, turns_nocache)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
STAGES = ("embed", "train", "serve")
# on request only (--stages): the 4-bit LLM (the phi3-mini preset's default) at 1 user; long prompts
# prefilled in one pass or in chunks while streams decode (bench/chunk_bench.py); 4-turn chats about an
# image through Serve with the LLM's prefix cache on (turns) and off (turns_nocache)
EXTRA_STAGES = ("serve4bit", "chunk", "turns", "turns_nocache")
MIN_STAGE_S = 30.0  # with --budget-s, a stage is skipped when less than this is left


def _module(name: str):
    """A sibling benchmark script as a module (bench/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _phi3_mini(bf16: bool) -> list[str]:
    """The LLM stages' model on CUDA: phi3-mini with random weights of its
    shapes (no downloads); with ``bf16`` unquantised in bfloat16, else the
    preset's own 4-bit base."""
    sets = [x for o in _module("train_bench").offline_overrides("phi3-mini") for x in ("--set", o)]
    dtype = ["--set", "llm.load_in_4bit=false", "--set", "llm.dtype=bfloat16"] if bf16 else []
    return ["--preset", "phi3-mini", "--gpu", *sets, *dtype]


def stage_argv(stage: str, cuda: bool, work: Path) -> list[str]:
    """Each stage script's flags: phi3-mini shapes on CUDA, toy sizes on the CPU."""
    out = ["--out", str(work / f"{stage}.json")]
    if stage == "embed":
        if cuda:
            return ["--preset", "phi3-mini", "--set", "vision.pretrained=null", "--set", "vision.model=ViT-L-14",
                    "--images", "3000", "--batch-size", "256", "--calls-per-actor", "2,1", "--profile",
                    "--workdir", str(work / "embed"), *out]
        return ["--images", "160", "--batch-size", "32", "--calls-per-actor", "2,1", "--profile",
                "--workdir", str(work / "embed"), *out]
    if stage == "train":
        if cuda:
            return ["--preset", "phi3-mini", "--gpu", "--batch", "8", "--max-len", "1024", "--steps", "6",
                    "--warmup", "2", "--profile", *out]
        return ["--batch", "8", "--max-len", "256", "--steps", "4", "--warmup", "1", "--threads", "1", "--profile", *out]
    if stage == "serve":
        # the image caches and the LLM's prefix cache off: every request is a first turn (a new image, a
        # prompt prefilled whole; the timed requests repeat the warm-up's), as in the tries before them
        common = ["--users", "1,32", "--mix", "both", "--no-ui", "--baseline-repeats", "1", "--image-cache-mb", "0",
                  "--encoder-cache-mb", "0",
                  "--option", "LLM.user_config.prefix_cache=false", *out]
        if cuda:
            return [*_phi3_mini(bf16=True), "--max-tokens", "64", "--requests-per-user", "2", *common]
        # two requests per user: the lone user's second request is the image + text one (TTFT)
        return ["--max-tokens", "8", "--requests-per-user", "2", "--warmup", "2", *common]
    if stage == "serve4bit":  # the preset's 4-bit base (LoRA apart, fused): does decoding keep its graphs, how fast
        common = ["--users", "1", "--mix", "both", "--no-ui", "--baseline-repeats", "1", "--image-cache-mb", "0",
                  "--encoder-cache-mb", "0",
                  "--option", "LLM.user_config.prefix_cache=false", *out]
        if cuda:
            return [*_phi3_mini(bf16=False), "--max-tokens", "64", "--requests-per-user", "2", *common]
        from models.config import load_config

        # bitsandbytes' CPU kernel wants whole 64-value blocks per row: the tiny shape with a 768-wide MLP (688)
        shape = json.dumps({**load_config("tiny").llm.random_init, "intermediate_size": 768})
        return ["--set", "llm.load_in_4bit=true", "--set", "llm.compute_dtype=float32", "--set",
                f"llm.random_init={shape}", "--max-tokens", "8", "--requests-per-user", "2", *common]
    if stage in ("turns", "turns_nocache"):  # every user's requests are the 4 turns of chats about an image
        common = ["--turns", "4", "--mix", "image", "--no-ui", "--no-baseline", *out]
        if stage == "turns_nocache":
            common += ["--option", "LLM.user_config.prefix_cache=false"]
        if cuda:
            return [*_phi3_mini(bf16=True), "--users", "1,8", "--requests-per-user", "8",
                    "--max-tokens", "64", *common]
        return ["--users", "1,2", "--requests-per-user", "4", "--max-tokens", "8", *common]
    if stage == "chunk":  # 8 streams decoding, a long prompt every 12 steps: in one pass, in chunks of 512, of 1,024
        if cuda:
            return [*_phi3_mini(bf16=True), "--long-tokens", "3000", "--chunks", "0,512,1024", *out]
        return ["--long-tokens", "200", "--chunks", "0,64", "--steps", "40", "--every", "10", "--streams", "3", *out]
    raise ValueError(f"unknown stage {stage!r}")


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarise_embed(r: dict) -> dict:
    job, bare = r["job_steady_images_per_s"], r["bare_e2e_images_per_s"]
    return {"job_images_per_s": job, "bare_images_per_s": bare, "ratio_vs_bare": _ratio(job, bare),
            "bare_encoder_images_per_s": r["bare_encoder_images_per_s"],
            "ratio_vs_bare_encoder": _ratio(job, r["bare_encoder_images_per_s"]),
            # the encoder with no host copies (pixels and features on the device): the ceiling of both
            **({"bare_encoder_device_images_per_s": dev, "ratio_vs_bare_encoder_device": _ratio(job, dev)}
               if (dev := r.get("bare_encoder_device_images_per_s")) else {}),
            **({"encoder_profile_by_kind": r["encoder_profile"]["by_kind_share"]} if "encoder_profile" in r else {}),
            "encoder": r["encoder"]["model"], "images": r["images"], "batch_size": r["batch_size"],
            # the job without overlap in its encoder actor (one Ray Data call at a time): what the overlap gives
            **({"job_one_call_images_per_s": r["job_steady_images_per_s_by_calls"].get("1"),
                "ratio_overlap_vs_one_call": _ratio(job, r["job_steady_images_per_s_by_calls"].get("1"))}
               if "1" in r.get("job_steady_images_per_s_by_calls", {}) and r.get("calls_per_actor") != 1 else {})}


def summarise_train(r: dict) -> dict:
    v = r["variants"]
    job, base = v[r["job_variant"]], v["hf_peft_max_length"]
    out = {"job_tokens_per_s": job["tokens_per_s"], "hf_peft_tokens_per_s": base["tokens_per_s"],
           "ratio_vs_hf_peft": _ratio(job["tokens_per_s"], base["tokens_per_s"]),
           "peak_gib": job["peak_gib"], "baseline_peak_gib": base["peak_gib"],
           "job_supervised_tokens_per_s": job["supervised_tokens_per_s"],
           "hf_peft_supervised_tokens_per_s": base["supervised_tokens_per_s"],
           "batch": r["batch"], "max_len": r["max_len"], "mean_tokens": r["data"]["mean_tokens"]}
    if "hf_peft_longest" in v:
        out["hf_peft_longest_tokens_per_s"] = v["hf_peft_longest"]["tokens_per_s"]
        out["ratio_vs_hf_peft_longest"] = _ratio(job["tokens_per_s"], out["hf_peft_longest_tokens_per_s"])
    if "job_packed" in v:
        out["job_packed_tokens_per_s"] = v["job_packed"]["tokens_per_s"]
        out["ratio_packed_vs_hf_peft"] = _ratio(out["job_packed_tokens_per_s"], base["tokens_per_s"])
        out["packed_peak_gib"] = v["job_packed"]["peak_gib"]
    if "job_peft_lora" in v:  # the job with PEFT's own LoRA forward: what the fused one gives
        out["job_peft_lora_tokens_per_s"] = v["job_peft_lora"]["tokens_per_s"]
        out["ratio_peft_lora_vs_hf_peft"] = _ratio(out["job_peft_lora_tokens_per_s"], base["tokens_per_s"])
    if "job_hf_norm" in v:  # the job with Phi-3's own RMSNorm and rotary (--kernels none): what native gives
        out["job_hf_norm_tokens_per_s"] = v["job_hf_norm"]["tokens_per_s"]
        out["ratio_hf_norm_vs_hf_peft"] = _ratio(out["job_hf_norm_tokens_per_s"], base["tokens_per_s"])
    if "job_fp32_frozen" in v:  # the job with fp32 frozen embeddings/norms/LM head: what bf16 ones give
        out["job_fp32_frozen_tokens_per_s"] = v["job_fp32_frozen"]["tokens_per_s"]
        out["ratio_fp32_frozen_vs_hf_peft"] = _ratio(out["job_fp32_frozen_tokens_per_s"], base["tokens_per_s"])
        out["fp32_frozen_peak_gib"] = v["job_fp32_frozen"]["peak_gib"]
    if "job_eager" in v:  # the job without torch.compile (GPU only; on a GPU the job compiles by default)
        je = v["job_eager"]
        out["job_eager_tokens_per_s"] = je.get("tokens_per_s")
        out["ratio_eager_vs_hf_peft"] = _ratio(je.get("tokens_per_s"), base["tokens_per_s"])
        out["eager_peak_gib"] = je.get("peak_gib")
    if "compiled" in job:  # whether the job's decoder layers ran compiled, and why (or why not)
        out["job_compiled"], out["job_compile"] = job["compiled"], job.get("compile")
        if "compiled_error" in job:  # the compiled job failed; its figures are then the eager job's
            out["job_compiled_error"] = job["compiled_error"]
    if "job_whole_last_layer" in v:  # the eager job with its whole last layer: what answers-only saves
        out["job_whole_last_layer_tokens_per_s"] = v["job_whole_last_layer"]["tokens_per_s"]
        out["ratio_whole_last_layer_vs_hf_peft"] = _ratio(out["job_whole_last_layer_tokens_per_s"], base["tokens_per_s"])
    if "job_liger" in v:  # fused kernels (GPU only); its error when they failed
        lg = v["job_liger"]
        out["job_liger_tokens_per_s"] = lg.get("tokens_per_s")
        out["ratio_liger_vs_hf_peft"] = _ratio(lg.get("tokens_per_s"), base["tokens_per_s"])
        out["liger_peak_gib"] = lg.get("peak_gib")
        if "error" in lg:
            out["liger_error"] = lg["error"]
    return out


def summarise_serve(r: dict) -> dict:
    levels = {lv["users"]: lv for lv in r["levels"]}
    one, many = levels.get(1, {}), levels.get(32, {})
    served, hf = many.get("output_tok_s"), (r.get("inprocess") or {}).get("tok_s", {}).get("32")
    itl = one.get("itl_ms_p50")
    prompt_tokens = list(((r.get("inprocess") or {}).get("prompt_tokens") or {}).values())
    context = sum(prompt_tokens) / len(prompt_tokens) + r["max_tokens"] / 2 if prompt_tokens else None
    return {"decode_tok_s_batch1": 1000 / itl if itl else None, "itl_ms_p50_batch1": itl,
            "mean_context_tokens": context,
            "hf_decode_tok_s_batch1": _ratio(1000, (r.get("inprocess") or {}).get("itl_ms_batch1")),
            "served_tok_s_batch32": served, "hf_tok_s_batch32": hf, "ratio_vs_hf_batch32": _ratio(served, hf),
            "ttft_ms_p50": (one.get("ttft_ms_p50_by_kind") or {}).get("image"),
            "errors": sum(lv["errors"] for lv in r["levels"]), "max_tokens": r["max_tokens"],
            **engine_summary(r)}


def engine_summary(r: dict) -> dict:
    """The batching loop in-process (no Ray) per KV cache, and the served replica's cache."""
    inproc = r.get("inprocess") or {}
    out = {"llm_cache": (r.get("summary") or {}).get("llm_cache")}
    for kv, e in (inproc.get("engine") or {}).items():
        out[f"engine_{kv}_decode_tok_s_batch1"] = _ratio(1000, e.get("itl_ms_batch1"))
        out[f"engine_{kv}_tok_s_batch32"] = e["tok_s"].get("32")
        out[f"engine_{kv}_ratio_vs_hf_batch32"] = _ratio(e["tok_s"].get("32"), inproc.get("tok_s", {}).get("32"))
        out[f"engine_{kv}_graphs"] = e.get("graphs_captured")
        out[f"engine_{kv}_graph_error"] = e.get("graph_error")
        out[f"engine_{kv}_agrees_with_generate"] = e.get("agrees_with_generate")
        p = e.get("prefix")
        if p and p.get("error"):
            out[f"engine_{kv}_prefix_error"] = p["error"]
        elif p:  # a chat's second turn, prefilled whole and continuing the first turn's row
            out[f"engine_{kv}_prefix_ttft_ms_whole"] = p["ttft_ms_whole"]
            out[f"engine_{kv}_prefix_ttft_ms_cached"] = p["ttft_ms_cached"]
            out[f"engine_{kv}_prefix_ttft_ratio"] = _ratio(p["ttft_ms_whole"], p["ttft_ms_cached"])
            out[f"engine_{kv}_prefix_reused_tokens"] = p["reused_tokens"]
            out[f"engine_{kv}_prefix_prompt_tokens"] = p["prompt_tokens"]
            out[f"engine_{kv}_prefix_agrees"] = p["agrees"]
    return out


def summarise_chunk(r: dict) -> dict:
    """One pass against the largest chunk: what a long prompt's prefill adds
    to the running streams' time between tokens, and to its own first token."""
    rows = {row["prefill_chunk_tokens"]: row for row in r["results"]}
    off, chunked = rows.get(0), rows[max(rows)] if max(rows) else None
    out = {"long_prompt_tokens": r["long_prompt_tokens"], "chunk_tokens": max(rows) or None}
    for name, row in (("one_pass", off), ("chunked", chunked)):
        if row:
            out |= {f"{name}_itl_ms_p99": row["itl_ms_p99"], f"{name}_itl_ms_max": row["itl_ms_max"],
                    f"{name}_long_ttft_ms_p50": row["long_ttft_ms_p50"]}
    if off and chunked:
        out["itl_p99_ratio_one_pass_vs_chunked"] = _ratio(off["itl_ms_p99"], chunked["itl_ms_p99"])
        out["long_ttft_ratio_chunked_vs_one_pass"] = _ratio(chunked["long_ttft_ms_p50"], off["long_ttft_ms_p50"])
    return out


def summarise_turns(r: dict) -> dict:
    """Time to first token by turn at each user count, and the share of
    prompt tokens the LLM took from its prefix cache."""
    out: dict = {"turns": r.get("turns")}
    for lv in r["levels"]:
        u = lv["users"]
        by_turn = {int(t): v for t, v in (lv.get("ttft_ms_p50_by_turn") or {}).items()}
        out[f"ttft_ms_p50_by_turn_{u}u"] = by_turn
        out[f"ttft_ms_p50_last_turn_{u}u"] = by_turn[max(by_turn)] if by_turn else None
        p = lv.get("llm_prefix") or {}
        total = (p.get("prompt_tokens") or 0) + (p.get("prefix_tokens") or 0)
        out[f"prefix_share_{u}u"] = round(p["prefix_tokens"] / total, 3) if total else None
        out[f"errors_{u}u"] = lv["errors"]
    return out


def compare_turns(res: dict) -> None:
    """With both turns stages: the last turn's first token without the prefix
    cache over with it, per user count (in ``res["turns"]``)."""
    on, off = res.get("turns") or {}, res.get("turns_nocache") or {}
    for key in [k for k in on if k.startswith("ttft_ms_p50_last_turn_")]:
        ratio = _ratio(off.get(key), on.get(key))
        if ratio is not None:
            on[key.replace("ttft_ms_p50_last_turn_", "last_turn_ttft_ratio_nocache_vs_cache_")] = ratio


RUNNERS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "embed": ("embed_bench", summarise_embed),
    "train": ("train_bench", summarise_train),
    "serve": ("serve_bench", summarise_serve),
    "serve4bit": ("serve_bench", summarise_serve),
    "chunk": ("chunk_bench", summarise_chunk),
    "turns": ("serve_bench", summarise_turns),
    "turns_nocache": ("serve_bench", summarise_turns),
}


def _cleanup() -> None:
    """Between stages: no Ray cluster or GPU memory left behind."""
    try:
        import ray

        if ray.is_initialized():
            from ray import serve

            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve may not be running
                pass
            ray.shutdown()
    except ImportError:
        pass
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StageTimeout(Exception):
    """A stage ran past what was left of ``--budget-s``."""


def _on_alarm(signum, frame) -> None:
    raise StageTimeout("ran past the time left in --budget-s")


def run_stage(stage: str, cuda: bool, work: Path, seconds_left: float | None = None) -> dict:
    """One stage in its own try: its summary and full result, or its error.
    With ``seconds_left`` the stage is interrupted when that time is up."""
    name, summarise = RUNNERS[stage]
    argv = stage_argv(stage, cuda, work)
    print(f"\n=== {stage}: bench/{name}.py {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    if seconds_left is not None:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(seconds_left, 0.01))
    try:
        result = _module(name).main(argv)
        entry = {"ok": True, **summarise(result), "details": result}
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the other stages still run
        if isinstance(e, KeyboardInterrupt):
            raise
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print(f"{stage} failed: {entry['error']}", flush=True)
    finally:
        if seconds_left is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _cleanup()
    entry["seconds"] = time.perf_counter() - t
    entry["argv"] = argv
    return entry


TABLE = [  # (key, what, format)
    ("embed.ratio_vs_bare", "embedding job / bare loop, images/s", "{:.2f}"),
    ("embed.job_images_per_s", "embedding job, images/s (steady)", "{:,.0f}"),
    ("embed.bare_images_per_s", "bare loop, images/s", "{:,.0f}"),
    ("embed.ratio_vs_bare_encoder", "embedding job / encoder alone", "{:.2f}"),
    ("embed.ratio_overlap_vs_one_call", "embedding job / the same with one call per actor", "{:.2f}"),
    ("embed.ratio_vs_bare_encoder_device", "embedding job / encoder with no host copies", "{:.2f}"),
    ("train.ratio_vs_hf_peft", "training job (compiled on a GPU) / HF+PEFT (pad to max), real tokens/s", "{:.2f}"),
    ("train.job_tokens_per_s", "training job, real tokens/s", "{:,.0f}"),
    ("train.hf_peft_tokens_per_s", "HF+PEFT, real tokens/s", "{:,.0f}"),
    ("train.ratio_vs_hf_peft_longest", "training job / HF+PEFT (pad to longest)", "{:.2f}"),
    ("train.ratio_packed_vs_hf_peft", "training job packed / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.ratio_peft_lora_vs_hf_peft", "training job, PEFT's LoRA forward / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.ratio_hf_norm_vs_hf_peft", "training job, Phi-3's own RMSNorm and rotary / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.ratio_fp32_frozen_vs_hf_peft", "training job, fp32 frozen weights / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.ratio_eager_vs_hf_peft", "training job, eager (--compile off) / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.job_compiled", "training job's decoder layers compiled (--compile auto)", "{}"),
    ("train.ratio_liger_vs_hf_peft", "training job + Liger kernels / HF+PEFT (pad to max)", "{:.2f}"),
    ("train.peak_gib", "training job peak GiB", "{:.2f}"),
    ("train.baseline_peak_gib", "HF+PEFT peak GiB", "{:.2f}"),
    ("serve.decode_tok_s_batch1", "served decode tokens/s, 1 user", "{:,.1f}"),
    ("serve.hf_decode_tok_s_batch1", "in-process decode tokens/s, batch 1", "{:,.1f}"),
    ("serve.ratio_vs_hf_batch32", "served / in-process generate tokens/s at 32", "{:.2f}"),
    ("serve.served_tok_s_batch32", "served tokens/s, 32 users", "{:,.1f}"),
    ("serve.hf_tok_s_batch32", "in-process generate tokens/s, batch 32", "{:,.1f}"),
    ("serve.ttft_ms_p50", "time to first token p50, image + text, 1 user (ms)", "{:,.0f}"),
    ("serve.engine_static_decode_tok_s_batch1", "in-process batching loop, static cache: tokens/s, batch 1", "{:,.1f}"),
    ("serve.engine_static_ratio_vs_hf_batch32", "in-process loop, static cache / generate at 32", "{:.2f}"),
    ("serve.engine_dynamic_decode_tok_s_batch1", "in-process loop, dynamic cache: tokens/s, batch 1", "{:,.1f}"),
    ("serve.engine_dynamic_ratio_vs_hf_batch32", "in-process loop, dynamic cache / generate at 32", "{:.2f}"),
    ("serve4bit.decode_tok_s_batch1", "4-bit LLM: served decode tokens/s, 1 user", "{:,.1f}"),
    ("serve4bit.hf_decode_tok_s_batch1", "4-bit LLM: in-process generate tokens/s, batch 1", "{:,.1f}"),
    ("serve4bit.engine_static_decode_tok_s_batch1", "4-bit LLM: static-cache loop tokens/s, batch 1", "{:,.1f}"),
    ("serve4bit.ttft_ms_p50", "4-bit LLM: time to first token p50, image + text (ms)", "{:,.0f}"),
    ("chunk.itl_p99_ratio_one_pass_vs_chunked", "long prompts: streams' p99 between tokens, one pass / chunked",
     "{:.2f}"),
    ("chunk.one_pass_itl_ms_p99", "long prompts in one pass: streams' p99 between tokens (ms)", "{:,.1f}"),
    ("chunk.chunked_itl_ms_p99", "long prompts chunked: streams' p99 between tokens (ms)", "{:,.1f}"),
    ("chunk.long_ttft_ratio_chunked_vs_one_pass", "long prompts: first token p50, chunked / one pass", "{:.2f}"),
    ("turns.ttft_ms_p50_last_turn_1u", "4-turn chats, prefix cache: last turn's first token p50, 1 user (ms)",
     "{:,.0f}"),
    ("turns_nocache.ttft_ms_p50_last_turn_1u", "4-turn chats, no prefix cache: the same (ms)", "{:,.0f}"),
    ("turns.last_turn_ttft_ratio_nocache_vs_cache_1u", "4-turn chats: last turn's first token, no cache / cache, "
     "1 user", "{:.2f}"),
    ("turns.last_turn_ttft_ratio_nocache_vs_cache_8u", "the same at 8 users", "{:.2f}"),
    ("turns.prefix_share_8u", "4-turn chats, 8 users: prompt tokens from the prefix cache", "{:.1%}"),
]


def model_shapes(cuda: bool) -> tuple[dict, dict]:
    """The CLIP tower's and Phi-3's shapes the stages run (for utilisation)."""
    import open_clip

    from models.config import load_config
    from models.vision import _register

    def config(stage: str):
        argv = stage_argv(stage, cuda, Path("."))
        preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "tiny"
        sets = [argv[k + 1] for k, a in enumerate(argv) if a == "--set"]
        if stage == "train" and cuda:
            sets = _module("train_bench").offline_overrides(preset) + sets
        return load_config(preset, sets)

    vc = config("embed").vision
    _register(vc)
    v = open_clip.get_model_config(vc.model)["vision_cfg"]
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    run = vc.feature_layer % v["layers"] + 1 if vc.token_mode == "patches" else v["layers"]
    vision = {"width": v["width"], "layers_run": run, "patch": v["patch_size"], "image": size,
              "mlp_ratio": v.get("mlp_ratio", 4.0)}
    lc = config("train")
    llm = dict(lc.llm.random_init or {})
    llm.setdefault("vocab_size", (lc.tokenizer.build or {}).get("vocab_size", 32064))
    return vision, llm


def add_utilisation(res: dict, cuda: bool) -> None:
    """MFU / bandwidth utilisation of each figure (``bench/utilisation.py``)."""
    try:
        vision, llm = model_shapes(cuda)
        res["utilisation"] = _module("utilisation").summarise(res["card"], vision, llm, res)
    except Exception as e:  # noqa: BLE001 - the figures stand without it
        res["utilisation"] = {"error": f"{type(e).__name__}: {e}"}


UTIL_TABLE = [  # (key, what, format)
    ("embed.job_mfu", "embedding job MFU", "{:.1%}"),
    ("embed.bare_encoder_mfu", "encoder alone MFU", "{:.1%}"),
    ("embed.encoder_device_mfu", "encoder with no host copies MFU", "{:.1%}"),
    ("embed.compute_limit_images_per_s", "compute limit, images/s", "{:,.0f}"),
    ("train.job_mfu", "training job MFU (useful FLOPs)", "{:.1%}"),
    ("train.eager_mfu", "training job, eager, MFU", "{:.1%}"),
    ("train.hf_peft_mfu", "HF+PEFT MFU (useful FLOPs)", "{:.1%}"),
    ("train.liger_mfu", "training job + Liger MFU", "{:.1%}"),
    ("serve.served_decode_batch1_hbm_util", "served decode, batch 1: HBM bandwidth used", "{:.1%}"),
    ("serve.engine_static_batch1_hbm_util", "static-cache loop, batch 1: HBM bandwidth used", "{:.1%}"),
    ("serve.hf_batch1_hbm_util", "generate, batch 1: HBM bandwidth used", "{:.1%}"),
    ("serve.bandwidth_limit_tok_s_batch1", "bandwidth limit, tokens/s at batch 1", "{:,.0f}"),
    ("serve.served_batch32_mfu", "served, 32 users: MFU", "{:.1%}"),
    ("serve.hf_batch32_mfu", "generate, batch 32: MFU", "{:.1%}"),
]


def print_table(res: dict) -> None:
    print(f"\nGPU benchmark: {res['card']}, {res['date']}, {res['mode']}")
    for stage in [s for s in res["stages"] if s in res]:
        e = res[stage]
        print(f"  {stage}: {'ok' if e['ok'] else 'FAILED: ' + e['error']} ({e['seconds']:.0f} s)")
    width = max(len(k) for k, _, _ in TABLE)
    print(f"{'key':<{width}} {'value':>10}  what")
    _print_rows(TABLE, res, "{key:<" + str(width) + "}")
    util = res.get("utilisation") or {}
    if util.get("error"):
        print(f"utilisation: {util['error']}")
    elif util.get("peaks"):
        p = util["peaks"]
        print(f"utilisation against {p['bf16_dense_tflops']:g} TFLOP/s bf16 dense, {p['hbm_tb_s']:g} TB/s ({p['source']}):")
        _print_rows(UTIL_TABLE, util, "  {key:<38}", skip_missing=True)


def _print_rows(table: list, source: dict, key_format: str, skip_missing: bool = False) -> None:
    """One line per ``stage.field`` key of ``table`` whose stage ``source``
    has: its value (``-`` when absent, or no line with ``skip_missing``)."""
    for key, what, f in table:
        stage, field = key.split(".")
        v = (source.get(stage) or {}).get(field)
        if stage not in source or (v is None and skip_missing):
            continue
        print(f"{key_format.format(key=key)} {('-' if v is None else f.format(v)):>10}  {what}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated, from {', '.join(STAGES + EXTRA_STAGES)} (default: {', '.join(STAGES)})")
    ap.add_argument("--cpu", action="store_true", help="the CPU rehearsal even where CUDA is present")
    ap.add_argument("--workdir", default=None, help="stage outputs and scratch (default: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget for all stages: a stage still running when it is spent is "
                         "interrupted (its error recorded), later ones are skipped")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-bench-<device>.json)")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES + EXTRA_STAGES):
        ap.error(f"--stages: choose from {', '.join(STAGES + EXTRA_STAGES)}")
    if args.cpu:  # every stage on the CPU, the embedding job's actors and Serve's replicas too
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    train_bench = _module("train_bench")
    card = train_bench.card_name("cuda" if cuda else "cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    res: dict = {"benchmark": "gpu", "card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "mode": "phi3-mini shapes, random weights" if cuda else "CPU rehearsal, tiny preset",
                 "torch": torch.__version__, "stages": stages}
    out = Path(args.out or BENCH / "results" / f"gpu-bench-{train_bench.card_slug(card)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res["details"] = {}
    for stage in stages:
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t)
        if left is not None and left < MIN_STAGE_S:
            entry = {"ok": False, "error": "skipped: --budget-s spent", "seconds": 0.0}
        else:
            entry = run_stage(stage, cuda, work, left)
        if "details" in entry:
            res["details"][stage] = entry.pop("details")
        res[stage] = entry
        compare_turns(res)
        res["seconds"] = time.perf_counter() - t
        add_utilisation(res, cuda)
        out.write_text(json.dumps(res, indent=2, default=str))  # after every stage: a run cut short keeps the rest
    print_table(res)
    print(f"total {res['seconds']:.0f} s; wrote {out}")
    return res


if __name__ == "__main__":
    main()
