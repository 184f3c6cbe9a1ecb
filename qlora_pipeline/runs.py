"""Run directories: allocate `run_XXX` atomically, write config.json / status.json, log to experiment.log.

A run directory is never reused: `os.mkdir` either creates the next number or fails because another process
took it first, in which case we try the one after. status.json says `running` from the first moment, so a run
that dies half-way never looks like success.

A process killed outright (SIGKILL, the out-of-memory killer, a machine that stops) cannot record how it ended.
status.json therefore names the process that writes it (pid, its start time, host, boot) and carries a heartbeat
refreshed every HEARTBEAT_S seconds; `run_state` reads a `running` status through that, and a run whose process is
gone (or, seen from another host, whose heartbeat stopped STALE_AFTER_S ago) is recorded as `interrupted`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from qlora_pipeline.errors import UserError

log = logging.getLogger(__name__)

RUN_PATTERN = re.compile(r"^run_(\d+)$")
STATUS_BYTES = 4096  # status.json is padded to this size, so a final status fits over it on a full disk
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


HEARTBEAT_S = 30.0  # how often a running run refreshes status.json's heartbeat_at
STALE_AFTER_S = 600.0  # seen from another host, a run whose heartbeat is older than this is taken for dead
# Errors that mean the disk (or the user's quota) is full: a clear line, not a traceback (see `disk_full`).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RunInterrupted(Exception):
    """Raised inside a run when the process receives SIGTERM, so the run is recorded as interrupted."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk or quota is full (ENOSPC, EDQUOT, EFBIG)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def allocate_run_dir(root: str | Path) -> Path:
    """Create and return the next free `root/run_XXX` (zero-padded), safe against concurrent callers."""
    return allocate_numbered_dir(root, "run", "choose another with --output-dir")


def allocate_numbered_dir(root: str | Path, prefix: str, fix: str) -> Path:
    """Create and return the next free `root/<prefix>_NNN`: `os.mkdir` either creates it or fails because another
    process took that number first, and then the next one is tried. `fix`: how the user gets past an unwritable
    root."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output root {root}: {exc.strerror}; {fix}") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"output root {root} is not writable; {fix}")
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
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
            raise UserError(f"cannot create {candidate}: {exc.strerror}; {fix}") from exc
        return candidate


SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def dataset_folder(name: str) -> str:
    """The folder a dataset's files go in: its name when that is made of [A-Za-z0-9_.-] (every name older runs
    could have, so they load as before), else the safe characters of the name (or "dataset") and a short hash of the
    whole name, so that distinct names never share a folder: `评论` -> `dataset-1b2c3d4e`. Reports show the name."""
    if SAFE_NAME.fullmatch(name) and name.strip(".") != "":
        return name

    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:40]
    return f"{readable or 'dataset'}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (a temp file of this process and thread, then a rename), so a reader never
    sees half a file, an interrupted write leaves the old file whole, and two writers never share a temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def inside(root: Path, *parts: str) -> Path:
    """`root / parts...` for names that come from data (a dataset's name, a split): each must be one plain path
    component, so that whatever a name holds, nothing is written outside `root`."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part or Path(part).is_absolute():
            raise UserError(f"{part!r} cannot name a folder inside {root}; rename the dataset (letters, digits, _ . -)")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):  # a symlinked folder pointing elsewhere
        raise UserError(f"{path} resolves outside {root}; refusing to write there")
    return path


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


def package_versions(names: Sequence[str] = KEY_PACKAGES) -> dict[str, str | None]:
    """{package: installed version, or None when it is not installed}."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the package's source checkout, when it is one (an installed wheel has none)."""
    import subprocess

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


# ---- which process writes a run, and whether it still lives -----------------------------------------------------


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.readline().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a Linux process, or None without /proc."""
    line = _read_first_line(f"/proc/{pid}/stat")
    if not line or ")" not in line:
        return None
    fields = line.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_identity() -> dict[str, Any]:
    """This process as status.json records it: pid, host, and (on Linux) the boot and the process's start time,
    which tell a pid reused after the run's process died, or after a reboot, from the run's own."""
    stat = _proc_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "start_ticks": stat[1] if stat else None,
    }


def process_gone(process: dict[str, Any] | None, heartbeat_at: str | None, now: float | None = None) -> str | None:
    """Why the process that wrote a `running` status is certainly (same host) or presumably (another host, no
    heartbeat for STALE_AFTER_S) no longer running it; None while it may still be. Without a recorded process
    (runs written before status.json named one) nothing can be said: None."""
    if not process or not isinstance(process.get("pid"), int):
        return None
    pid, host = process["pid"], process.get("host")
    if host == socket.gethostname():
        boot = _read_first_line("/proc/sys/kernel/random/boot_id")
        if process.get("boot_id") and boot and process["boot_id"] != boot:
            return f"host {host} has restarted since process {pid} started the run"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} on {host} no longer exists"
        except PermissionError:
            pass  # a process of another user holds the pid: its start time below decides
        except OSError:
            return None
        stat = _proc_stat(pid)
        if stat is not None and stat[0] in ("Z", "X"):
            return f"its process {pid} on {host} has exited"
        if stat is not None and process.get("start_ticks") and stat[1] != process["start_ticks"]:
            return f"its process {pid} on {host} no longer exists (the pid now belongs to another process)"
        return None
    if heartbeat_at is None:
        return None
    try:
        last = datetime.fromisoformat(heartbeat_at).timestamp()
    except (TypeError, ValueError):
        return None
    silent = (now if now is not None else time.time()) - last
    if silent > STALE_AFTER_S:
        return f"its process {pid} on {host} has sent no heartbeat for {silent / 60:.0f} min (since {heartbeat_at})"
    return None


def run_state(run_dir: Path) -> dict[str, Any]:
    """status.json of `run_dir`, with a `running` run whose process is gone turned into `interrupted` (and written
    back, when the directory is writable, so the file stops saying `running`). {} when there is no status."""
    path = run_dir / "status.json"
    try:
        status = read_json(path, optional=True)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); the run directory is damaged") from exc
    if not isinstance(status, dict):
        return {}
    if status.get("state") != "running":
        return status
    why = process_gone(status.get("process"), status.get("heartbeat_at"))
    if why is None:
        return status
    status["state"] = "interrupted"
    status["error"] = (
        f"the run ended without recording how: {why} (killed with SIGKILL, by the out-of-memory killer, or the "
        f"machine stopped); found at {now_iso()}"
    )
    for record in status.get("stages", {}).values():
        if isinstance(record, dict) and record.get("state") == "running":
            record["state"] = "interrupted"
    try:
        write_json(path, status)
    except OSError as exc:  # a read-only archive: the answer stands, the file stays as it was
        log.debug("could not record the interrupted state in %s: %s", path, exc)
    return status


@dataclass
class Run:
    """One run directory and its status. Stages are timed; the final state is written however the run ends."""

    dir: Path
    started: float = field(default_factory=time.time)
    state: str = "running"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    process: dict[str, Any] = field(default_factory=process_identity)
    _log_handler: logging.Handler | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop_heartbeat: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def create(cls, root: str | Path) -> Run:
        run = cls(dir=allocate_run_dir(root))
        run.write_status()
        run._log_handler = attach_file_log(run.dir / "experiment.log")
        threading.Thread(target=run._heartbeat, name=f"heartbeat {run.name}", daemon=True).start()
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
            "process": self.process,
            "heartbeat_at": now_iso(),
        }

    def write_status(self) -> None:
        """Write status.json atomically. On a full disk a new file cannot be made; the status is then written over
        the old one in place (its blocks are already allocated), so a run that filled the disk still says how it
        ended."""
        with self._lock:
            text = json.dumps(self.status(), indent=2, ensure_ascii=False, default=str) + "\n"
            path = self.dir / "status.json"
            try:
                write_text_atomic(path, text.ljust(STATUS_BYTES - 1) + "\n" if len(text) < STATUS_BYTES else text)
            except OSError as exc:
                if not disk_full(exc) or not path.is_file():
                    raise
                with path.open("r+b") as handle:  # shorter or as long as the padded file: no new block needed
                    handle.write(text.encode("utf-8"))
                    handle.truncate()

    def _heartbeat(self) -> None:
        """Refresh status.json every HEARTBEAT_S while the run lives (a daemon thread; `finish` stops it)."""
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                self.write_status()
            except OSError as exc:  # the directory went away, or the disk is full: the run itself will say so
                log.debug("heartbeat of %s not written: %s", self.name, exc)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one pipeline stage; its state is recorded as running, then succeeded or failed."""
        log.info("stage %s: started", name)
        start = time.perf_counter()
        self._set_stage(name, {"state": "running"})
        self.write_status()
        try:
            yield
        except BaseException as exc:
            state = "interrupted" if isinstance(exc, (KeyboardInterrupt, RunInterrupted)) else "failed"
            self._set_stage(name, {"state": state, "seconds": round(time.perf_counter() - start, 3)})
            raise
        self._set_stage(name, {"state": "succeeded", "seconds": round(time.perf_counter() - start, 3)})
        log.info("stage %s: done in %.2f s", name, self.stages[name]["seconds"])
        self.write_status()

    def _set_stage(self, name: str, record: dict[str, Any]) -> None:
        with self._lock:  # the heartbeat thread serializes `stages` meanwhile
            self.stages[name] = record

    def finish(self, state: str, error: BaseException | None = None) -> None:
        self._stop_heartbeat.set()
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


class _RunLogHandler(logging.FileHandler):
    """experiment.log. On a full disk it stops writing, once, with a note on the console, instead of printing a
    logging traceback for every later message; the run's error says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if disk_full(sys.exc_info()[1] or Exception()):
            logging.getLogger("qlora_pipeline").removeHandler(self)
            sys.stderr.write(f"qlora: {self.baseFilename}: disk full, the run log stops here\n")
            return
        super().handleError(record)


def attach_file_log(path: Path) -> logging.Handler:
    handler = _RunLogHandler(path, encoding="utf-8")
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
        raise RunInterrupted(f"received {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
