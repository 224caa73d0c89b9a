"""Ray Data job: CLIP embeddings of every image a data set uses, once.

    python -m data_pipelines.embed --data DIR --out DIR [--preset P] [--set k=v] [--gpus-per-actor 1]

Pipeline (streaming, all Ray Data):

1. the driver lists the images the conversations reference (deduplicated),
   minus those already in finished shards of ``--out`` (resume);
2. CPU tasks read each file (local or ``s3://``/``gs://``), decode it (EXIF
   rotation, CMYK/grey/palette/16-bit -> RGB) and resize + centre-crop it to
   uint8; an image that cannot be used becomes a logged "skipped" row;
3. an actor pool (``ActorPoolStrategy``; ``--gpus-per-actor`` GPUs per
   actor, by default 1 when the Ray cluster has GPUs and 0 (CPU) when it has
   none; ``--resources-per-actor`` pins the actors to nodes with custom
   resources) normalises on the device and runs the CLIP tower in
   bf16/fp16/fp32 as the preset says;
4. CPU tasks write shards of ``--shard-size`` images, each one Parquet file
   written atomically, so a killed run loses at most the shards in flight.

Output: ``OUT/shards/shard-*.parquet`` with columns ``path`` (relative to the
image folder), ``embedding`` (raw little-endian bytes of a ``shape`` array of
``dtype``), ``node`` (Ray node id that embedded it); each file's Parquet
metadata lists the images it skipped and why. ``OUT/manifest.json`` names
the encoder (identity as in ``models.vision.vision_identity``, open_clip
version, weight fingerprint), dtype, shape, counts and shards.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import storage
from .resources import ResourcesAction, check_resources, warn_if_absent

log = logging.getLogger(__name__)

FORMAT = "mmphi-embeddings"
VERSION = 1
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STORE_DTYPES = ("float16", "bfloat16", "float32")  # little-endian on every supported platform


class EmbedError(RuntimeError):
    """The job cannot run as asked; the message says why."""


# ----------------------------------------------------------------- inputs
def referenced_images(data: str | None = None, json_files: list[str] | None = None,
                      images: str | None = None) -> tuple[str, list[str], dict]:
    """``(image_root, sorted unique relative paths, info)`` for a data set
    folder (``train.json``/``val.json``/``images/``), LLaVA json file(s) plus an
    image folder, or an image folder alone (every image file in it)."""
    files: list[str] = list(json_files or [])
    if data is not None:
        from .llava import dataset_paths

        paths = dataset_paths(data)
        files += [str(paths[k]) for k in ("train", "val") if paths.get(k) is not None]
        images = images or str(paths["images"])
    if images is None:
        raise EmbedError("give --data DIR, or --images DIR (with optional --json FILE ...)")
    if not Path(images).is_dir() and "://" not in images:
        raise EmbedError(f"image folder not found: {images}")
    info = {"json": files, "images": str(images)}
    if files:
        from .llava import read_llava

        refs: set[str] = set()
        n_refs = n_bad = 0
        for f in files:
            report = read_llava(f, images, check_images=False)
            n_bad += len(report.errors)
            for r in report.records:
                if r.image:
                    refs.add(r.image)
                    n_refs += 1
        info.update(references=n_refs, unique=len(refs), bad_records=n_bad)
        return str(images), sorted(refs), info
    root = Path(images)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    info.update(references=len(found), unique=len(found), bad_records=0)
    return str(images), found, info


# ----------------------------------------------------------------- shards
def shard_dir(out: str) -> tuple[object, str]:
    fs, base = storage.resolve(out)
    return fs, storage.join(base, "shards")


def finished(out: str) -> tuple[set[str], dict[str, str], list[str]]:
    """Paths embedded and skipped in finished shards, and the shard files.
    Leftover temporary files of a killed run are removed."""
    import pyarrow.parquet as pq

    fs, folder = shard_dir(out)
    done: set[str] = set()
    skipped: dict[str, str] = {}
    files = []
    for path in storage.list_files(fs, folder):
        if ".tmp-" in path:
            fs.delete_file(path)
            continue
        if not path.endswith(".parquet"):
            continue
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            done.update(pf.read(columns=["path"]).column("path").to_pylist())
        skipped.update(json.loads(meta.get(b"skipped", b"{}")))
        files.append(path)
    return done, skipped, files


# ----------------------------------------------------------------- stages
def decode_batch(batch: dict, *, root: str, cropper, max_pixels: int) -> dict:
    """CPU: read + decode + crop each image with ``cropper`` (the tower's
    ``models.images.ImageCropper``); failures become error rows. Imports only
    PIL/NumPy/pyarrow, so these workers start fast."""
    fs, base = storage.resolve(root)
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths), cropper.size, cropper.size, 3), np.uint8)
    errors = []
    for i, rel in enumerate(paths):
        try:
            pixels[i] = cropper(storage.read_bytes(fs, storage.join(base, rel)), max_pixels)
            errors.append("")
        except Exception as e:  # one bad image never stops the job
            errors.append(f"{type(e).__name__}: {e}"[:500] or type(e).__name__)
    return {"path": np.array(paths, dtype=object), "pixels": pixels, "error": np.array(errors, dtype=object)}


class Embedder:
    """Actor: the CLIP tower on its device; uint8 crops -> stored embeddings."""

    def __init__(self, config: dict, store_dtype: str):
        import ray
        import torch

        from models.config import config_from_dict
        from models.vision import DTYPES, VisionEncoder

        cfg = config_from_dict(config)
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.encoder = VisionEncoder(cfg.vision, self.device)
        self.dtype = DTYPES[cfg.vision.dtype]
        self.store_torch = DTYPES[store_dtype]
        self.nbytes = int(np.prod(job_identity(cfg, store_dtype)["shape"])) * self.store_torch.itemsize
        self.node = ray.get_runtime_context().get_node_id()
        self._streams = threading.local()
        if self.device == "cuda":
            torch.cuda.synchronize()  # the weights are on the device before any call's stream reads them

    def _stream(self):
        """This thread's CUDA stream (a null context on the CPU). Ray Data runs
        ``calls_per_actor`` calls at once on as many threads; on one stream
        each call's host copies (pixels in, features out) would wait for the
        other's encoder kernels, on its own they overlap them."""
        import contextlib

        import torch

        if self.device != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream()
        return torch.cuda.stream(stream)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(batch["path"])
        every = bool(ok.all())
        emb = None if every else np.zeros((n, self.nbytes), np.uint8)  # fixed-width rows: a tensor column, no pickling
        if ok.any():
            with torch.inference_mode(), self._stream():
                # a batch without failures goes as it is: no copies of its pixels or features on the host
                x = self.encoder.pipeline.normalize(batch["pixels"] if every else batch["pixels"][ok],
                                                    self.device, self.dtype)
                feats = self.encoder(x).to(self.store_torch)  # cast on the device: fewer bytes to copy
                raw = feats.contiguous().view(torch.uint8).reshape(int(ok.sum()), -1)  # the stored bytes, little-endian
                if every:
                    emb = raw.cpu().numpy()
                else:
                    emb[ok] = raw.cpu().numpy()
        return {"path": batch["path"], "embedding": emb, "error": batch["error"],
                "node": np.array([self.node] * n, dtype=object), "t_end": np.full(n, time.time())}


def write_shard(batch: dict, *, out: str) -> dict:
    """CPU: one atomic Parquet file per batch; returns a one-row summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, folder = shard_dir(out)
    fs.create_dir(folder, recursive=True)
    ok = [i for i, e in enumerate(batch["error"]) if not e]
    skipped = {str(batch["path"][i]): str(batch["error"][i]) for i, e in enumerate(batch["error"]) if e}
    emb = np.ascontiguousarray(batch["embedding"][ok])
    width = batch["embedding"].shape[1]
    table = pa.table({
        "path": pa.array([str(batch["path"][i]) for i in ok], pa.string()),
        "embedding": pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(ok), [None, pa.py_buffer(emb)]),
        "node": pa.array([str(batch["node"][i]) for i in ok], pa.string()),
    }).replace_schema_metadata({"skipped": json.dumps(skipped)})
    name = storage.join(folder, f"shard-{uuid.uuid4().hex[:12]}.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="lz4")  # activations barely compress; keep the CPU for decoding
    storage.write_bytes_atomic(fs, name, sink.getvalue().to_pybytes())
    nodes = sorted({str(n) for n in batch["node"]})
    ends, counts = np.unique(batch["t_end"], return_counts=True)  # one entry per encoder batch
    return {"file": [name.rsplit("/", 1)[-1]], "rows": [len(ok)], "skipped": [len(skipped)],
            "nodes": [json.dumps(nodes)], "batches": [json.dumps([[float(t), int(c)] for t, c in zip(ends, counts)])]}


# ----------------------------------------------------------------- job
@dataclass
class EmbedSettings:
    out: str
    data: str | None = None
    json_files: list[str] = field(default_factory=list)
    images: str | None = None
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    store_dtype: str = "float16"
    actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    resources_per_actor: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {"infer_gpu": 1}
    cpus_per_actor: float = 0.5
    # Ray Data calls in flight per encoder actor: the encoder runs one batch at
    # a time, while the next batch's input and the last one's output are
    # assembled on other threads (without this the device idles meanwhile)
    calls_per_actor: int = 2
    cpus_per_task: float = 0.25
    # decode tasks at once; None: one per logical CPU of the cluster that the encoder actors leave. More
    # only add processes: each starts a Python worker, and on a small machine their start-up competes with
    # the encoder's (2 cores, 6,000 images: about 40 % more time with 14 at once than with 3)
    decode_tasks: int | None = None
    batch_size: int = 64
    decode_batch: int = 32
    shard_size: int = 256
    max_pixels: int = 64_000_000
    limit: int | None = None
    address: str | None = None
    actor_wait_s: int = 900


def steady_rate(batches: list) -> float | None:
    """Images per second from the end of the first encoder batch to the end of
    the last (start-up and model warm-up excluded, pipeline stalls included)."""
    if len(batches) < 3:
        return None
    batches = sorted(batches)
    span = batches[-1][0] - batches[0][0]
    return round(sum(c for _, c in batches[1:]) / span, 2) if span > 0 else None


def job_identity(cfg, store_dtype: str) -> dict:
    import open_clip

    from models.vision import vision_identity, vision_spec

    spec = vision_spec(cfg.vision)
    return {"encoder": vision_identity(cfg.vision), "open_clip": open_clip.__version__, "dtype": store_dtype,
            "shape": [spec["num_tokens"], spec["feature_dim"]], "compute_dtype": cfg.vision.dtype}


RESOURCE_HINTS = {"GPU": "--gpus-per-actor", "CPU": "EmbedSettings.cpus_per_actor"}


def _check_positive_int(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EmbedError(f"{flag} must be a positive integer, got {value!r}")


def decode_concurrency(s: EmbedSettings, cluster_cpus: float, blocks: int) -> int:
    """Decode tasks at once: ``--decode-tasks``, or one per logical CPU that the
    minimum encoder pool leaves (at least one), never more than there are blocks."""
    wanted = s.decode_tasks or int(cluster_cpus - s.actors * s.cpus_per_actor)
    return max(1, min(wanted, blocks))


def default_gpus_per_actor() -> float:
    """1 when the connected Ray cluster has GPUs, else 0. The cluster decides,
    not the driver: on a cluster the driver runs on a CPU head node."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


_local_gcs: str | None = None  # GCS address of the local cluster init_ray started


def init_ray(address: str | None, **local) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a one-machine
    cluster; ``local``: more ``ray.init`` arguments for that one (tests keep
    the dashboard off). Does nothing when Ray is already up."""
    global _local_gcs
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
    else:
        # a new local cluster (address "local": never a leftover one that
        # /tmp/ray/ray_current_cluster still names); logical CPUs above the
        # core count, so fractional tasks/actors never deadlock on a small machine
        ray.init(address="local", **{"num_cpus": max(4, os.cpu_count() or 1), "log_to_driver": True, **local})
        _local_gcs = ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def started_local_cluster() -> bool:
    """Whether this process is connected to the one-machine cluster that
    ``init_ray`` started (not to a cluster it joined)."""
    import ray

    return ray.is_initialized() and _local_gcs is not None and _local_gcs == ray.get_runtime_context().gcs_address


def run(s: EmbedSettings) -> dict:
    from models.config import load_config
    from models.vision import image_cropper

    if s.store_dtype not in STORE_DTYPES:
        raise EmbedError(f"--dtype must be one of {', '.join(STORE_DTYPES)}")
    try:
        resources = check_resources(s.resources_per_actor, RESOURCE_HINTS)
    except ValueError as e:
        raise EmbedError(f"--resources-per-actor: {e}") from None
    for value, flag in ((s.batch_size, "--batch-size"), (s.actors, "--actors"), (s.shard_size, "--shard-size"),
                        (s.calls_per_actor, "--calls-per-actor"), (s.decode_batch, "EmbedSettings.decode_batch")):
        _check_positive_int(value, flag)
    if s.max_actors is not None:
        _check_positive_int(s.max_actors, "--max-actors")
        if s.max_actors < s.actors:
            raise EmbedError(f"--max-actors ({s.max_actors}) must be at least --actors ({s.actors})")
    if s.limit is not None:
        _check_positive_int(s.limit, "--limit")
    if s.decode_tasks is not None:
        _check_positive_int(s.decode_tasks, "--decode-tasks")
    if s.gpus_per_actor is not None and s.gpus_per_actor < 0:
        raise EmbedError(f"--gpus-per-actor must be 0 or more, got {s.gpus_per_actor}")
    try:
        storage.check_output_folder(s.out, "--out")
    except ValueError as e:
        raise EmbedError(str(e)) from None
    gpus = s.gpus_per_actor
    t0 = time.time()
    cfg = load_config(s.preset, s.overrides)
    ident = job_identity(cfg, s.store_dtype)
    cropper = image_cropper(cfg.vision)
    root, paths, info = referenced_images(s.data, s.json_files, s.images)
    if s.limit is not None:
        paths = paths[: s.limit]
    fs, base = storage.resolve(s.out)
    fs.create_dir(base, recursive=True)
    job_file = storage.join(base, "job.json")
    if storage.exists(fs, job_file):
        prior = json.loads(storage.read_bytes(fs, job_file))
        if prior != ident:
            from models.checkpoint import differences

            diffs = (differences(prior, ident, "the folder", "this job writes") if isinstance(prior, dict)
                     else [f"job.json: {prior!r}"])
            more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
            raise EmbedError(f"{s.out} holds embeddings of another encoder or dtype than this job's "
                             f"({'; '.join(diffs[:6])}{more}); use a new --out, or delete it to start over")
    else:
        storage.write_bytes_atomic(fs, job_file, json.dumps(ident, indent=2).encode())
    done, skipped_before, _ = finished(s.out)
    wanted = set(paths)
    todo = [p for p in paths if p not in done and p not in skipped_before]
    log.info("%d images referenced (%d unique); %d already done, %d skipped before; %d to embed",
             info["references"], len(paths), len(done & wanted), len(set(skipped_before) & wanted), len(todo))
    summaries = []
    if todo:
        import ray
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        init_ray(s.address)
        if gpus is None:
            gpus = default_gpus_per_actor()
        log.info("encoder actors: %d to %d, %g GPU and %g CPU each%s", s.actors, s.max_actors or s.actors, gpus,
                 s.cpus_per_actor, f", custom resources {resources}" if resources else "")
        warn_if_absent({**resources, **({"GPU": gpus} if gpus else {})}, s.actors, "encoder actors")
        n_blocks = max(1, min(-(-len(todo) // s.decode_batch), 5000))  # about decode_batch rows a block
        decode_tasks = decode_concurrency(s, ray.cluster_resources().get("CPU", 1), n_blocks)
        log.info("decode tasks: at most %d at once", decode_tasks)
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=n_blocks)
        ds = ds.map_batches(decode_batch, batch_size=s.decode_batch, num_cpus=s.cpus_per_task,
                            compute=TaskPoolStrategy(size=decode_tasks),
                            fn_kwargs={"root": root, "cropper": cropper, "max_pixels": s.max_pixels})
        # start work only once the minimum pool is up, so every actor gets a share
        # (and a cluster that can never place them fails with a clear time-out)
        ray.data.DataContext.get_current().wait_for_min_actors_s = s.actor_wait_s
        ds = ds.map_batches(
            Embedder, batch_size=s.batch_size,
            compute=ActorPoolStrategy(min_size=s.actors, max_size=s.max_actors or s.actors,
                                      max_concurrent_calls_per_actor=s.calls_per_actor),
            num_gpus=gpus, num_cpus=s.cpus_per_actor, **({"resources": resources} if resources else {}),
            fn_constructor_kwargs={"config": cfg.to_dict(), "store_dtype": s.store_dtype},
        )
        ds = ds.map_batches(write_shard, batch_size=s.shard_size, num_cpus=s.cpus_per_task, fn_kwargs={"out": s.out})
        for row in ds.iter_rows():
            summaries.append(row)
        log.debug("Ray Data stats:\n%s", ds.stats())
    seconds = time.time() - t0
    done, skipped, files = finished(s.out)
    embedded_now = sum(r["rows"] for r in summaries)
    steady = steady_rate([b for r in summaries for b in json.loads(r["batches"])])
    manifest = {
        "format": FORMAT, "version": VERSION, **ident,
        "encoding": "row 'embedding' = raw little-endian bytes of a C-order array of `shape` and `dtype`",
        "bytes_per_image": int(np.prod(ident["shape"])) * (4 if s.store_dtype == "float32" else 2),
        "image_root": root, "source": info,
        "count": len(done & wanted), "skipped": {p: skipped[p] for p in sorted(set(skipped) & wanted)},
        "missing": len(wanted - done - set(skipped)),
        "shards": [f.rsplit("/", 1)[-1] for f in files],
        "last_run": {"embedded": embedded_now, "skipped": sum(r["skipped"] for r in summaries),
                     "shards_written": len(summaries), "seconds": round(seconds, 2),
                     "images_per_s": round(embedded_now / seconds, 2) if seconds else None,
                     "steady_images_per_s": steady, "gpus_per_actor": gpus, "resources_per_actor": resources,
                     "shard_nodes": {r["file"]: json.loads(r["nodes"]) for r in summaries}},
    }
    storage.write_bytes_atomic(fs, storage.join(base, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


# ----------------------------------------------------------------- reading
def no_manifest(fs, base: str, out: str) -> str:
    """Why ``out`` holds no embeddings, naming the likely mistake: a folder
    that is not there, a file, a data set folder, or the folder above one
    with embeddings (the demo keeps them per preset: ``embeddings/tiny``)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return f"{out} does not exist: run the embedding job first (mmphi data embed --out {out})"
    if info.type != pafs.FileType.Directory:
        return f"{out} is a file, not a folder of embeddings"
    if storage.exists(fs, storage.join(base, "train.json")):
        return f"{out} is a data set folder (it holds train.json), not embeddings: give the embedding job's --out"
    inside = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=False))
              if i.type == pafs.FileType.Directory and storage.exists(fs, storage.join(i.path, "manifest.json"))]
    if inside:
        shown = ", ".join(storage.join(out, p.rsplit("/", 1)[-1]) for p in sorted(inside)[:3])
        which = "the folders in it hold" if len(inside) > 1 else "the folder in it holds"
        return f"{out} has no manifest.json, but {which} embeddings: give {shown}"
    return f"{out} has no manifest.json: run the embedding job first"


class EmbeddingStore:
    """Read embeddings back: ``store[path] -> np.ndarray (tokens, dim)``."""

    def __init__(self, out: str):
        fs, base = storage.resolve(out)
        mf = storage.join(base, "manifest.json")
        if not storage.exists(fs, mf):
            raise FileNotFoundError(no_manifest(fs, base, out))
        try:
            self.manifest = json.loads(storage.read_bytes(fs, mf))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{mf} is not valid JSON ({e}): rerun the embedding job to rewrite it") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mf} is not an mmphi embeddings manifest")
        self.shape = tuple(self.manifest["shape"])
        self.dtype = self.manifest["dtype"]
        self._fs, self._folder = fs, storage.join(base, "shards")
        self._rows: dict[str, bytes] | None = None

    @property
    def identity(self) -> dict:
        return {"vision": self.manifest["encoder"]}

    def _load(self) -> dict[str, bytes]:
        if self._rows is None:
            import pyarrow.parquet as pq

            rows: dict[str, bytes] = {}
            for name in self.manifest["shards"]:
                with self._fs.open_input_file(storage.join(self._folder, name)) as f:
                    t = pq.read_table(f, columns=["path", "embedding"])
                rows.update(zip(t.column("path").to_pylist(), t.column("embedding").to_pylist()))
            self._rows = rows
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, path: str) -> bool:
        return path in self._load()

    def paths(self) -> list[str]:
        return sorted(self._load())

    def __getitem__(self, path: str) -> np.ndarray:
        raw = self._load()[path]
        if self.dtype == "bfloat16":
            import torch

            return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy().reshape(self.shape)
        return np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)


# ----------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data set folder with train.json, val.json, images/")
    p.add_argument("--json", dest="json_files", action="append", default=[], metavar="FILE",
                   help="LLaVA-format json/jsonl (repeatable); use with --images")
    p.add_argument("--images", help="image folder (alone: embed every image in it)")
    p.add_argument("--out", required=True, help="output folder or URI (s3://..., gs://...)")
    p.add_argument("--preset", default="tiny", help="model preset or config file (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set vision.patch_pool=2")
    p.add_argument("--dtype", dest="store_dtype", default="float16", choices=STORE_DTYPES, help="stored dtype")
    p.add_argument("--actors", type=int, default=1, help="encoder actors (min pool size)")
    p.add_argument("--max-actors", type=int, default=None, help="max pool size (autoscaling)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per encoder actor (default: 1 when the Ray cluster has GPUs now, else 0; "
                        "give it on an autoscaling cluster whose GPU nodes may be at zero)")
    p.add_argument("--resources-per-actor", action=ResourcesAction, hints=RESOURCE_HINTS,
                   help="custom Ray resource per encoder actor, repeatable, e.g. infer_gpu=1: the actors run "
                        "only on nodes that declare it")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--calls-per-actor", type=int, default=2,
                   help="Ray Data calls in flight per encoder actor: batches are assembled while the encoder runs "
                        "(1: one at a time)")
    p.add_argument("--decode-tasks", type=int, default=None,
                   help="decode tasks at once (default: one per logical CPU of the cluster that the encoder actors "
                        "leave; more only help when reading waits on remote storage)")
    p.add_argument("--shard-size", type=int, default=256, help="images per output Parquet file")
    p.add_argument("--limit", type=int, default=None,
                   help="embed only the first N images, N >= 1 (smoke runs; default: all)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")


def settings_from_args(args: argparse.Namespace) -> EmbedSettings:
    return EmbedSettings(out=args.out, data=args.data, json_files=args.json_files, images=args.images,
                         preset=args.preset, overrides=args.overrides, store_dtype=args.store_dtype,
                         actors=args.actors, max_actors=args.max_actors, gpus_per_actor=args.gpus_per_actor,
                         resources_per_actor=dict(args.resources_per_actor or {}),
                         batch_size=args.batch_size, shard_size=args.shard_size, limit=args.limit,
                         address=args.address, calls_per_actor=args.calls_per_actor, decode_tasks=args.decode_tasks)


def main(args: argparse.Namespace) -> int:
    try:
        m = run(settings_from_args(args))
    except (EmbedError, FileNotFoundError) as e:
        print(f"mmphi data embed: {e}", file=sys.stderr)
        return 2
    last = m["last_run"]
    print(f"embeddings in {args.out}: {m['count']} images ({m['bytes_per_image']:,} bytes each, "
          f"{m['dtype']} {m['shape']}), {len(m['skipped'])} skipped, {m['missing']} missing; this run: "
          f"{last['embedded']} embedded, {last['skipped']} skipped in {last['seconds']} s "
          f"({last['images_per_s']} images/s)")
    for path, why in list(m["skipped"].items())[:10]:
        print(f"  skipped {path}: {why}")
    return 0 if m["missing"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main(parser.parse_args()))
