"""Resources: a disk that fills while a run writes ends the run with one clear line and status.json `failed`.

Two ways to fill it: a patched write (every new file fails with ENOSPC from the moment the run writes its
predictions; works anywhere), and a real 400 KiB tmpfs mounted in a user and mount namespace (`unshare -rm`,
where the kernel allows it), which the run fills itself while drawing its figures.
(Memory for large corpora is benchmarked by scripts/, beside the embedding cache.)
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import cache_with_model
from procs import EMBEDDINGS, REPO, WAIT_S, child_env, error_lines, read_json

from qlora_pipeline import runs
from qlora_pipeline.cli import main
from qlora_pipeline.reporting import report


def test_a_disk_that_fills_during_a_run_fails_it_in_one_line(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_CACHE_DIR", str(cache_with_model(tmp_path, tiny_model)))
    full = {"now": False}

    def no_space(*args: Any, **kwargs: Any) -> None:
        full["now"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    atomic = runs.write_text_atomic

    def new_files_fail(path: Path, text: str) -> None:  # once full, no new file can be made
        if full["now"]:
            no_space()
        atomic(path, text)

    monkeypatch.setattr(pd.DataFrame, "to_csv", no_space)  # the first predictions.csv fills the disk
    monkeypatch.setattr(runs, "write_text_atomic", new_files_fail)  # status.json, config.json, ... from then on
    monkeypatch.setattr(report, "write_text_atomic", new_files_fail)  # experiment_report.md
    capsys.readouterr()
    assert main([*EMBEDDINGS, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("qlora: error: No space left on device: free some space")
    assert "run_001 is marked failed" in lines[0]
    status = read_json(tmp_path / "out" / "run_001" / "status.json")  # written over the old one, in place
    assert status["state"] == "failed" and "No space left on device" in status["error"]
    assert status["stages"]["evaluation"]["state"] == "failed"


def test_status_is_written_in_place_when_no_new_file_can_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = runs.Run.create(tmp_path)
    assert (run.dir / "status.json").stat().st_size == runs.STATUS_BYTES  # room kept for the final status

    def no_space(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "write_text_atomic", no_space)
    run.finish("failed", OSError(errno.ENOSPC, "No space left on device"))
    assert read_json(run.dir / "status.json")["state"] == "failed"
    assert not [p for p in run.dir.iterdir() if p.name.startswith(".")]  # no temp file left behind


def can_mount_a_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow  # a real run (~10 s of CPU) on a real, tiny filesystem
def test_a_run_on_a_real_full_filesystem_fails_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    if not can_mount_a_tmpfs():
        pytest.skip(
            "this kernel does not let an unprivileged user mount a tmpfs (unshare -rm); the patched test stands"
        )
    mount = tmp_path / "small"
    mount.mkdir()
    cache = cache_with_model(tmp_path, tiny_model)
    args = [*EMBEDDINGS, "--set", "evaluation.figures=true", "--output-dir", str(mount / "out")]
    qlora = " ".join(f"'{a}'" for a in [sys.executable, "-m", "qlora_pipeline", *args])
    script = (
        f"mount -t tmpfs -o size=400k tmpfs '{mount}' && cd '{REPO}' && {qlora} 2>'{tmp_path}/stderr'; "
        f"echo \"exit=$?\"; cat '{mount}/out/run_001/status.json'"  # the mount ends with the namespace
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=child_env(cache), timeout=WAIT_S
    )
    first, _, status_text = result.stdout.partition("\n")
    stderr = (tmp_path / "stderr").read_text(encoding="utf-8")
    assert first == "exit=2", (result.stdout, stderr)
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run_001 is marked failed" in lines[0]
    status = json.loads(status_text)
    assert status["state"] == "failed" and "No space left on device" in status["error"]
