"""Every stage through `ray job submit` against a head started with `ray start --head`.

The jobs are submitted with the Jobs API (what `ray job submit` uses), with a
runtime environment and entrypoint resources, and each must reach SUCCEEDED
and leave its outputs: embed -> a training plan (projector, then qlora, one
worker group) -> the qlora run again from flags (reused: no Ray Train start)
-> evaluate.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head node in its own process group (only it is stopped afterwards)."""
    from ray.job_submission import JobSubmissionClient

    import secrets

    root = tmp_path_factory.mktemp("jobs")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    ray = Path(sys.executable).with_name("ray")
    # Ray 2.60 heads require a token for the Jobs API: the same one for the head and this client
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--temp-dir={root / 'ray'}"],
        stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client, deadline, error = None, time.time() + 120, None
    while client is None:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"no Jobs API at port {dash} ({error!r}); ray start --head said:\n"
                               f"{(root / 'head.log').read_text()[-2000:]}")
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{dash}", headers={"Authorization": f"Bearer {token}"})
        except Exception as e:
            error = e
            time.sleep(2)
    yield client, root
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # a clean stop takes about 30 s; the group is killed sooner (every test is done with it)
        proc.wait(3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def submit(client, root: Path, module: str, *args) -> str:
    from ray.job_submission import JobStatus

    entry = " ".join([sys.executable, "-m", module, *map(str, args)])
    env_vars = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if os.environ.get("MMPHI_CACHE"):
        env_vars["MMPHI_CACHE"] = os.environ["MMPHI_CACHE"]
    for attempt in range(60):  # the head's job agent comes up a few seconds after the dashboard
        try:
            job = client.submit_job(entrypoint=entry, entrypoint_num_cpus=0.25, runtime_env={"env_vars": env_vars})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 59:
                raise
            time.sleep(2)
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"{module} still {status} after 600 s"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{module} ended {status}:\n{logs[-4000:]}"
    return logs


def test_every_stage_as_a_submitted_job(head):
    from data_pipelines.synthetic import synthesize

    client, root = head
    data, emb, runs = root / "data", root / "emb", root / "runs"
    synthesize(data, images=80, seed=2, progress=False)

    submit(client, root, "data_pipelines.embed", "--data", data, "--out", emb)
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["count"] == 80 and manifest["missing"] == 0

    shared = {"data": str(data), "embeddings": str(emb), "out": str(runs), "workers": 2, "cpus_per_worker": 0.5,
              "threads": 1, "steps": 4, "batch_size": 4, "eval_every": 4, "ckpt_every": 4, "eval_samples": 16,
              "warmup": 1}
    plan = root / "plan.yaml"
    plan.write_text(json.dumps({**shared, "runs": [{"stage": "projector", "name": "s1"},
                                                   {"stage": "qlora", "name": "s2"}]}))  # JSON is YAML
    logs = submit(client, root, "ray_jobs.train", "plan", plan)
    s1 = json.loads((runs / "s1" / "summary.json").read_text())
    assert s1["steps"] == 4 and s1["workers"] == 2 and (runs / "s1" / "final" / "projector.safetensors").is_file()
    assert not (runs / "s1" / "final" / "adapter").exists()
    s2 = json.loads((runs / "s2" / "summary.json").read_text())
    assert s2["steps"] == 4 and (runs / "s2" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((runs / "s2" / "final" / "mmphi.json").read_text())["extra"]["stage"] == "qlora"
    assert [json.loads(r)["step"] for r in (runs / "s2" / "progress.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "s1: finished at step" not in logs  # trained here, not found finished

    # the same run from flags: found finished, reused without a Ray Train start, its summary printed
    common = [x for k, v in shared.items() for x in (f"--{k.replace('_', '-')}", v)]  # the plan's settings as flags
    progress = (runs / "s2" / "progress.jsonl").read_text()
    logs = submit(client, root, "ray_jobs.train", "qlora", "--name", "s2", "--init", runs / "s1" / "final", *common)
    assert "s2: finished at step 4 (asked 4)" in logs, logs[-3000:]
    assert (runs / "s2" / "progress.jsonl").read_text() == progress
    assert json.loads((runs / "s2" / "summary.json").read_text()) == s2

    submit(client, root, "ray_jobs.evaluate", "--checkpoint", runs / "s2" / "final", "--data", data,
           "--embeddings", emb, "--samples", 16, "--out", root / "eval.json")
    ev = json.loads((root / "eval.json").read_text())
    assert set(ev["answer_accuracy"]) <= {"colour", "shape", "position", "count", "size", "text"}
    assert sum(ev["answer_counts"].values()) == 16
