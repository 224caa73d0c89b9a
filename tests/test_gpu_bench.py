"""``make bench-gpu``: one JSON with every stage against its baseline; a
failing stage records its error and the others still run; each ratio is its
recorded numerator over its denominator. The slow test runs the real CPU
rehearsal (tiny preset: Ray Data, the training step, Ray Serve)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["card", "date", "embed.ratio_vs_bare", "train.ratio_vs_hf_peft", "train.peak_gib", "train.baseline_peak_gib",
        "serve.decode_tok_s_batch1", "serve.ratio_vs_hf_batch32", "serve.ttft_ms_p50"]
RATIOS = {("embed", "ratio_vs_bare"): ("job_images_per_s", "bare_images_per_s"),
          ("embed", "ratio_vs_bare_encoder"): ("job_images_per_s", "bare_encoder_images_per_s"),
          ("embed", "ratio_overlap_vs_one_call"): ("job_images_per_s", "job_one_call_images_per_s"),
          ("embed", "ratio_vs_bare_encoder_device"): ("job_images_per_s", "bare_encoder_device_images_per_s"),
          ("train", "ratio_vs_hf_peft"): ("job_tokens_per_s", "hf_peft_tokens_per_s"),
          ("train", "ratio_vs_hf_peft_longest"): ("job_tokens_per_s", "hf_peft_longest_tokens_per_s"),
          ("train", "ratio_packed_vs_hf_peft"): ("job_packed_tokens_per_s", "hf_peft_tokens_per_s"),
          ("train", "ratio_hf_norm_vs_hf_peft"): ("job_hf_norm_tokens_per_s", "hf_peft_tokens_per_s"),
          ("train", "ratio_fp32_frozen_vs_hf_peft"): ("job_fp32_frozen_tokens_per_s", "hf_peft_tokens_per_s"),
          ("train", "ratio_peft_lora_vs_hf_peft"): ("job_peft_lora_tokens_per_s", "hf_peft_tokens_per_s"),
          ("train", "ratio_whole_last_layer_vs_hf_peft"): ("job_whole_last_layer_tokens_per_s", "hf_peft_tokens_per_s"),
          ("serve", "ratio_vs_hf_batch32"): ("served_tok_s_batch32", "hf_tok_s_batch32"),
          ("serve", "engine_static_prefix_ttft_ratio"): ("engine_static_prefix_ttft_ms_whole",
                                                         "engine_static_prefix_ttft_ms_cached")}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", ROOT / "bench" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _get(res: dict, dotted: str):
    node = res
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_ratios(res: dict) -> None:
    for (stage, key), (num, den) in RATIOS.items():
        if stage in res["stages"] and res[stage]["ok"] and key in res[stage]:
            e = res[stage]
            assert e[key] == pytest.approx(e[num] / e[den], rel=1e-9), (stage, key)


FAKE = {
    "embed_bench": {"job_steady_images_per_s": 900.0, "bare_e2e_images_per_s": 200.0, "bare_encoder_images_per_s": 1500.0,
                    "encoder": {"model": "ViT-L-14"}, "images": 10, "batch_size": 2},
    "serve_bench": {"max_tokens": 8, "inprocess": {"tok_s": {"1": 50.0, "32": 400.0}, "itl_ms_batch1": 20.0,
                                                   "engine": {"static": {"itl_ms_batch1": 4.0, "tok_s": {"1": 200.0, "32": 1000.0},
                                                                         "graphs_captured": 12, "graph_error": None,
                                                                         "agrees_with_generate": "8/8",
                                                                         "prefix": {"error": "RuntimeError: pretend"}}}},
                    "summary": {"llm_cache": {"kv_cache": "static", "rows": 32}},
                    "levels": [{"users": 1, "itl_ms_p50": 25.0, "output_tok_s": 30.0, "errors": 0,
                                "ttft_ms_p50_by_kind": {"text": 40.0, "image": 60.0}},
                               {"users": 32, "itl_ms_p50": 80.0, "output_tok_s": 300.0, "errors": 0,
                                "ttft_ms_p50_by_kind": {"text": 400.0, "image": 500.0}}]},
}


def _fake_stages(gb, monkeypatch, fake_main) -> None:
    """Replace each stage module's ``main`` by ``fake_main(name, argv)``; its helpers
    (card_name, offline_overrides ...) stay the real ones. ``--cpu`` sets
    CUDA_VISIBLE_DEVICES: it is recorded first (setenv), so teardown restores the
    original, absent or not."""
    real_module = gb._module

    def module(name):
        real = real_module(name)
        helpers = {k: getattr(real, k) for k in dir(real) if not k.startswith("__") and k != "main"}
        return SimpleNamespace(**helpers, main=lambda argv: fake_main(name, argv))

    monkeypatch.setattr(gb, "_module", module)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")


def test_a_failing_stage_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    gb = _load()
    calls = []

    def main(name, argv):
        calls.append(name)
        if name == "train_bench":
            raise RuntimeError("CUDA out of memory (pretend)")
        return FAKE[name]

    _fake_stages(gb, monkeypatch, main)
    res = gb.main(["--cpu", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "gpu.json")])
    assert calls == ["embed_bench", "train_bench", "serve_bench"]
    assert res["embed"]["ok"] and res["serve"]["ok"] and not res["train"]["ok"]
    assert "CUDA out of memory (pretend)" in res["train"]["error"] and "RuntimeError" in res["train"]["traceback"]
    assert res["embed"]["ratio_vs_bare"] == pytest.approx(4.5)
    assert res["serve"]["decode_tok_s_batch1"] == pytest.approx(40.0)  # 1000 / ITL p50 at 1 user
    assert res["serve"]["ttft_ms_p50"] == 60.0  # the image + text request's
    assert res["serve"]["ratio_vs_hf_batch32"] == pytest.approx(0.75)
    assert res["serve"]["engine_static_decode_tok_s_batch1"] == pytest.approx(250.0)  # 1000 / its ITL
    assert res["serve"]["engine_static_ratio_vs_hf_batch32"] == pytest.approx(2.5)
    assert res["serve"]["engine_static_graphs"] == 12 and res["serve"]["llm_cache"]["kv_cache"] == "static"
    # the second-turn figure failed alone: its error is kept, the stage's figures stand
    assert res["serve"]["engine_static_prefix_error"] == "RuntimeError: pretend"
    assert "engine_static_prefix_ttft_ratio" not in res["serve"]
    # what each figure implies: FLOPs and bytes from the shapes run (no peaks for a CPU: no utilisation)
    util = res["utilisation"]
    assert util["peaks"] is None and util["embed"]["gflops_per_image"] > 0 and util["embed"]["job_mfu"] is None
    assert "train" not in util and util["serve"]["bytes_per_token_batch1_gb"] > 0  # the train stage failed here
    _check_ratios(res)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["details"]["serve"] == FAKE["serve_bench"] and "train" not in saved["details"]


def test_budget_interrupts_a_stage_and_skips_the_rest(tmp_path, monkeypatch):
    import time

    gb = _load()

    def main(name, argv):
        if name == "embed_bench":
            time.sleep(30)  # the alarm interrupts this
        return FAKE[name]

    _fake_stages(gb, monkeypatch, main)
    monkeypatch.setattr(gb, "MIN_STAGE_S", 1.0)
    t = time.perf_counter()
    res = gb.main(["--cpu", "--budget-s", "2", "--stages", "embed,serve", "--workdir", str(tmp_path / "w"),
                   "--out", str(tmp_path / "gpu.json")])
    assert time.perf_counter() - t < 10
    assert not res["embed"]["ok"] and "StageTimeout" in res["embed"]["error"]
    assert not res["serve"]["ok"] and "skipped" in res["serve"]["error"]


def test_stage_flags_fit_each_device(tmp_path):
    gb = _load()
    cpu = {s: gb.stage_argv(s, False, tmp_path) for s in gb.STAGES}
    gpu = {s: gb.stage_argv(s, True, tmp_path) for s in gb.STAGES}
    assert "--preset" not in cpu["train"] and gpu["train"][:3] == ["--preset", "phi3-mini", "--gpu"]
    for argv in list(cpu.values()) + list(gpu.values()):
        assert argv[argv.index("--out") + 1].startswith(str(tmp_path))
    for argv in (cpu["serve"], gpu["serve"]):  # 1 and 32 users, both prompt kinds, no Gradio (not on the GPU image)
        assert argv[argv.index("--users") + 1] == "1,32" and "--no-ui" in argv
        assert argv[argv.index("--mix") + 1] == "both" and int(argv[argv.index("--requests-per-user") + 1]) >= 2
    assert "llm.random_init" in " ".join(gpu["serve"]) and "vision.pretrained=null" in gpu["serve"]
    # the stage scripts accept these flags
    sys.path.insert(0, str(ROOT / "bench"))
    tb, sb = gb._module("train_bench"), gb._module("serve_bench")
    for argv in (cpu["train"], gpu["train"]):
        tb.parse_args(argv)
    for argv in (cpu["serve"], gpu["serve"]):
        assert sb.parse_args(argv).no_ui
    # on request: the 4-bit LLM at one user (the preset's own 4-bit, not the bf16 override)
    assert "serve4bit" not in gb.STAGES and "serve4bit" in gb.EXTRA_STAGES
    for cuda in (False, True):
        argv = gb.stage_argv("serve4bit", cuda, tmp_path)
        assert sb.parse_args(argv).users == [1] and "llm.load_in_4bit=false" not in argv
    assert "llm.load_in_4bit=true" in gb.stage_argv("serve4bit", False, tmp_path)
    # on request: long prompts in one pass against chunks, 3,000 tokens of Phi-3-mini in bf16 on a GPU
    assert "chunk" not in gb.STAGES and "chunk" in gb.EXTRA_STAGES
    cb = gb._module("chunk_bench")
    chunk_gpu = cb.parse_args(gb.stage_argv("chunk", True, tmp_path))
    assert chunk_gpu.gpu and chunk_gpu.preset == "phi3-mini" and chunk_gpu.long_tokens == 3000
    assert chunk_gpu.chunks == "0,512,1024" and "llm.dtype=bfloat16" in chunk_gpu.overrides
    assert not cb.parse_args(gb.stage_argv("chunk", False, tmp_path)).gpu
    with pytest.raises(SystemExit):
        gb.main(["--stages", "embed,nope"])


@pytest.mark.slow
def test_cpu_rehearsal_end_to_end(cpu_bench):
    res = cpu_bench.result
    for stage in ("embed", "train", "serve"):
        assert res[stage]["ok"], res[stage].get("error")
        assert res[stage]["seconds"] > 0
    for key in KEYS:
        assert _get(res, key) is not None, key
    _check_ratios(res)
    assert res["serve"]["errors"] == 0 and res["serve"]["decode_tok_s_batch1"] > 0
    # the batching loop in-process, with either cache, gives generate's greedy tokens (fp32 on the CPU)
    for kv in ("static", "dynamic"):
        got, want = res["serve"][f"engine_{kv}_agrees_with_generate"].split("/")
        assert got == want and int(want) > 0, kv
        assert res["serve"][f"engine_{kv}_decode_tok_s_batch1"] > 0
    assert res["serve"]["llm_cache"]["kv_cache"] == "static"
    # a chat's second turn continuing the first turn's row: fewer tokens prefilled, the same greedy tokens
    srv = res["serve"]
    got, want = srv["engine_static_prefix_agrees"].split("/")
    assert got == want and int(want) > 0
    assert 0 < srv["engine_static_prefix_reused_tokens"] < srv["engine_static_prefix_prompt_tokens"]
    assert "engine_dynamic_prefix_agrees" not in srv  # the dynamic cache keeps no rows
    assert res["embed"]["job_one_call_images_per_s"] > 0  # the job timed with and without the actor's overlap
    assert set(res["details"]["embed"]["job_steady_images_per_s_by_calls"]) == {"1", "2"}
    # the encoder with no host copies: a rate of its own, and the profile of one of its batches
    emb = res["embed"]
    assert emb["bare_encoder_device_images_per_s"] > 0 and "ratio_vs_bare_encoder_device" in emb  # checked above
    assert sum(emb["encoder_profile_by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
    assert emb["encoder_profile_by_kind"]["matmul"] > 0.1, emb["encoder_profile_by_kind"]
    assert res["utilisation"]["embed"]["encoder_device_mfu"] is None  # no peak for a CPU
    assert res["utilisation"]["train"]["gflops_per_token"] > 0 and res["serve"]["mean_context_tokens"] > 0
    # one profiled step per training side: where its time goes, for the next optimisation
    for side in ("hf_peft_max_length", "job"):
        prof = res["details"]["train"]["variants"][side]["profile"]
        assert prof["top"] and sum(prof["by_kind_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert prof["by_kind_share"]["matmul"] > 0.2, prof["by_kind_share"]  # a transformer step is mostly matmuls
    assert "train.ratio_vs_hf_peft" in cpu_bench.stdout  # the table
    # on the CPU the job stays eager under --compile auto, and the summary says why
    assert res["train"]["job_compiled"] is False and res["train"]["job_compile"].startswith("auto: eager on cpu")
    assert "job_compiled_error" not in res["train"]
    # every CPU-run ablation has its figure and ratio in the summary
    for key in ("ratio_packed_vs_hf_peft", "ratio_whole_last_layer_vs_hf_peft", "ratio_peft_lora_vs_hf_peft",
                "ratio_hf_norm_vs_hf_peft", "ratio_fp32_frozen_vs_hf_peft"):
        assert res["train"][key] > 0, key


def test_the_chunk_stage_compares_one_pass_with_the_largest_chunk():
    gb = _load()
    rows = [{"prefill_chunk_tokens": c, "itl_ms_p99": p99, "itl_ms_max": p99 + 5, "long_ttft_ms_p50": ttft}
            for c, p99, ttft in ((0, 90.0, 100.0), (512, 20.0, 140.0), (1024, 30.0, 120.0))]
    s = gb.summarise_chunk({"long_prompt_tokens": 3001, "results": rows})
    assert s["chunk_tokens"] == 1024 and s["one_pass_itl_ms_p99"] == 90.0 and s["chunked_itl_ms_p99"] == 30.0
    assert s["itl_p99_ratio_one_pass_vs_chunked"] == 3.0 and s["long_ttft_ratio_chunked_vs_one_pass"] == 1.2
    alone = gb.summarise_chunk({"long_prompt_tokens": 3001, "results": rows[:1]})  # one pass only: no ratio
    assert alone["chunk_tokens"] is None and "itl_p99_ratio_one_pass_vs_chunked" not in alone


def test_the_turns_stages_compare_the_last_turn_with_and_without_the_prefix_cache(tmp_path):
    gb = _load()
    sb = gb._module("serve_bench")
    for cuda in (False, True):
        on = sb.parse_args(gb.stage_argv("turns", cuda, tmp_path))
        off_argv = gb.stage_argv("turns_nocache", cuda, tmp_path)
        off = sb.parse_args(off_argv)
        assert on.turns == off.turns == 4 and on.mix == "image" and on.users == off.users
        assert "LLM.user_config.prefix_cache=false" in off_argv and not on.option
    assert sb.parse_args(gb.stage_argv("turns", True, tmp_path)).users == [1, 8]

    def level(users, ttft, prompt, cached):
        return {"users": users, "errors": 0, "ttft_ms_p50_by_turn": {1: 80.0, 2: ttft / 2, 4: ttft},
                "llm_prefix": {"prompt_tokens": prompt, "prefix_tokens": cached, "prefix_hits": 3}}

    cached = {"turns": 4, "levels": [level(1, 30.0, 300, 900), level(8, 60.0, 400, 800)]}
    whole = {"turns": 4, "levels": [level(1, 90.0, 1200, 0), level(8, 120.0, 1200, 0)]}
    res = {"turns": gb.summarise_turns(cached), "turns_nocache": gb.summarise_turns(whole)}
    assert res["turns"]["ttft_ms_p50_last_turn_1u"] == 30.0 and res["turns"]["prefix_share_1u"] == 0.75
    assert res["turns_nocache"]["prefix_share_8u"] == 0.0
    gb.compare_turns(res)
    assert res["turns"]["last_turn_ttft_ratio_nocache_vs_cache_1u"] == 3.0
    assert res["turns"]["last_turn_ttft_ratio_nocache_vs_cache_8u"] == 2.0
    alone = {"turns": dict(res["turns_nocache"])}  # one stage only: no ratio
    gb.compare_turns(alone)
    assert not any(k.startswith("last_turn_ttft_ratio") for k in alone["turns"])
