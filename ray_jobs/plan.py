"""A training plan: several runs trained in order in one Ray Train run
(``ray_jobs.train.run_sequence``), written as a YAML (or JSON) file.

    data: data/synth            # settings for every run: any TrainSettings field
    embeddings: emb/synth
    out: runs
    workers: 2
    runs:                       # in order; each run after the first starts from the previous one's final/
      - {stage: projector, name: s1, steps: 200}
      - {stage: qlora, name: s2, steps: 1000, lr: 0.001}

    mmphi train plan plan.yaml          # or: python -m ray_jobs.train plan plan.yaml

Setting names are ``TrainSettings``' fields, the long flags of ``mmphi train``
with ``_`` for ``-`` (``batch_size``, ``ckpt_every``; ``overrides`` is the
list of ``--set`` values, ``resources_per_worker`` a mapping). A run after the
first starts from the previous run's ``final/``: its ``init`` may be left out,
and ``preset`` matters for the first run only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from models.config import ConfigError

from .train import SettingsError, TrainSettings

# the value types a setting accepts, by the names in its annotation ("int | None", "list[str]")
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,), "dict": (dict,),
          "None": (type(None),)}
_REQUIRED = ("stage", "data", "embeddings", "out")


class PlanError(ConfigError):
    """A plan file that cannot be read as runs (the CLI prints it without a traceback)."""


def load_plan(path: str | Path) -> list[TrainSettings]:
    """The runs of the plan file ``path``, each a ``TrainSettings``; a clear
    error for a missing file, bad YAML, an unknown setting or a wrong type."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    try:
        plan = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list) or not plan["runs"]:
        raise PlanError(f"{path}: a plan is a mapping with a non-empty list 'runs' (and settings shared by every run)")
    shared = _check({k: v for k, v in plan.items() if k != "runs"}, f"{path}")
    runs = []
    for i, item in enumerate(plan["runs"], 1):
        if not isinstance(item, dict):
            raise PlanError(f"{path}: run {i} is not a mapping of settings: {item!r}")
        merged = shared | _check(item, f"{path}: run {i}")
        missing = [k for k in _REQUIRED if k not in merged]
        if missing:
            raise PlanError(f"{path}: run {i} has no {', '.join(missing)} (set them for the run or for every run)")
        try:
            runs.append(TrainSettings(**merged))
        except SettingsError as e:
            raise PlanError(f"{path}: run {i}: {e}") from None
    return runs


def _check(settings: dict, where: str) -> dict:
    """``settings`` checked against ``TrainSettings``' fields; numbers that YAML
    read as text (``1e-3``: YAML 1.1 wants ``1.0e-3``) become numbers."""
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    out = {}
    for key, value in settings.items():
        if key not in fields:
            raise PlanError(f"{where}: unknown setting {key!r}; settings are: {', '.join(fields)}")
        allowed = tuple(tp for name in str(fields[key].type).split("|") for tp in _TYPES[name.strip().split("[")[0]])
        if float in allowed and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            hint = " (YAML reads on/off/yes/no as booleans: quote it)" if isinstance(value, bool) and str in allowed else ""
            raise PlanError(f"{where}: {key} must be {names}, got {value!r}{hint}")
        if key == "overrides" and not all(isinstance(v, str) for v in value):
            raise PlanError(f"{where}: overrides is a list of KEY=VALUE strings, got {value!r}")
        out[key] = value
    return out
