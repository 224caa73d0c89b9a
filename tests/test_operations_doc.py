"""docs/operations.md: linked from the README, its paths exist, and every
figure it calls measured is the one in bench/results/*.json (recomputed here,
so a new benchmark run that changes a number fails until the guide follows)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def bench(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def row(doc: str, *needles: str) -> str:
    """The one table row holding every needle."""
    rows = [ln for ln in doc.splitlines() if ln.startswith("|") and all(n in ln for n in needles)]
    assert len(rows) == 1, f"{len(rows)} table rows hold {needles}"
    return rows[0]


def flat(doc: str) -> str:
    """The text with line breaks and runs of spaces as single spaces (prose wraps)."""
    return " ".join(doc.split())


def price(doc: str, card: str) -> float:
    m = re.search(rf"\$(\d+\.\d\d) per {card}-hour", flat(doc))
    assert m, f"no assumed price per {card}-hour"
    return float(m.group(1))


def test_readme_links_the_guide():
    assert "docs/operations.md" in (ROOT / "README.md").read_text()


def test_paths_in_the_guide_exist(doc):
    paths = set(re.findall(r"`((?:deploy|bench|serve|tests|docs|models|ray_jobs|data_pipelines)/[\w./-]*\w)`", doc))
    assert {"deploy/cluster.yaml", "serve/config.yaml", "deploy/Dockerfile"} <= paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing
    sources = set(re.findall(r"\*\*measured\*\*[^|\n]*?`([\w.-]+\.json)`", doc))
    assert len(sources) >= 3
    for name in sources:
        assert (RESULTS / name).is_file(), name


def test_embedding_costs_are_the_measured_ones(doc):
    h100 = price(doc, "H100")
    e224, e336 = bench("embed-vit-l-14-224-h100.json"), bench("embed-vit-l-14-336-h100-first.json")
    assert "H100" in e224["card"] and "H100" in e336["card"]
    cases = [
        (row(doc, "embed-vit-l-14-224-h100.json", "Ray Data job"), e224["job_steady_images_per_s"]),
        (row(doc, "embed-vit-l-14-336-h100-first.json", "Ray Data job"), e336["job_steady_images_per_s"]),
        (row(doc, "encoder alone"), e336["bare_encoder_images_per_s"]),
    ]
    for line, rate in cases:
        assert f"| {rate:,.0f} images/s" in line, line
        assert f"| {1000 / rate:.2f} H100-s" in line, line
        assert f"| ${1000 / rate / 3600 * h100:.4f}" in line, line
    # the L4 estimate scales the measured H100 encoder by the dense bf16 peaks it names
    l4 = e336["bare_encoder_images_per_s"] * 121 / 989
    line = row(doc, "on an L4")
    assert "estimate" in line and "121 / 989" in line
    assert f"about {l4:,.0f} images/s" in line and f"about {1000 / l4:.1f} L4-s" in line
    assert f"about ${1000 / l4 / 3600 * price(doc, 'L4'):.4f}" in line
    assert f"{e224['job_wall_s']:.1f} s wall ({e224['job_images_per_s_incl_startup']:,.0f} images/s" in flat(doc)
    assert f"{e224['bytes_per_image'] * 1000 / 1e9:.2f} GB at 224 px" in flat(doc)
    assert f"{e336['bytes_per_image'] * 1000 / 1e9:.2f} GB at 336 px" in flat(doc)
    assert f"({e224['bare_decode_images_per_s_one_core']:,.0f} images/s per core)" in flat(doc)
    minutes = 80_000 / e336["job_steady_images_per_s"] / 60, 80_000 / e336["bare_encoder_images_per_s"] / 60
    assert f"{minutes[0]:.1f} minutes of one H100" in flat(doc) and f"({minutes[1]:.1f} at the encoder's)" in flat(doc)


def test_training_and_decode_costs_are_the_measured_ones(doc):
    h100 = price(doc, "H100")
    g = bench("gpu_model_check-h100.json")
    assert "H100" in g["card"]
    tps = g["tokens_per_s"]
    line = row(doc, "train stage 2, QLoRA")
    assert f"| {tps:,.0f} tokens/s per GPU" in line and f"batch {g['batch']} × {g['seq_len']:,}" in line
    assert f"| {1e6 / tps:.0f} H100-s ({1e6 / tps / 3600:.3f} H100-h)" in line
    assert f"| ${1e6 / tps / 3600 * h100:.2f}" in line
    per_request = 32 / g["generate_32_s"]
    line = row(doc, "serve, LLM decode")
    assert f"| {per_request:.1f} tokens/s per request" in line
    assert f"| {1e6 / per_request / 3600:.0f} H100-h" in line and f"| ${1e6 / per_request / 3600 * h100:.0f}" in line
    epoch = 158_000 * (576 + 300) / tps / 3600
    assert f"about {epoch:.1f} H100-hours of stage 2, ${epoch * h100:.0f}" in flat(doc)


def test_memory_figures_are_measured_or_computed(doc):
    import open_clip
    import torch

    from bench.gpu_model_check import PHI3_MINI

    g = bench("gpu_model_check-h100.json")
    assert f"peak {g['train_peak_gib']:.1f} GiB" in flat(doc) and f"{g['load_gib']:.1f} GiB after loading" in flat(doc)
    with torch.device("meta"):
        visual = open_clip.model.CLIP(**open_clip.get_model_config("ViT-L-14-336")).visual
    tower_gib = sum(p.numel() for p in visual.parameters()) * 2 / 2**30
    line = row(doc, "`LLM`", "Phi-3-mini")
    assert f"about {g['load_gib'] - tower_gib:.1f} GiB" in line and f"minus the tower's {tower_gib:.2f} GiB" in line
    assert f"| {tower_gib:.2f} GiB (**estimate**)" in row(doc, "`ImageEncoder`")
    kv = 2 * PHI3_MINI["num_hidden_layers"] * PHI3_MINI["hidden_size"] * 2  # K and V per layer, bf16
    assert PHI3_MINI["num_key_value_heads"] == PHI3_MINI["num_attention_heads"]  # no grouped-query sharing
    assert f"KV cache {kv // 1024} KiB per token" in line
    assert f"{kv * 4096 / 2**30:.1f} GiB for a full 4,096-token context" in line


def test_h200_training_and_serving_costs_are_the_last_gpu_benchmarks(doc):
    """The H200 rows quote bench-gpu's last run: the training job as it runs
    by default on a GPU (its decoder layers compiled: the ``job`` side once
    it compiles, or the run's compiled side before that default) and the
    served replica at 32 users."""
    price_h200 = price(doc, "H200")
    g = bench("gpu-bench-h200.json")
    assert "H200" in g["card"]
    tr, sv = g["train"], g["serve"]
    compiled = tr["job_tokens_per_s"] if tr.get("job_compiled") else tr["job_compile_tokens_per_s"]
    eager = tr["job_eager_tokens_per_s"] if tr.get("job_compiled") else tr["job_tokens_per_s"]
    line = row(doc, "the QLoRA job's step", "H200")
    assert f"| {compiled:,.0f} real tokens/s per GPU with the layers compiled" in line, line
    assert f"plain HF + PEFT: {tr['hf_peft_tokens_per_s']:,.0f}; the job eagerly: {eager:,.0f}" in line, line
    assert f"| {1e6 / compiled:.0f} H200-s ({1e6 / compiled / 3600:.3f} H200-h)" in line, line
    assert f"| ${1e6 / compiled / 3600 * price_h200:.2f} at an assumed" in line, line
    line = row(doc, "32 concurrent streams", "H200")
    served = sv["served_tok_s_batch32"]
    assert f"| {served:,.0f} tokens/s per replica | {1e6 / served / 3600:.2f} H200-h" in line, line
    assert f"| ${1e6 / served / 3600 * price_h200:.2f} at" in line, line
    assert f"one stream alone decodes {sv['decode_tok_s_batch1']:.0f} tokens/s" in line, line
