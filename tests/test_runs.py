from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import Run, allocate_run_dir


def test_run_dirs_are_numbered_zero_padded_and_never_reused(tmp_path: Path) -> None:
    first = allocate_run_dir(tmp_path)
    second = allocate_run_dir(tmp_path)
    (tmp_path / "run_007").mkdir()
    after_gap = allocate_run_dir(tmp_path)
    assert [first.name, second.name, after_gap.name] == ["run_001", "run_002", "run_008"]


def _allocate(root: str, barrier: multiprocessing.synchronize.Barrier, queue: multiprocessing.Queue) -> None:
    barrier.wait()
    queue.put(allocate_run_dir(root).name)


def test_concurrent_processes_get_distinct_run_dirs(tmp_path: Path) -> None:
    count = 8
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    queue = context.Queue()
    processes = [context.Process(target=_allocate, args=(str(tmp_path), barrier, queue)) for _ in range(count)]
    for process in processes:
        process.start()
    names = [queue.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert sorted(names) == [f"run_{i:03d}" for i in range(1, count + 1)]


def test_output_root_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create output root"):
        allocate_run_dir(blocker / "outputs")


def test_status_records_stage_timings_and_failure(tmp_path: Path) -> None:
    run = Run.create(tmp_path)
    with run.stage("data"):
        pass
    with pytest.raises(RuntimeError), run.stage("model"):
        raise RuntimeError("boom")
    run.finish("failed", RuntimeError("boom"))
    status = json.loads((run.dir / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["stages"]["data"]["state"] == "succeeded"
    assert status["stages"]["model"]["state"] == "failed"
    assert status["error"] == "RuntimeError: boom"
    assert "stage data: started" in (run.dir / "experiment.log").read_text()
