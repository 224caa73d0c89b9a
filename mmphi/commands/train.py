"""``mmphi train projector|qlora|plan`` (the Ray Train jobs) and ``mmphi eval``."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from ray_jobs.train import add_arguments, add_plan_arguments

    p = sub.add_parser("train", help="train with Ray Train: stage 1 projector, stage 2 (Q)LoRA",
                       description="Ray Train jobs on precomputed embeddings. Same --name and --out resumes.")
    tsub = p.add_subparsers(dest="train_stage", metavar="STAGE", required=True)
    s1 = tsub.add_parser("projector", help="stage 1: train the projector (Phi-3 and CLIP frozen)")
    add_arguments(s1, "projector")
    s1.set_defaults(func=lambda a: _run("projector", a))
    s2 = tsub.add_parser("qlora", help="stage 2: instruction-tune Phi-3 with (Q)LoRA and the projector")
    add_arguments(s2, "qlora")
    s2.set_defaults(func=lambda a: _run("qlora", a))
    seq = tsub.add_parser("plan", help="several runs in order (stage 1, then stage 2 ...) in one Ray Train run, "
                                       "from a YAML plan file",
                          description="Runs listed in a plan file, trained in order by one worker group: each run "
                                      "after the first starts from the previous one's final/. Same file resumes.")
    add_plan_arguments(seq)
    seq.set_defaults(func=lambda a: _run("plan", a))

    from ray_jobs.evaluate import add_arguments as eval_arguments

    e = sub.add_parser("eval", help="held-out metrics of a checkpoint (answer accuracy per question type)",
                       description="Validation loss, perplexity, token accuracy and per-type answer accuracy of a "
                                   "checkpoint, with the blind (image replaced by the training mean) baseline.")
    eval_arguments(e)
    e.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from ray_jobs.evaluate import main

    return main(args)


def _run(stage: str, args: argparse.Namespace) -> int:
    from ray_jobs.train import main

    return main(stage, args)
