"""ray_jobs.metrics without Ray: what each rank records, and rank 0's gauges kept alive."""
from __future__ import annotations

import time

import pytest

from ray_jobs import metrics as M


class Recorder:
    def __init__(self, name):
        self.name, self.calls = name, []

    def inc(self, value=1, tags=None):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


@pytest.fixture
def made(monkeypatch):
    made = {}
    monkeypatch.setattr(M, "_metric", lambda kind, name, d: made.setdefault(name, Recorder(name)))
    return made


def last_set(made, name):
    sets = [c for c in made[name].calls if c[0] == "set"]
    return sets[-1][1] if sets else None


def test_rank0_sets_gauges_and_counts_steps_every_rank_counts_its_tokens(made):
    t0 = time.time()
    m0 = M.TrainMetrics("r", 0, planned_steps=10, start_step=4, every_s=60)
    m1 = M.TrainMetrics("r", 1, planned_steps=10, start_step=4, every_s=60)
    try:
        assert last_set(made, "mmphi_train_step") == 4 and last_set(made, "mmphi_train_planned_steps") == 10
        started = last_set(made, "mmphi_train_last_step_timestamp_seconds")
        assert t0 <= started <= time.time()  # no step yet: the run's start
        time.sleep(0.01)
        m0.step(5, 2.5, tokens=300, learning_rate=1e-4)
        stepped = last_set(made, "mmphi_train_last_step_timestamp_seconds")
        assert started < stepped <= time.time()
        m1.step(5, 2.7, tokens=280, learning_rate=1e-4)
        assert made["mmphi_train_tokens_total"].calls == [("inc", 300, {"run": "r"}), ("inc", 280, {"run": "r"})]
        assert made["mmphi_train_steps_total"].calls == [("inc", 1, {"run": "r"})]  # rank 0's step only
        assert last_set(made, "mmphi_train_loss") == 2.5 and last_set(made, "mmphi_train_learning_rate") == 1e-4
        assert last_set(made, "mmphi_train_val_loss") is None  # not evaluated yet
        m0.evaluated({"val_loss": 2.1, "tokens_per_s": 1234.0, "answer_accuracy": {"colour": 0.5}})
        m1.evaluated({"val_loss": 9.9})
        assert last_set(made, "mmphi_train_val_loss") == 2.1 and last_set(made, "mmphi_train_tokens_per_second") == 1234.0
        time.sleep(0.01)
        m0.step(6, float("nan"), tokens=0, learning_rate=1e-4)  # a diverged step: the gauge keeps its last number
        assert last_set(made, "mmphi_train_loss") == 2.5 and last_set(made, "mmphi_train_step") == 6
        assert last_set(made, "mmphi_train_last_step_timestamp_seconds") > stepped  # a diverged step is a step
        assert len(made["mmphi_train_tokens_total"].calls) == 2  # nothing counted for no tokens
    finally:
        m0.close()
        m1.close()


def test_rank0_sets_its_gauges_again_until_closed(made):
    """Ray drops a gauge no one sets for a few seconds: a step may take longer."""
    m = M.TrainMetrics("r", 0, planned_steps=10, start_step=0, every_s=0.05)
    m.step(1, 3.0, tokens=10, learning_rate=1e-3)
    time.sleep(0.5)
    m.close()
    n = len(made["mmphi_train_loss"].calls)
    assert n >= 4 and {c[1] for c in made["mmphi_train_loss"].calls} == {3.0}
    time.sleep(0.3)
    assert len(made["mmphi_train_loss"].calls) == n  # stopped


def test_a_metric_ray_cannot_make_is_off_and_training_goes_on(monkeypatch):
    import ray.util.metrics

    def refuse(*a, **kw):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(M, "_made", {})
    monkeypatch.setattr(ray.util.metrics, "Gauge", refuse)
    m = M.TrainMetrics("r", 0, planned_steps=3, start_step=0, every_s=60)
    try:
        m.step(1, 1.0, tokens=5, learning_rate=1e-3)
        assert isinstance(M._made["mmphi_train_loss"], M._Off)
    finally:
        m.close()
