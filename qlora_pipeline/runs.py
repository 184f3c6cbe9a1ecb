"""Run directories: allocate `run_XXX` atomically, write config.json / status.json, log to experiment.log.

A run directory is never reused: `os.mkdir` either creates the next number or fails because another process
took it first, in which case we try the one after. status.json says `running` from the first moment, so a run
that dies half-way never looks like success.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from qlora_pipeline.errors import UserError

log = logging.getLogger(__name__)

RUN_PATTERN = re.compile(r"^run_(\d+)$")
# Libraries whose versions decide whether a result reproduces; recorded in every config.json.
KEY_PACKAGES = (
    "qlora-pipeline",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "scikit-learn",
    "xgboost",
    "numpy",
    "pandas",
    "snownlp",
)


class RunInterrupted(Exception):
    """Raised inside a run when the process receives SIGTERM, so the run is recorded as interrupted."""


def allocate_run_dir(root: str | Path, prefix: str = "run") -> Path:
    """Create and return the next free `root/run_XXX` (zero-padded; `prefix` sweep: `sweep_XXX`), safe against
    concurrent callers."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output root {root}: {exc.strerror}; choose another with --output-dir") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"output root {root} is not writable; choose another with --output-dir")
    pattern = RUN_PATTERN if prefix == "run" else re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    taken = [int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name))]
    number = max(taken, default=0) + 1
    while True:
        candidate = root / f"{prefix}_{number:03d}"
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            continue
        except OSError as exc:
            raise UserError(
                f"cannot create run directory {candidate}: {exc.strerror}; choose another with --output-dir"
            ) from exc
        return candidate


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, *, optional: bool = False) -> Any:
    """A JSON file's content; with `optional`, None when the file does not exist."""
    if optional and not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """A run record (config, metrics) as {dotted key: value}: sections and lists of sections are followed
    ("data.sources.0.name"); other lists and empty sections become their JSON text, so every value is hashable."""
    if isinstance(record, dict) and record:
        items = [(str(key), value) for key, value in record.items()]
    elif isinstance(record, list) and record and all(isinstance(item, dict) for item in record):
        items = [(str(index), value) for index, value in enumerate(record)]
    elif isinstance(record, (dict, list)):
        return {prefix: json.dumps(record, ensure_ascii=False)}
    else:
        return {prefix: record}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the package's source checkout, when it is one (an installed wheel has none)."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "git": git_commit(),
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """One run directory and its status. Stages are timed; the final state is written however the run ends."""

    dir: Path
    started: float = field(default_factory=time.time)
    state: str = "running"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    _log_handler: logging.Handler | None = None

    @classmethod
    def create(cls, root: str | Path) -> Run:
        run = cls(dir=allocate_run_dir(root))
        run.write_status()
        run._log_handler = attach_file_log(run.dir / "experiment.log")
        log.info("run directory %s", run.dir)
        return run

    @property
    def name(self) -> str:
        return self.dir.name

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "updated_at": now_iso(),
            "elapsed_s": round(time.time() - self.started, 3),
            "stages": self.stages,
            "error": self.error,
        }

    def write_status(self) -> None:
        write_json(self.dir / "status.json", self.status())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one pipeline stage; its state is recorded as running, then succeeded or failed."""
        log.info("stage %s: started", name)
        start = time.perf_counter()
        self.stages[name] = {"state": "running"}
        self.write_status()
        try:
            yield
        except BaseException:
            self.stages[name] = {"state": "failed", "seconds": round(time.perf_counter() - start, 3)}
            raise
        self.stages[name] = {"state": "succeeded", "seconds": round(time.perf_counter() - start, 3)}
        log.info("stage %s: done in %.2f s", name, self.stages[name]["seconds"])
        self.write_status()

    def finish(self, state: str, error: BaseException | None = None) -> None:
        self.state = state
        if error is not None:
            self.error = f"{type(error).__name__}: {error}"
            log.error("run %s %s: %s", self.name, state, self.error)
        else:
            log.info("run %s %s in %.1f s", self.name, state, time.time() - self.started)
        self.write_status()
        if self._log_handler is not None:
            detach_file_log(self._log_handler)
            self._log_handler = None


def attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("qlora_pipeline")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    logging.getLogger("qlora_pipeline").removeHandler(handler)
    handler.close()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into RunInterrupted for the duration, so a killed run is recorded as interrupted."""
    if sys.platform == "win32":
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise RunInterrupted(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
