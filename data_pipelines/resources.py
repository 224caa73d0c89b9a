"""Custom Ray resources from the command line: ``--resources-per-worker KEY=N``.

A cluster's nodes can declare custom resources (``deploy/cluster.yaml``: every
GPU of the L4 group is one ``infer_gpu``, of the H100 group one
``train_gpu``); a job whose workers ask for one of them runs only on nodes
that have it, and on an autoscaling cluster makes the autoscaler start such a
node. The flags are repeatable (``--resources-per-worker train_gpu=1
--resources-per-worker spot=0.5``) and give Ray's ``resources`` option of each
worker or actor. CPUs and GPUs have their own flags; Ray refuses them here.
"""
from __future__ import annotations

import argparse
import logging
import math

log = logging.getLogger(__name__)

# Ray's own resources, which its remote options set by keyword, never in ``resources``
RESERVED = ("CPU", "GPU", "memory", "object_store_memory")
PRECISION = 1e-4  # Ray's resource unit


def check_resource(key: str, quantity: float, hints: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming the problem with one ``key: quantity``."""
    if not key or key != key.strip() or any(c.isspace() for c in key):
        raise ValueError(f"resource name {key!r} is empty or holds spaces")
    if key in RESERVED:
        hint = (hints or {}).get(key)
        raise ValueError(f"{key} is not a custom resource" + (f": use {hint}" if hint else ""))
    if isinstance(quantity, bool) or not isinstance(quantity, (int, float)):
        raise ValueError(f"resource {key}: quantity must be a number, got {quantity!r}")
    if not math.isfinite(quantity) or quantity <= 0:
        raise ValueError(f"resource {key}: quantity must be a positive number, got {quantity}")
    if abs(round(quantity / PRECISION) * PRECISION - quantity) > 1e-9:
        raise ValueError(f"resource {key}: Ray counts resources in steps of {PRECISION}, got {quantity}")


def parse_resource(text: str, hints: dict[str, str] | None = None) -> tuple[str, float]:
    """``"train_gpu=1"`` -> ``("train_gpu", 1.0)``; ``ValueError`` on anything else."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"expected KEY=N (for example train_gpu=1), got {text!r}")
    key = key.strip()
    try:
        quantity = float(value)
    except ValueError:
        raise ValueError(f"resource {key}: quantity must be a number, got {value!r}") from None
    check_resource(key, quantity, hints)
    return key, quantity


def check_resources(resources: dict[str, float] | None, hints: dict[str, str] | None = None) -> dict[str, float]:
    """A validated copy of a ``{name: quantity}`` mapping (programmatic callers)."""
    out = {}
    for key, quantity in (resources or {}).items():
        check_resource(key, quantity, hints)
        out[key] = float(quantity)
    return out


class ResourcesAction(argparse.Action):
    """Collects repeated ``KEY=N`` values into one dict; a bad value or a key
    given twice is a usage error naming the flag."""

    def __init__(self, option_strings, dest, hints: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("metavar", "KEY=N")
        kwargs.setdefault("default", {})
        super().__init__(option_strings, dest, **kwargs)
        self.hints = hints or {}

    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})  # never mutate the shared default
        try:
            key, quantity = parse_resource(values, self.hints)
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        if key in current:
            raise argparse.ArgumentError(self, f"{key} given twice")
        current[key] = quantity
        setattr(namespace, self.dest, current)


def warn_if_absent(resources: dict[str, float], count: int, what: str) -> list[str]:
    """Log (and return) the resources the running cluster cannot give ``count``
    workers now. Not an error: an autoscaler adds such nodes on demand, and the
    job waits for them."""
    import ray

    have = ray.cluster_resources()
    short = [k for k, q in resources.items() if have.get(k, 0) < q * count]
    if short:
        log.warning("%s ask for %s each (%d of them); the cluster has %s now: they wait until nodes with "
                    "these resources join (an autoscaler starts them on demand)", what, resources, count,
                    {k: have.get(k, 0) for k in short})
    return short
