"""Multi-node rehearsal on one machine (slow): embed -> train -> serve on a
simulated Ray cluster, with a node lost in training and in serving.

The cluster (``ray.cluster_utils.Cluster``) has a CPU head, which runs the
drivers, the Train controller, Serve's controller and proxy and the
CPU-only deployments (pinned there by a ``head_node`` custom resource), and
two worker nodes that each declare one ``train_gpu`` and one ``infer_gpu``,
the custom resources of ``deploy/cluster.yaml``'s GPU groups (declared only:
everything runs on the CPU). All nodes are processes on this machine, so one
temporary folder stands for the shared file system (EFS, a ReadWriteMany
claim) that the nodes of a real cluster mount: embeddings, checkpoints and
the served checkpoint are read by processes on other nodes than the writers.

What it checks:

1. **Embed**: the Ray Data job with ``--resources-per-actor infer_gpu=1`` and
   2 actors places one encoder actor on each worker node and none on the
   head, embeds every image, and (the cluster has no GPUs) encodes on CPUs.
2. **Train**: the projector stage with 2 workers and
   ``--resources-per-worker train_gpu=1`` runs one worker on each worker
   node. After a checkpoint, the node of rank 1 is removed (its raylet and
   processes are killed) and a fresh node with the same resources joins, as an
   autoscaler would replace it. The job resumes (``FailureConfig``) from a
   checkpoint at least as new as the newest on storage at the removal: it
   ends at the planned step count, every step done, at most one checkpoint
   interval redone, the new worker on the new node.
3. **Serve**: the trained checkpoint served with two LLM replicas that ask
   for ``infer_gpu: 1`` each, so one per worker node. While a client sends
   chat requests (text and image) one after another, the node of one LLM
   replica is removed: every request succeeds, including at least 8 started
   after the removal, each within 60 s, and Serve sees only the surviving
   replica running.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")

WORKER = {"num_cpus": 2, "resources": {"train_gpu": 1, "infer_gpu": 1}}
STEPS, CKPT_EVERY = 16, 4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head_node": 1},
                                                      "include_dashboard": False})
    c.add_node(**WORKER)
    c.add_node(**WORKER)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def head_id(cluster) -> str:
    return cluster.head_node.node_id


def remove(cluster, node_id: str) -> None:
    """Kill a node's raylet and processes at once (SIGKILL), as when a machine is lost."""
    (node,) = [n for n in cluster.list_all_nodes() if n.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The 'shared file system' of the simulated cluster, with a small synthetic data set."""
    from data_pipelines.synthetic import synthesize

    root = tmp_path_factory.mktemp("shared")
    synthesize(root / "data", images=64, seed=7, size=64, progress=False)
    return root


@pytest.fixture(scope="module")
def embedded(cluster, shared):
    from data_pipelines import embed

    p = argparse.ArgumentParser()
    embed.add_arguments(p)
    s = embed.settings_from_args(p.parse_args([
        "--data", str(shared / "data"), "--out", str(shared / "emb"), "--actors", "2", "--batch-size", "8",
        "--shard-size", "8", "--resources-per-actor", "infer_gpu=1"]))
    s.decode_batch, s.actor_wait_s = 8, 180
    return embed.run(s)


def test_embedding_actors_run_on_the_worker_nodes(cluster, shared, embedded):
    from ray._private import state as ray_state

    from data_pipelines.embed import referenced_images

    m = embedded
    _, paths, _ = referenced_images(data=str(shared / "data"))
    assert m["count"] == len(paths) > 0 and m["missing"] == 0
    workers = alive_nodes() - {head_id(cluster)}
    # the pool's two actors, one on each worker node (Ray's actor table; a tiny job may
    # finish on the first actor that is ready, so the shards alone need not name both)
    actors = [a for a in ray_state.actors().values() if "Embedder" in a["ActorClassName"]]
    assert len(actors) == 2 and {a["Address"]["NodeID"] for a in actors} == workers
    used = {n for nodes in m["last_run"]["shard_nodes"].values() for n in nodes}
    assert used and used <= workers
    assert m["last_run"]["resources_per_actor"] == {"infer_gpu": 1.0}
    assert m["last_run"]["gpus_per_actor"] == 0.0  # the cluster declares no GPU


@pytest.fixture(scope="module")
def trained(cluster, shared, embedded):
    """Train with one worker per node; remove rank 1's node after a checkpoint."""
    from ray_jobs import train
    from ray_jobs.outputs import RunOutputs

    p = argparse.ArgumentParser()
    train.add_arguments(p, "projector")
    s = train.settings_from_args("projector", p.parse_args([
        "--data", str(shared / "data"), "--embeddings", str(shared / "emb"), "--out", str(shared / "runs"),
        "--name", "rehearsal", "--workers", "2", "--resources-per-worker", "train_gpu=1", "--cpus-per-worker", "1",
        "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--eval-every", str(STEPS), "--eval-samples", "8",
        "--batch-size", "8", "--warmup", "2", "--threads", "1", "--max-failures", "2"]))
    out = RunOutputs(s.out, s.name)
    progress = Path(out.root) / "progress.jsonl"
    result: dict = {}

    def fit():
        try:
            result["summary"] = train.run(s)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and t.is_alive():
        done = len(progress.read_text().splitlines()) if progress.exists() else 0
        newest = out.newest_checkpoint()
        if done >= CKPT_EVERY + 2 and newest is not None and len(out.workers()) == 2:
            break
        time.sleep(0.2)
    assert t.is_alive(), f"training ended before the removal: {result}"
    before = {w["rank"]: w for w in out.workers()}
    checkpoint_at_removal = out.newest_checkpoint()[0]
    lost = before[1]["node"]
    remove(cluster, lost)
    # A killed raylet's workers notice it only after a moment and train on until
    # then, so the steps done at the loss are counted once rank 1's process is
    # gone (and a second later: rank 0 may still log the step both finished).
    assert wait_gone(before[1]["pid"], 60), "rank 1's process outlived its node by a minute"
    time.sleep(1.0)
    steps_at_loss = len(progress.read_text().splitlines())
    cluster.add_node(**WORKER)  # the replacement an autoscaler would start
    cluster.wait_for_nodes()
    t.join(timeout=420)
    assert not t.is_alive(), "training did not finish within 7 minutes of the removal"
    if "error" in result:
        raise result["error"]
    done = [json.loads(r)["step"] for r in progress.read_text().splitlines()]
    return dict(summary=result["summary"], before=before, after={w["rank"]: w for w in out.workers()}, lost=lost,
                checkpoint_at_removal=checkpoint_at_removal, steps_at_loss=steps_at_loss, done=done,
                out=out)


def test_training_places_one_worker_per_node_and_survives_losing_one(cluster, trained):
    before, after, lost = trained["before"], trained["after"], trained["lost"]
    head = head_id(cluster)
    # one worker on each worker node, none on the head, before and after the loss
    assert len({w["node"] for w in before.values()}) == 2 and head not in {w["node"] for w in before.values()}
    assert len({w["node"] for w in after.values()}) == 2 and head not in {w["node"] for w in after.values()}
    assert lost not in {w["node"] for w in after.values()}
    assert {w["node"] for w in after.values()} <= alive_nodes()
    assert len({w["node"] for w in after.values()} - {w["node"] for w in before.values()}) == 1  # the new node
    # the run ends where it was planned to, every step done once more at most
    assert trained["summary"]["steps"] == STEPS
    done = trained["done"]
    assert sorted(set(done)) == list(range(1, STEPS + 1))
    # (the restart itself is shown by the workers' nodes above; a removal right
    # after a checkpoint may redo no step at all, so the count is only bounded)
    assert len(done) - STEPS <= CKPT_EVERY  # at most one checkpoint interval redone
    # the restart began from a checkpoint no older than the newest on storage at the removal
    resumed = after[0]["start_step"]
    assert after[1]["start_step"] == resumed and resumed % CKPT_EVERY == 0
    # (and no newer than the last step both workers finished: a checkpoint
    # follows its step's progress line)
    assert trained["checkpoint_at_removal"] <= resumed <= trained["steps_at_loss"]
    assert trained["checkpoint_at_removal"] >= CKPT_EVERY
    assert trained["out"].has_final()


def llm_replicas() -> list[dict]:
    from ray import serve

    details = ray_get(serve.context._get_global_client()._controller.get_serve_instance_details.remote())
    return details["applications"]["mmphi"]["deployments"]["LLM"]["replicas"]


def ray_get(ref):
    import ray

    return ray.get(ref, timeout=30)


@pytest.fixture(scope="module")
def served(cluster, trained):
    from ray import serve

    from serve.app import APP_NAME, build_app, read_serve_config
    from test_serve import free_port

    args, opts = read_serve_config()
    args.update(checkpoint=str(Path(trained["out"].final)), torch_threads=1)
    for name, o in opts.items():
        o.pop("autoscaling_config", None)
        if name == "LLM":  # one replica per node that has an inference slot
            o.update(num_replicas=2, ray_actor_options={"num_cpus": 0.25, "resources": {"infer_gpu": 1}})
        else:  # CPU-only parts stay on the head, which is never removed
            o.update(num_replicas=1, ray_actor_options={"num_cpus": 0.25, "resources": {"head_node": 0.01}})
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args, opts), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(url + "healthz", timeout=15).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the application did not become healthy within 240 s"
        time.sleep(2)
    return url


def test_service_keeps_answering_when_an_llm_replicas_node_is_removed(cluster, served):
    from test_serve import image_part, png

    url = served
    running = [r for r in llm_replicas() if r["state"] == "RUNNING"]
    nodes = {r["node_id"] for r in running}
    assert len(running) == 2 and len(nodes) == 2 and head_id(cluster) not in nodes
    lost = running[0]["node_id"]

    records: list[dict] = []
    stop = threading.Event()

    def client():
        i = 0
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                content = [{"type": "text", "text": f"What colour is the shape? ({i})"}]
                if i % 2:
                    content.insert(0, image_part(png(64, 64, ("red", "blue")[i % 4 // 2])))
                t0 = time.monotonic()
                try:
                    r = c.post(url + "v1/chat/completions", json={
                        "model": "mmphi", "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": content}]})
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                    why = "" if ok else f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                records.append({"t0": t0, "t1": time.monotonic(), "ok": ok, "why": why})
                i += 1

    t = threading.Thread(target=client, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while sum(r["ok"] for r in records) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    removed_at = time.monotonic()
    remove(cluster, lost)
    deadline = removed_at + 180
    while sum(r["t0"] > removed_at for r in records) < 8 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.2)
    stop.set()
    t.join(timeout=150)

    after = [r for r in records if r["t0"] > removed_at]
    failed = [r["why"] for r in records if not r["ok"]]
    assert not failed, failed[:3]
    assert len(after) >= 8, f"only {len(after)} requests after the removal within 180 s"
    assert max(r["t1"] - r["t0"] for r in after) < 60
    # Serve saw the loss: the only running replica is the survivor (the lost one cannot be
    # replaced, no other node has an inference slot)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [r for r in llm_replicas() if r["state"] == "RUNNING"]
        if {r["node_id"] for r in running} == nodes - {lost}:
            break
        time.sleep(1)
    assert {r["node_id"] for r in running} == nodes - {lost}
