"""``mmphi serve``: the chat page and OpenAI-compatible API on a local Ray cluster."""
from __future__ import annotations

import argparse
import sys

from mmphi.cli import device_arg, positive_int


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    n = positive_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{n} is out of range (1 to 65535)")
    return n


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the chat page and the OpenAI-compatible API with Ray Serve",
        description="Run the Ray Serve application (Whisper, image encoder and Phi-3 deployments behind one "
                    "HTTP ingress) on a local Ray cluster: a Gradio chat page at / and an OpenAI-compatible "
                    "API under /v1. Without --checkpoint the preset's weights are served (random for tiny). "
                    "Set the environment variable MMPHI_API_KEY to require 'Authorization: Bearer <key>' "
                    "on /v1. For a cluster, use `serve deploy serve/config.yaml` instead.")
    p.add_argument("--checkpoint", help="checkpoint folder written by training, e.g. runs/demo/runs/stage2/final")
    p.add_argument("--preset", default=None, help="preset or config file when no checkpoint is given (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="runtime model override, e.g. --set llm.load_in_4bit=true (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--config", default=None,
                   help="Serve config YAML with application args and per-deployment options "
                        "(default: serve/config.yaml)")
    p.add_argument("--device", default=None, type=device_arg,
                   help="torch device of the model replicas: cpu, cuda, cuda:N or mps (default: cuda if present)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs in chat requests")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="logical CPUs of the local Ray cluster (default: max(4, cores))")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serve.app import DEFAULT_CONFIG, run_local
    from serve.settings import SettingsError

    settings: dict = {}
    if args.preset:
        settings["preset"] = args.preset
    if args.overrides:
        settings["overrides"] = args.overrides
    if args.device:
        settings["device"] = args.device
    if args.allow_remote_images:
        settings["allow_remote_images"] = True
    if args.checkpoint:  # a wrong folder is named before Ray starts
        from models.checkpoint import CheckpointError, read_meta

        try:
            read_meta(args.checkpoint)
        except (FileNotFoundError, CheckpointError) as e:
            print(f"mmphi serve: {e}", file=sys.stderr)
            return 2
    try:
        run_local(args.checkpoint, args.port, blocking=True, host=args.host, settings=settings,
                  config=args.config or DEFAULT_CONFIG, num_cpus=args.num_cpus)
    except (SettingsError, RuntimeError, FileNotFoundError) as e:
        print(f"mmphi serve: {e}", file=sys.stderr)
        return 2
    return 0
