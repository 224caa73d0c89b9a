"""``mmphi data``: make and prepare data sets (synthetic data, CLIP embeddings)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("data", help="data sets: generate synthetic data, embed images with Ray Data",
                       description="Data set commands.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    s = dsub.add_parser("synth", help="write a learnable synthetic data set in LLaVA format",
                        description="Images of coloured shapes and questions about them (colour, shape, "
                                    "position, count, size; some multi-turn, some text-only; optionally tool use), split into "
                                    "train/val by image. Deterministic by --seed.")
    s.add_argument("--out", required=True, help="output folder (train.json, val.json, images/, synth.json)")
    s.add_argument("--images", type=int, default=600, help="number of images (default: 600)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out (default: 0.2)")
    s.add_argument("--tool-records", type=float, default=0.0, metavar="FRACTION",
                   help="add tool-use records (a request about a one-object image that one of two functions "
                        "answers, with the object's colour or grid cell as its argument), this many per image "
                        "(default: 0, none)")
    s.add_argument("--workers", type=int, default=None,
                   help="processes drawing the images (default: one per core, at most 8, from 1,000 images; "
                        "the output does not depend on it)")
    s.set_defaults(func=_synth)

    from data_pipelines.embed import add_arguments

    e = dsub.add_parser("embed", help="precompute CLIP embeddings with Ray Data (resumable)",
                        description="Embed every image a data set references, once, with a Ray Data "
                                    "pipeline (CPU decode tasks -> encoder actor pool -> Parquet shards). "
                                    "Rerunning resumes.")
    add_arguments(e)
    e.set_defaults(func=_embed)


def _synth(args: argparse.Namespace) -> int:
    from data_pipelines.synthetic import main

    return int(main(args) or 0)


def _embed(args: argparse.Namespace) -> int:
    from data_pipelines.embed import main

    return main(args)
