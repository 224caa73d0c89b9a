"""The test run's own set-up (tests/conftest.py): its private weights cache is
removed when pytest ends, and pytest's exit status survives the fast exit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_removes_its_own_cache_and_keeps_its_exit_status(tmp_path):
    probe = tmp_path / "test_probe.py"
    seen = tmp_path / "cache.txt"
    probe.write_text(
        "import os\n"
        "from pathlib import Path\n\n"
        "def test_cache_is_set():\n"
        f"    Path({str(seen)!r}).write_text(os.environ['MMPHI_CACHE'])\n"
        "    assert os.path.isdir(os.environ['MMPHI_CACHE'])\n\n"
        "def test_fails():\n"
        "    assert False\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MMPHI_CACHE", "MMPHI_TEST_FULL_TEARDOWN")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), str(probe)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr  # one test failed: the fast exit keeps that
    assert "1 failed, 1 passed" in run.stdout
    cache = Path(seen.read_text())
    assert cache.name.startswith("mmphi-test-cache-")
    assert not cache.exists()
