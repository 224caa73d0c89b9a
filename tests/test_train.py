"""The Ray Train jobs on the tiny preset: stages, outputs, resume, worker failure (one worker per node of a
simulated cluster, through a node's loss: tests/test_multinode.py)."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ray_jobs.outputs import RunOutputs
from ray_jobs.train import TrainSettings, run, run_sequence

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import ray

    from data_pipelines.embed import EmbedSettings, init_ray, started_local_cluster
    from data_pipelines.embed import run as embed
    from data_pipelines.synthetic import synthesize

    root = tmp_path_factory.mktemp("train")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # metrics reach the node's agent within a second
    synthesize(root / "data", images=160, seed=6, progress=False)
    # a one-machine cluster started as the jobs start one, so the runs get what a user's local runs get
    # (no preemption watcher, 0.5 s polling)
    init_ray(None, num_cpus=4, include_dashboard=False, log_to_driver=False)
    assert started_local_cluster()
    embed(EmbedSettings(out=str(root / "emb"), data=str(root / "data")))
    yield root
    ray.shutdown()


def settings(root: Path, stage: str, name: str, **kw) -> TrainSettings:
    base = dict(stage=stage, data=str(root / "data"), embeddings=str(root / "emb"), out=str(root / "runs"),
                name=name, workers=2, steps=12, batch_size=8, eval_every=6, ckpt_every=6, eval_samples=24,
                threads=1, warmup=2)
    base.update(kw)
    return TrainSettings(**base)


@pytest.fixture(scope="module")
def stages(dataset):
    s1 = run(settings(dataset, "projector", "s1"))
    s2 = run(settings(dataset, "qlora", "s2", init=s1["final"]))
    return s1, s2


def test_stage1_then_stage2(stages, dataset):
    from models.multimodal import MultimodalPhi3

    s1, s2 = stages
    for s in (s1, s2):
        assert s["steps"] == 12 and s["workers"] == 2
        assert set(s["answer_accuracy"]) >= {"colour", "shape", "position", "count", "size"}
        assert set(s["blind_answer_accuracy"]) == set(s["answer_accuracy"])
        assert s["chance"]["shape"] == pytest.approx(1 / 6)
        assert 0 <= s["token_accuracy"] <= 1 and s["perplexity"] == pytest.approx(math.exp(s["val_loss"]))
    # the first loss (before any update) of a random model is ln(vocab)
    assert abs(s1["first_loss"] - s1["ln_vocab"]) / s1["ln_vocab"] < 0.15
    assert s1["val_loss"] < s1["first_loss"]
    # stage 2 starts from stage 1's projector (the LM was frozen there): well below a fresh model's loss
    assert s2["first_loss"] < 0.85 * s1["first_loss"]
    assert s2["val_loss"] < s2["first_loss"]
    runs = dataset / "runs"
    rows = [json.loads(line) for line in (runs / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 6, 12]
    assert (runs / "s2" / "curves.png").stat().st_size > 5000
    # stage 1 trained no LoRA; stage 2 saved an adapter that plain PEFT loads
    assert not (runs / "s1" / "final" / "adapter").exists()
    assert (runs / "s2" / "final" / "adapter" / "adapter_model.safetensors").exists()
    m = MultimodalPhi3.from_checkpoint(runs / "s2" / "final", device="cpu", with_vision=False)
    meta = json.loads((runs / "s2" / "final" / "mmphi.json").read_text())
    assert meta["extra"]["step"] == 12 and meta["extra"]["stage"] == "qlora"
    assert json.loads((runs / "s2" / "final" / "summary.json").read_text())["steps"] == 12
    assert m.num_image_tokens == 9  # the tiny preset: 3x3 pooled patch tokens
    # --compile auto (the default) leaves CPU workers eager, and each worker records why
    workers = RunOutputs(str(runs), "s2").workers()
    assert len(workers) == 2 and all(w["device"] == "cpu" and w["compiled"] is False for w in workers)
    assert {w["compile"] for w in workers} == {"auto: eager on cpu (--compile on forces compilation)"}


def test_rerun_with_same_name_does_no_more_steps(stages, dataset):
    runs = dataset / "runs" / "s2"
    before_ckpts = sorted(p.name for p in runs.glob("checkpoint_*"))
    before_rows = (runs / "metrics.jsonl").read_text()
    before_progress = (runs / "progress.jsonl").read_text()
    s1 = json.loads((dataset / "runs" / "s1" / "summary.json").read_text())
    workers = sorted(RunOutputs(str(dataset / "runs"), "s2").workers(), key=lambda w: w["rank"])
    summary = json.loads((runs / "summary.json").read_text())
    again = run(settings(dataset, "qlora", "s2", init=s1["final"]))
    assert again["steps"] == 12
    assert again == summary  # the finished run's own summary
    # decided before Ray Train: no worker started again
    assert sorted(RunOutputs(str(dataset / "runs"), "s2").workers(), key=lambda w: w["rank"]) == workers
    assert (runs / "progress.jsonl").read_text() == before_progress  # not one step more
    assert (runs / "metrics.jsonl").read_text() == before_rows
    assert sorted(p.name for p in runs.glob("checkpoint_*")) == before_ckpts


def test_a_copied_runs_folder_is_reused_from_its_new_place(stages, dataset, tmp_path):
    """A finished run copied elsewhere (a moved disk, a synced bucket) is
    reused there, and its summary names the copy's checkpoint, not the
    original's: the next stage and the server load what is there."""
    import shutil

    shutil.copytree(dataset / "runs" / "s1", tmp_path / "moved" / "s1")
    original = json.loads((dataset / "runs" / "s1" / "summary.json").read_text())
    again = run(settings(dataset, "projector", "s1", out=str(tmp_path / "moved")))
    assert again["final"] == str(tmp_path / "moved" / "s1" / "final") != original["final"]
    assert again["ray_checkpoint"].startswith(str(tmp_path / "moved" / "s1") + "/")
    assert Path(again["ray_checkpoint"]).is_dir()
    assert {k: v for k, v in again.items() if k not in ("final", "ray_checkpoint")} == \
        {k: v for k, v in original.items() if k not in ("final", "ray_checkpoint")}
    # decided before Ray Train: the copied worker records are the original run's
    assert RunOutputs(str(tmp_path / "moved"), "s1").workers() == RunOutputs(str(dataset / "runs"), "s1").workers()


def test_other_name_starts_fresh(stages, dataset):
    """A new name trains from scratch; this run also takes the GPU default's
    path, every decoder layer compiled (``--compile on``; ``auto`` compiles on
    GPUs only): its first step's loss is the eager run's."""
    s = run(settings(dataset, "projector", "s1-other", steps=6, eval_every=6, compile="on"))
    rows = [json.loads(r) for r in (dataset / "runs" / "s1-other" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert s["first_loss"] == pytest.approx(json.loads((dataset / "runs" / "s1" / "summary.json").read_text())["first_loss"])
    eager = [json.loads(r) for r in (dataset / "runs" / "s1" / "progress.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-4)  # the same batch, before any update
    workers = RunOutputs(str(dataset / "runs"), "s1-other").workers()
    assert len(workers) == 2 and all(w["compiled"] is True and w["compile"] == "on" for w in workers)


def test_a_run_exports_its_progress_to_prometheus(stages, dataset):
    """While a run trains, this node's Ray metrics port shows its step, planned
    steps, loss, validation loss, learning rate and tokens/s (rank 0's
    gauges); once it has ended, its step counter is the steps trained and the
    token counters of the two workers sum to at least one real token per
    sample. These are the series the training dashboard plots (and its
    alerting rules read), with the labels its per-worker panel groups by."""
    import math
    import re

    import httpx
    from conftest import promql_selectors, scraped

    from deploy.alerts import TRAINING
    from deploy.dashboard import training_dashboard
    from serve.app import metrics_url

    name, steps = "live", 40
    result = {}

    def fit():
        result["summary"] = run(settings(dataset, "qlora", name, steps=steps, eval_every=20, ckpt_every=20,
                                         init=str(dataset / "runs" / "s1" / "final")))

    t = threading.Thread(target=fit)
    started = time.time()
    t.start()
    gauges = ("step", "planned_steps", "loss", "val_loss", "learning_rate", "tokens_per_second",
              "last_step_timestamp_seconds")
    def train_metrics(expr: str) -> set[str]:
        return {m.removeprefix("ray_") for m, _ in promql_selectors(expr) if m.startswith("ray_mmphi_train_")}

    plotted = set().union(*(train_metrics(t["expr"]) for p in training_dashboard()["panels"] for t in p["targets"]))
    alerted = set().union(*(train_metrics(r["expr"]) for r in TRAINING))
    assert alerted and alerted <= plotted
    assert plotted == {f"mmphi_train_{g}" for g in gauges} | {"mmphi_train_steps_total", "mmphi_train_tokens_total"}
    seen = {}
    while t.is_alive() and len(seen) < len(gauges):
        for g in gauges:
            if values := scraped(f"mmphi_train_{g}", run=name):
                assert len(values) == 1, (g, values)  # rank 0's only
                seen.setdefault(g, values[0])
        time.sleep(0.5)
    t.join(timeout=600)
    assert not t.is_alive() and result["summary"]["steps"] == steps
    assert set(seen) == set(gauges), f"gauges seen while the run trained: {seen}"
    assert seen["planned_steps"] == steps and 0 <= seen["step"] <= steps, seen
    assert math.isfinite(seen["loss"]) and seen["loss"] > 0 and seen["val_loss"] > 0 and seen["learning_rate"] > 0, seen
    assert seen["tokens_per_second"] > 0, seen
    assert started - 5 <= seen["last_step_timestamp_seconds"] <= time.time(), (started, seen)
    deadline = time.monotonic() + 60
    while sum(scraped("mmphi_train_steps_total", run=name)) < steps and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(scraped("mmphi_train_steps_total", run=name)) == steps
    tokens = scraped("mmphi_train_tokens_total", run=name)
    assert len(tokens) == 2 and sum(tokens) >= steps * 8 * 2, tokens  # each worker: its own series
    series = [line for line in httpx.get(metrics_url(), timeout=30).text.splitlines()
              if line.startswith("ray_mmphi_train_tokens_total{") and f'run="{name}"' in line]
    workers = {tuple(re.search(rf'\b{k}="([^"]+)"', line).group(1) for k in ("NodeAddress", "WorkerId"))
               for line in series}
    assert len(workers) == 2, series  # the per-worker panel's lines: one per (node, worker)


def test_killed_worker_resumes_from_last_checkpoint(stages, dataset):
    name, ckpt_every, steps = "killed", 5, 30
    out = RunOutputs(str(dataset / "runs"), name)
    result = {}

    def fit():
        result["summary"] = run(settings(dataset, "qlora", name, steps=steps, ckpt_every=ckpt_every, eval_every=30,
                                         init=str(dataset / "runs" / "s1" / "final")))

    t = threading.Thread(target=fit)
    started = time.time()
    t.start()
    progress = dataset / "runs" / name / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        steps_done = len(progress.read_text().splitlines()) if progress.exists() else 0
        if steps_done >= 2 * ckpt_every + 2:
            break
        time.sleep(0.2)
    victim = next(w for w in out.workers() if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive()
    s = result["summary"]
    assert s["steps"] == steps
    rows = [json.loads(r) for r in progress.read_text().splitlines()]
    done = [r["step"] for r in rows]
    assert sorted(set(done)) == list(range(1, steps + 1))  # every planned step, none beyond
    # the failure really happened mid-run: a new worker resumed from a checkpoint taken before the kill
    restarted = next(w for w in out.workers() if w["rank"] == 1)
    resumed = restarted["start_step"]
    assert restarted["pid"] != victim["pid"] and 2 * ckpt_every <= resumed < steps and resumed % ckpt_every == 0
    # what was redone is the steps between that checkpoint and the kill (none when the kill came right
    # after a checkpoint), at most one checkpoint interval
    before_kill = max(r["step"] for r in rows if r["t"] < restarted["time"])
    assert len(done) - steps == before_kill - resumed <= ckpt_every


def _progress(runs: Path, name: str) -> list[dict]:
    return [json.loads(r) for r in (runs / name / "progress.jsonl").read_text().splitlines()]


def test_a_sequence_is_its_runs_in_one_worker_group(stages, dataset):
    """Stage 1 then stage 2 as one sequence: the same worker processes train
    both, every step's loss is the one of the two separate runs (same
    settings, stage 2 from stage 1's final/), each run has its own outputs,
    and stage 2's Ray Train checkpoints are in stage 1's folder under its own
    name. A rerun starts no worker."""
    runs = dataset / "runs"
    first, second = run_sequence([settings(dataset, "projector", "seq-s1"), settings(dataset, "qlora", "seq-s2")])
    assert (first["run"], first["stage"], second["run"], second["stage"]) == ("seq-s1", "projector", "seq-s2", "qlora")
    pids = {name: {w["rank"]: w["pid"] for w in RunOutputs(str(runs), name).workers()} for name in ("seq-s1", "seq-s2")}
    assert pids["seq-s1"] == pids["seq-s2"] and len(pids["seq-s1"]) == 2
    for name, separate in (("seq-s1", "s1"), ("seq-s2", "s2")):
        assert [r["loss"] for r in _progress(runs, name)] == pytest.approx([r["loss"] for r in _progress(runs, separate)],
                                                                          rel=1e-5)
    s1, s2 = stages
    assert second["first_loss"] == pytest.approx(s2["first_loss"], rel=1e-5)
    assert second["answer_accuracy"] == pytest.approx(s2["answer_accuracy"])
    meta = json.loads((runs / "seq-s2" / "final" / "mmphi.json").read_text())
    assert meta["extra"] == {"stage": "qlora", "step": 12, "run": "seq-s2"}
    assert not list((runs / "seq-s2").glob("checkpoint_*"))
    theirs = sorted(p.name for p in (runs / "seq-s1").glob("checkpoint_seq-s2_*"))
    assert len(theirs) == 2 and second["ray_checkpoint"] == str(runs / "seq-s1" / theirs[-1])
    assert 0 < second["seconds_last_fit"] < first["seconds_last_fit"]  # no second start-up
    progress = {name: (runs / name / "progress.jsonl").read_text() for name in ("seq-s1", "seq-s2")}
    again = run_sequence([settings(dataset, "projector", "seq-s1"), settings(dataset, "qlora", "seq-s2")])
    assert [a["steps"] for a in again] == [12, 12]
    assert {name: (runs / name / "progress.jsonl").read_text() for name in progress} == progress
    assert {w["rank"]: w["pid"] for w in RunOutputs(str(runs), "seq-s2").workers()} == pids["seq-s2"]


def test_a_sequence_resumes_the_run_a_killed_worker_was_in(stages, dataset):
    """A worker killed early in a sequence's second run, before its first
    checkpoint: the restarted workers skip the finished first run (not one of
    its steps again) and start the second over from the first run's final/,
    not from the first run's newest Ray Train checkpoint, which Ray offers."""
    runs = dataset / "runs"
    result = {}
    sequence = [settings(dataset, "projector", "kseq-1", steps=6, eval_every=6, ckpt_every=6),
                settings(dataset, "qlora", "kseq-2", steps=24, eval_every=24, ckpt_every=20)]

    def fit():
        result["summaries"] = run_sequence(sequence)

    t = threading.Thread(target=fit)
    started = time.time()
    t.start()
    progress = runs / "kseq-2" / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (progress.exists() and len(progress.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    first_run = (runs / "kseq-1" / "progress.jsonl").read_text()
    victim = next(w for w in RunOutputs(str(runs), "kseq-2").workers() if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(timeout=600)
    assert not t.is_alive()
    one, two = result["summaries"]
    assert (one["steps"], two["steps"]) == (6, 24)
    assert (runs / "kseq-1" / "progress.jsonl").read_text() == first_run  # the finished run was not trained again
    done = [r["step"] for r in _progress(runs, "kseq-2")]
    assert sorted(set(done)) == list(range(1, 25))
    assert done.count(1) == 2 and len(done) < 24 + 20  # started over once, from the start
    assert [r["step"] for r in RunOutputs(str(runs), "kseq-2").metrics()] == [0, 20, 24]  # one row each
    assert next(w for w in RunOutputs(str(runs), "kseq-2").workers() if w["rank"] == 1)["pid"] != victim["pid"]
    # started over from kseq-1's final/: its first loss is a fresh start's, the same as an unbroken run's
    rows = _progress(runs, "kseq-2")
    restart = max(i for i, r in enumerate(rows) if r["step"] == 1)
    assert rows[restart]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)


def test_eval_command_matches_the_training_evaluation(stages, dataset):
    from ray_jobs.evaluate import evaluate_checkpoint

    _, s2 = stages
    res = evaluate_checkpoint(str(dataset / "runs" / "s2" / "final"), str(dataset / "data"), str(dataset / "emb"),
                              samples=24, device="cpu")
    # the same number proves the checkpoint holds the weights every worker evaluated
    # (replicas that drifted apart would give another validation loss)
    assert res["val_loss"] == pytest.approx(s2["val_loss"], rel=1e-4)
    assert res["answer_accuracy"] == pytest.approx(s2["answer_accuracy"])
    assert res["blind_answer_accuracy"] == pytest.approx(s2["blind_answer_accuracy"])
    assert res["chance"]["position"] == pytest.approx(1 / 9)


# ---------------------------------------------------------------- DeepSpeed ZeRO-2
@pytest.fixture(scope="module")
def zero_runs(dataset):
    """Stage 2 from a fresh model on 2 workers: 4 steps under ddp and under
    DeepSpeed ZeRO-2 (the step-4 checkpoint of each kept aside), then each
    resumed to 8 steps with the same name."""
    import shutil

    from models.config import load_config
    from models.multimodal import MultimodalPhi3

    # building the cached random weights the first time draws from torch's global
    # generator, which moves the LoRA init after it: build them before both runs
    MultimodalPhi3.from_config(load_config("tiny"), device="cpu", with_vision=False)
    runs = dataset / "runs"
    kw = dict(steps=4, eval_every=4, ckpt_every=4, eval_samples=16)
    out = {}
    for strategy in ("ddp", "deepspeed"):
        name = f"zero-{strategy}"
        out[strategy] = run(settings(dataset, "qlora", name, strategy=strategy, **kw))
        kept = dataset / f"{name}-step4"
        shutil.copytree(runs / name / "final", kept)
        shutil.copy(Path(RunOutputs(str(runs), name).newest_checkpoint()[1]) / "train_state.pt", kept)
    for strategy in ("ddp", "deepspeed"):
        out[f"{strategy}-resumed"] = run(settings(dataset, "qlora", f"zero-{strategy}", strategy=strategy,
                                                  **{**kw, "steps": 8}))
    return out


def _losses(dataset, name):
    rows = (dataset / "runs" / name / "progress.jsonl").read_text().splitlines()
    return [(json.loads(r)["step"], json.loads(r)["loss"]) for r in rows]


def test_deepspeed_stage2_matches_ddp(zero_runs, dataset):
    import torch
    from safetensors.torch import load_file

    from models.multimodal import MultimodalPhi3
    from ray_jobs.evaluate import evaluate_checkpoint

    ds = zero_runs["deepspeed"]
    assert ds["steps"] == 4 and ds["workers"] == 2
    assert ds["val_loss"] < 0.8 * ds["first_loss"]  # it learns
    ddp_losses = [loss for _, loss in _losses(dataset, "zero-ddp")[:4]]
    ds_losses = [loss for _, loss in _losses(dataset, "zero-deepspeed")[:4]]
    assert ds_losses[-1] < 0.8 * ds_losses[0]
    assert ds_losses == pytest.approx(ddp_losses, abs=1e-3)  # the first loss is before any update
    # after 4 updates: the same weights and the same optimizer state, in the ddp checkpoint format
    ref, got = dataset / "zero-ddp-step4", dataset / "zero-deepspeed-step4"
    for f in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(ref / f)), load_file(str(got / f))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    sa = torch.load(ref / "train_state.pt", weights_only=False)
    sb = torch.load(got / "train_state.pt", weights_only=False)
    assert sorted(sa) == sorted(sb) and sb["step"] == 4
    assert sb["scheduler"] == sa["scheduler"]
    strip = [{k: v for k, v in g.items() if k != "params"} for g in sa["optimizer"]["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in sb["optimizer"]["param_groups"]] == strip
    assert sorted(sb["optimizer"]["state"]) == sorted(sa["optimizer"]["state"])
    for i, entry in sa["optimizer"]["state"].items():
        assert float(sb["optimizer"]["state"][i]["step"]) == 4
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["optimizer"]["state"][i][key], entry[key], rtol=1e-3, atol=1e-8)
    # the existing loaders read it, and it holds the weights the workers evaluated
    m = MultimodalPhi3.from_checkpoint(got, device="cpu", with_vision=False)
    assert m.num_image_tokens == 9
    res = evaluate_checkpoint(str(got), str(dataset / "data"), str(dataset / "emb"), samples=16, device="cpu")
    assert res["val_loss"] == pytest.approx(ds["val_loss"], rel=1e-4)


def test_deepspeed_resume_continues_at_the_saved_step(zero_runs, dataset):
    ds, ref = zero_runs["deepspeed-resumed"], zero_runs["ddp-resumed"]
    assert ds["steps"] == 8
    steps = _losses(dataset, "zero-deepspeed")
    assert [s for s, _ in steps] == list(range(1, 9))  # 4 steps, then 4 more: none redone, none skipped
    assert {w["start_step"] for w in RunOutputs(str(dataset / "runs"), "zero-deepspeed").workers()} == {4}
    rows = [json.loads(r) for r in (dataset / "runs" / "zero-deepspeed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    # the same continuation as ddp's resume (weights, AdamW moments, schedule, data position restored)
    assert [loss for _, loss in steps[4:]] == pytest.approx([loss for _, loss in _losses(dataset, "zero-ddp")[4:]],
                                                            abs=1e-3)
    assert ds["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-3)
    assert ds["val_loss"] < zero_runs["deepspeed"]["val_loss"]


def test_embeddings_of_another_encoder_are_refused_naming_both_sides(tiny_cfg):
    """The worker's check before training: the message says what the
    embeddings hold and what the model expects, each on its own side."""
    import dataclasses

    from models.checkpoint import CheckpointMismatch, identity
    from ray_jobs.train import check_embeddings

    mine = {"vision": identity(tiny_cfg)["vision"]}
    check_embeddings(tiny_cfg, mine, "emb/ok")  # the same encoder: accepted
    other = dataclasses.replace(tiny_cfg, vision=dataclasses.replace(tiny_cfg.vision, feature_layer=-2))
    with pytest.raises(CheckpointMismatch) as e:
        check_embeddings(tiny_cfg, {"vision": identity(other)["vision"]}, "emb/other")
    msg = str(e.value)
    assert "embeddings emb/other" in msg
    assert "vision.feature_layer: embeddings emb/other has -2, expected 1" in msg, msg


def test_progress_line_shows_steps_losses_speed_and_time_left():
    """At a report: the step, its figures, steps/s of this fit and the time
    left; in between, a line only once ``every_s`` has passed, with the mean
    loss since the last line; never an in-between line at the last step."""
    from ray_jobs.train import ProgressLine

    now = [100.0]
    p = ProgressLine("s2", total=400, start_step=100, every_s=30, clock=lambda: now[0])
    now[0] += 10
    assert p.step(101, 2.0) is None  # 10 s after the start: not due
    now[0] += 25
    assert p.step(102, 4.0) == "s2: step 102/400 (26 %), loss 3.0000, 0.06 steps/s, 1:26:55 left"
    now[0] += 5
    line = p.line(200, {"train_loss": 1.5, "val_loss": 1.25, "tokens_per_s": 12345.6, "lr": 2e-4,
                        "answer_accuracy": {"colour": 1.0}})
    assert line == ("s2: step 200/400 (50 %), loss 1.5000, val loss 1.2500, 12,346 tokens/s, lr 2.00e-04, "
                    "2.50 steps/s, 0:01:20 left")
    now[0] += 60
    assert p.step(400, 1.0) is None  # the last step's line is the report's
    assert p.line(400, {"train_loss": 1.0, "val_loss": None}).endswith("(100 %), loss 1.0000, 3.00 steps/s")
