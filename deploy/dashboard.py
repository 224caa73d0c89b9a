"""The Grafana dashboard of the serving path: ``deploy/grafana/mmphi.json``.

Built from the metrics of ``serve/metrics.py`` (as Ray exports them: with
the ``ray_`` prefix) and Ray Serve's own; import it in Grafana (Dashboards →
Import) with a Prometheus data source that scrapes the Ray nodes
(``deploy/k8s/podmonitor.yaml`` on KubeRay).

    python -m deploy.dashboard            # write deploy/grafana/mmphi.json
    python -m deploy.dashboard --check    # exit 1 if the committed file differs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana" / "mmphi.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application="$application"'


def _panel(i: int, title: str, targets: list[tuple[str, str]], unit: str, description: str) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + k), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for k, (expr, legend) in enumerate(targets)],
    }


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate(ray_{metric}_bucket{{{APP}}}[$__rate_interval])))",
             f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)]


PANELS = [
    ("Generated tokens per second", [
        (f"sum(rate(ray_mmphi_llm_generation_tokens_total{{{APP}}}[$__rate_interval]))", "generated"),
        (f"sum(rate(ray_mmphi_llm_prompt_tokens_total{{{APP}}}[$__rate_interval]))", "prompt")],
     "short", "Tokens out (and prompt tokens in) per second over every LLM replica."),
    ("Time to first token", _quantiles("mmphi_llm_time_to_first_token_seconds"), "s",
     "In the LLM replica: waiting for a batch row plus prefill."),
    ("Time per output token", _quantiles("mmphi_llm_time_per_output_token_seconds"), "s",
     "Mean gap between a request's later tokens: the decoding speed one user sees."),
    ("Requests decoding and waiting", [
        (f"sum by (replica) (ray_mmphi_llm_running_requests{{{APP}}})", "decoding {{replica}}"),
        (f"sum by (replica) (ray_mmphi_llm_waiting_requests{{{APP}}})", "waiting {{replica}}")],
     "short", "Per LLM replica: rows in the continuous batch, and requests waiting for one."),
    ("Finished generations by outcome", [
        (f"sum by (outcome) (rate(ray_mmphi_llm_requests_total{{{APP}}}[$__rate_interval]))", "{{outcome}}")],
     "reqps", "stop: a stop token; length: max_tokens; cancelled: the client left; error."),
    ("API errors by code", [
        (f"sum by (code, status) (rate(ray_mmphi_api_errors_total{{{APP}}}[$__rate_interval]))",
         "{{code}} ({{status}})")],
     "reqps", "Refused or failed API requests; server_overloaded: a full queue (max_queued_requests)."),
    ("HTTP requests (Ray Serve)", [
        (f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{{{APP}}}[$__rate_interval]))",
         "{{route}} {{status_code}}")],
     "reqps", "Every request through the Serve proxy, by route and status."),
    ("Replicas (Ray Serve)", [
        (f"count by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "{{deployment}}")],
     "short", "Running replicas per deployment, as the autoscaler moves them."),
]


def dashboard() -> dict:
    return {
        "uid": "mmphi-serving",
        "title": "mmphi serving",
        "tags": ["mmphi", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": "application", "label": "Serve application", "type": "custom", "query": "mmphi",
             "current": {"text": "mmphi", "value": "mmphi"}},
        ]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT}: differs from the generator's output; run: python -m deploy.dashboard", file=sys.stderr)
            return 1
        print(f"{OUT}: up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
