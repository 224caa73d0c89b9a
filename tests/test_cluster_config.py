"""deploy/cluster.yaml: valid for Ray's cluster launcher, and what the operator's guide promises.

No cloud is contacted: the file is checked against Ray's own schema
(``ray/autoscaler/ray-schema.json``) and through the same
``prepare_config`` + ``validate_config`` that ``ray up`` runs before it
talks to AWS. Each promise is a function that returns the problems it finds,
so the mutation tests below can show that a broken edit is caught.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "deploy" / "cluster.yaml"
SHARED = "/mnt/shared"  # where every node sees the shared file system (the KubeRay manifests use it too)

# Published shapes of the instance types the file may use: vCPUs, memory
# (GiB), GPUs and memory per GPU (GB). A new instance type needs a row here.
INSTANCES = {
    "m6i.2xlarge": (8, 32, 0, 0),
    "m6i.4xlarge": (16, 64, 0, 0),
    "g5.4xlarge": (16, 64, 1, 24),
    "g6.4xlarge": (16, 64, 1, 24),
    "g6.8xlarge": (32, 128, 1, 24),
    "p4d.24xlarge": (96, 1152, 8, 40),
    "p5.48xlarge": (192, 2048, 8, 80),
}
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def pyproject_pins() -> dict[str, str]:
    deps = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    pins = {}
    for spec in re.findall(r'"([^"]+)"', deps):
        name, _, version = spec.partition("==")
        pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def gpu_groups(cfg: dict) -> dict[str, dict]:
    return {n: t for n, t in cfg["available_node_types"].items()
            if n != cfg["head_node_type"] and t.get("resources", {}).get("GPU", 0) > 0}


def run_options(cfg: dict, node_type: str) -> list[str]:
    """The docker run options a node of this type starts with (as Ray's
    updater merges them: global run_options + head/worker options, the node
    type's own docker section replacing the global worker ones)."""
    docker = dict(cfg.get("docker") or {})
    if node_type == cfg["head_node_type"]:
        return docker.get("run_options", []) + docker.get("head_run_options", [])
    docker.update(cfg["available_node_types"][node_type].get("docker") or {})
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def shm_bytes(options: list[str]) -> list[int]:
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
    sizes = []
    for opt in options:
        m = re.search(r"--shm-size[= ]'?(\d+(?:\.\d+)?)([bkmg]?)'?", opt, re.I)
        if m:
            sizes.append(int(float(m.group(1)) * units[m.group(2).lower()]))
    return sizes


# ----------------------------------------------------------------- checks
def schema_problems(cfg: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)  # the file as written: no unknown keys, right types
        validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks before AWS
    except (jsonschema.ValidationError, ValueError, AssertionError, RuntimeError) as e:
        return [f"schema: {str(e).splitlines()[0]}"]
    return []


def group_problems(cfg: dict) -> list[str]:
    problems = []
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head["resources"].get("GPU", 0) or INSTANCES[head["node_config"]["InstanceType"]][2]:
        problems.append("head node has GPUs")
    groups = gpu_groups(cfg)
    if len(groups) < 2:
        problems.append(f"expected an embedding/serving and a training GPU group, found {sorted(groups)}")
    customs = {}
    for name, t in groups.items():
        vcpus, _, gpus, _ = INSTANCES[t["node_config"]["InstanceType"]]
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers {t.get('min_workers')} (GPU groups must scale from 0)")
        if t.get("max_workers", cfg["max_workers"]) < 1:
            problems.append(f"{name}: max_workers < 1")
        if t["resources"]["GPU"] != gpus or t["resources"].get("CPU", vcpus) > vcpus:
            problems.append(f"{name}: resources {t['resources']} do not match {t['node_config']['InstanceType']}")
        custom = {k: v for k, v in t["resources"].items() if k not in STANDARD}
        if not custom or any(v != gpus for v in custom.values()):
            problems.append(f"{name}: needs a custom resource counting its GPUs, has {custom}")
        customs[name] = set(custom)
    names = [r for rs in customs.values() for r in rs]
    if len(names) != len(set(names)):
        problems.append(f"GPU groups share custom resources: {customs}")
    if "train_gpu" not in names or "infer_gpu" not in names:
        problems.append(f"custom resources infer_gpu and train_gpu expected, found {sorted(names)}")
    else:
        by_res = {r: INSTANCES[groups[n]["node_config"]["InstanceType"]][3] for n, rs in customs.items() for r in rs}
        if by_res["train_gpu"] <= by_res["infer_gpu"]:
            problems.append("the training group's GPUs are not larger than the embedding/serving group's")
    if cfg.get("max_workers", 0) < sum(t.get("min_workers", 0) for t in types.values()):
        problems.append("max_workers below the sum of min_workers")
    return problems


def shm_problems(cfg: dict) -> list[str]:
    from ray._private.ray_constants import (DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES,
                                            DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)

    problems = []
    for name, t in cfg["available_node_types"].items():
        sizes = shm_bytes(run_options(cfg, name))
        mem = INSTANCES[t["node_config"]["InstanceType"]][1] * 2**30
        store = min(mem * DEFAULT_OBJECT_STORE_MEMORY_PROPORTION, DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)
        if len(sizes) != 1:
            problems.append(f"{name}: {len(sizes)} --shm-size options (want exactly 1)")
        elif not store <= sizes[0] < mem:
            problems.append(f"{name}: /dev/shm {sizes[0] / 2**30:.0f} GiB, object store needs "
                            f"{store / 2**30:.0f} GiB of {mem / 2**30:.0f} GiB")
    return problems


def install_problems(cfg: dict) -> list[str]:
    problems = []
    ray_pin = pyproject_pins()["ray"]
    image = cfg["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>3\d+)-(?:gpu|cu\d+)", image)
    if not m:
        problems.append(f"docker image {image!r} is not a rayproject/ray GPU image")
    elif m["ray"] != ray_pin:
        problems.append(f"docker image has Ray {m['ray']}, pyproject.toml pins {ray_pin}")
    unpinned = [n for n, v in pyproject_pins().items() if not v]
    if unpinned:
        problems.append(f"pyproject.toml dependencies without an exact pin: {unpinned}")
    # the project's source is the repository root (file_mounts from "."), installed by path
    mounts = {dst: src for dst, src in (cfg.get("file_mounts") or {}).items()}
    project = [dst for dst, src in mounts.items() if Path(src) == Path(".")]
    installs = [shlex.split(c) for c in cfg.get("setup_commands", []) if "pip install" in c]
    targets = [a for cmd in installs for a in cmd[cmd.index("install") + 1:] if not a.startswith("-")]
    if not project or not installs or targets != project:
        problems.append(f"setup_commands must pip install exactly the project mount {project}, installs {targets}")
    if ".gitignore" not in (cfg.get("rsync_filter") or []):
        problems.append("rsync_filter must skip what .gitignore lists (.venv, runs ...)")
    if not any("ffmpeg" in c for c in cfg.get("setup_commands", [])):
        problems.append("setup_commands do not install ffmpeg (audio decoding)")
    return problems


def storage_problems(cfg: dict, shared: str) -> list[str]:
    problems = []
    if f"-v {shared}:{shared}" not in cfg["docker"].get("run_options", []):
        problems.append(f"containers do not bind-mount the shared file system at {shared}")
    if not any(re.search(rf"mount .* {re.escape(shared)}\b", c) for c in cfg.get("initialization_commands", [])):
        problems.append(f"no initialization command mounts the shared file system at {shared}")
    return problems


def timeout_problems(cfg: dict) -> list[str]:
    t = cfg.get("idle_timeout_minutes")
    return [] if isinstance(t, (int, float)) and 0 < t <= 60 else [f"idle_timeout_minutes is {t!r}"]


def all_problems(cfg: dict) -> list[str]:
    return (schema_problems(cfg) + group_problems(cfg) + shm_problems(cfg) + install_problems(cfg)
            + storage_problems(cfg, SHARED) + timeout_problems(cfg))


# ----------------------------------------------------------------- tests
def test_cluster_yaml_passes_ray_schema_and_launcher_checks():
    assert schema_problems(load()) == []


def test_cluster_yaml_keeps_its_promises():
    assert all_problems(load()) == []


def test_gpu_groups_scale_from_zero_with_their_own_resources():
    cfg = load()
    groups = gpu_groups(cfg)
    assert len(groups) >= 2 and all(t["min_workers"] == 0 for t in groups.values())
    customs = {r for t in groups.values() for r in t["resources"] if r not in STANDARD}
    assert {"infer_gpu", "train_gpu"} <= customs


def _set(path: tuple, value):
    def edit(cfg):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


DELETE = object()
T = "available_node_types"
MUTATIONS = {
    "unknown top-level key": _set(("idle_timeout",), 5),
    "GPU group min_workers 1": _set((T, "gpu_h100", "min_workers"), 1),
    "no custom resource": _set((T, "gpu_l4", "resources"), {"CPU": 16, "GPU": 1}),
    "GPU count wrong": _set((T, "gpu_h100", "resources", "GPU"), 4),
    "no shm on a worker group": _set((T, "gpu_l4", "docker"), DELETE),
    "shm too small on the head": _set(("docker", "head_run_options"), ["--shm-size=2g"]),
    "no idle timeout": _set(("idle_timeout_minutes",), DELETE),
    "image of another Ray": _set(("docker", "image"), "rayproject/ray:2.9.0-py311-gpu"),
    "CPU image": _set(("docker", "image"), "rayproject/ray:2.60.0-py311-cpu"),
    "unpinned install": _set(("setup_commands",), ["pip install mmphi"]),
    "no shared mount": _set(("docker", "run_options"), ["--ulimit nofile=65536:65536"]),
    "GPU head": _set((T, "head", "node_config", "InstanceType"), "g6.4xlarge"),
    "one GPU group": _set((T, "gpu_l4"), DELETE),
    "node type with a typo": _set((T, "gpu_l4", "min_worker"), 0),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_broken_edit_is_caught(name):
    cfg = load()
    MUTATIONS[name](cfg)
    assert all_problems(cfg), f"{name}: not detected"
