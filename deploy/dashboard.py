"""The Grafana dashboards: serving (``deploy/grafana/mmphi.json``) and
training (``deploy/grafana/mmphi-training.json``).

Built from the metrics of ``serve/metrics.py`` and ``ray_jobs/metrics.py``
(as Ray exports them: with the ``ray_`` prefix), Ray Serve's own and Ray's
node metrics; import them in Grafana (Dashboards → Import) with a Prometheus
data source that scrapes the Ray nodes (``deploy/k8s/podmonitor.yaml`` on
KubeRay).

    python -m deploy.dashboard            # write both files
    python -m deploy.dashboard --check    # exit 1 if a committed file differs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from deploy import write_or_check

OUT = Path(__file__).resolve().parent / "grafana" / "mmphi.json"
TRAINING_OUT = OUT.with_name("mmphi-training.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application="$application"'
RUN = 'run=~"$run"'
DATASOURCE = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}


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


SERVING_PANELS = [
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
    ("Image feature cache hit ratio", [
        (f'sum(rate(ray_mmphi_image_cache_lookups_total{{{APP},outcome="hit"}}[$__rate_interval])) / '
         f"sum(rate(ray_mmphi_image_cache_lookups_total{{{APP}}}[$__rate_interval]))", "ingress"),
        (f'sum(rate(ray_mmphi_encoder_cache_lookups_total{{{APP},outcome="hit"}}[$__rate_interval])) / '
         f"sum(rate(ray_mmphi_encoder_cache_lookups_total{{{APP}}}[$__rate_interval]))", "ImageEncoder")],
     "percentunit", "Share of images whose CLIP features the ingress had kept (image_cache_mb) and, of those it "
                    "sent on, the ImageEncoder replica they were routed to (encoder_cache_mb): a conversation "
                    "sends its image again with every turn, and its turns spread over the ingress replicas. "
                    "Low: caches too small for the images in use."),
    ("Prompt tokens from the prefix cache", [
        (f"sum(rate(ray_mmphi_llm_prefix_cache_tokens_total{{{APP}}}[$__rate_interval])) / "
         f"sum(rate(ray_mmphi_llm_prompt_tokens_total{{{APP}}}[$__rate_interval]))", "from the cache")],
     "percentunit", "Share of prompt tokens whose keys and values an LLM replica kept from an earlier request "
                    "(LLM user_config prefix_cache): a chat's next turn repeats its history. Low with long chats: "
                    "busy replicas (retained rows give way to running ones), or a chat's turns spread over replicas "
                    "(the LLM's request router keeps them together unless a replica is overloaded)."),
    ("HTTP requests (Ray Serve)", [
        (f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{{{APP}}}[$__rate_interval]))",
         "{{route}} {{status_code}}")],
     "reqps", "Every request through the Serve proxy, by route and status."),
    ("Replicas (Ray Serve)", [
        (f"count by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "{{deployment}}")],
     "short", "Running replicas per deployment, as the autoscaler moves them."),
]


TRAINING_PANELS = [
    ("Training tokens per second", [
        (f"sum by (run) (rate(ray_mmphi_train_tokens_total{{{RUN}}}[$__rate_interval]))", "{{run}}"),
        (f"max by (run) (ray_mmphi_train_tokens_per_second{{{RUN}}})", "{{run}} (between evaluations)")],
     "short", "Real (not padding) tokens trained on per second, all workers together: the counters' rate, "
              "and the run's own figure between its last two evaluations or checkpoints (training time only)."),
    ("Loss", [
        (f"max by (run) (ray_mmphi_train_loss{{{RUN}}})", "{{run}} train"),
        (f"max by (run) (ray_mmphi_train_val_loss{{{RUN}}})", "{{run}} validation")],
     "short", "Rank 0's loss of its last step, and the loss on held-out samples at the last evaluation."),
    ("Progress", [
        (f"max by (run) (ray_mmphi_train_step{{{RUN}}}) / max by (run) (ray_mmphi_train_planned_steps{{{RUN}}})",
         "{{run}}")],
     "percentunit", "The step the run is at, of the steps it will do (a resumed run starts where it stopped)."),
    ("Time left", [
        (f"(max by (run) (ray_mmphi_train_planned_steps{{{RUN}}}) - max by (run) (ray_mmphi_train_step{{{RUN}}}))"
         f" / sum by (run) (rate(ray_mmphi_train_steps_total{{{RUN}}}[5m]))", "{{run}}")],
     "s", "Steps left over the steps per second of the last five minutes (evaluations and checkpoints included)."),
    ("Time since the last step", [
        (f"time() - max by (run) (ray_mmphi_train_last_step_timestamp_seconds{{{RUN}}})", "{{run}}")],
     "s", "Seconds since rank 0's last optimizer step (since the run started, before its first). It rises "
          "through an evaluation or a checkpoint and falls back at the next step; one that keeps rising is a "
          "hung run (alert MmphiTrainingStalled)."),
    ("Optimizer steps per second", [
        (f"sum by (run) (rate(ray_mmphi_train_steps_total{{{RUN}}}[$__rate_interval]))", "{{run}}")],
     "short", "Steps done per second (rank 0's counter)."),
    ("Learning rate", [(f"max by (run) (ray_mmphi_train_learning_rate{{{RUN}}})", "{{run}}")],
     "short", "The learning rate of the last step (warm-up, then cosine decay)."),
    ("Tokens per second per worker", [
        (f"sum by (run, NodeAddress, WorkerId) (rate(ray_mmphi_train_tokens_total{{{RUN}}}[$__rate_interval]))",
         "{{run}} {{NodeAddress}} {{WorkerId}}")],
     "short", "One line per training worker. Data-parallel workers step together, so a gap between lines is "
              "data, not speed (one worker's batches carry fewer real tokens); a slow worker slows every line."),
    ("Node CPU and GPU utilisation", [
        ("avg by (ip) (ray_node_cpu_utilization)", "CPU {{ip}}"),
        ("avg by (ip, GpuIndex) (ray_node_gpus_utilization)", "GPU {{ip}} #{{GpuIndex}}")],
     "percent", "Ray's node metrics: every node of the cluster, busy or not (a data-bound run shows idle GPUs)."),
    ("Node memory and GPU memory", [
        ("sum by (ip) (ray_node_mem_used)", "RAM {{ip}}"),
        ("sum by (ip, GpuIndex) (ray_node_gram_used) * 1024 * 1024", "GPU {{ip}} #{{GpuIndex}}")],
     "bytes", "Host memory in use, and GPU memory in use per card (Ray reports it in MiB)."),
]
# series only a node with GPUs exports
GPU_ONLY = {"ray_node_gpus_utilization", "ray_node_gram_used"}


def _dashboard(uid: str, title: str, tags: list[str], variables: list[dict], panels: list) -> dict:
    return {
        "uid": uid,
        "title": title,
        "tags": tags,
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [DATASOURCE, *variables]},
        "panels": [_panel(i, *p) for i, p in enumerate(panels)],
    }


def dashboard() -> dict:
    """Serving: tokens/s, latencies, queues, outcomes, errors, replicas."""
    return _dashboard("mmphi-serving", "mmphi serving", ["mmphi", "ray-serve"], [
        {"name": "application", "label": "Serve application", "type": "custom", "query": "mmphi",
         "current": {"text": "mmphi", "value": "mmphi"}},
    ], SERVING_PANELS)


def training_dashboard() -> dict:
    """Training: tokens/s, loss, progress and time left per run, per-worker
    throughput, and the nodes' CPU, GPU and memory."""
    query = "label_values(ray_mmphi_train_steps_total, run)"
    return _dashboard("mmphi-training", "mmphi training", ["mmphi", "ray-train"], [
        {"name": "run", "label": "Training run", "type": "query", "datasource": DS,
         "query": {"query": query, "refId": "run"}, "definition": query, "refresh": 2, "sort": 1,
         "multi": True, "includeAll": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"}},
    ], TRAINING_PANELS)


FILES = {OUT: dashboard, TRAINING_OUT: training_dashboard}


def render(make=dashboard) -> str:
    return json.dumps(make(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.dashboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    a = ap.parse_args(argv)
    return write_or_check({out: render(make) for out, make in FILES.items()}, a.check, "python -m deploy.dashboard")


if __name__ == "__main__":
    raise SystemExit(main())
