"""Interrupt anywhere: SIGINT, SIGTERM and SIGKILL sent to a real `qlora` process at named points of a run.

Each test starts the command as a process (harness.py pauses it at the point, from outside the package), sends the
signal there and checks what is left: SIGINT and SIGTERM end it with one line and status.json `interrupted`;
after SIGKILL, which nothing can record, the next command that reads the run (predict, compare, reproduce,
resume) finds its process gone and records `interrupted` itself. Rerunning an embeddings run, or resuming a
QLoRA run, then ends with exactly the results of a run never interrupted.

Default suite: the data stage under each signal, and the dead-process checks in-process. The rest of the matrix
(10 points of the two paths) is marked slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from procs import EMBEDDINGS, EXIT_CODES, QLORA, error_lines, read_json, start

from qlora_pipeline import runs
from qlora_pipeline.cli import main
from qlora_pipeline.reproduce import compare_runs
from qlora_pipeline.training.checkpoints import MARKER

STAGE_OF = {  # the stage a point lies in
    "data": "data",
    "encode": "embeddings",
    "cache_put": "embeddings",
    "heads": "classifiers",
    "evaluation": "evaluation",
    "report": "report",
    "train_step": "training",
    "checkpoint": "training",
    "rotation": "training",
    "adapter_save": "save",
}


def interrupt_at(tmp_path: Path, cache: Path, args: list[str], point: str, signal_name: str) -> tuple[Path, int, str]:
    """Run `qlora ARGS` into tmp_path/out, hold it at `point`, send the signal; (run directory, exit code, stderr)."""
    root = tmp_path / "out"
    process = start([*args, "--output-dir", str(root)], tmp_path, cache, point=point)
    process.wait_held()
    code = process.interrupt(signal_name)
    return root / "run_001", code, process.stderr()


def assert_recorded(run: Path, code: int, stderr: str, point: str, signal_name: str, capsys: Any) -> None:
    """The run says it was interrupted, in the stage of `point`: at once (SIGINT, SIGTERM), or as soon as a later
    command looks at it (SIGKILL)."""
    assert code == EXIT_CODES[signal_name], stderr
    assert "Traceback" not in stderr, stderr
    stage = STAGE_OF[point.partition(":")[0]]
    if signal_name == "SIGKILL":
        assert read_json(run / "status.json")["state"] == "running"  # nothing could record the end
        capsys.readouterr()
        assert main(["predict", "--run", str(run), "--text", "好"]) == 2  # a later command finds the process gone
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "is interrupted (the run ended without recording how: its process" in lines[0]
    else:
        assert error_lines(stderr) == [f"qlora: interrupted ({signal_name})"]
        assert "INTERRUPTED" in (run / "experiment_report.md").read_text(encoding="utf-8")
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted"
    assert status["stages"][stage]["state"] == "interrupted", status["stages"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_run_interrupted_while_preparing_its_data_says_so(
    signal_name: str, tmp_path: Path, fresh_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, code, stderr = interrupt_at(tmp_path, fresh_cache, EMBEDDINGS, "data", signal_name)
    assert_recorded(run, code, stderr, "data", signal_name, capsys)


# ---- a run whose process died: recognised by pid (same host) or heartbeat (another host) -----------------------


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def running_status(run: Path, process: dict[str, Any], heartbeat_at: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    status = {"state": "running", "stages": {"training": {"state": "running"}}, "error": None, "process": process}
    (run / "status.json").write_text(json.dumps({**status, "heartbeat_at": heartbeat_at or runs.now_iso()}))


def test_a_running_status_whose_process_died_reads_as_interrupted_and_is_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run_001"
    running_status(run, {**runs.process_identity(), "pid": dead_pid()})
    status = runs.run_state(run)
    assert status["state"] == "interrupted" and "no longer exists" in status["error"]
    assert status["stages"]["training"]["state"] == "interrupted"
    assert read_json(run / "status.json")["state"] == "interrupted"  # the file no longer says running


def test_a_live_run_stays_running(tmp_path: Path) -> None:
    run = tmp_path / "run_001"
    running_status(run, runs.process_identity())  # this very process
    assert runs.run_state(run)["state"] == "running"


def test_a_pid_reused_by_another_process_is_not_mistaken_for_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run_001"
    process = runs.process_identity()
    if process["start_ticks"] is None:
        pytest.skip("no /proc: process start times are not available on this system")
    running_status(run, {**process, "start_ticks": str(int(process["start_ticks"]) - 1)})
    assert "belongs to another process" in runs.run_state(run)["error"]


def test_a_run_on_another_host_is_dead_only_once_its_heartbeat_is_stale(tmp_path: Path) -> None:
    elsewhere = {"pid": os.getpid(), "host": f"not-{socket.gethostname()}", "boot_id": None, "start_ticks": None}
    fresh, stale = tmp_path / "run_001", tmp_path / "run_002"
    running_status(fresh, elsewhere)
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - runs.STALE_AFTER_S - 60))
    running_status(stale, elsewhere, heartbeat_at=old)
    assert runs.run_state(fresh)["state"] == "running"
    assert "has sent no heartbeat" in runs.run_state(stale)["error"]


def test_a_status_written_before_processes_were_recorded_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"state": "running"}))
    assert runs.run_state(tmp_path) == {"state": "running"}


def test_the_heartbeat_refreshes_status_while_a_run_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.05)
    run = runs.Run.create(tmp_path)
    first = read_json(run.dir / "status.json")["heartbeat_at"]
    deadline = time.monotonic() + 30
    while read_json(run.dir / "status.json")["heartbeat_at"] == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_json(run.dir / "status.json")["heartbeat_at"] > first
    assert read_json(run.dir / "status.json")["process"]["pid"] == os.getpid()
    run.finish("succeeded")


@pytest.mark.parametrize("command", ["predict", "compare", "reproduce", "resume", "resume auto"])
def test_every_command_that_reads_a_run_recognises_a_dead_one(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run SIGKILLed mid-training (status.json still `running`, its process gone): each command says so in one
    line instead of waiting for it or treating it as finished; `--resume auto` takes it as unfinished."""
    run = tmp_path / "run_001"
    running_status(run, {**runs.process_identity(), "pid": dead_pid()})
    (run / "config.json").write_text(json.dumps({"config": {"experiment": {"mode": "qlora"}}}))
    for name in ("metrics.json", "data_summary.json"):
        (run / name).write_text("{}")
    argv = {
        "predict": ["predict", "--run", str(run), "--text", "好"],
        "compare": ["compare", str(run), str(run)],
        "reproduce": ["reproduce", str(run)],
        "resume": ["resume", str(run)],
        "resume auto": ["run", "--config", "qlora_tiny", "--output-dir", str(tmp_path), "--resume", "auto"],
    }[command]
    if command == "resume auto":  # no checkpoint to continue: a fresh start, which the test does not run
        from qlora_pipeline.config import load_config
        from qlora_pipeline.training.checkpoints import resolve_resume

        assert resolve_resume("auto", load_config("qlora_tiny"), tmp_path) is None
    else:
        assert main(argv) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1, lines
        expected = "no checkpoint there" if command == "resume" else "is interrupted (the run ended without recording"
        assert expected in lines[0]
    assert read_json(run / "status.json")["state"] == "interrupted"


def test_resume_refuses_a_run_whose_process_still_lives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run_001"
    running_status(run, runs.process_identity())
    (run / "config.json").write_text(json.dumps({"config": {"experiment": {"mode": "qlora"}}}))
    assert main(["resume", str(run)]) == 2
    assert "is still running" in capsys.readouterr().err


# ---- the matrix: every point of both paths, each with a signal; reruns and resumes match -----------------------


@pytest.fixture
def embeddings_reference(embeddings_run: tuple[Path, Path]) -> Path:
    """The small embeddings run, never interrupted, with a cold cache of its own (conftest's)."""
    return embeddings_run[0]


@pytest.fixture
def qlora_reference(uninterrupted: Path) -> Path:
    """procs.QLORA never interrupted (tests/conftest.py's)."""
    return uninterrupted


EMBEDDING_POINTS = [  # (point, signal, rerun and compare): 7 points with the data stage above, each signal 3+ times
    ("encode:5", "SIGINT", False),  # mid-batch: the finished batches are flushed to the cache
    ("encode:5", "SIGTERM", True),
    ("encode:5", "SIGKILL", True),  # the unflushed batches are lost, nothing half-written is kept
    ("cache_put:2", "SIGKILL", True),  # between two cache writes: the first split's vectors are cached
    ("heads", "SIGTERM", False),
    ("evaluation", "SIGINT", False),
    ("report", "SIGKILL", True),  # metrics.json exists, yet the run never reads as succeeded
]


@pytest.mark.slow  # one process per point (~10 s of CPU each), and a rerun where marked
@pytest.mark.parametrize(("point", "signal_name", "rerun"), EMBEDDING_POINTS, ids=lambda v: str(v))
def test_an_embeddings_run_interrupted_anywhere_reruns_to_the_uninterrupted_result(
    point: str,
    signal_name: str,
    rerun: bool,
    tmp_path: Path,
    fresh_cache: Path,
    embeddings_reference: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, code, stderr = interrupt_at(tmp_path, fresh_cache, EMBEDDINGS, point, signal_name)
    assert_recorded(run, code, stderr, point, signal_name, capsys)
    if not rerun:
        return
    monkeypatch.setenv("QLORA_CACHE_DIR", str(fresh_cache))  # the cache the interrupted run wrote into
    assert main([*EMBEDDINGS, "--output-dir", str(run.parent)]) == 0
    comparison = compare_runs(embeddings_reference, run.parent / "run_002")  # metrics, every predictions.csv
    assert comparison["matches"], comparison["checks"]
    splits = read_json(run.parent / "run_002" / "config.json")["embedding"]["splits"]
    computed = {split: record["computed"] for split, record in splits.items()}
    if point == "cache_put:2" or signal_name == "SIGTERM":  # work that finished before the signal was kept
        assert computed["train"] < 84, computed


QLORA_POINTS = [  # (point, signal, the checkpoint a resume continues from)
    ("train_step:3", "SIGKILL", "checkpoint-2"),  # between two checkpoints
    ("checkpoint:4", "SIGKILL", "checkpoint-2"),  # checkpoint-4 half written (adapter only, no marker): skipped
    ("rotation", "SIGKILL", "checkpoint-2"),  # checkpoint-4 half deleted, marker intact: its checksums fail
    # Training over, the adapter not saved yet. checkpoint-6 was saved as early stopping ended training: resumed
    # there, the Trainer trained 2 steps more (a longer log, 8 steps); the resume starts from checkpoint-2 instead.
    ("adapter_save", "SIGINT", "checkpoint-2"),
]


@pytest.mark.slow  # one QLoRA process per point (~15 s of CPU each), then a resume
@pytest.mark.parametrize(("point", "signal_name", "resumed_from"), QLORA_POINTS, ids=lambda v: str(v))
def test_a_qlora_run_interrupted_anywhere_resumes_to_the_uninterrupted_result(
    point: str,
    signal_name: str,
    resumed_from: str,
    tmp_path: Path,
    fresh_cache: Path,
    qlora_reference: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, code, stderr = interrupt_at(tmp_path, fresh_cache, QLORA, point, signal_name)
    assert_recorded(run, code, stderr, point, signal_name, capsys)
    left = run / "checkpoints" / "checkpoint-4"
    if point == "checkpoint:4":  # what the kill left: a checkpoint cut short, without its marker
        assert (left / "adapter_model.safetensors").is_file() and not (left / MARKER).is_file()
    if point == "rotation":  # a checkpoint the Trainer was deleting: its marker still there, a file gone
        assert (left / MARKER).is_file() and not (left / "optimizer.pt").is_file()
    monkeypatch.setenv("QLORA_CACHE_DIR", str(fresh_cache))
    assert main(["resume", str(run)]) == 0
    resumed = run.parent / "run_002"
    assert read_json(resumed / "config.json")["resumed_from"] == str(run / "checkpoints" / resumed_from)
    comparison = compare_runs(qlora_reference, resumed)  # metrics.json and every predictions.csv, byte for byte
    assert comparison["matches"], comparison["checks"]
    assert (resumed / "training_log.csv").read_bytes() == (qlora_reference / "training_log.csv").read_bytes()
