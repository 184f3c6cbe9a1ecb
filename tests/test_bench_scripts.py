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


def test_bench_cache_and_bench_embeddings_list_their_options() -> None:
    for script, options in (
        ("bench_cache.py", ("--sizes", "--repeats", "--dir")),
        ("bench_embeddings.py", ("--sections", "--run-texts", "--memory-texts")),
    ):
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        for option in options:
            assert option in done.stdout, (script, option)
