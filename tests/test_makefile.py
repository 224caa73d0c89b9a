"""The Makefile: `make help` lists what the docs name, and `make setup` refuses
a disk without room for the environment before it creates anything."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(*args, cwd=ROOT):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_command_the_docs_name():
    out = make("help")
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^\s+make (\S+)", out.stdout, re.M))
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = set()
    for doc in docs:
        named |= set(re.findall(r"`make ([a-z][a-z0-9-]*)", doc.read_text()))
    assert named, "the docs name no make command"
    assert named <= listed | {"help"}, f"named in the docs, missing from make help: {named - listed}"
    assert {"demo", "test", "setup", "check-disk"} <= listed


def test_setup_refuses_a_disk_without_room_before_creating_the_venv(tmp_path):
    venv = tmp_path / "env"
    out = make("setup", f"VENV={venv}", "MIN_FREE_MB=999999999")
    assert out.returncode != 0
    assert "needs about 999999999 MB free" in out.stderr
    assert str(tmp_path) in out.stderr  # names the folder it measured
    assert "VENV=" in out.stderr        # and says how to put it elsewhere
    assert not venv.exists(), "the venv was created before the disk check"


def test_check_disk_reports_the_free_space_when_there_is_room(tmp_path):
    out = make("check-disk", f"VENV={tmp_path / 'env'}", "MIN_FREE_MB=1")
    assert out.returncode == 0, out.stderr
    free = int(re.search(r"disk: (\d+) MB free", out.stdout).group(1))
    assert abs(free - shutil.disk_usage(tmp_path).free // 2**20) < 512
