"""The Ray Train jobs on the tiny preset: stages, outputs, resume, worker failure, two nodes."""
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
from ray_jobs.train import TrainSettings, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import ray

    from data_pipelines.embed import EmbedSettings
    from data_pipelines.embed import run as embed
    from data_pipelines.synthetic import synthesize

    root = tmp_path_factory.mktemp("train")
    synthesize(root / "data", images=160, seed=5, progress=False)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
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
    assert m.num_image_tokens == 64


def test_rerun_with_same_name_does_no_more_steps(stages, dataset):
    runs = dataset / "runs" / "s2"
    before_ckpts = sorted(p.name for p in runs.glob("checkpoint_*"))
    before_rows = (runs / "metrics.jsonl").read_text()
    before_progress = (runs / "progress.jsonl").read_text()
    s1 = json.loads((dataset / "runs" / "s1" / "summary.json").read_text())
    again = run(settings(dataset, "qlora", "s2", init=s1["final"]))
    assert again["steps"] == 12
    assert (runs / "progress.jsonl").read_text() == before_progress  # not one step more
    assert (runs / "metrics.jsonl").read_text() == before_rows
    assert sorted(p.name for p in runs.glob("checkpoint_*")) == before_ckpts


def test_other_name_starts_fresh(stages, dataset):
    s = run(settings(dataset, "projector", "s1-other", steps=6, eval_every=6))
    rows = (dataset / "runs" / "s1-other" / "progress.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 7))
    assert s["first_loss"] == pytest.approx(json.loads((dataset / "runs" / "s1" / "summary.json").read_text())["first_loss"])


def test_killed_worker_resumes_from_last_checkpoint(stages, dataset):
    name, ckpt_every, steps = "killed", 5, 30
    out = RunOutputs(str(dataset / "runs"), name)
    result = {}

    def fit():
        result["summary"] = run(settings(dataset, "qlora", name, steps=steps, ckpt_every=ckpt_every, eval_every=30,
                                         init=str(dataset / "runs" / "s1" / "final")))

    t = threading.Thread(target=fit)
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
    done = [json.loads(r)["step"] for r in progress.read_text().splitlines()]
    assert sorted(set(done)) == list(range(1, steps + 1))  # every planned step, none beyond
    assert len(done) - steps <= ckpt_every  # redone at most one checkpoint interval
    assert len(done) > steps  # and the failure really happened mid-run
    assert next(w for w in out.workers() if w["rank"] == 1)["pid"] != victim["pid"]


def test_two_nodes_one_worker_each(tmp_path, dataset):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        s = run(settings(dataset, "projector", "two-nodes", steps=4, eval_every=4, ckpt_every=4,
                         out=str(tmp_path / "runs"), cpus_per_worker=1.5))
        workers = RunOutputs(str(tmp_path / "runs"), "two-nodes").workers()
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert s["steps"] == 4
        assert {w["node"] for w in workers} == alive and len(alive) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # for later tests in this module


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
