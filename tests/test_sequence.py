"""What ``run_sequence`` hands Ray Train and what it refuses, without starting Ray."""
from __future__ import annotations

import json
import re

import pytest

from ray_jobs import train
from ray_jobs.outputs import RunOutputs

from conftest import write_train_inputs


def settings(tmp_path, stage: str, name: str, **kw) -> train.TrainSettings:
    write_train_inputs(tmp_path)
    return train.TrainSettings(stage=stage, data=str(tmp_path / "d"), embeddings=str(tmp_path / "e"),
                               out=str(tmp_path / "runs"), name=name, **kw)


def test_each_run_starts_from_the_previous_final_in_the_first_runs_ray_folder(tmp_path, handed):
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a"), settings(tmp_path, "qlora", "b"),
                            settings(tmp_path, "qlora", "c", overrides=["llm.lora.r=4"])])
    runs = handed["train_loop_config"]["runs"]
    assert handed["train_loop_config"]["checkpoints"] == "a"
    assert handed["run_config"].name == "a" and handed["run_config"].storage_path == str(tmp_path / "runs")
    assert [r["settings"]["init"] for r in runs] == [None, str(tmp_path / "runs" / "a" / "final"),
                                                     str(tmp_path / "runs" / "b" / "final")]
    # stage 1 trains the projector alone; each later config is the one before plus the run's overrides
    assert [r["model_config"]["llm"]["lora"]["enabled"] for r in runs] == [False, True, True]
    assert [r["model_config"]["llm"]["lora"]["r"] for r in runs][1:] == [16, 4]


def test_finished_runs_are_left_out(tmp_path, handed):
    """A run finished earlier (final/ at its last step, a summary) is not
    handed to the workers; the Ray Train folder stays the first run's, where
    the sequence's state is."""
    out = RunOutputs(str(tmp_path / "runs"), "a")
    (tmp_path / "runs" / "a" / "final").mkdir()
    (tmp_path / "runs" / "a" / "final" / "mmphi.json").write_text(json.dumps({"extra": {"step": 200, "run": "a"}}))
    (tmp_path / "runs" / "a" / "summary.json").write_text(json.dumps({"steps": 200, "final": out.final}))
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a"), settings(tmp_path, "qlora", "b")])
    assert [r["settings"]["name"] for r in handed["train_loop_config"]["runs"]] == ["b"]
    assert handed["train_loop_config"]["checkpoints"] == "a" and handed["run_config"].name == "a"


def test_a_train_split_too_small_is_refused_and_an_empty_val_split_is_warned_of(tmp_path, handed, capsys):
    """Fewer training conversations than workers (for stage 1, conversations
    with an image) fail on the driver, not in every worker after the Ray
    Train start-up and its retries; an empty val split trains, said once."""
    s = settings(tmp_path, "projector", "a", workers=5)
    with pytest.raises(train.SettingsError, match=r"the train split of .*/d has 4 conversation\(s\) with an image "
                                                  r"\(stage 1 trains on those alone\): 5 worker\(s\) need"):
        train.run_sequence([s])
    assert not handed
    s = settings(tmp_path, "projector", "a", workers=2)
    (tmp_path / "d" / "val.json").write_text("[]")
    with pytest.raises(handed.Stop):
        train.run_sequence([s])
    err = capsys.readouterr().err
    assert err == (f"mmphi train: a: the val split of {tmp_path / 'd'} is empty: the run trains, but measures no "
                   "validation loss or answer accuracy\n"), err


def test_nothing_to_score_is_no_loss_not_a_zero_one(tiny_model):
    """``evaluate`` on no validation conversations: the loss, perplexity and
    token accuracy are None (null in metrics.jsonl), not 0, 1 and 0."""
    m = train.evaluate(tiny_model, tiny_model.tokenizer, [], [], None, [], 1, 0, 4)
    assert (m["val_loss"], m["perplexity"], m["token_accuracy"]) == (None, None, None)
    assert m["answer_accuracy"] == {} and tiny_model.training


def test_a_rerun_with_other_settings_is_told_which(tmp_path, handed, capsys):
    """A new run records what decides its numbers in ``settings.json``; the
    same run started again with another learning rate or seed is told which
    settings changed (it still resumes), while a change that does not alter
    the numbers (threads, checkpoint interval, steps) says nothing; a run
    from before settings.json existed records nothing afterwards."""
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a")])
    recorded = json.loads((tmp_path / "runs" / "a" / "settings.json").read_text())
    assert recorded == {**train.recipe(settings(tmp_path, "projector", "a")), "steps": 200} and recorded["lr"] == 2e-3
    assert recorded["data"] == str(tmp_path / "d") and capsys.readouterr().err == ""
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a", threads=1, ckpt_every=5, steps=300)])
    assert capsys.readouterr().err == ""
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a", lr=0.5, seed=3)])
    err = capsys.readouterr().err
    assert err.startswith("mmphi train: a was started with other settings (lr: 0.002 -> 0.5; seed: 0 -> 3). "), err
    assert [r["settings"]["lr"] for r in handed["train_loop_config"]["runs"]] == [0.5]  # still resumed
    assert json.loads((tmp_path / "runs" / "a" / "settings.json").read_text()) == recorded  # the first start's
    (tmp_path / "runs" / "old").mkdir()
    (tmp_path / "runs" / "old" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.0}\n')
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "old", lr=0.5)])
    assert not (tmp_path / "runs" / "old" / "settings.json").exists() and capsys.readouterr().err == ""


def test_more_steps_on_a_trained_run_says_how_its_learning_rate_schedule_moves(tmp_path, handed, capsys):
    """A run trained to step 200 of 200 and started again with --steps 300
    resumes on a schedule laid over 300 steps: the learning rate at step 200
    goes back up from 10 % of --lr, which the command says, recording the new
    total so that a third start with the same --steps says nothing; fewer
    steps than trained reuse the run and say nothing either."""
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a")])
    out = RunOutputs(str(tmp_path / "runs"), "a")
    (tmp_path / "runs" / "a" / "final").mkdir()
    (tmp_path / "runs" / "a" / "final" / "mmphi.json").write_text(json.dumps({"extra": {"step": 200, "run": "a"}}))
    (tmp_path / "runs" / "a" / "summary.json").write_text(json.dumps({"steps": 200, "final": out.final}))
    capsys.readouterr()
    f = train._lr_lambda(20, 300)(200)
    assert 0.1 < f < 1  # the old schedule ended at 10 %
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a", steps=300)])
    err = capsys.readouterr().err
    assert err == (f"mmphi train: a resumes at step 200 with --steps 300 where it was planned for 200: its "
                   "learning-rate schedule (warm-up, then cosine down to 10 % of --lr) is laid over 300 steps "
                   f"from here, so the learning rate goes from 10% to {f:.0%} of --lr at step 200 and decays "
                   "again from there.\n"), err
    assert json.loads((tmp_path / "runs" / "a" / "settings.json").read_text())["steps"] == 300
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "projector", "a", steps=300)])
    assert capsys.readouterr().err == ""
    assert train.run_sequence([settings(tmp_path, "projector", "a", steps=150)])[0]["steps"] == 200
    assert "resumes at step" not in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("workers", 3), ("gpu", True), ("cpus_per_worker", 0.5),
                                          ("strategy", "deepspeed"), ("resources_per_worker", {"x": 1})])
def test_runs_of_a_sequence_share_the_worker_group(tmp_path, handed, field, value):
    with pytest.raises(ValueError, match=f"share one worker group: run 2 \\(b\\) has {field}="):
        train.run_sequence([settings(tmp_path, "projector", "a"), settings(tmp_path, "qlora", "b", **{field: value})])
    assert not handed


def test_sequence_errors_name_the_problem(tmp_path, handed):
    with pytest.raises(ValueError, match="run 2 of a sequence \\(b\\) starts from run 1's final checkpoint .*/a/final, "
                                         "not from --init /elsewhere"):
        train.run_sequence([settings(tmp_path, "projector", "a"), settings(tmp_path, "qlora", "b", init="/elsewhere")])
    with pytest.raises(ValueError, match="different names"):
        train.run_sequence([settings(tmp_path, "projector", "a"), settings(tmp_path, "qlora", "a")])
    with pytest.raises(ValueError, match="at least one run"):
        train.run_sequence([])
    assert not handed


def test_checkpoints_of_another_run_are_not_a_runs_own(tmp_path):
    """In the folder a sequence shares, a checkpoint belongs to the run its
    mmphi.json names; one without a name belongs to the folder's own run."""
    import torch

    root = tmp_path / "runs" / "a"
    for folder, run, step in (("checkpoint_1", "a", 5), ("checkpoint_b_2", "b", 9), ("checkpoint_3", None, 7)):
        (root / folder).mkdir(parents=True)
        (root / folder / "mmphi.json").write_text(json.dumps({"extra": {"step": step} | ({"run": run} if run else {})}))
        torch.save({"step": step}, root / folder / "train_state.pt")
    a = RunOutputs(str(tmp_path / "runs"), "a")
    b = RunOutputs(str(tmp_path / "runs"), "b", checkpoints="a")
    assert a.newest_checkpoint() == (7, str(root / "checkpoint_3"))
    assert b.newest_checkpoint() == (9, str(root / "checkpoint_b_2"))
    assert not b.wrote(str(root / "checkpoint_3")) and not b.wrote(str(root / "checkpoint_1"))
    assert train.checkpoint_dir_name("a", "a") is None
    assert train.checkpoint_dir_name("b", "a").startswith("checkpoint_b_")


PLAN = """
data: {root}/d
embeddings: {root}/e
out: {root}/runs
workers: 2
cpus_per_worker: 0.5
overrides: [llm.lora.r=8]
runs:
  - {{stage: projector, name: s1, steps: 20, lr: 1e-3}}
  - {{stage: qlora, name: s2, steps: 40, resources_per_worker: {{}}}}
"""


def test_a_plan_file_is_a_sequence(tmp_path, handed):
    """``mmphi train plan FILE``: shared settings, then each run's own, in order."""
    from mmphi.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(root=tmp_path))
    write_train_inputs(tmp_path)
    with pytest.raises(handed.Stop):
        main(["train", "plan", str(plan)])
    runs = [r["settings"] for r in handed["train_loop_config"]["runs"]]
    assert [(r["stage"], r["name"], r["steps"], r["workers"], r["cpus_per_worker"]) for r in runs] == \
        [("projector", "s1", 20, 2, 0.5), ("qlora", "s2", 40, 2, 0.5)]
    assert runs[0]["lr"] == 1e-3 and runs[1]["lr"] == train.TrainSettings.lr  # YAML 1.1 reads 1e-3 as text
    assert runs[1]["init"] == str(tmp_path / "runs" / "s1" / "final")
    assert [r["model_config"]["llm"]["lora"]["r"] for r in handed["train_loop_config"]["runs"]] == [8, 8]


@pytest.mark.parametrize("text, says", [
    ("runs: []", "non-empty list 'runs'"),
    ("- a\n- b", "non-empty list 'runs'"),
    ("runs: [{stage: projector, stpes: 3}]", "run 1: unknown setting 'stpes'; settings are: stage, data"),
    ("data: d\nruns: [{stage: projector, embeddings: e}]", "run 1 has no out"),
    ("data: d\nembeddings: e\nout: o\nruns: [{stage: projector, steps: '20'}]", "run 1: steps must be int, got '20'"),
    ("data: d\nembeddings: e\nout: o\ngpu: 1\nruns: [{stage: projector}]", "gpu must be bool, got 1"),
    ("workers: true\nruns: [{stage: projector}]", "workers must be int, got True"),
    ("overrides: [1]\nruns: [{stage: projector}]", "overrides is a list of KEY=VALUE strings"),
    ("runs: [projector]", "run 1 is not a mapping of settings: 'projector'"),
    ("runs: [{stage: projector, compile: on}]", "compile must be str, got True (YAML reads on/off/yes/no as booleans"),
    ("runs: [{stage: projector\n", "not valid YAML"),
])
def test_plan_errors_name_the_file_the_run_and_the_setting(tmp_path, text, says):
    from ray_jobs.plan import PlanError, load_plan

    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(PlanError, match=str(plan).replace(".", r"\.") if "YAML" in says else None) as e:
        load_plan(plan)
    assert says in str(e.value) and str(plan) in str(e.value)
    with pytest.raises(PlanError, match="plan file .*missing.yaml does not exist"):
        load_plan(tmp_path / "missing.yaml")


def test_the_readme_plan_is_a_valid_plan(tmp_path):
    from pathlib import Path

    from ray_jobs.plan import load_plan

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    text = readme.split("cat > plan.yaml <<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    (tmp_path / "plan.yaml").write_text(text)
    s1, s2 = load_plan(tmp_path / "plan.yaml")
    assert (s1.stage, s1.name, s1.steps, s2.stage, s2.name, s2.steps) == ("projector", "s1", 200, "qlora", "s2", 1000)
    assert s1.workers == s2.workers == 2 and s1.data == s2.data == "data/synth"


def test_every_setting_has_a_plan_type():
    """Each ``TrainSettings`` field, at its default, passes the plan's type check."""
    import dataclasses

    from ray_jobs.plan import _check

    for f in dataclasses.fields(train.TrainSettings):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = "x" if value is dataclasses.MISSING else value
        assert _check({f.name: value}, "plan") == {f.name: value}


def test_the_cluster_plan_is_the_guides_two_training_jobs():
    """``deploy/llava-plan.yaml`` holds the settings of the two training jobs
    that docs/operations.md submits one by one."""
    import argparse
    import dataclasses
    import re
    import shlex
    from pathlib import Path

    from ray_jobs.plan import load_plan

    root = Path(__file__).parent.parent
    doc = re.sub(r"\\\n\s*", " ", (root / "docs" / "operations.md").read_text())
    jobs = {}
    for stage in ("projector", "qlora"):
        line = next(ln for ln in doc.splitlines() if f"python -m ray_jobs.train {stage} " in ln)
        p = argparse.ArgumentParser()
        train.add_arguments(p, stage)
        jobs[stage] = train.settings_from_args(stage, p.parse_args(shlex.split(line.split(f"ray_jobs.train {stage}", 1)[1])))
    s1, s2 = load_plan(root / "deploy" / "llava-plan.yaml")
    assert dataclasses.asdict(s1) == dataclasses.asdict(jobs["projector"])
    # the guide's stage 2 names its --init, and takes its model from there (the preset is stage 1's)
    assert jobs["qlora"].init == f"{s1.out}/{s1.name}/final" and s2.init is None
    assert dataclasses.asdict(s2) | {"init": None, "preset": None} == \
        dataclasses.asdict(jobs["qlora"]) | {"init": None, "preset": None}


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "--steps must be an integer of 1 or more, got 0"),
    ({"steps": -3}, "--steps must be"),
    ({"batch_size": 0}, "--batch-size must be"),
    ({"workers": 0}, "--workers must be"),
    ({"eval_every": 0}, "--eval-every must be"),
    ({"ckpt_every": 0}, "--ckpt-every must be"),
    ({"warmup": -1}, "--warmup must be an integer of 0 or more"),
    ({"lr": -1.0}, "--lr must be a finite number above 0"),
    ({"lr": float("nan")}, "--lr must be a finite number above 0"),
    ({"lr": 0}, "--lr must be"),
])
def test_settings_refuse_numbers_the_job_cannot_run_with(values, message):
    with pytest.raises(train.SettingsError, match=message):
        train.TrainSettings(stage="projector", data="d", embeddings="e", out="o", **values)
    s = train.TrainSettings(stage="projector", data="d", embeddings="e", out="o", warmup=0, max_failures=-1)
    for k, v in values.items():  # changed after they were made: refused before any start-up
        setattr(s, k, v)
    with pytest.raises(train.SettingsError, match=message):
        train.prepare_sequence([s])


@pytest.mark.parametrize("name, message", [
    ("../elsewhere", "must name a folder inside --out"),
    ("/tmp/run", "must name a folder inside --out"),
    ("exp//s1", "must name a folder inside --out"),
    ("exp/", "must name a folder inside --out"),
    ("s1 ", "no spaces around it"),
    ("a\\b", "no backslash"),
    ("", "--name is blank"),
    ("  ", "--name is blank"),
])
def test_a_run_name_that_is_not_a_folder_inside_out_is_refused(name, message, tmp_path):
    """A run name is a folder inside --out: one that would escape it ('..', an
    absolute path) or make an odd folder (blank, spaces around it, '//') is
    refused before anything starts; nothing is written."""
    s = train.TrainSettings(stage="projector", data="d", embeddings="e", out=str(tmp_path / "runs"), name=name)
    with pytest.raises(train.SettingsError, match=re.escape(message)):
        train.prepare_sequence([s])
    assert not (tmp_path / "runs").exists()
    for good in (None, "s1", "exp/s1", "x y", "v1.2"):
        train.check_run_name(good)


def test_a_plan_with_bad_numbers_names_the_run(tmp_path):
    from ray_jobs.plan import PlanError, load_plan

    plan = tmp_path / "plan.yaml"
    plan.write_text("data: d\nembeddings: e\nout: o\nruns:\n  - {stage: projector, steps: -1, batch_size: 0}\n")
    with pytest.raises(PlanError, match=r"run 1: --steps must be an integer of 1 or more, got -1"):
        load_plan(plan)


def test_inputs_are_checked_on_the_driver_before_ray(tmp_path, monkeypatch):
    """A missing data folder, a corrupt train.json or embeddings without a
    manifest fail in the driver with the workers' own message; no run folder
    is left behind."""
    import ray_jobs.train as T

    monkeypatch.setattr("data_pipelines.embed.init_ray", lambda *a, **k: pytest.fail("Ray started"))

    def refused(data, embeddings, message):
        s = T.TrainSettings(stage="projector", data=str(data), embeddings=str(embeddings), out=str(tmp_path / "runs"))
        with pytest.raises(T.SettingsError, match=message):
            T.run(s)
        assert not (tmp_path / "runs").exists()

    (tmp_path / "emb").mkdir()
    refused(tmp_path / "nosuch", tmp_path / "emb", "data set folder .*nosuch does not exist")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text('[{"id":')
    (data / "val.json").write_text("[]")
    refused(data, tmp_path / "emb", r"train\.json is not valid JSON")
    (data / "train.json").write_text("[]")
    refused(data, tmp_path / "emb", r"the train split of .*data has 0 conversation\(s\) with an image")
    (data / "train.json").write_text(json.dumps([{"id": "1", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}]))
    refused(data, tmp_path / "emb", "has no manifest.json: run the embedding job first")
    (tmp_path / "emb" / "manifest.json").write_text("{oops")
    refused(data, tmp_path / "emb", r"manifest\.json is not valid JSON")


def test_the_command_prints_a_settings_error_as_one_line(capsys):
    from mmphi.cli import main

    assert main(["train", "projector", "--data", "d", "--embeddings", "e", "--out", "o", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "mmphi train: --steps must be an integer of 1 or more, got 0\n", err


def test_overrides_an_init_checkpoints_adapter_would_not_follow_are_refused_on_the_driver(tmp_path, handed,
                                                                                         tiny_model):
    """Stage 2 from a checkpoint with a LoRA adapter loads that adapter as it
    was trained: a --set llm.lora.r=4 would be ignored in every worker, so the
    driver refuses it before Ray starts; the stage's own switch passes."""
    from models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tiny_model, tmp_path / "init")
    with pytest.raises(ValueError, match=r"\(llm.lora.r: the override has 4, but its adapter was trained with 16\)"):
        train.run_sequence([settings(tmp_path, "qlora", "b", init=str(ckpt), overrides=["llm.lora.r=4"])])
    assert not handed
    with pytest.raises(handed.Stop):
        train.run_sequence([settings(tmp_path, "qlora", "b", init=str(ckpt), overrides=["llm.lora.enabled=true"])])
