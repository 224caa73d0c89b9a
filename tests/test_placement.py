"""Job placement: custom resources per Train worker / encoder actor from the
command line, and the embedding job's GPU default taken from the cluster."""
from __future__ import annotations

import argparse

import pytest

from data_pipelines import embed
from data_pipelines.resources import check_resources, parse_resource
from ray_jobs import train

from conftest import write_train_inputs


def train_args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    train.add_arguments(p, "projector")
    return p.parse_args(["--data", "d", "--embeddings", "e", "--out", "o", *extra])


def embed_args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    embed.add_arguments(p)
    return p.parse_args(["--data", "d", "--out", "o", *extra])


@pytest.mark.parametrize("text, expected", [("train_gpu=1", ("train_gpu", 1.0)), (" spot = 0.25", ("spot", 0.25)),
                                            ("node:10.0.0.5=0.01", ("node:10.0.0.5", 0.01))])
def test_resource_values_parse(text, expected):
    assert parse_resource(text) == expected


@pytest.mark.parametrize("text, says", [("train_gpu", "KEY=N"), ("=1", "empty"), ("a b=1", "spaces"),
                                        ("train_gpu=x", "number"), ("train_gpu=0", "positive"),
                                        ("train_gpu=-1", "positive"), ("train_gpu=nan", "positive"),
                                        ("train_gpu=0.00001", "0.0001"), ("memory=1000", "not a custom")])
def test_bad_resource_values_say_why(text, says):
    with pytest.raises(ValueError, match=says):
        parse_resource(text)


def test_train_flag_collects_repeated_resources():
    s = train.settings_from_args("projector", train_args("--resources-per-worker", "train_gpu=1",
                                                         "--resources-per-worker", "spot=0.5"))
    assert s.resources_per_worker == {"train_gpu": 1.0, "spot": 0.5}
    assert train.settings_from_args("projector", train_args()).resources_per_worker == {}


@pytest.mark.parametrize("argv, says", [
    (["--resources-per-worker", "CPU=2"], "--cpus-per-worker"),
    (["--resources-per-worker", "GPU=1"], "--gpu"),
    (["--resources-per-worker", "a=1", "--resources-per-worker", "a=2"], "a given twice"),
    (["--resources-per-worker", "train_gpu"], "KEY=N"),
])
def test_train_flag_errors_name_the_flag_and_the_fix(argv, says):
    with pytest.raises(argparse.ArgumentError, match=says) as e:
        train_args(*argv)
    assert "--resources-per-worker" in str(e.value)


def test_embed_flag_and_its_errors():
    s = embed.settings_from_args(embed_args("--resources-per-actor", "infer_gpu=1"))
    assert s.resources_per_actor == {"infer_gpu": 1.0}
    with pytest.raises(argparse.ArgumentError, match="--gpus-per-actor"):
        embed_args("--resources-per-actor", "GPU=1")


def test_resources_reach_the_scaling_config(handed, tmp_path):
    """What run() hands Ray Train, without starting Ray."""
    write_train_inputs(tmp_path)
    s = train.TrainSettings(stage="projector", data=str(tmp_path / "d"), embeddings=str(tmp_path / "e"),
                            out=str(tmp_path), workers=2, cpus_per_worker=1.5, resources_per_worker={"train_gpu": 1})
    with pytest.raises(handed.Stop):
        train.run(s)
    assert handed["scaling_config"].num_workers == 2
    assert handed["scaling_config"].resources_per_worker == {"CPU": 1.5, "train_gpu": 1.0}
    with pytest.raises(ValueError, match="--resources-per-worker: GPU .*--gpu"):
        train.run(train.TrainSettings(stage="projector", data="d", embeddings="e", out=str(tmp_path),
                                      resources_per_worker={"GPU": 1}))
    with pytest.raises(embed.EmbedError, match="--resources-per-actor: .*positive"):
        embed.run(embed.EmbedSettings(out=str(tmp_path / "emb"), data="d", resources_per_actor={"infer_gpu": 0}))


def test_programmatic_resources_are_checked_too():
    assert check_resources({"a": 2}) == {"a": 2.0}
    with pytest.raises(ValueError, match="number"):
        check_resources({"a": "1"})


def test_gpu_default_reads_the_cluster_resources(monkeypatch):
    import ray
    import torch

    assert embed.settings_from_args(embed_args()).gpus_per_actor is None  # left to the cluster
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver with CUDA does not count
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "infer_gpu": 1.0})
    assert embed.default_gpus_per_actor() == 0.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 0.5})
    assert embed.default_gpus_per_actor() == 1.0


@pytest.mark.slow
def test_gpu_default_follows_the_cluster_not_the_driver(monkeypatch, tmp_path):
    """On a simulated cluster: the driver (this process, on a CPU head; then
    pretending to have CUDA) decides nothing: a CPU-only cluster gets 0 GPUs
    per actor, and 1 once a node with a GPU joins. The GPU is declared, not
    real: the job's actors land on that node and, finding no CUDA, encode on
    its CPU."""
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from data_pipelines.synthetic import synthesize

    synthesize(tmp_path / "data", images=8, seed=1, size=64, progress=False)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert embed.default_gpus_per_actor() == 0.0
        monkeypatch.undo()
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        assert embed.default_gpus_per_actor() == 1.0
        s = embed.settings_from_args(embed_args("--data", str(tmp_path / "data"), "--out", str(tmp_path / "emb")))
        s.actor_wait_s = 180
        m = embed.run(s)
        assert m["last_run"]["gpus_per_actor"] == 1.0 and m["missing"] == 0
        assert {n for ns in m["last_run"]["shard_nodes"].values() for n in ns} == {gpu_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_decode_tasks_follow_the_cpus_the_encoders_leave(tmp_path):
    s = embed.settings_from_args(embed_args())
    assert s.decode_tasks is None
    # a 2-core machine's local cluster (4 logical CPUs), one CPU encoder actor of 0.5 CPU: 3 decode tasks
    assert embed.decode_concurrency(s, 4.0, blocks=188) == 3
    # a 16-core GPU node with two encoder actors of 1 CPU each: 14
    two = embed.EmbedSettings(out="o", actors=2, cpus_per_actor=1.0)
    assert embed.decode_concurrency(two, 16.0, blocks=188) == 14
    # never more than there are blocks, never fewer than one (actors holding every CPU)
    assert embed.decode_concurrency(two, 16.0, blocks=5) == 5
    assert embed.decode_concurrency(embed.EmbedSettings(out="o", actors=2, cpus_per_actor=1.5), 2.0, blocks=9) == 1
    # --decode-tasks wins over the cluster's size
    given = embed.settings_from_args(embed_args("--decode-tasks", "32"))
    assert given.decode_tasks == 32 and embed.decode_concurrency(given, 4.0, blocks=188) == 32
    for bad in (0, -1, 2.5, True):
        with pytest.raises(embed.EmbedError, match="--decode-tasks must be a positive integer"):
            embed.run(embed.EmbedSettings(out=str(tmp_path / "emb"), data="d", decode_tasks=bad))


@pytest.mark.parametrize("local", [True, False])
def test_local_clusters_skip_the_preemption_watcher(monkeypatch, tmp_path, local):
    """On the one-machine cluster the job started itself, Ray Train runs no
    preemption watcher and polls its workers every 0.5 s; a cluster it joined
    keeps Ray Train's defaults (as does anything the user set)."""
    import os

    import ray.train.torch

    import data_pipelines.resources

    seen = {}

    class Stop(Exception):
        pass

    def trainer(*a, **kw):
        seen.update({k: os.environ.get(k) for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                                     "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")})
        raise Stop

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own setting stays
    monkeypatch.setattr(embed, "init_ray", lambda address: None)
    monkeypatch.setattr(embed, "started_local_cluster", lambda: local)
    monkeypatch.setattr(data_pipelines.resources, "warn_if_absent", lambda *a: [])
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    with pytest.raises(Stop):
        train.run(train.TrainSettings(stage="projector", data=str(write_train_inputs(tmp_path) / "d"),
                                      embeddings=str(tmp_path / "e"), out=str(tmp_path)))
    assert seen == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0" if local else None,
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
    # for that run only: a later run in this process may join another cluster
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_started_local_cluster_is_the_one_init_ray_started(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.shutdown()
    try:
        assert not embed.started_local_cluster()
        embed.init_ray(None)
        assert embed.started_local_cluster()
        ray.shutdown()
        assert not embed.started_local_cluster()
    finally:
        ray.shutdown()
