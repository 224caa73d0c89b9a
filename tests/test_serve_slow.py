"""`mmphi serve` with a checkpoint, under load, with an LLM replica killed (slow).

Starts the real command in a subprocess with two LLM replicas, checks the
served answers equal the in-process model's, then sends 50 concurrent mixed
requests and SIGKILLs one LLM replica process while they are in flight:
every request must still succeed.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_serve import audio_part, b64, free_port, image_part, png, sse_events, wav

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    return tiny_model.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoint):
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] in ("LLM", "Ingress"):  # two LLM replicas: one can die while the other serves;
            d.pop("autoscaling_config")     # one ingress: /healthz counts its recoveries
            d["num_replicas"] = 2 if d["name"] == "LLM" else 1
    conf = tmp_path_factory.mktemp("conf") / "serve.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMPHI_API_KEY": ""}
    log_path = tmp_path_factory.mktemp("log") / "serve.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mmphi", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--config", str(conf)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            # as a background job of a script: SIGINT starts ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"mmphi serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            # the ingress answers /healthz as soon as it is up; "chat page at" comes once every replica is
            # (both LLM replicas: the kill test must not hit one that was still starting and held no request)
            if httpx.get(url + "healthz", timeout=5).status_code == 200 and "chat page at" in log_path.read_text():
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mmphi serve did not become healthy within 300 s")
        time.sleep(2)
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def llm_replica_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ServeReplica:mmphi:LLM" in part for part in p.info["cmdline"] or []):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def test_served_checkpoint_answers_like_the_model_in_process(served, checkpoint, tiny_model):
    url, _ = served
    health = httpx.get(url + "healthz", timeout=30).json()
    assert health["weights"] == f"checkpoint {Path(checkpoint).resolve()}"
    from models.multimodal import MultimodalPhi3

    model = MultimodalPhi3.from_checkpoint(checkpoint, device="cpu")
    image = png(64, 64, "blue")
    for content, images in (("What is 3 plus 4?", []),
                            ([{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}], [image])):
        expected = model.chat([{"role": "user", "content": content}], images, max_new_tokens=12,
                              suppress_tokens=model.suppressed_ids)  # the server never emits image slots
        api_content = content if isinstance(content, str) else [image_part(image), content[1]]
        r = httpx.post(url + "v1/chat/completions", timeout=120, json={
            "model": "mmphi", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": api_content}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == expected


def test_fifty_concurrent_requests_survive_an_llm_replica_kill(served):
    url, _ = served
    pids = llm_replica_pids()
    assert len(pids) == 2, pids
    kinds = ["text", "image", "audio", "stream"]

    def body(i: int) -> dict:
        kind = kinds[i % 4]
        content = [{"type": "text", "text": f"Tell me about shapes, number {i}"}]
        if kind == "image":
            content.insert(0, image_part(png(64, 64, "green")))
        if kind == "audio":
            content.insert(0, audio_part(wav(0.5)))
        # min_tokens: every answer is long enough to be live when the replica dies
        return {"model": "mmphi", "max_tokens": 48, "min_tokens": 32, "temperature": 0, "stream": kind == "stream",
                "messages": [{"role": "user", "content": content}]}

    done = []

    async def one(client, i):
        # arrivals spread over a second: a replica's batch does not all finish at one step,
        # so both replicas hold live answers whenever the kill comes
        await asyncio.sleep(0.02 * i)
        r = await client.post(url + "v1/chat/completions", json=body(i))
        assert r.status_code == 200, r.text
        if body(i)["stream"]:
            events = sse_events(r.text)
            assert not any("error" in e for e in events), events
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
        done.append(i)

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=60)) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(50)]
            while len(done) < 5:  # the load is running
                await asyncio.sleep(0.05)
            in_flight = 50 - len(done)
            os.kill(pids[0], signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return in_flight, results

    in_flight, results = asyncio.run(main())
    assert in_flight > 10, f"only {in_flight} requests were in flight at the kill"
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert len(done) == 50
    recovered = httpx.get(url + "healthz", timeout=30).json()["recovered"]
    assert recovered["continued_answers"] + recovered["retried_calls"] >= 1, recovered  # the kill hit live requests
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    # Serve replaces the dead replica
    deadline = time.monotonic() + 180
    while len(llm_replica_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(llm_replica_pids()) == 2


def test_ctrl_c_stops_the_server(served):
    url, proc = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "healthz", timeout=5)
