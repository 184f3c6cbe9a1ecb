"""What the reliability tests share: the real `qlora` command started as a process (through harness.py when it must
pause at a point), waiting for that point, signalling it, and small run configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import CHECKPOINTED, sets
from helpers import error_lines as _error_lines

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("harness.py")
WAIT_S = 600  # generous on a busy shared machine; a hang fails the test instead of waiting forever

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}


# A small embeddings run: 120 texts, batches of 8 (so encoding takes several forward passes), no figures.
EMBEDDINGS = [
    "run",
    "--config",
    "quick_test",
    *sets(
        "data.max_samples=120",
        "embedding.batch_size=8",
        "embedding.fidelity_sample=0",
        "evaluation.bootstrap=0",
        "evaluation.figures=false",
    ),
]
# A small QLoRA run that checkpoints every 2 steps, keeps 2 checkpoints and the best, and stops early at step 6
# with step 2 the best (helpers.CHECKPOINTED, tests/test_checkpoints.py's): at step 6 the Trainer deletes checkpoint-4.
QLORA = ["run", "--config", "qlora_tiny", *sets(*CHECKPOINTED)]


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a child `qlora`: this checkout first on the path, its own embedding/model cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOLD_FILE", "RELEASE_FILE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["QLORA_CACHE_DIR"] = str(cache)
    env.update(extra)
    return env


@dataclass
class Qlora:
    """A `qlora` process; its stderr goes to a file (a pipe nobody reads could block it)."""

    popen: subprocess.Popen[bytes]
    stderr_file: Path
    hold_file: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"qlora (pid {self.pid}) did not end within {timeout} s:\n{self.stderr()[-3000:]}"
            ) from exc

    def wait_held(self, timeout: float = WAIT_S) -> str:
        """Wait until the process reaches its hold point; returns the point. Fails with its stderr if it ends first."""
        assert self.hold_file is not None
        deadline = time.monotonic() + timeout
        while not self.hold_file.is_file():
            if self.popen.poll() is not None:
                raise AssertionError(f"qlora ended ({self.popen.returncode}) before its hold point:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"qlora did not reach its hold point within {timeout} s:\n{self.stderr()}")
            time.sleep(0.05)
        pid, point = self.hold_file.read_text(encoding="utf-8").split()
        assert int(pid) == self.pid
        return point

    def interrupt(self, name: str) -> int:
        """Send the signal `name` (SIGINT, SIGTERM, SIGKILL) and wait for the process to end; its exit code."""
        self.popen.send_signal(SIGNALS[name])
        return self.wait()


def start(
    args: list[str],
    folder: Path,
    cache: Path,
    point: str | None = None,
    release: Path | None = None,
    env: dict[str, str] | None = None,
    tag: str = "qlora",
) -> Qlora:
    """Start `qlora ARGS` (`python -m qlora_pipeline`), or through the harness with a hold at `point`."""
    folder.mkdir(parents=True, exist_ok=True)
    hold_file = folder / f"{tag}.held" if point else None
    extra = {"HOLD_FILE": str(hold_file)} if hold_file else {}
    if release is not None:
        extra["RELEASE_FILE"] = str(release)
    command = (
        [sys.executable, str(HARNESS), point, "--", *args] if point else [sys.executable, "-m", "qlora_pipeline", *args]
    )
    stderr_file = folder / f"{tag}.stderr"
    with stderr_file.open("wb") as stderr:
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env={**child_env(cache, **extra), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # a signal the test sends reaches this process alone
            # A shell that starts the test suite in the background makes it ignore SIGINT, and the children would
            # inherit that (Python raises KeyboardInterrupt only where SIGINT had its default action at start).
            preexec_fn=_default_sigint,
        )
    return Qlora(popen, stderr_file, hold_file)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def error_lines(stderr: str) -> list[str]:
    """Every line the command printed as itself (`qlora: error: ...`, `qlora: interrupted ...`)."""
    return _error_lines(stderr, prefix="qlora:")
