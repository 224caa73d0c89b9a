"""Prometheus metrics of a training run, through Ray's metrics agent.

Ray exports them on every node's metrics port (``ray start
--metrics-export-port``) with a ``ray_`` prefix, tagged with the run's name
(``run``). Rank 0 sets the gauges and counts the steps; every worker counts
the tokens it trained on, so ``sum by (run) (rate(ray_mmphi_train_tokens_total[1m]))``
is the job's tokens/s:

===========================================  =======  ================================================
``mmphi_train_steps_total``                  counter  optimizer steps done (rank 0)
``mmphi_train_tokens_total``                 counter  real (not padding) tokens trained on, per worker
``mmphi_train_step``                         gauge    the step the run is at
``mmphi_train_planned_steps``                gauge    the steps the run will do
``mmphi_train_loss``                         gauge    rank 0's loss of its last step
``mmphi_train_val_loss``                     gauge    the loss on held-out samples, last evaluation
``mmphi_train_learning_rate``                gauge    the learning rate of the last step
``mmphi_train_tokens_per_second``            gauge    all workers' tokens/s between the last two
                                                      evaluations or checkpoints (training only)
``mmphi_train_last_step_timestamp_seconds``  gauge    Unix time of rank 0's last optimizer step (of
                                                      the run's start, before its first step)
===========================================  =======  ================================================

Ray drops a gauge that no one sets for a few seconds, so a thread sets
rank 0's gauges again every second while the run goes on (a step, an
evaluation or a checkpoint may take longer than that). Counters stay
exported for a while after the run's workers have ended.
"""
from __future__ import annotations

import logging
import math
import threading
import time

log = logging.getLogger(__name__)

GAUGES = {
    "step": ("mmphi_train_step", "the step the run is at"),
    "planned_steps": ("mmphi_train_planned_steps", "the steps the run will do"),
    "loss": ("mmphi_train_loss", "rank 0's loss of its last step"),
    "val_loss": ("mmphi_train_val_loss", "the loss on held-out samples at the last evaluation"),
    "learning_rate": ("mmphi_train_learning_rate", "the learning rate of the last step"),
    "tokens_per_second": ("mmphi_train_tokens_per_second",
                          "all workers' training tokens per second between the last two evaluations or checkpoints"),
    "last_step_timestamp_seconds": ("mmphi_train_last_step_timestamp_seconds",
                                    "Unix time of the last optimizer step (of the run's start, before its first step)"),
}
_made: dict = {}


class _Off:
    """Stands in for a metric when Ray's metrics cannot be made (then training
    goes on without them)."""

    def inc(self, *a, **kw) -> None:
        pass

    set = inc


def _metric(kind: str, name: str, description: str):
    """One metric object per name and process (a worker runs a sequence's runs in turn)."""
    if name not in _made:
        try:
            from ray.util import metrics

            _made[name] = getattr(metrics, kind)(name, description, tag_keys=("run",))
        except Exception as e:  # noqa: BLE001 - metrics are never worth a failed run
            log.warning("metric %s is off: %s", name, e)
            _made[name] = _Off()
    return _made[name]


class TrainMetrics:
    """One run's metrics on one worker; :meth:`close` when the run ends."""

    def __init__(self, run: str, rank: int, planned_steps: int, start_step: int, every_s: float = 1.0):
        self.tags = {"run": run}
        self.rank = rank
        self.tokens = _metric("Counter", "mmphi_train_tokens_total", "real tokens trained on, per worker")
        self.values: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = None
        if rank == 0:
            self.steps = _metric("Counter", "mmphi_train_steps_total", "optimizer steps done")
            self.gauges = {k: _metric("Gauge", name, d) for k, (name, d) in GAUGES.items()}
            self.values.update(step=start_step, planned_steps=planned_steps, last_step_timestamp_seconds=time.time())
            self._set_gauges()
            self._thread = threading.Thread(target=self._keep, args=(every_s,), name="mmphi-train-metrics", daemon=True)
            self._thread.start()

    def step(self, step: int, loss: float, tokens: int, learning_rate: float) -> None:
        """After an optimizer step: ``tokens`` real tokens of this worker's batch."""
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)
        if self.rank == 0:
            self.steps.inc(1, tags=self.tags)
            self.values.update(step=step, loss=loss, learning_rate=learning_rate, last_step_timestamp_seconds=time.time())
            self._set_gauges()

    def evaluated(self, metrics: dict) -> None:
        """After an evaluation or checkpoint: its validation loss and tokens/s, where measured."""
        if self.rank == 0:
            for key, name in (("val_loss", "val_loss"), ("tokens_per_s", "tokens_per_second")):
                if isinstance(metrics.get(key), (int, float)):
                    self.values[name] = float(metrics[key])
            self._set_gauges()

    def _set_gauges(self) -> None:
        for key, value in list(self.values.items()):
            if math.isfinite(value):
                self.gauges[key].set(value, tags=self.tags)

    def _keep(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._set_gauges()
            except Exception as e:  # noqa: BLE001
                log.warning("training metrics stopped: %s", e)
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
