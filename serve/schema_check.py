"""Whether xgrammar can compile a request's schema, found within a time limit.

Some small schemas take xgrammar long to turn into a grammar: a ``pattern``
such as ``(a|b|c){1,5000}`` (58 bytes) takes 11 s of CPU on one core, and
the time grows with the square of the count; objects nested a few hundred
deep take seconds too. A thread cannot be stopped, so the ingress compiles
each new schema in a child process (:class:`Checker`, one per ingress
replica, started at the first schema it has not seen), and kills it when a
schema takes longer than ``limits.max_schema_seconds``: that request gets a
400 naming the limit, the next new schema starts a fresh child, and the
ingress itself never spends the time.

The child is this module run as a script: it reads ``[kind, text]`` JSON
lines from stdin and writes ``{"problem": ...}`` lines (None when the schema
compiles), after one ``{"ready": true}`` line once xgrammar is imported.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("ray.serve")

_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[10:15:45] /project/cpp/x.cc:94: " before the message
STARTUP_S = 120.0  # importing xgrammar (and torch) in the child


def message(e: Exception) -> str:
    """xgrammar's error message without its C++ source prefix."""
    return _XGR_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__


def compile_kwargs() -> dict:
    return {"any_whitespace": False, "strict_mode": True}


def problem_here(kind: str, text: str) -> str | None:
    """In this process: None when xgrammar compiles the text (``kind``
    "schema": a JSON schema; "tag": a structural tag), else what is wrong."""
    import xgrammar as xgr

    try:
        if kind == "tag":
            xgr.Grammar.from_structural_tag(text)
        else:
            xgr.Grammar.from_json_schema(text, **compile_kwargs())
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError (or a ValueError) with the message
        return message(e)
    return None


class Checker:
    """The child process that compiles schemas for :func:`problem`, one at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        proc = subprocess.Popen([sys.executable, "-m", "serve.schema_check"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=root)
        if self._line(proc, STARTUP_S) != {"ready": True}:
            proc.kill()
            proc.wait()
            raise RuntimeError("the schema checker process did not start")
        return proc

    @staticmethod
    def _line(proc: subprocess.Popen, timeout_s: float) -> dict | None:
        """The child's next JSON line, or None when none came within ``timeout_s`` (or the child ended)."""
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = proc.stdout.readline()
        return json.loads(line) if line else None

    def problem(self, kind: str, text: str, timeout_s: float) -> str | None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            proc.stdin.write(json.dumps([kind, text]).encode() + b"\n")
            proc.stdin.flush()
            start = time.monotonic()
            answer = self._line(proc, timeout_s)
            if answer is not None:
                return answer["problem"]
            proc.kill()
            proc.wait()
            self._proc = None
            if time.monotonic() - start < timeout_s:  # it ended, not timed out: xgrammar crashed on it
                return "xgrammar could not compile it (the process compiling it ended)"
            log.warning("a schema took over %g s to compile; its checker process was stopped", timeout_s)
            return (f"compiling it takes over {timeout_s:g} s, this server's limit; simplify it (long repetitions "
                    "in a 'pattern', deeply nested objects)")


_checker: Checker | None = None
_checker_lock = threading.Lock()


def problem(kind: str, text: str, timeout_s: float | None) -> str | None:
    """What is wrong with a schema (``kind`` "schema") or structural tag
    ("tag"), or None when xgrammar compiles it; compiled in the checker
    process within ``timeout_s``, or in this process when ``timeout_s`` is
    None (or the process cannot start)."""
    global _checker
    if timeout_s is None:
        return problem_here(kind, text)
    with _checker_lock:
        if _checker is None:
            _checker = Checker()
    try:
        return _checker.problem(kind, text, timeout_s)
    except (OSError, RuntimeError) as e:
        log.warning("checking a schema in this process (%s)", e)
        return problem_here(kind, text)


def main() -> None:
    import xgrammar  # noqa: F401 - imported before saying ready, so the time limit counts compiling only

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        kind, text = json.loads(line)
        out.write(json.dumps({"problem": problem_here(kind, text)}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
