"""The embedding job on a simulated two-node Ray cluster, fed by a LLaVA-format data set."""
from __future__ import annotations

import json

import pytest

from data_pipelines.embed import EmbeddingStore, EmbedSettings, referenced_images, run


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data_pipelines.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, images=96, seed=3, size=96, progress=False)
    return out


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_data_set_references_are_deduplicated(synth, tmp_path):
    root, paths, info = referenced_images(data=str(synth))
    train = json.loads((synth / "train.json").read_text())
    val = json.loads((synth / "val.json").read_text())
    expected = {r["image"] for r in train + val if r.get("image")}
    assert paths == sorted(expected) and info["unique"] == len(expected)
    # a json that names every image twice still yields each once
    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(train + train))
    _, paths2, info2 = referenced_images(json_files=[str(doubled)], images=root)
    assert info2["references"] == 2 * sum(1 for r in train if r.get("image"))
    assert len(paths2) == info2["unique"] == len({r["image"] for r in train if r.get("image")})


@pytest.mark.slow
def test_actors_on_both_nodes_and_output_complete(two_nodes, synth, tmp_path):
    import ray
    from ray._private import state as ray_state

    out = "file://" + str(tmp_path / "emb")  # an object-store style URI, through pyarrow's filesystem layer
    # 1.5 CPUs per actor on 2-CPU nodes: one actor per node, room left for decode/write tasks
    m = run(EmbedSettings(out=out, data=str(synth), actors=2, cpus_per_actor=1.5, batch_size=8, decode_batch=8,
                          shard_size=8))
    _, paths, _ = referenced_images(data=str(synth))
    assert m["count"] == len(paths) and m["missing"] == 0
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # one encoder actor on each node (Ray's actor table): on a busy machine the first actor
    # that is ready can embed all 96 images before the other loads, so the shards need not name both
    actors = [a for a in ray_state.actors().values() if "Embedder" in a["ActorClassName"]]
    assert len(alive) == 2 and len(actors) == 2 and {a["Address"]["NodeID"] for a in actors} == alive
    nodes_used = {n for nodes in m["last_run"]["shard_nodes"].values() for n in nodes}
    assert nodes_used and nodes_used <= alive
    store = EmbeddingStore(out)
    assert store.paths() == paths
