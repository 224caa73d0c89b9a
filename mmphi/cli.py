"""``mmphi``: the platform's command line.

Each stage lives in its own module exposing ``register(subparsers)``; a new
stage plugs in by adding its module to ``COMMANDS``. Heavy imports (torch,
Ray) happen inside the commands, so ``mmphi --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import shutil
import sys

from . import __version__

COMMANDS = [
    "mmphi.commands.data",
    "mmphi.commands.demo",
    "mmphi.commands.model",
    "mmphi.commands.serve",
    "mmphi.commands.train",
]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds the model."""
    p.add_argument("--preset", default="tiny",
                   help="preset name (tiny, phi3-mini) or a .yaml/.json config file (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set llm.lora.r=8 (repeatable)")
    p.add_argument("--device", default=None, type=device_arg,
                   help="torch device: cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")


def device_arg(value: str) -> str:
    """A ``--device`` value torch can place a model on, checked without
    importing torch (so a wrong one is a usage error at once)."""
    from models.config import check_device_name

    try:
        return check_device_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def float_between(lo: float, hi: float):
    """An argparse ``type``: a number from ``lo`` to ``hi``."""
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not lo <= x <= hi:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{value} is not between {lo:g} and {hi:g}")
        return x

    return parse


unit_float = float_between(0.0, 1.0)


def positive_int(value: str) -> int:
    """An argparse ``type``: an integer of 1 or more."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is below 1")
    return n


def positive_float(value: str) -> float:
    """An argparse ``type``: a finite number above 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number above 0")
    return x


def quiet_third_party(verbose: bool = False) -> None:
    """Our own INFO logs; only warnings from libraries (open_clip logs its
    model parsing at INFO on the root logger). bitsandbytes' notice about an
    optional CPU kernel package goes in every process (``models``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("models", "mmphi", "data_pipelines", "ray_jobs", "serve"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmphi",
        description="A multimodal Phi-3 (sees images with CLIP, hears audio with Whisper, chats with "
                    "QLoRA-tuned Phi-3), trained and served on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmphi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        # DeepSpeed (imported by accelerate while saving) otherwise prints its
        # accelerator guess to stdout, mixing it into command output
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = build_parser().parse_args(argv)
    quiet_third_party(args.verbose)
    from models.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"mmphi {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmphi {args.command}: interrupted", file=sys.stderr)
        return 130
