"""KubeRay manifests for mmphi, generated so that they cannot drift from the code.

    python -m deploy.generate                 # (re)write deploy/k8s/*.yaml  (make manifests)
    python -m deploy.generate --check         # exit 1 when deploy/k8s/ is not what this writes
    python -m deploy.generate --image REGISTRY/mmphi:0.1.0 --out my-manifests/

Where each part comes from:

- the RayService's ``serveConfigV2`` is ``serve/config.yaml`` (the file
  ``serve deploy`` and ``mmphi serve`` read) with only the changes in
  :data:`CLUSTER_SERVE_CHANGES`;
- the RayJobs run the job modules' own command lines (``python -m
  data_pipelines.embed``, ``ray_jobs.train``, ``ray_jobs.evaluate``), with the
  flags in :data:`JOBS`; tests parse them with the modules' parsers;
- ``rayVersion`` is the ``ray`` pin of ``pyproject.toml``, the default image
  tag its version (build it with ``deploy/Dockerfile``).

Every pod mounts the ReadWriteMany claim ``mmphi-shared`` at ``/mnt/shared``
(data, embeddings, training runs, the Hugging Face cache) and a memory-backed
``/dev/shm`` for Ray's object store. GPU worker groups start at zero pods and
advertise the same custom resources as ``deploy/cluster.yaml``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
OUT = ROOT / "deploy" / "k8s"

SHARED = "/mnt/shared"
SHARED_CLAIM = "mmphi-shared"
DATA = f"{SHARED}/data/llava"          # train.json, val.json, images/ (see docs/operations.md)
EMBEDDINGS = f"{SHARED}/emb/llava"
RUNS = f"{SHARED}/runs"

# The only differences between serve/config.yaml and the RayService's Serve
# config, each with its reason. (key path) -> value.
CLUSTER_SERVE_CHANGES: dict[tuple[str, ...], object] = {
    # KubeRay's serve Service sends traffic to the pod's address; a proxy bound
    # to 127.0.0.1 is reachable only from inside the pod.
    ("http_options", "host"): "0.0.0.0",
}


def _pins() -> tuple[str, str]:
    """(ray version, project version) from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    ray = re.search(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', text)
    version = re.search(r'^version = "([^"]+)"', text, re.M)
    if not (ray and version):
        raise SystemExit("pyproject.toml: cannot find the ray pin or the project version")
    return ray.group(1), version.group(1)


RAY_VERSION, PROJECT_VERSION = _pins()
DEFAULT_IMAGE = f"mmphi:{PROJECT_VERSION}"


@dataclass
class Group:
    """A worker group: one pod per node of this shape."""

    gpus: int
    cpus: int
    memory: str
    shm: str
    max_pods: int
    custom: dict[str, int]


HEAD = {"cpus": 4, "memory": "16Gi", "shm": "8Gi"}
GROUPS = {
    # embedding job and Serve replicas: an L4-class GPU, many CPUs for JPEG decoding
    "gpu-l4": Group(gpus=1, cpus=14, memory="56Gi", shm="24Gi", max_pods=4, custom={"infer_gpu": 1}),
    # Ray Train jobs: 8 H100-class GPUs per pod, one Train worker per GPU
    "gpu-h100": Group(gpus=8, cpus=180, memory="1800Gi", shm="200Gi", max_pods=2, custom={"train_gpu": 8}),
}


@dataclass
class Job:
    argv: list[str]
    groups: list[str]
    cpus: float = 1
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


# LLaVA-format data on the shared file system, phi3-mini preset. Learning
# rates and batch sizes follow LLaVA-1.5 (projector 1e-3; LoRA 2e-4 with the
# projector at a tenth); they are starting points, not tuned for this code.
# The jobs name their group's custom resource (--resources-per-actor,
# --resources-per-worker), so the same command lines also run on the
# launcher cluster, whose groups share one Ray cluster (docs/operations.md).
JOBS: dict[str, Job] = {
    "embed": Job(
        ["python", "-m", "data_pipelines.embed", "--data", DATA, "--out", EMBEDDINGS, "--preset", "phi3-mini",
         "--actors", "1", "--max-actors", "4", "--gpus-per-actor", "1", "--resources-per-actor", "infer_gpu=1",
         "--batch-size", "128"],
        groups=["gpu-l4"]),
    "train-projector": Job(
        ["python", "-m", "ray_jobs.train", "projector", "--data", DATA, "--embeddings", EMBEDDINGS, "--out", RUNS,
         "--name", "llava-s1", "--preset", "phi3-mini", "--workers", "8", "--gpu", "--resources-per-worker",
         "train_gpu=1", "--cpus-per-worker", "8",
         "--threads", "8", "--batch-size", "32", "--lr", "1e-3", "--projector-lr-scale", "1", "--steps", "600",
         "--ckpt-every", "100", "--eval-every", "200"],
        groups=["gpu-h100"]),
    "train-qlora": Job(
        ["python", "-m", "ray_jobs.train", "qlora", "--data", DATA, "--embeddings", EMBEDDINGS, "--out", RUNS,
         "--name", "llava-s2", "--init", f"{RUNS}/llava-s1/final", "--workers", "8", "--gpu",
         "--resources-per-worker", "train_gpu=1",
         "--cpus-per-worker", "8", "--threads", "8", "--batch-size", "16", "--lr", "2e-4",
         "--projector-lr-scale", "0.1", "--steps", "1200", "--ckpt-every", "100", "--eval-every", "200"],
        groups=["gpu-h100"]),
    "evaluate": Job(
        ["python", "-m", "ray_jobs.evaluate", "--checkpoint", f"{RUNS}/llava-s2/final", "--data", DATA,
         "--embeddings", EMBEDDINGS, "--out", f"{RUNS}/llava-s2/eval.json"],
        groups=["gpu-l4"], gpus=1, resources={"infer_gpu": 1}),
}

# the Serve application runs on the head (CPU) and the L4 group
SERVICE_GROUPS = ["gpu-l4"]


# ----------------------------------------------------------------- pieces
def cluster_serve_config(local: dict) -> dict:
    """serve/config.yaml's content with :data:`CLUSTER_SERVE_CHANGES` applied."""
    cfg = copy.deepcopy(local)
    for path, value in CLUSTER_SERVE_CHANGES.items():
        node = cfg
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return cfg


def _pod(container: str, image: str, cpus: int, memory: str, shm: str, gpus: int = 0,
         ports: list[dict] | None = None, env: list[dict] | None = None) -> dict:
    res: dict = {"cpu": str(cpus), "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = gpus
    c: dict = {
        "name": container,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "HF_HOME", "value": f"{SHARED}/cache/huggingface"}] + list(env or []),
        "resources": {"requests": dict(res), "limits": dict(res)},
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        c["ports"] = ports
    spec: dict = {
        "containers": [c],
        "volumes": [
            {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        ],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


# Ray's metrics agent on every pod (Prometheus text: Ray's, Ray Serve's and mmphi's), scraped by podmonitor.yaml
METRICS_PORT = 8080
METRICS = {"name": "metrics", "containerPort": METRICS_PORT}


def ray_cluster(image: str, groups: list[str], *, serve: bool = False) -> dict:
    """A RayCluster spec: CPU head, the named GPU groups at 0..max pods, autoscaling on."""
    ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
             {"name": "client", "containerPort": 10001}, dict(METRICS)]
    env = []
    if serve:
        ports.append({"name": "serve", "containerPort": 8000})
        # the API key of serve/config.yaml's api_key_env, from an optional Secret
        env = [{"name": "MMPHI_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "mmphi-api-key", "key": "key", "optional": True}}}]
    workers = []
    for name in groups:
        g = GROUPS[name]
        workers.append({
            "groupName": name,
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": g.max_pods,
            # KubeRay passes this string to `ray start --resources`
            "rayStartParams": {"resources": json.dumps(json.dumps(g.custom)),
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod("ray-worker", image, g.cpus, g.memory, g.shm, g.gpus, ports=[dict(METRICS)], env=env),
        })
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": 600, "upscalingMode": "Default"},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
            "template": _pod("ray-head", image, HEAD["cpus"], HEAD["memory"], HEAD["shm"], ports=ports, env=env),
        },
        "workerGroupSpecs": workers,
    }


def _meta(name: str, component: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "mmphi", "app.kubernetes.io/component": component}}


def ray_job(name: str, job: Job, image: str) -> dict:
    spec: dict = {
        "entrypoint": shlex.join(job.argv),
        "entrypointNumCpus": job.cpus,
        "submissionMode": "K8sJobMode",
        # the cluster goes away when the job ends; outputs are on the shared claim
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
    }
    if job.gpus:
        spec["entrypointNumGpus"] = job.gpus
    if job.resources:
        spec["entrypointResources"] = json.dumps(job.resources)
    spec["rayClusterSpec"] = ray_cluster(image, job.groups)
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(f"mmphi-{name}", name), "spec": spec}


def ray_service(image: str, serve_config: dict) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta("mmphi", "serve"),
        "spec": {
            # a changed cluster spec starts a new cluster and moves traffic once it serves
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False, width=1000),
            "rayClusterConfig": ray_cluster(image, SERVICE_GROUPS, serve=True),
        },
    }


def pod_monitor() -> dict:
    """A Prometheus Operator PodMonitor scraping the metrics port of every Ray
    pod in its namespace (the RayService's and the RayJobs' clusters), with
    the Ray cluster's name as a label (``ray_io_cluster``, as Ray's Grafana
    dashboards expect)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta("mmphi-ray", "metrics"),
        "spec": {
            "selector": {"matchLabels": {"ray.io/is-ray-node": "yes"}},
            "podMetricsEndpoints": [{
                "port": METRICS["name"],
                "interval": "15s",
                "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                 "targetLabel": "ray_io_cluster"}],
            }],
        },
    }


def prometheus_rule() -> dict:
    """The alerting rules of ``deploy/alerts.py`` as a Prometheus Operator
    ``PrometheusRule`` (its Prometheus must select it: kube-prometheus-stack
    selects rules labelled with its Helm release unless
    ``ruleSelectorNilUsesHelmValues`` is false)."""
    from deploy.alerts import groups

    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta("mmphi-alerts", "metrics"),
        "spec": {"groups": groups()},
    }


def shared_claim() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(SHARED_CLAIM, "storage"),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            # any ReadWriteMany class: EFS (efs.csi.aws.com), Filestore, Azure Files, NFS
            "storageClassName": "efs-sc",
            "resources": {"requests": {"storage": "1Ti"}},
        },
    }


# ----------------------------------------------------------------- output
class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # every manifest spelled out, no &anchors
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# Generated by `python -m deploy.generate` (make manifests) from serve/config.yaml,
# pyproject.toml and deploy/generate.py: edit those, then regenerate.
# tests/test_k8s_manifests.py fails when this file differs from the generator's output.
# See docs/operations.md.
#   kubectl apply -f deploy/k8s/{name}
"""


def render(image: str = DEFAULT_IMAGE) -> dict[str, str]:
    """{file name: text} of every manifest."""
    local = yaml.safe_load(SERVE_CONFIG.read_text())
    docs = {"shared-storage.yaml": shared_claim()}
    docs.update({f"rayjob-{name}.yaml": ray_job(name, job, image) for name, job in JOBS.items()})
    docs["rayservice.yaml"] = ray_service(image, cluster_serve_config(local))
    docs["podmonitor.yaml"] = pod_monitor()
    docs["prometheusrule.yaml"] = prometheus_rule()
    return {name: HEADER.format(name=name) + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000)
            for name, doc in docs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default: deploy/k8s)")
    ap.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image (default: {DEFAULT_IMAGE})")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs")
    a = ap.parse_args(argv)
    files = render(a.image)
    if a.check:
        stale = sorted(n for n, text in files.items()
                       if not (a.out / n).is_file() or (a.out / n).read_text() != text)
        extra = sorted(p.name for p in a.out.glob("*.yaml") if p.name not in files)
        for n in stale:
            print(f"{a.out / n}: differs from the generator's output", file=sys.stderr)
        for n in extra:
            print(f"{a.out / n}: not written by the generator", file=sys.stderr)
        if stale or extra:
            print("run: python -m deploy.generate", file=sys.stderr)
            return 1
        print(f"{a.out}: {len(files)} manifests up to date")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (a.out / name).write_text(text)
    print(f"wrote {len(files)} manifests to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
