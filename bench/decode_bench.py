"""Decoding and cropping one image on one core: whole decode against
``vision.jpeg_draft`` (libjpeg's DCT scaling), per image size and crop size.

What it tells: the embedding job's decode tasks' rate per core, and the
part of serving's time to first token spent turning an uploaded JPEG into
the tower's pixels. Same images and cropper settings on both sides, one run;
the pixels' mean and largest difference between the two are printed too.

    python bench/decode_bench.py                     # 640x480, 1600x1200, 4032x3024 at 224 and 336 px
    python bench/decode_bench.py --sizes 4032x3024 --crops 336 --out decode.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo(w: int, h: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (quality 90): gradients, discs of colour, mild noise."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    rgb += rng.normal(0, 5, rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        cx, cy, r = rng.randint(0, w), rng.randint(0, h), rng.randint(h // 40 + 1, h // 5 + 2)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def time_per_image(fn, data: bytes, min_seconds: float) -> float:
    """Median seconds of one call over repeated rounds lasting ``min_seconds``."""
    fn(data)  # warm-up
    times, t_end = [], time.perf_counter() + min_seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="640x480,1600x1200,4032x3024", help="JPEG sizes WxH, comma-separated")
    ap.add_argument("--crops", default="224,336", help="crop sizes in pixels, comma-separated")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per side and case")
    ap.add_argument("--out", default="decode_bench.json")
    args = ap.parse_args(argv)

    from models.images import ImageCropper

    rows = []
    for size in args.sizes.split(","):
        w, h = map(int, size.lower().split("x"))
        data = photo(w, h)
        for crop in map(int, args.crops.split(",")):
            whole, draft = ImageCropper(crop), ImageCropper(crop, jpeg_draft=True)
            diff = np.abs(whole(data).astype(np.int16) - draft(data).astype(np.int16))
            t_whole = time_per_image(whole, data, args.seconds)
            t_draft = time_per_image(draft, data, args.seconds)
            rows.append({"image": f"{w}x{h}", "jpeg_bytes": len(data), "crop": crop,
                         "whole_ms": round(t_whole * 1e3, 3), "draft_ms": round(t_draft * 1e3, 3),
                         "speedup": round(t_whole / t_draft, 2),
                         "whole_images_per_s": round(1 / t_whole, 1), "draft_images_per_s": round(1 / t_draft, 1),
                         "mean_abs_diff": round(float(diff.mean()), 3), "max_abs_diff": int(diff.max())})
            r = rows[-1]
            print(f"{r['image']:>10} -> {crop} px: whole {r['whole_ms']:8.2f} ms, draft {r['draft_ms']:7.2f} ms "
                  f"({r['speedup']:.2f}x); pixels differ by {r['mean_abs_diff']:.2f} on average, "
                  f"{r['max_abs_diff']} at most", flush=True)
    res = {"machine": f"cpu ({os.cpu_count()} cores), one core", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
