"""The training benchmark: its data look like LLaVA's lengths, and its JSON
is consistent with its own records (tokens/s = tokens / time, ratio = job /
baseline, every side the same conversations)."""
from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    if "train_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["train_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["train_bench"]


def test_data_lengths_follow_the_asked_distribution(tok):
    tb = _bench()
    d = tb.make_data(tok, 200, max_len=512, num_image_tokens=64, feature_dim=128, median_text=100, sigma=0.6,
                     image_share=0.9, seed=3)
    lengths = [len(e) for e in d.encoded]
    assert max(lengths) <= 512
    text = [n - 64 * img for n, img in zip(lengths, d.images)]
    assert 80 <= statistics.median(text) <= 130  # whole sentences: near the asked median
    assert 0.8 <= sum(d.images) / len(d.images) <= 0.97
    assert max(text) > 2.5 * statistics.median(text)  # a long tail
    for e, img in zip(d.encoded, d.images):  # the project's template: answers supervised, images as placeholders
        assert (e.input_ids.count(tok.ids.image) == 64) == img
        assert any(x != -100 for x in e.labels)
    assert d.feats([0, 1, 2]).shape[1:] == (64, 128)
    assert tb.make_data(tok, 5, max_len=512, num_image_tokens=64, feature_dim=128, median_text=100, sigma=0.6,
                        image_share=0.9, seed=3).encoded[0].input_ids == d.encoded[0].input_ids  # seeded


def test_offline_overrides_make_phi3_mini_download_free():
    from models.config import load_config

    tb = _bench()
    cfg = load_config("phi3-mini", tb.offline_overrides("phi3-mini"))
    assert cfg.llm.random_init["hidden_size"] == 3072 and cfg.llm.random_init["vocab_size"] == 32064
    assert cfg.vision.pretrained is None and cfg.tokenizer.build is not None
    assert cfg.speech.random_init is not None
    assert cfg.llm.load_in_4bit and cfg.llm.gradient_checkpointing  # the preset's QLoRA settings stay
    assert tb.offline_overrides("tiny") == []


@pytest.fixture(scope="module")
def result(cpu_bench):
    """What ``train_bench.py`` wrote in ``make bench-gpu``'s CPU rehearsal (tests/conftest.py)."""
    return cpu_bench.stage("train")


@pytest.mark.slow
def test_every_side_saw_the_same_conversations(result):
    v = result["variants"]
    assert set(v) == {"hf_peft_max_length", "hf_peft_longest", "job", "job_packed", "job_hf_loss",
                      "job_whole_last_layer", "job_peft_lora", "job_hf_norm", "job_fp32_frozen"}
    # the last layer at answer positions only is the same math as the whole layer
    assert v["job_whole_last_layer"]["first_loss"] == pytest.approx(v["job"]["first_loss"], abs=1e-4)
    assert v["job_fp32_frozen"]["frozen_dtype"] == "float32"  # tiny is an fp32 model: the side equals the job here
    assert v["job"]["frozen_dtype"] == result["model"]["dtype"]  # the preset's dtype: no upcast by default
    # the job follows --compile auto: eager on the CPU, and says so; the ablations are eager by setting
    assert v["job"]["compiled"] is False and v["job"]["compile"].startswith("auto: eager on cpu")
    assert all(v[k]["compile"] == "off" for k in v if k.startswith("job_"))
    for key in ("conversations", "real_tokens", "supervised_tokens"):
        assert len({r[key] for r in v.values()}) == 1, key
    batch, steps, max_len = result["batch"], result["steps"], result["max_len"]
    assert v["job"]["conversations"] == batch * steps == result["data"]["conversations"]
    assert v["job"]["real_tokens"] == pytest.approx(result["data"]["mean_tokens"] * batch * steps)
    # padding: every baseline row is max_len wide; the job pads less, packing least
    assert v["hf_peft_max_length"]["slots"] == batch * steps * max_len
    assert v["hf_peft_max_length"]["steps"] == v["job"]["steps"] == steps
    assert v["job_packed"]["steps"] <= steps
    assert v["job"]["padding_share"] < v["hf_peft_longest"]["padding_share"] < v["hf_peft_max_length"]["padding_share"]


@pytest.mark.slow
def test_figures_are_the_records_own(result):
    v = result["variants"]
    ref = v["hf_peft_max_length"]
    for name, r in v.items():
        assert r["seconds"] == pytest.approx(sum(r["step_s"]))
        assert len(r["step_s"]) == len(r["step_slots"]) == r["steps"] and sum(r["step_slots"]) == r["slots"]
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens"] / r["seconds"])
        assert r["supervised_tokens_per_s"] == pytest.approx(r["supervised_tokens"] / r["seconds"])
        assert r["padding_share"] == pytest.approx(1 - r["real_tokens"] / r["slots"])
        assert r["ratio_vs_hf_peft"] == pytest.approx(r["tokens_per_s"] / ref["tokens_per_s"])
        assert r["ratio_vs_hf_peft_longest"] == pytest.approx(r["tokens_per_s"] / v["hf_peft_longest"]["tokens_per_s"])
        assert r["peak_gib"] > 0 and r["loss_finite"], name
        assert r["step_s_min"] <= r["step_s_median"] <= max(r["step_s"])
    job = v[result["job_variant"]]
    assert result["job_variant"] == "job"
    assert result["ratio_vs_hf_peft"] == job["ratio_vs_hf_peft"]
    assert result["peak_gib"] == job["peak_gib"] and result["baseline_peak_gib"] == ref["peak_gib"]
    # a random model's first loss is near ln(vocab) on every side (same model, same labels)
    ln_vocab = math.log(2048)
    assert all(abs(r["first_loss"] - ln_vocab) < 0.25 * ln_vocab for r in v.values())


@pytest.mark.slow
def test_the_run_is_described(result):
    assert result["device"] == "cpu" and result["preset"] == "tiny"
    assert (result["batch"], result["max_len"], result["steps"]) == (8, 256, 4)  # bench/gpu_bench.py's CPU stage
    tp = result["model"]["trainable_params"]  # the same LoRA + projector on both sides
    assert tp["job"] == tp["hf_peft"] > 0
    d = result["data"]
    assert d["max_tokens"] <= result["max_len"] and d["min_tokens"] <= d["median_tokens"] <= d["p90_tokens"] <= d["max_tokens"]
    assert "lognormal" in d["text_tokens"]


def test_gpu_only_variants_run_with_gpu_and_last():
    tb = _bench()
    assert "job_liger" not in tb.parse_args([]).variants  # CPU default: what can run here
    gpu = tb.parse_args(["--gpu"]).variants
    assert gpu[-2:] == ["job_eager", "job_liger"] and set(gpu) == set(tb.JOB_VARIANTS)
    # asked first, still run last: its kernels patch the model for the variants after it
    assert tb.parse_args(["--gpu", "--variants", "job_liger,job"]).variants == ["job", "job_liger"]
    assert tb.parse_args(["--gpu", "--variants", "job_liger,job_eager,job"]).variants == ["job", "job_eager",
                                                                                          "job_liger"]
    with pytest.raises(SystemExit):
        tb.parse_args(["--variants", "job_liger"])


def test_a_compiled_job_that_fails_is_measured_eager_with_the_error(tok, monkeypatch):
    """The compiled job side failing with an error its own fall-back leaves
    alone (it catches the compiler's): the side is timed again eagerly, says
    so, and keeps the error, instead of the training stage losing every
    figure."""
    from models.config import load_config
    from models.kernels import CompiledSteps
    from models.vision import vision_spec

    class FailsCompiled(CompiledSteps):
        def __call__(self, step, *args):
            if self.compiled:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().__call__(step, *args)

    tb = _bench()
    real_start = CompiledSteps.start.__func__

    def start(cls, llm, mode, *args, **kwargs):
        steps = real_start(FailsCompiled, llm, mode, *args, **kwargs)
        if mode != "off":  # what a GPU does by default (pretended here: the layers stay eager)
            steps.compiled, steps.reason = True, "auto: compiled"
        return steps

    monkeypatch.setattr(CompiledSteps, "start", classmethod(start))
    cfg = load_config("tiny", ["tokenizer.max_length=128"])
    spec = vision_spec(cfg.vision)
    data = tb.make_data(tok, 12, max_len=128, num_image_tokens=spec["num_tokens"], feature_dim=spec["feature_dim"],
                        median_text=25, sigma=0.6, image_share=0.9, seed=0)
    r = tb.job(cfg, "cpu", data, list(range(8)), list(range(8, 12)), batch=4, max_len=128, warmup=1,
               memory=tb.PeakMemory("cpu"), variants=["job", "job_packed"])["variants"]
    assert r["job"]["compiled"] is False and r["job"]["compile"].startswith("off")
    assert r["job"]["compiled_error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert r["job"]["steps"] == 2 and r["job"]["loss_finite"]
    assert "compiled_error" not in r["job_packed"] and r["job_packed"]["steps"] >= 1
