"""Embedding throughput: the Ray Data job against a bare single-process loop.

Same encoder, same images, same batch size, one run. Prints a table and
writes JSON. Two bare figures are measured:

- ``bare_e2e``: read + decode + crop each image, then encode, sequentially in
  one process (what a simple script does, with open_clip's preprocessing:
  whole decode, resize, crop, whatever ``vision.jpeg_draft`` says);
- ``bare_encoder``: the encoder alone on images already decoded in memory,
  one batch at a time, each batch's features copied to the host before the
  next starts (the job's goal is >= 90 % of it).

A third, ``bare_encoder_device``, keeps pixels and features on the device
(no host copy at all): the encoder's own rate, the ceiling for both.
``--profile`` adds where one encoder batch spends its device time.

The job's figure is its steady state: images per second between its first
and last shard written (Ray start-up and actor start excluded), and its
whole wall time is reported too.

    python bench/embed_bench.py                                  # tiny preset, CPU
    python bench/embed_bench.py --preset phi3-mini --set vision.pretrained=null \\
        --set vision.model=ViT-L-14 --images 6000 --batch-size 256   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profiling import profile_step, sync  # noqa: E402


def _make(args: tuple) -> None:
    from PIL import Image, ImageDraw

    folder, i, w, h = args
    rng = random.Random(i)
    img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(10, 120)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    img.save(Path(folder) / f"{i:06d}.jpg", quality=90)


def make_images(folder: Path, n: int, w: int, h: int) -> list[str]:
    """COCO-like JPEGs (640x480 by default), made in parallel."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder), i, w, h) for i in range(n) if not (folder / f"{i:06d}.jpg").exists()]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        list(ex.map(_make, todo, chunksize=64))
    return sorted(p.name for p in folder.glob("*.jpg"))[:n]


def bare(cfg, folder: Path, names: list[str], batch: int, device: str, min_seconds: float = 5.0,
         profile: bool = False) -> dict:
    """The bare loops, on at most 1,024 of the images (decoding is the slow part)."""
    import torch

    from models.images import ImageCropper
    from models.vision import DTYPES, VisionEncoder, preprocess_cfg

    enc = VisionEncoder(cfg.vision, device)
    crop = enc.pipeline.cropper  # the job's decode and crop (vision.jpeg_draft as configured)
    plain = ImageCropper.from_preprocess_cfg(preprocess_cfg(cfg.vision))  # open_clip's: whole decode, resize, crop
    dtype = DTYPES[cfg.vision.dtype]
    names = names[:1024]
    rates = {}
    sides = [("plain", plain)] + ([("job", crop)] if crop.jpeg_draft else [])  # the job's own only if it differs
    for name, c in sides:
        t = time.perf_counter()
        decoded = [np.stack([c((folder / n).read_bytes()) for n in names[i:i + batch]])
                   for i in range(0, len(names), batch)]
        rates[name] = len(names) / (time.perf_counter() - t)
    rates.setdefault("job", rates["plain"])
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            enc(enc.pipeline.normalize(decoded[0], device, dtype)).cpu()
    sync(device)
    t = time.perf_counter()  # end to end, sequential, as a simple script does: read + decode + crop, then encode
    with torch.inference_mode():
        for i in range(0, len(names), batch):
            px = np.stack([plain((folder / n).read_bytes()) for n in names[i:i + batch]])
            enc(enc.pipeline.normalize(px, device, dtype)).cpu()
    sync(device)
    e2e = len(names) / (time.perf_counter() - t)
    if device == "cuda":
        decoded = [torch.from_numpy(d).pin_memory() for d in decoded]
    done, t = 0, time.perf_counter()  # the encoder alone, on decoded images, for min_seconds
    with torch.inference_mode():
        while time.perf_counter() - t < min_seconds:
            for px in decoded:
                enc(enc.pipeline.normalize(px, device, dtype)).cpu()
                done += len(px)
    sync(device)
    enc_rate = done / (time.perf_counter() - t)
    store = torch.float16  # the job's stored dtype (EmbedSettings.store_dtype)
    with torch.inference_mode():  # the encoder's own rate: pixels and features stay on the device
        on_device = [enc.pipeline.normalize(px, device, dtype) for px in decoded[:2]]
        done, t = 0, time.perf_counter()
        while time.perf_counter() - t < min_seconds:
            for x in on_device:
                enc(x).to(store)
                done += len(x)
        sync(device)
        device_rate = done / (time.perf_counter() - t)
        prof = profile_step(lambda: enc(on_device[0]).to(store), device, top=12) if profile else None
    del enc, on_device
    return {"bare_e2e_images_per_s": e2e, "bare_decode_images_per_s_one_core": rates["plain"],
            "job_decode_images_per_s_one_core": rates["job"],
            "bare_encoder_images_per_s": enc_rate, "bare_encoder_device_images_per_s": device_rate,
            **({"encoder_profile": prof} if prof else {})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--source-size", default="640x480", help="generated JPEG size WxH")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=None, help="default: 4 batches")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--calls-per-actor", default="2",
                    help="Ray Data calls in flight per encoder actor, comma-separated: one job run each, the first "
                         "is the headline figure (e.g. 2,1 also times the job without overlap)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one encoder batch on device-resident pixels: device time by kind, top kernels")
    ap.add_argument("--workdir", default=None, help="where images and embeddings go (default: a temp dir)")
    ap.add_argument("--out", default="embed_bench.json")
    args = ap.parse_args(argv)

    import logging

    import ray
    import torch

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("data_pipelines").setLevel(logging.DEBUG if os.environ.get("BENCH_STATS") else logging.INFO)

    from data_pipelines.embed import EmbedSettings, init_ray, run
    from models.config import load_config

    cfg = load_config(args.preset, args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embed-bench-"))
    w, h = map(int, args.source_size.split("x"))
    t = time.perf_counter()
    names = make_images(work / "images", args.images, w, h)
    print(f"{len(names)} images {w}x{h} ready in {time.perf_counter() - t:.1f} s", flush=True)

    b = bare(cfg, work / "images", names, args.batch_size, device, profile=args.profile)
    prof = b.pop("encoder_profile", None)
    print(f"bare loop: {b}", flush=True)
    torch.cuda.empty_cache() if device == "cuda" else None

    calls = [int(c) for c in str(args.calls_per_actor).split(",") if c.strip()]
    init_ray(None)
    runs = []
    for c in calls:  # every run embeds the same images into a fresh folder
        out = work / f"emb-{time.time_ns()}"
        t = time.perf_counter()
        m = run(EmbedSettings(out=str(out), images=str(work / "images"), preset=args.preset, overrides=args.overrides,
                              batch_size=args.batch_size, shard_size=args.shard_size or 4 * args.batch_size,
                              actors=args.actors, gpus_per_actor=1.0 if device == "cuda" else 0.0,
                              cpus_per_actor=1.0 if device == "cuda" else 0.5, calls_per_actor=c))
        wall = time.perf_counter() - t
        job = m["last_run"]
        runs.append((c, m, wall, job["steady_images_per_s"] or job["images_per_s"]))
        print(f"job, {c} call(s) per actor: {runs[-1][3]} images/s steady, {wall:.1f} s", flush=True)
    ray.shutdown()
    _, m, wall, steady = runs[0]
    res = {
        "card": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "overrides": args.overrides,
        "encoder": m["encoder"], "compute_dtype": cfg.vision.dtype, "jpeg_draft": cfg.vision.jpeg_draft,
        "images": len(names),
        "source_size": args.source_size, "batch_size": args.batch_size, "actors": args.actors,
        **{k: round(v, 1) for k, v in b.items()},
        "job_steady_images_per_s": steady, "job_wall_s": round(wall, 1),
        "job_images_per_s_incl_startup": round(len(names) / wall, 1),
        "ratio_vs_bare_encoder": round(steady / b["bare_encoder_images_per_s"], 3),
        "ratio_vs_bare_e2e": round(steady / b["bare_e2e_images_per_s"], 3),
        "ratio_vs_bare_encoder_device": round(steady / b["bare_encoder_device_images_per_s"], 3),
        "bytes_per_image": m["bytes_per_image"], "calls_per_actor": calls[0],
        "job_steady_images_per_s_by_calls": {str(c): r for c, _, _, r in runs},
    }
    print(f"\n{'metric':<36}value")
    for k, v in res.items():
        print(f"{k:<36}{v}")
    if prof:
        res["encoder_profile"] = prof
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof["by_kind_share"].items())
        print(f"profile of one encoder batch ({prof['measured']}, {prof['total_ms']:,.1f} ms): {kinds}")
        for row in prof["top"][:6]:
            print(f"    {row['share']:6.1%}  {row['calls']:4d} x  {row['name'][:90]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
