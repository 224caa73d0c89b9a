"""A training run's own outputs beside Ray Train's checkpoints, in OUT/NAME:
``metrics.jsonl`` (one line per evaluation), ``final/`` (the model
checkpoint), ``summary.json``, ``curves.png`` and ``settings.json`` (what
the run was started with). Local paths or URIs.

A run's Ray Train checkpoints are in its own folder, or, for the later runs
of a sequence trained in one Ray Train run (``ray_jobs.train.run_sequence``),
in the folder of the sequence's first run, ``checkpoints``; the
``mmphi.json`` in each says which run wrote it."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

from data_pipelines import storage


class RunOutputs:
    def __init__(self, out: str, name: str, checkpoints: str | None = None):
        self.fs, base = storage.resolve(out)
        self.name = name
        self.root = storage.join(base, name)
        self.checkpoints = storage.join(base, checkpoints or name)  # the Ray Train run folder holding its checkpoints
        self.fs.create_dir(self.root, recursive=True)
        self.metrics_path = storage.join(self.root, "metrics.jsonl")
        self.final = storage.join(self.root, "final")

    # metrics --------------------------------------------------------------
    def metrics(self) -> list[dict]:
        if not storage.exists(self.fs, self.metrics_path):
            return []
        text = storage.read_bytes(self.fs, self.metrics_path).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _write(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        storage.write_bytes_atomic(self.fs, self.metrics_path, data)

    def append(self, row: dict) -> None:
        self._write(self.metrics() + [row])

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: forget lines written after the checkpoint we resume from."""
        rows = self.metrics()
        kept = [r for r in rows if r.get("step", 0) <= after_step]
        if len(kept) != len(rows):
            self._write(kept)

    # live progress ------------------------------------------------------------
    def register_worker(self, rank: int, start_step: int, **extra) -> None:
        """``workers/rank-N.json``: where each worker runs (node, pid), the
        step it (re)started from and ``extra`` (its device, whether it
        compiled); rewritten on every restart."""
        import os
        import time

        import ray

        folder = storage.join(self.root, "workers")
        self.fs.create_dir(folder, recursive=True)
        info = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "start_step": start_step, "time": time.time(), **extra}
        storage.write_bytes_atomic(self.fs, storage.join(folder, f"rank-{rank}.json"), json.dumps(info).encode())

    def progress(self, step: int, loss: float) -> None:
        """One line per step in ``progress.jsonl`` (local runs folders only)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            import time

            with open(storage.join(self.root, "progress.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": round(loss, 5), "t": round(time.time(), 3)}) + "\n")

    def workers(self) -> list[dict]:
        folder = storage.join(self.root, "workers")
        return [json.loads(storage.read_bytes(self.fs, f)) for f in storage.list_files(self.fs, folder, ".json")]

    # resume point ---------------------------------------------------------------
    def newest_checkpoint(self) -> tuple[int, str] | None:
        """``(step, folder)`` of the newest complete checkpoint folder Ray Train
        wrote for this run. Ray's controller registers a reported checkpoint
        only at its next poll of the workers (every few seconds), so after a
        crash the newest one on storage can be newer than the one Ray offers.

        A folder is complete when every file its ``mmphi.json`` lists is
        there with its size (one listing per folder; nothing is downloaded
        but ``mmphi.json``). Folders written before ``mmphi.json`` listed
        its files are checked by loading their ``train_state.pt``."""
        best = None
        infos = self.fs.get_file_info(pafs.FileSelector(self.checkpoints, allow_not_found=True))
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
                continue
            meta = self._meta(info.path)
            if meta is None or not self._owns(meta):
                continue
            step = self._complete_step(info.path, meta)
            if step is not None and (best is None or step > best[0]):
                best = (step, info.path)
        return best

    def _complete_step(self, folder: str, meta: dict) -> int | None:
        """The step of a checkpoint ``folder`` when all of it is on storage."""
        files = meta.get("files")
        if files is None:  # an older checkpoint: its state loads only when whole
            import io

            import torch

            try:
                state = storage.read_bytes(self.fs, storage.join(folder, "train_state.pt"))
                return torch.load(io.BytesIO(state), weights_only=False)["step"]
            except Exception:  # missing, or cut short by the crash
                return None
        step = meta["extra"].get("step")
        if "train_state.pt" not in files or not isinstance(step, int):
            return None  # not a trainer's checkpoint: nothing to resume from
        have = {i.path[len(folder):].lstrip("/"): i.size
                for i in self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
                if i.type == pafs.FileType.File}
        return step if all(have.get(f) == size for f, size in files.items()) else None

    def _meta(self, folder: str) -> dict | None:
        """A checkpoint folder's ``mmphi.json`` (its ``extra`` a mapping, ``{}``
        when absent), or None when it is missing or unreadable."""
        try:
            meta = json.loads(storage.read_bytes(self.fs, storage.join(folder, "mmphi.json")))
        except (FileNotFoundError, OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.setdefault("extra", {}), dict):
            return None
        return meta

    def _owns(self, meta: dict) -> bool:
        run = meta["extra"].get("run")
        return run == self.name if run is not None else self.checkpoints == self.root

    def wrote(self, folder: str) -> bool:
        """Whether the checkpoint ``folder`` is this run's (its ``mmphi.json``
        names the run; one without a name is taken as the folder's own)."""
        meta = self._meta(folder)
        return meta is not None and self._owns(meta)

    def final_step(self) -> int | None:
        """The step of ``final/``, or None without one."""
        meta = self._meta(self.final)
        return meta["extra"].get("step") if meta is not None else None

    def trained(self, steps: int) -> bool:
        """Whether ``final/`` holds step ``steps`` or later and no checkpoint of
        the run is newer: training it again would do nothing."""
        final_step = self.final_step()
        if final_step is None or final_step < steps:
            return False
        newest = self.newest_checkpoint()
        return not (newest and newest[0] > final_step)

    def local_copy(self, folder: str) -> str:
        """A local path for a checkpoint folder (downloaded when remote)."""
        return storage.local_folder(self.fs, folder)

    # final checkpoint -------------------------------------------------------
    def has_final(self) -> bool:
        return storage.exists(self.fs, storage.join(self.final, "mmphi.json"))

    def export_final(self, ckpt_dir: str) -> None:
        from models.checkpoint import meta_text

        if storage.exists(self.fs, self.final):
            self.fs.delete_dir(self.final)
        self.fs.create_dir(self.final, recursive=True)
        src = Path(ckpt_dir)
        meta = json.loads((src / "mmphi.json").read_text())
        meta.get("files", {}).pop("train_state.pt", None)  # final/ is a model, not a point to resume from
        for f in src.rglob("*"):
            if f.is_file() and f.name not in ("train_state.pt", "mmphi.json"):
                dest = storage.join(self.final, f.relative_to(src).as_posix())
                self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(f), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        # last, so that a final/ with its mmphi.json (what has_final looks for) has all its files
        storage.write_bytes_atomic(self.fs, storage.join(self.final, "mmphi.json"), meta_text(meta).encode())

    def finished(self, steps: int) -> dict | None:
        """The summary of a run that already finished ``steps`` or more, when
        its final checkpoint holds the newest step on storage: rerunning it
        would train nothing, so the caller can skip starting Ray Train. Its
        paths are this run folder's, also when the folder was moved or copied
        after the run wrote them."""
        summary_path = storage.join(self.root, "summary.json")
        if not (self.has_final() and storage.exists(self.fs, summary_path)):
            return None
        try:
            summary = json.loads(storage.read_bytes(self.fs, summary_path))
        except ValueError:
            return None
        if not self.trained(steps) or summary.get("steps") != self.final_step():
            return None
        stored = summary.get("final")
        if isinstance(stored, str) and stored != self.final:  # the runs folder moved since: its paths follow it
            old_out = stored.rsplit("/", 2)[0]  # OUT, the folder of the runs (a sequence's checkpoints are in another run's)
            ray_ckpt = summary.get("ray_checkpoint")
            if isinstance(ray_ckpt, str) and ray_ckpt.startswith(old_out + "/"):
                ray_ckpt = self.root.rsplit("/", 1)[0] + ray_ckpt[len(old_out):]
            summary = summary | {"final": self.final, "ray_checkpoint": ray_ckpt}
        return summary

    # the settings a run started with ------------------------------------------
    def started_settings(self) -> dict | None:
        """``settings.json``: the settings the run was first started with
        (None for a run from before they were recorded, or a damaged file)."""
        path = storage.join(self.root, "settings.json")
        if not storage.exists(self.fs, path):
            return None
        try:
            got = json.loads(storage.read_bytes(self.fs, path))
        except ValueError:
            return None
        return got if isinstance(got, dict) else None

    def record_start(self, settings: dict) -> bool:
        """Write ``settings.json`` when the run has trained nothing yet (no
        metrics, checkpoint or ``final/``); returns whether it did."""
        if self.metrics() or self.has_final() or self.newest_checkpoint() is not None:
            return False
        self.record_settings(settings)
        return True

    def record_settings(self, settings: dict) -> None:
        """Write ``settings.json`` (for a run that changes its planned steps)."""
        storage.write_bytes_atomic(self.fs, storage.join(self.root, "settings.json"),
                                   json.dumps(settings, indent=2).encode())

    # summary ----------------------------------------------------------------
    def write_summary(self, settings: dict, seconds: float, checkpoint: str | None) -> dict:
        rows = self.metrics()
        first = next((r for r in rows if r.get("step") == 0), {})
        last_eval = next((r for r in reversed(rows) if "answer_accuracy" in r), {})
        chance = _chance(settings.get("data"))
        summary = {
            "run": settings.get("name") or Path(self.root).name, "stage": settings.get("stage"),
            "steps": max((r.get("step", 0) for r in rows), default=0), "planned_steps": settings.get("steps"),
            "workers": settings.get("workers"), "seconds_last_fit": round(seconds, 1),
            "first_loss": first.get("val_loss"), "ln_vocab": first.get("ln_vocab"),
            "train_loss": last_eval.get("train_loss"), "val_loss": last_eval.get("val_loss"),
            "perplexity": last_eval.get("perplexity"), "token_accuracy": last_eval.get("token_accuracy"),
            "answer_accuracy": last_eval.get("answer_accuracy", {}),
            "answer_counts": last_eval.get("answer_counts", {}),
            "blind_answer_accuracy": next((r["blind_answer_accuracy"] for r in reversed(rows)
                                           if "blind_answer_accuracy" in r), {}),
            "chance": chance, "final": self.final if self.has_final() else None, "ray_checkpoint": checkpoint,
        }
        storage.write_bytes_atomic(self.fs, storage.join(self.root, "summary.json"),
                                   json.dumps(summary, indent=2).encode())
        if self.has_final():
            storage.write_bytes_atomic(self.fs, storage.join(self.final, "summary.json"),
                                       json.dumps(summary, indent=2).encode())
        return summary

    def plot(self) -> None:
        rows = self.metrics()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("train_loss", "val_loss"):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                a.plot(*zip(*pts), marker="o", label=key)
        a.set_xlabel("step"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
        types = sorted({q for r in rows for q in r.get("answer_accuracy", {})})
        for q in types:
            pts = [(r["step"], r["answer_accuracy"][q]) for r in rows if q in r.get("answer_accuracy", {})]
            b.plot(*zip(*pts), marker="o", label=q)
        b.set_ylim(0, 1), b.set_xlabel("step"), b.set_ylabel("held-out answer accuracy"), b.set_title("accuracy")
        if types:
            b.legend()
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        storage.write_bytes_atomic(self.fs, storage.join(self.root, "curves.png"), buf.getvalue())


def _chance(data: str | None) -> dict:
    if not data:
        return {}
    p = Path(data) / "synth.json"
    if not p.exists():
        return {}
    return {k: v for k, v in json.loads(p.read_text()).get("chance", {}).items() if v}

