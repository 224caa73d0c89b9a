"""bench/decode_bench.py: whole decode against vision.jpeg_draft, per image and crop size."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bench_times_both_sides_and_measures_the_pixel_difference(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_bench_under_test", ROOT / "bench" / "decode_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "d.json"
    res = mod.main(["--sizes", "150x120,800x600", "--crops", "96", "--seconds", "0.05", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    small, large = res["rows"]
    for r in (small, large):
        assert r["speedup"] == pytest.approx(r["whole_ms"] / r["draft_ms"], rel=0.02)
        assert r["whole_images_per_s"] > 0 and r["draft_images_per_s"] > 0
    # under twice the resize a JPEG decodes whole either way: the same pixels
    assert small["image"] == "150x120" and small["mean_abs_diff"] == 0 and small["max_abs_diff"] == 0
    # 800 x 600 for a 96 px crop decodes at 1/4: close to, not equal to, the whole decode's pixels
    assert 0 < large["mean_abs_diff"] < 2
