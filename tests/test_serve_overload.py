"""A full LLM queue answers 503 with Retry-After, in OpenAI's error shape
(streamed requests too, before any event), a full ingress queue is Serve's
proxy's 503 with Retry-After, and the service goes on (slow: its own Serve
instance, one LLM slot and one queue place)."""
from __future__ import annotations

import asyncio
import os
import time

import pytest
import yaml

from conftest import scrape
from test_serve import free_port

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow


def config(tmp_path_factory, ingress: dict | None = None):
    """serve/config.yaml with one replica each, one LLM slot and one place in its queue."""
    from serve.app import DEFAULT_CONFIG

    cfg = yaml.safe_load(open(DEFAULT_CONFIG).read())
    for d in cfg["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        if d["name"] == "LLM":  # one request decodes, one waits at the ingress, the rest are refused
            d.update(max_ongoing_requests=1, max_queued_requests=1)
            d["user_config"]["max_batch_size"] = 1
        if d["name"] == "Ingress":
            d.update(ingress or {})
    conf = tmp_path_factory.mktemp("conf") / "serve.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    return conf


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from serve.app import run_local

    os.environ.pop("MMPHI_API_KEY", None)
    port = free_port()
    url = run_local(None, port, blocking=False, num_cpus=4, config=config(tmp_path_factory), access_log=False)
    yield url, port
    serve.shutdown()
    ray.shutdown()


BODY = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 48, "min_tokens": 48,
        "temperature": 0}


def burst(url: str, n: int) -> list:
    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json={**BODY, "stream": i % 2 == 1})
                                          for i in range(n)])

    return asyncio.run(send())


def test_a_full_queue_is_a_503_with_retry_after_and_the_service_goes_on(server):
    server, _ = server
    replies = burst(server, 12)
    codes = [r.status_code for r in replies]
    refused = [r for r in replies if r.status_code == 503]
    # the one in the slot answers; the queue place may go too (Serve counts a request queued until a
    # replica takes it, so requests arriving together can find the place still taken)
    assert refused and codes.count(200) >= 1, codes
    for r in refused:  # plain JSON, streamed or not: nothing was sent before the refusal
        assert r.headers["content-type"].startswith("application/json") and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "server_overloaded" and err["type"] == "server_error"
        assert "every LLM replica is busy and 1 more requests already wait" in err["message"], err
    for r in replies:
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    after = httpx.post(server + "v1/chat/completions", json=BODY, timeout=120)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 48


def test_a_full_ingress_queue_is_the_proxys_503_with_retry_after(server, tmp_path_factory):
    """serve/config.yaml bounds the requests waiting at the HTTP proxy for an
    ingress slot (max_queued_requests, backpressure_config): here two slots
    (held by a decoding request and one waiting for the LLM) and one place,
    so most of a burst is refused at the proxy, at once, with Retry-After,
    before it reaches the ingress; then the service answers again."""
    from ray import serve

    from serve.app import DEFAULT_CONFIG, read_serve_config, run_local

    _, opts = read_serve_config(DEFAULT_CONFIG)
    shipped = opts["Ingress"]
    assert shipped["max_queued_requests"] > 0 and shipped["backpressure_config"] == {"status_code": 503,
                                                                                     "retry_after_s": 1}
    url, port = server
    conf = config(tmp_path_factory, {"max_ongoing_requests": 2, "max_queued_requests": 1})
    run_local(None, port, blocking=False, num_cpus=4, config=conf, access_log=False)  # redeploys the ingress
    status = serve.status().applications["mmphi"].deployments["Ingress"]
    assert status.status == "HEALTHY", status
    replies = burst(url, 10)
    codes = [r.status_code for r in replies]
    at_proxy = [r for r in replies if r.status_code == 503 and "backpressure" in r.text]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and len(at_proxy) >= 5, codes
    assert all(r.headers["retry-after"] == "1" for r in at_proxy), [dict(r.headers) for r in at_proxy]
    assert "max_queued_requests=1" in at_proxy[0].text, at_proxy[0].text
    # the refusals are in Serve's request counter, which the MmphiRequestsRefused alert reads
    deadline = time.monotonic() + 60
    while scrape("serve_num_http_requests_total", application="mmphi", status_code="503") < len(at_proxy) \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert scrape("serve_num_http_requests_total", application="mmphi", status_code="503") >= len(at_proxy)
    after = httpx.post(url + "v1/chat/completions", json=BODY, timeout=120)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 48
