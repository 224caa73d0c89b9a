"""Prometheus alerting rules for the serving path and training runs.

Written from the same metrics as the Grafana dashboards (``deploy/dashboard.py``):
``deploy/prometheus/mmphi-alerts.yaml`` is a rules file for a plain Prometheus
(``rule_files:`` in prometheus.yml); ``deploy/k8s/prometheusrule.yaml``
(written by ``deploy/generate.py``) carries the same groups as a Prometheus
Operator ``PrometheusRule``.

    python -m deploy.alerts            # write deploy/prometheus/mmphi-alerts.yaml
    python -m deploy.alerts --check    # exit 1 if the committed file differs

Thresholds are the constants below; change them here and regenerate.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from deploy import write_or_check
from deploy.generate import _Dumper  # the manifests' YAML: no &anchors

OUT = Path(__file__).resolve().parent / "prometheus" / "mmphi-alerts.yaml"
APP = 'application="mmphi"'  # serve/app.py APP_NAME

REFUSED_SHARE = 0.01      # 503s (full queues, no replica) over all HTTP requests
ERROR_SHARE = 0.05        # other 5xx over all HTTP requests
TTFT_P95_S = 5.0          # time to first token in the LLM replica, p95
TPOT_P50_S = 0.2          # seconds per output token, p50 (below 5 tokens/s for a typical user)
STALL_MINUTES = 15        # a training run with steps left and none done in this long


def _rule(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description}}


def _http(matchers: str = "") -> str:
    sel = ", ".join(m for m in (APP, matchers) if m)
    return f"sum by (application) (rate(ray_serve_num_http_requests_total{{{sel}}}[5m]))"


REFUSED = 'status_code="503"'
FAILED = 'status_code=~"5..", status_code!="503"'
SERVING = [
    _rule("MmphiRequestsRefused",
          f"{_http(REFUSED)} / {_http()} > {REFUSED_SHARE}", "5m", "warning",
          "mmphi refuses {{ $value | humanizePercentage }} of its HTTP requests with 503",
          "Full queues (LLM, ASR or ImageEncoder: 503 server_overloaded; the ingress: Serve's proxy) or no "
          "replica to take a request. Raise autoscaling_config.max_replicas (the cluster needs GPUs for them) "
          "or max_queued_requests in serve/config.yaml; ray_mmphi_api_errors_total by code says which."),
    _rule("MmphiServerErrors",
          f"{_http(FAILED)} / {_http()} > {ERROR_SHARE}", "5m", "critical",
          "{{ $value | humanizePercentage }} of mmphi's HTTP requests fail with a server error",
          "5xx answers other than 503: failed model calls or a crashing replica. The replica logs "
          "(/tmp/ray/session_latest/logs/serve/) name the error."),
    _rule("MmphiGenerationErrors",
          f"sum by (application) (rate(ray_mmphi_llm_requests_total{{{APP}, outcome=\"error\"}}[5m])) > 0",
          "5m", "warning",
          "mmphi's LLM replicas end generations with errors ({{ $value | humanize }} a second)",
          "Generations that ended in an error rather than a stop token, max_tokens or a client leaving; "
          "see the LLM replica logs (replica_mmphi_LLM_*.log)."),
    _rule("MmphiSlowFirstToken",
          f"histogram_quantile(0.95, sum by (application, le) "
          f"(rate(ray_mmphi_llm_time_to_first_token_seconds_bucket{{{APP}}}[5m]))) > {TTFT_P95_S}",
          "10m", "warning",
          "mmphi's time to first token is {{ $value | humanizeDuration }} at p95",
          "Requests wait for a batch row or a long prefill. More LLM replicas (max_replicas), a larger "
          "max_batch_size or a lower target_ongoing_requests bring it down."),
    _rule("MmphiSlowDecoding",
          f"histogram_quantile(0.5, sum by (application, le) "
          f"(rate(ray_mmphi_llm_time_per_output_token_seconds_bucket{{{APP}}}[5m]))) > {TPOT_P50_S}",
          "10m", "warning",
          "mmphi decodes at {{ $value | humanizeDuration }} a token (p50)",
          "Each decoding step serves too many rows or runs without CUDA graphs or the static KV cache "
          "(the LLM replica logs say which at start)."),
    _rule("MmphiLLMSaturated",
          f"sum by (application) (ray_mmphi_llm_waiting_requests{{{APP}}}) > 0", "10m", "warning",
          "requests have waited for an LLM batch row for 10 minutes",
          "Every row of every LLM replica's batch is busy and requests queue in the replicas; the autoscaler "
          "is at max_replicas or cannot get a GPU node."),
    _rule("MmphiDeploymentUnhealthy",
          f"max by (application, deployment) (ray_serve_deployment_status{{{APP}}}) <= 2", "5m", "critical",
          "mmphi's {{ $labels.deployment }} deployment is unhealthy or failed to deploy",
          "Ray Serve reports the deployment as UNKNOWN, DEPLOY_FAILED or UNHEALTHY (its replicas fail their "
          "health checks or cannot start: a missing checkpoint, no GPU); `serve status` gives the reason."),
]

TRAINING = [
    _rule("MmphiTrainingStalled",
          f"(max by (run) (ray_mmphi_train_planned_steps) > max by (run) (ray_mmphi_train_step))"
          f" and on (run) (time() - max by (run) (ray_mmphi_train_last_step_timestamp_seconds) > {STALL_MINUTES * 60})",
          "1m", "warning",
          "training run {{ $labels.run }} has done no step in " + str(STALL_MINUTES) + " minutes",
          "Rank 0 still exports the run's gauges (its process is alive), but its last optimizer step "
          "ended that long ago, or, before its first step, the run started that long ago (the evaluation "
          "before step 1 and any compilation count): a hung collective (a worker lost mid-step), a "
          "stuck data loader or a full disk while checkpointing. The workers' logs in the Ray "
          "dashboard (Train tab) show where it waits; "
          "stopping the job and submitting it again resumes from the last checkpoint."),
]


def groups() -> list[dict]:
    return [{"name": "mmphi-serving", "rules": SERVING}, {"name": "mmphi-training", "rules": TRAINING}]


HEADER = """\
# Generated by `python -m deploy.alerts` (make manifests) from deploy/alerts.py: edit that, then regenerate.
# A Prometheus rules file: list it under rule_files in prometheus.yml (the Prometheus Operator: deploy/k8s/prometheusrule.yaml).
"""


def render() -> str:
    return HEADER + yaml.dump({"groups": groups()}, Dumper=_Dumper, sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.alerts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    a = ap.parse_args(argv)
    return write_or_check({OUT: render()}, a.check, "python -m deploy.alerts")


if __name__ == "__main__":
    raise SystemExit(main())
