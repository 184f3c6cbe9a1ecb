"""Checksums of what a run wrote, so a damaged, truncated or swapped file is refused instead of used.

Two records, both SHA-256:
- `checksums.json` beside model files (heads, the LoRA adapter), written as they are saved: a head is a pickle,
  and unpickling runs code, so `qlora predict` checks a head against it before loading it.
- `manifest.json` at the root of a run directory, written just before the run is marked succeeded: every file of
  the run except the few rewritten after it (status, report, log) and the checkpoints, which carry their own
  checksums (`training/checkpoints.py`). `qlora predict`, `reproduce` and `compare` check the files they read.

They catch disk damage, partial copies, hand edits and a file swapped for another; not a forger with write access
to the run directory, who can rewrite the records too (predict only from run directories you trust).
Runs written before these records existed have none: they are read as before, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import read_json, write_json

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
MANIFEST = "manifest.json"
# Rewritten after the manifest (status, the final report, the log) or checked on their own (checkpoints).
UNLISTED = frozenset({"status.json", "experiment_report.md", "experiment.log", MANIFEST})
UNLISTED_DIRS = frozenset({"checkpoints"})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(path: Path) -> dict[str, str] | None:
    """A checksums or manifest file as {relative path: sha256}; None when absent; UserError when unreadable."""
    try:
        record = read_json(path, optional=True)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}); the files it lists cannot be trusted") from exc
    if record is None:
        return None
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise UserError(f"{path} is not a checksum record; the files it lists cannot be trusted")
    return record


def record_checksums(folder: Path, names: Iterable[str]) -> None:
    """Add the SHA-256 of `names` (paths relative to `folder`) to `folder/checksums.json`."""
    path = folder / CHECKSUMS
    record = _read_record(path) or {}
    for name in names:
        record[name] = sha256_file(folder / name)
    write_json(path, dict(sorted(record.items())))


def verify_checksums(folder: Path, names: Iterable[str]) -> bool:
    """Check `names` (relative to `folder`) against `folder/checksums.json` before they are loaded: UserError, in
    one line, for a file that differs or that the record does not list. False when the folder has no record."""
    record = _read_record(folder / CHECKSUMS)
    if record is None:
        log.warning(
            "%s has no %s (a run written before checksums): its model files cannot be verified", folder, CHECKSUMS
        )
        return False
    for name in names:
        expected = record.get(name)
        if expected is None:
            raise UserError(
                f"{folder / name} is not listed in {CHECKSUMS}: it was not saved by the run; refusing to load it"
            )
        if sha256_file(folder / name) != expected:
            raise UserError(
                f"{folder / name} does not match the checksum recorded when the run saved it (changed or damaged "
                "since); refusing to load it"
            )
    return True


def listed_files(run_dir: Path) -> list[str]:
    """The files a manifest covers, relative to `run_dir`, sorted."""
    found = []
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if not path.is_file() or relative.parts[0] in UNLISTED_DIRS or relative.as_posix() in UNLISTED:
            continue
        if any(part.startswith(".") for part in relative.parts):  # temp files of an atomic write in flight
            continue
        found.append(relative.as_posix())
    return sorted(found)


def write_manifest(run_dir: Path) -> None:
    write_json(run_dir / MANIFEST, {name: sha256_file(run_dir / name) for name in listed_files(run_dir)})


def verify_manifest(run_dir: Path, names: Iterable[str] | None = None) -> bool:
    """Check `names` (default: every file the manifest lists) against `run_dir/manifest.json`: UserError, in one
    line, naming the first file that is missing or differs. False when the run has no manifest."""
    record = _read_record(run_dir / MANIFEST)
    if record is None:
        log.warning(
            "%s has no %s (written before manifests, or never finished): its files cannot be verified",
            run_dir,
            MANIFEST,
        )
        return False
    for name in record if names is None else names:
        path = run_dir / name
        if name not in record:
            if path.is_file():
                raise UserError(f"{path} is not among the files the run recorded in {MANIFEST}; refusing to use it")
            continue
        if not path.is_file():
            raise UserError(f"{path} is missing: the run recorded it in {MANIFEST}; the run directory is incomplete")
        if sha256_file(path) != record[name]:
            raise UserError(
                f"{path} has changed since the run recorded it in {MANIFEST} (edited or damaged); refusing to use it"
            )
    return True
