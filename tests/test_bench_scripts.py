"""The benchmark scripts are not tests (they take minutes); this only checks that they start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_training_help_lists_its_options_without_training() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_training.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--steps", "--repeats", "--contention", "--threads"):
        assert option in done.stdout
