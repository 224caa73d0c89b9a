"""The Ray Data embedding job on the tiny preset (local Ray, CPU)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipelines.embed import EmbeddingStore, EmbedError, EmbedSettings, finished, run

N_IMAGES = 240


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rel = []
    for i in range(n):
        img = Image.new("RGB", (rng.randint(48, 120), rng.randint(48, 120)), (rng.randint(0, 80),) * 3)
        d = ImageDraw.Draw(img)
        d.ellipse((5, 5, 40, 40), fill=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        sub = "a" if i % 2 else "b/c"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"{sub}/img{i:04d}.png"
        img.save(folder / name)
        rel.append(name)
    return sorted(rel)


def seed_broken(folder: Path) -> dict[str, str]:
    """Every kind of awkward file; returns {name: expected 'skipped' or 'ok'}."""
    good = Image.new("RGB", (64, 48), (200, 10, 10))
    buf = folder / "good.jpg"
    good.save(buf, quality=95)
    data = buf.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "zero.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(os.urandom(500))
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("L", (40, 40), 128).save(folder / "grey.png")
    Image.new("P", (40, 40), 3).save(folder / "palette.png")
    Image.new("I;16", (40, 40), 40000).save(folder / "sixteen.png")
    rot = Image.new("RGB", (60, 30), (0, 0, 255))
    exif = rot.getexif()
    exif[0x0112] = 6
    rot.save(folder / "rotated.jpg", exif=exif)
    return {"good.jpg": "ok", "truncated.jpg": "skipped", "zero.png": "skipped", "garbage.jpg": "skipped",
            "cmyk.jpg": "ok", "grey.png": "ok", "palette.png": "ok", "sixteen.png": "ok", "rotated.jpg": "ok"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return folder, make_images(folder, N_IMAGES)


@pytest.fixture(scope="module")
def full_run(ray_local, image_set, tmp_path_factory):
    folder, rel = image_set
    out = tmp_path_factory.mktemp("emb")
    manifest = run(EmbedSettings(out=str(out), images=str(folder), shard_size=64, batch_size=32))
    return out, manifest


def test_every_image_embedded_exactly_once(full_run, image_set):
    out, manifest = full_run
    _, rel = image_set
    import pyarrow.parquet as pq

    paths = []
    for f in sorted((out / "shards").glob("*.parquet")):
        paths += pq.read_table(f, columns=["path"]).column("path").to_pylist()
    assert sorted(paths) == rel  # each once, nothing else
    assert manifest["count"] == N_IMAGES and manifest["missing"] == 0 and not manifest["skipped"]
    assert manifest["shape"] == [9, 128] and manifest["dtype"] == "float16"
    assert manifest["bytes_per_image"] == 9 * 128 * 2
    assert manifest["encoder"]["token_mode"] == "patches"
    assert len(manifest["shards"]) >= N_IMAGES // 64


def test_values_match_the_encoder_called_directly(full_run, image_set, tiny_cfg):
    """Stored fp16 features equal VisionEncoder.encode on the same file, to fp16 rounding
    (|stored - direct| <= 2e-3 + 2e-3 * |direct|)."""
    from models.vision import VisionEncoder

    out, _ = full_run
    folder, rel = image_set
    store = EmbeddingStore(str(out))
    enc = VisionEncoder(tiny_cfg.vision)
    sample = rel[::40]
    direct = enc.encode([folder / p for p in sample]).numpy()
    for i, p in enumerate(sample):
        got = store[p].astype(np.float32)
        assert got.shape == (9, 128)
        np.testing.assert_allclose(got, direct[i], rtol=2e-3, atol=2e-3)
    assert store.identity["vision"]["model"] == tiny_cfg.vision.model


def test_rerun_does_nothing_when_complete(full_run, image_set, ray_local):
    out, _ = full_run
    folder, _ = image_set
    before = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    m = run(EmbedSettings(out=str(out), images=str(folder), shard_size=64))
    assert m["last_run"]["embedded"] == 0 and m["last_run"]["shards_written"] == 0
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == before


def test_other_encoder_into_same_folder_is_refused(full_run, image_set):
    out, _ = full_run
    folder, _ = image_set
    with pytest.raises(EmbedError, match="another encoder") as e:
        run(EmbedSettings(out=str(out), images=str(folder), overrides=["vision.token_mode=pooled"]))
    # each field that differs, by name, not the whole stored identity
    assert "encoder.token_mode: the folder has 'patches', this job writes 'pooled'" in str(e.value)
    assert "encoder.model" not in str(e.value) and "{" not in str(e.value)


def test_broken_images_are_skipped_and_listed(ray_local, tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    expected = seed_broken(folder)
    m = run(EmbedSettings(out=str(tmp_path / "emb"), images=str(folder), shard_size=4, batch_size=4))
    skipped = set(m["skipped"])
    assert skipped == {k for k, v in expected.items() if v == "skipped"}
    assert m["count"] == sum(v == "ok" for v in expected.values()) and m["missing"] == 0
    assert "empty" in m["skipped"]["zero.png"]
    store = EmbeddingStore(str(tmp_path / "emb"))
    assert set(store.paths()) == {k for k, v in expected.items() if v == "ok"}
    # skipped images are remembered: a rerun does not retry them
    again = run(EmbedSettings(out=str(tmp_path / "emb"), images=str(folder)))
    assert again["last_run"]["embedded"] == 0 and again["last_run"]["skipped"] == 0


def test_pooled_mode_and_patch_pooling_shapes(ray_local, image_set, tmp_path):
    folder, rel = image_set
    pooled = run(EmbedSettings(out=str(tmp_path / "p"), images=str(folder), limit=16,
                               overrides=["vision.token_mode=pooled"]))
    assert pooled["shape"] == [1, 128] and pooled["count"] == 16
    unpooled = run(EmbedSettings(out=str(tmp_path / "q"), images=str(folder), limit=16,
                              overrides=["vision.patch_pool=1"], store_dtype="float32"))
    assert unpooled["shape"] == [36, 128] and unpooled["bytes_per_image"] == 36 * 128 * 4  # the 6x6 grid unpooled
    assert EmbeddingStore(str(tmp_path / "q"))[rel[0]].dtype == np.float32


SLOW_ENCODER = """
import argparse, sys, time
import data_pipelines.embed as E
class SlowEmbedder(E.Embedder):
    def __call__(self, batch):
        time.sleep(0.4)
        return super().__call__(batch)
E.Embedder = SlowEmbedder
parser = argparse.ArgumentParser()
E.add_arguments(parser)
sys.exit(E.main(parser.parse_args(sys.argv[1:])))
"""


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_shards(image_set, tmp_path):
    folder, rel = image_set
    out = tmp_path / "emb"
    args = ["--images", str(folder), "--out", str(out), "--shard-size", "16", "--batch-size", "16"]
    cmd = [sys.executable, "-m", "data_pipelines.embed", *args]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    # the first run's encoder takes 0.4 s more per batch of 16, so shards come
    # one by one: otherwise Ray Data may write them all in one burst, before
    # the kill below can land mid-run
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODER, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < 3:
            time.sleep(0.2)
            assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # tasks already running when the driver died may still finish their (atomic) shard
    # for a moment: take the snapshot once the folder has been still for 5 s
    last, still_since = None, time.time()
    while time.time() - still_since < 5 and time.time() < deadline + 60:
        now = sorted(p.name for p in (out / "shards").iterdir())
        if now != last:
            last, still_since = now, time.time()
        time.sleep(0.5)
    done_after_kill, _, files = finished(str(out))
    assert 0 < len(done_after_kill) < N_IMAGES
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["last_run"]["embedded"] == N_IMAGES - len(done_after_kill)
    for name, stamp in stamps.items():  # finished shards were kept, not rewritten
        assert (out / "shards" / name).stat().st_mtime_ns == stamp
    store = EmbeddingStore(str(out))
    assert store.paths() == rel and len(store) == N_IMAGES


def test_init_ray_starts_its_own_local_cluster_unless_given_an_address(monkeypatch):
    """Without an address the job starts a new local cluster (address "local"),
    never one that /tmp/ray/ray_current_cluster still names after it died."""
    import ray

    import data_pipelines.embed as E

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for env, arg in ((None, None), ("local", None), ("10.0.0.1:6379", None), (None, "10.0.0.2:6379")):
        if env is None:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        else:
            monkeypatch.setenv("RAY_ADDRESS", env)
        E.init_ray(arg)
    assert [c["address"] for c in calls] == ["local", "local", "10.0.0.1:6379", "10.0.0.2:6379"]
    assert calls[0]["num_cpus"] >= 4 and "num_cpus" not in calls[2]  # a cluster's CPUs are its own


def test_a_folder_without_embeddings_is_named_with_the_likely_mistake(tmp_path):
    """Reading embeddings from the wrong folder says which mistake it looks
    like: nothing there, a file, the data set folder, or the folder above the
    embeddings (the demo keeps them per preset)."""
    def why(path) -> str:
        with pytest.raises(FileNotFoundError) as e:
            EmbeddingStore(str(path))
        return str(e.value)

    assert why(tmp_path / "nosuch") == (f"{tmp_path / 'nosuch'} does not exist: run the embedding job first "
                                        f"(mmphi data embed --out {tmp_path / 'nosuch'})")
    (tmp_path / "notes.txt").write_text("x")
    assert why(tmp_path / "notes.txt") == f"{tmp_path / 'notes.txt'} is a file, not a folder of embeddings"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    assert "is a data set folder (it holds train.json), not embeddings" in why(tmp_path / "data")
    (tmp_path / "emb" / "tiny").mkdir(parents=True)
    assert why(tmp_path / "emb") == f"{tmp_path / 'emb'} has no manifest.json: run the embedding job first"
    (tmp_path / "emb" / "tiny" / "manifest.json").write_text("{}")
    assert why(tmp_path / "emb") == (f"{tmp_path / 'emb'} has no manifest.json, but the folder in it holds "
                                     f"embeddings: give {tmp_path / 'emb' / 'tiny'}")


def test_each_encoder_thread_runs_on_its_own_cuda_stream(monkeypatch):
    """Ray Data runs an encoder actor's calls on several threads: each thread
    gets one stream of its own and keeps it, so one call's host copies overlap
    another's kernels (CUDA's calls faked; on the CPU no stream is made)."""
    import contextlib
    import threading

    import torch

    from data_pipelines.embed import Embedder

    made, entered = [], []

    class FakeStream:
        def __init__(self):
            made.append(self)

    @contextlib.contextmanager
    def fake_stream(stream):
        entered.append((threading.get_ident(), stream))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream)
    emb = Embedder.__new__(Embedder)  # the stream logic only: no encoder built
    emb.device, emb._streams = "cuda", threading.local()

    together = threading.Barrier(3)  # all alive at once: their idents differ

    def two_calls():
        together.wait(timeout=10)
        for _ in range(2):
            with emb._stream():
                pass

    threads = [threading.Thread(target=two_calls) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 3  # one per thread, not one per call
    by_thread: dict[int, set] = {}
    for ident, stream in entered:
        by_thread.setdefault(ident, set()).add(id(stream))
    assert len(by_thread) == 3 and all(len(s) == 1 for s in by_thread.values())
    assert len({s for ss in by_thread.values() for s in ss}) == 3
    emb.device = "cpu"
    with emb._stream():
        pass
    assert len(made) == 3 and len(entered) == 6  # the CPU makes and enters no stream


def test_decode_tasks_crop_as_the_config_says(tmp_path):
    """The job's CPU tasks crop with the tower's own cropper, vision.jpeg_draft
    included: their pixels are serving's and chat's."""
    from data_pipelines.embed import decode_batch
    from models.config import load_config
    from models.vision import PixelPipeline, image_cropper

    rng = np.random.RandomState(0)
    big = Image.fromarray(rng.randint(0, 255, (800, 1000, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    seen = {}
    for draft in (False, True):
        vision = load_config("tiny", [f"vision.jpeg_draft={str(draft).lower()}"]).vision
        out = decode_batch({"path": np.array(["big.jpg"], dtype=object)}, root=str(tmp_path),
                           cropper=image_cropper(vision), max_pixels=10**8)
        assert out["error"][0] == ""
        np.testing.assert_array_equal(out["pixels"][0], PixelPipeline(vision).crop(tmp_path / "big.jpg"))
        seen[draft] = out["pixels"][0]
    assert not np.array_equal(seen[False], seen[True])  # a 1000 x 800 JPEG for a 96 px crop: decoded at 1/8
