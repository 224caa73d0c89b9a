"""Cluster deployment: Ray cluster launcher config, KubeRay manifests and their generator."""
from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(files: dict[Path, str], check: bool, command: str) -> int:
    """Write each generated file, or with ``check`` write nothing and return 1
    if one on disk differs from its text (naming ``command`` to regenerate)."""
    stale = 0
    for out, text in files.items():
        if check:
            if not out.is_file() or out.read_text() != text:
                print(f"{out}: differs from the generator's output; run: {command}", file=sys.stderr)
                stale += 1
            else:
                print(f"{out}: up to date")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 1 if stale else 0
