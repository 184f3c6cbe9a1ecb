"""Content-addressed embedding cache, shared by every run and process under `cache_root()/embeddings`.

Layout: one folder per *model key* (a hash of everything that decides a vector except the text: model id,
revision, a fingerprint of local weights, quantization, compute dtype, device, prompt, pooling, max length,
normalization, library versions), holding `settings.json` (the key in readable form), segment files of vectors,
and `index.sqlite`, which maps each text key to (segment, record) and says when the vector was written.

Writes append: each writer (an `EmbeddingCache` in one process) appends fixed-size records to a segment file of
its own, up to `SEGMENT_BYTES`, then starts another; after each append the new keys are registered in the index
in one transaction. A lookup asks the index for the keys it wants (a primary-key search per key) and reads only
their records (memory-mapped segments, a few of them per million vectors), so it costs what is asked for, not
what the cache holds, and memory stays bounded by the vectors returned. SQLite (stdlib) in WAL mode lets any
number of processes on one machine read while one writes (each write transaction takes milliseconds); a key that
two processes both computed keeps the first registration, and the second copy is unused space.

Integrity: every record carries its key and a CRC-32 of key and vector, checked on every read. A record that is
truncated or corrupt is logged, dropped from the index and recomputed, never used. A segment on disk that the
index does not know (its writer was killed before registering it, or the index was deleted or damaged: a
damaged index is deleted) is scanned record by record when a cache is opened, and its intact records are
registered. Caches written before segments existed (chunk files `*.emb`, each with a SHA-256 of its body) are
read: each chunk is verified, moved into a segment, and deleted.

Deletion under a running process (`qlora cache clear`): a reader whose segment vanished counts misses and
recomputes; a writer whose folder or index vanished starts new ones and carries on.

Segment format (`*.seg`): magic `QLSEG1\\n\\0`, uint32 dim, uint32 0, then records: 32-byte text key, uint32
CRC-32 of key + vector, dim little-endian float32.

Exactness: a hit returns the bytes the first encode wrote. Vectors depend on their batch-mates at the level
of float rounding (measured on the tiny Qwen3, mean and last-token pooling, NF4 and float32: up to 1.2e-7 on
unit vectors, from GEMM blocking and padded lengths), so a run whose texts were partly cached by a different
text set can differ from a cold-cache run of the same config by that much. A rerun of the same config, and
`qlora reproduce`, read back the very bytes of the first run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from qlora_pipeline.models.tiny import cache_root

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"QLSEG1\n\0"
SEGMENT_HEADER = struct.Struct("<8sII")
SEGMENT_SUFFIX = ".seg"
SEGMENT_BYTES = 64 * 2**20  # a writer starts a new segment past this size: few files per million vectors
KEY_BYTES = 32
# The chunk files of caches written before segments (read, then moved into segments).
MAGIC = b"QLEMB1\n\0"
HEADER = struct.Struct("<8sII32s")
CHUNK_SUFFIX = ".emb"
FULL_HASH_LIMIT = 64 * 2**20  # weight files up to this size are hashed whole; larger ones by header+size+mtime
INDEX = "index.sqlite"
SETTINGS = "settings.json"
READ_BYTES = 4 * 2**20  # the most one read of consecutive records takes
QUERY_KEYS = 900  # keys per SELECT ... IN (...): well under SQLite's variable limit, few round trips
BUSY_TIMEOUT_S = 120.0  # a writer waits this long for another process's write transaction
DAMAGED = "embedding cache: %s is truncated or corrupt at %d record(s); they are dropped and recomputed"
SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    dim INTEGER NOT NULL,
    live INTEGER NOT NULL DEFAULT 0,
    oldest REAL,
    newest REAL
);
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY,
    segment INTEGER NOT NULL,
    record INTEGER NOT NULL,
    written REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_segment ON vectors(segment);
"""

T = TypeVar("T")


def embeddings_root() -> Path:
    return cache_root() / "embeddings"


def text_key(text: str, pair: str | None = None) -> bytes:
    """The content address of one input: SHA-256 of the text (and its pair, when there is one)."""
    data = text.encode("utf-8") if pair is None else text.encode("utf-8") + b"\x00pair\x00" + pair.encode("utf-8")
    return hashlib.sha256(data).digest()


def weights_fingerprint(folder: Path) -> str:
    """SHA-256 over a local model directory's config, tokenizer files and weights. Small files are hashed
    whole; a weight file over 64 MiB by its safetensors header (names, dtypes, shapes, offsets), size and
    mtime, which changes whenever the file is rewritten, at the cost of a miss after a mere copy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        stat = path.stat()
        if stat.st_size <= FULL_HASH_LIMIT:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
            continue
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(min(length, 100 * 2**20)))
    return digest.hexdigest()


def model_key(settings: dict[str, Any]) -> str:
    """The folder name for these settings: 24 hex digits of SHA-256 over their canonical JSON."""
    canonical = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def record_dtype(dim: int) -> np.dtype:
    return np.dtype([("key", "V32"), ("crc", "<u4"), ("vector", "<f4", (dim,))])


def record_crc(key: bytes | memoryview, vector: bytes | memoryview) -> int:
    return zlib.crc32(vector, zlib.crc32(key))


def pack_records(keys: Sequence[bytes], vectors: np.ndarray) -> np.ndarray:
    """Records (key, CRC, little-endian float32 vector) of one vector per key, as segments store them."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    records = np.zeros(len(keys), dtype=record_dtype(vectors.shape[1]))
    records["key"] = [np.void(k) for k in keys]
    records["vector"] = vectors
    records["crc"] = [record_crc(k, v.tobytes()) for k, v in zip(keys, vectors, strict=True)]
    return records


class EmbeddingCache:
    """The vectors cached for one model key: `lookup` asks the index and reads only the records asked for; `put`
    appends to this writer's segment. Safe to use from several processes at once; an instance may be shared by
    threads."""

    def __init__(self, settings: dict[str, Any], root: Path | None = None) -> None:
        self.settings = settings
        self.key = model_key(settings)
        self.folder = (root or embeddings_root()) / self.key
        self._index: _Index | None = None
        self._segment: _Segment | None = None
        self._lock = threading.Lock()

    @classmethod
    def at(cls, folder: Path) -> EmbeddingCache:
        """The cache in an existing model-key folder (for info and clear), whatever its settings hash to."""
        settings: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError):
            try:
                settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):  # damaged: only `cache info` reads it, to show the settings
                log.warning("embedding cache: %s is damaged; the settings of %s are unknown", SETTINGS, folder)
        cache = cls(settings if isinstance(settings, dict) else {}, root=folder.parent)
        cache.folder = folder
        return cache

    # ---- reading ----------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """Cached vectors for those of `keys` that are present and intact. A truncated or corrupt record is
        dropped from the index and not returned (its vector is recomputed)."""
        if not len(keys) or not self.folder.is_dir():
            return {}
        distinct = list(dict.fromkeys(keys))
        with self._lock:
            located = self._with_index(False, lambda index: index.locate(distinct)) or {}
            found: dict[bytes, np.ndarray] = {}
            for (name, dim), rows in located.items():
                found.update(self._read_records(name, dim, rows))
            return found

    def _read_records(self, name: str, dim: int, rows: list[tuple[bytes, int]]) -> dict[bytes, np.ndarray]:
        """The given records of one segment, each checked against its key and CRC; the damaged ones (and all of
        them when the segment is gone, deleted by a `cache clear`) are dropped from the index."""
        path = self.folder / name
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            log.debug("embedding cache: %s was deleted; its vectors count as misses", path)
            self._with_index(False, lambda index: index.drop_segments([name]))
            return {}
        with handle:
            records, present = _records_at(handle, dim, [record for _, record in rows])
        keys = [key for key, _ in rows]
        intact = present & (records["key"] == np.frombuffer(b"".join(keys), dtype="V32"))
        raw = memoryview(records.tobytes())
        size, crcs = records.dtype.itemsize, records["crc"].tolist()
        for i in np.flatnonzero(intact).tolist():
            at = i * size
            if record_crc(raw[at : at + KEY_BYTES], raw[at + KEY_BYTES + 4 : at + size]) != crcs[i]:
                intact[i] = False
        vectors = records["vector"].astype(np.float32)
        damaged = [key for key, ok in zip(keys, intact.tolist(), strict=True) if not ok]
        if damaged:
            log.warning(DAMAGED, path, len(damaged))
            self._with_index(False, lambda index: index.drop_keys(damaged))
        return {key: vectors[i] for i, (key, ok) in enumerate(zip(keys, intact.tolist(), strict=True)) if ok}

    # ---- writing ----------------------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> Path | None:
        """Append one vector per key to this writer's segment and register the keys in the index. Returns the
        segment's path, or None when the cache folder kept vanishing while writing (`cache clear` racing this
        write three times): the vectors are then not cached, and the caller carries on."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if len(keys) != len(vectors) or vectors.ndim != 2:
            raise ValueError(f"put needs one 2-D vector per key, got {len(keys)} keys and shape {vectors.shape}")
        if not len(keys):
            return None
        records = pack_records(keys, vectors)
        with self._lock:
            written = self._with_index(True, lambda index: self._append(index, list(keys), records))
        if written is None:
            log.warning("embedding cache: %s kept vanishing; %d vectors not cached", self.folder, len(keys))
        return written

    def _append(self, index: _Index, keys: list[bytes], records: np.ndarray) -> Path:
        dim = records.dtype["vector"].shape[0]
        segment = self._segment
        if segment is None or segment.dim != dim or segment.full() or not segment.exists():
            if segment is not None:
                segment.close()
            self._segment = segment = _Segment.create(self.folder, dim)
            index.add_segment(segment.path.name, dim)
        first = segment.append(records)
        index.register(segment.path.name, dim, keys, first, time.time())
        return segment.path

    # ---- the index --------------------------------------------------------------------------------------

    def _with_index(self, create: bool, operation: Callable[[_Index], T]) -> T | None:
        """Run `operation` on the index, opening it first. When the folder or the index file is deleted or
        replaced meanwhile (a `cache clear` racing this process), open it again and retry, three times in all;
        then give up with None, as when there is no cache and `create` is false."""
        for _ in range(3):
            try:
                index = self._open(create)
                if index is None:
                    return None
                return operation(index)
            except (_IndexGone, FileNotFoundError) as exc:
                log.info("embedding cache: %s vanished (%s); opening it again", self.folder, str(exc))
                self._close()
            except sqlite3.DatabaseError as exc:  # damage found past opening: rebuilt from the segments
                if not _is_damage(exc):
                    raise
                self._close()
                _Index.rebuild(self.folder / INDEX, exc).close()
        return None

    def _open(self, create: bool) -> _Index | None:
        """The index connection, (re)opened when it is missing or its file was replaced; segments it does not
        know are scanned and registered, chunk files of older caches moved into a segment."""
        if self._index is not None and self._index.is_current():
            return self._index
        self._close()
        if not create and not self.folder.is_dir():
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / SETTINGS
        if self.settings and not settings_file.exists():
            _atomic_write(settings_file, json.dumps(self.settings, indent=2, ensure_ascii=False).encode("utf-8"))
        path = self.folder / INDEX
        try:
            self._index = _Index.connect(path)
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            self._index = _Index.rebuild(path, exc)
        self._adopt(self._index)
        return self._index

    def _adopt(self, index: _Index) -> None:
        """Register the intact records of segments the index does not know, forget segments gone from disk, and
        move chunk files of an older cache into a segment."""
        names = [entry.name for entry in os.scandir(self.folder)]
        on_disk = {name for name in names if name.endswith(SEGMENT_SUFFIX)}
        known = index.segment_names()
        if known - on_disk:
            index.drop_segments(sorted(known - on_disk))
        for name in sorted(on_disk - known):
            path = self.folder / name
            scanned = read_segment(path, strict=False)
            if scanned is None:
                continue  # deleted meanwhile, or not a segment at all
            keys, vectors, damaged = scanned
            log.info("embedding cache: registering %d vectors of %s", len(keys), path)
            if damaged:
                log.warning(DAMAGED, path, damaged)
            index.register_records(name, vectors.shape[1], keys, path.stat().st_mtime)
        chunks = sorted(name for name in names if name.endswith(CHUNK_SUFFIX))
        if chunks:
            log.info("embedding cache: moving %d chunk file(s) of an older cache into a segment", len(chunks))
        for name in chunks:
            content = read_chunk(self.folder / name)
            if content is None:
                log.warning("embedding cache: %s is truncated or corrupt; deleted, its vectors are recomputed", name)
            else:
                self._append(index, content[0], pack_records(*content))
            (self.folder / name).unlink(missing_ok=True)

    def _close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def __del__(self) -> None:  # files and connections close anyway; this makes it prompt
        with contextlib.suppress(AttributeError):
            self._close()


def _records_at(handle: BinaryIO, dim: int, numbers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The given records of an open segment and whether each was there (not past the end), read with one `pread`
    per run of consecutive records: only these bytes are read, and memory holds nothing else (a mapping of the
    file would count a whole fault-around window per record)."""
    dtype = record_dtype(dim)
    order = np.argsort(numbers, kind="stable")
    records = np.zeros(len(numbers), dtype=dtype)
    present = np.zeros(len(numbers), dtype=bool)
    run_limit = max(1, READ_BYTES // dtype.itemsize)
    sorted_numbers = [numbers[i] for i in order.tolist()]
    begin = 0
    while begin < len(sorted_numbers):
        end = begin + 1
        while (
            end < len(sorted_numbers) and sorted_numbers[end] == sorted_numbers[end - 1] + 1 and end - begin < run_limit
        ):
            end += 1
        first, count = sorted_numbers[begin], end - begin
        data = os.pread(handle.fileno(), count * dtype.itemsize, SEGMENT_HEADER.size + first * dtype.itemsize)
        got = len(data) // dtype.itemsize
        targets = order[begin : begin + got]
        records[targets] = np.frombuffer(data, dtype=dtype, count=got)
        present[targets] = True
        begin = end
    return records, present


class _Segment:
    """The segment this writer appends to (only it does)."""

    def __init__(self, path: Path, dim: int, handle: BinaryIO) -> None:
        self.path, self.dim, self.handle = path, dim, handle
        self.records = 0
        self.itemsize = record_dtype(dim).itemsize

    @classmethod
    def create(cls, folder: Path, dim: int) -> _Segment:
        name = f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident() % 10**6:06d}{SEGMENT_SUFFIX}"
        handle = (folder / name).open("xb")
        handle.write(SEGMENT_HEADER.pack(SEGMENT_MAGIC, dim, 0))
        handle.flush()
        return cls(folder / name, dim, handle)

    def append(self, records: np.ndarray) -> int:
        """Write the records at the end, flushed to the OS before the index learns of them; returns the number
        of the first one."""
        first = self.records
        self.handle.write(records.tobytes())
        self.handle.flush()
        self.records += len(records)
        return first

    def full(self) -> bool:
        return SEGMENT_HEADER.size + self.records * self.itemsize >= SEGMENT_BYTES

    def exists(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def close(self) -> None:
        self.handle.close()


class _IndexGone(Exception):
    """The index file was deleted or replaced under an open connection."""


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "file is encrypted" in text


def _is_gone(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return any(
        sign in text for sign in ("readonly", "read-only", "unable to open", "disk i/o", "no such table", "moved")
    )


def _switch_to_wal(connection: sqlite3.Connection) -> None:
    """WAL mode. Switching a new index to it takes the file to itself: when processes open a new index at the same
    moment, SQLite can find them waiting on each other and answers "locked" at once, without the busy timeout
    (it refuses to wait on a deadlock). One of them gets the switch; the others try again shortly."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Index:
    """One connection to a model key's `index.sqlite`."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self.connection = connection
        self.inode = os.stat(path).st_ino

    @classmethod
    def connect(cls, path: Path) -> _Index:
        try:
            connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:  # its folder was deleted just now
            raise _IndexGone(str(exc)) from exc
        try:
            _switch_to_wal(connection)
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never
            connection.executescript(SCHEMA)  # the index's consistency; what they registered is recomputed
            connection.execute("SELECT COUNT(*) FROM segments").fetchone()  # a damaged file fails here
        except sqlite3.OperationalError as exc:
            connection.close()
            if _is_gone(exc):
                raise _IndexGone(str(exc)) from exc
            raise
        except BaseException:
            connection.close()
            raise
        return cls(path, connection)

    @classmethod
    def rebuild(cls, path: Path, cause: Exception) -> _Index:
        """Delete a damaged index (a cache is a cache); the segments are then registered again. (The log gets the
        cause's text, not the exception: a record kept by a handler would keep its frames, and their connections.)"""
        log.warning("embedding cache: %s is damaged (%s); rebuilt from the segments", path, str(cause))
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return cls.connect(path)

    def is_current(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    @contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self.connection
        except sqlite3.OperationalError as exc:
            if _is_gone(exc) or not self.is_current():
                raise _IndexGone(str(exc)) from exc
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def locate(self, keys: list[bytes]) -> dict[tuple[str, int], list[tuple[bytes, int]]]:
        """(segment name, dim) -> [(key, record)], in record order, for the keys the index holds."""
        by_segment: dict[int, list[tuple[bytes, int]]] = {}
        with self._guard() as db:
            for start in range(0, len(keys), QUERY_KEYS):
                part = keys[start : start + QUERY_KEYS]
                marks = ",".join("?" * len(part))
                query = f"SELECT key, segment, record FROM vectors WHERE key IN ({marks})"
                for key, segment, record in db.execute(query, part):
                    by_segment.setdefault(segment, []).append((bytes(key), record))
            names = {segment: (name, dim) for segment, name, dim in db.execute("SELECT id, name, dim FROM segments")}
        return {names[s]: sorted(rows, key=lambda r: r[1]) for s, rows in by_segment.items() if s in names}

    def add_segment(self, name: str, dim: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO segments (name, dim) VALUES (?, ?)", (name, dim))

    def register(self, name: str, dim: int, keys: list[bytes], first: int, written: float) -> None:
        """One transaction: keys -> records first, first + 1, ... of the segment (the first write of a key wins)."""
        self.register_records(name, dim, list(zip(keys, range(first, first + len(keys)), strict=True)), written)

    def register_records(self, name: str, dim: int, rows: list[tuple[bytes, int]], written: float) -> None:
        with self._transaction() as db:
            # The segment's row too: a `cache clear --older-than` may have dropped it since it was added.
            db.execute("INSERT OR IGNORE INTO segments (name, dim) VALUES (?, ?)", (name, dim))
            (segment,) = db.execute("SELECT id FROM segments WHERE name = ?", (name,)).fetchone()
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO vectors (key, segment, record, written) VALUES (?, ?, ?, ?)",
                [(key, segment, record, written) for key, record in rows],
            )
            db.execute(
                "UPDATE segments SET live = live + ?, oldest = MIN(COALESCE(oldest, ?), ?), "
                "newest = MAX(COALESCE(newest, ?), ?) WHERE id = ?",
                (db.total_changes - before, written, written, written, written, segment),
            )

    def drop_keys(self, keys: list[bytes]) -> None:
        with self._transaction() as db:
            for key in keys:
                row = db.execute("SELECT segment FROM vectors WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM vectors WHERE key = ?", (key,))
                    db.execute("UPDATE segments SET live = live - 1 WHERE id = ?", row)

    def drop_segments(self, names: list[str]) -> None:
        with self._transaction() as db:
            for name in names:
                row = db.execute("SELECT id FROM segments WHERE name = ?", (name,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM vectors WHERE segment = ?", row)
                    db.execute("DELETE FROM segments WHERE id = ?", row)

    def drop_older(self, cutoff: float) -> list[str]:
        """Forget the vectors written before `cutoff`; returns the segments left with none. Only the segments
        whose oldest vector is older are visited (by the index on segment), not every vector."""
        with self._transaction() as db:
            old = db.execute("SELECT id, newest FROM segments WHERE oldest < ?", (cutoff,)).fetchall()
            for segment, newest in old:
                if newest is not None and newest < cutoff:  # all of it
                    db.execute("DELETE FROM vectors WHERE segment = ?", (segment,))
                    db.execute("UPDATE segments SET live = 0, oldest = NULL WHERE id = ?", (segment,))
                    continue
                before = db.total_changes
                db.execute("DELETE FROM vectors WHERE segment = ? AND written < ?", (segment, cutoff))
                db.execute(
                    "UPDATE segments SET live = live - ?, oldest = "
                    "(SELECT MIN(written) FROM vectors WHERE segment = ?) WHERE id = ?",
                    (db.total_changes - before, segment, segment),
                )
            return [name for (name,) in db.execute("SELECT name FROM segments WHERE live <= 0 AND newest IS NOT NULL")]

    def segment_names(self) -> set[str]:
        with self._guard() as db:
            return {name for (name,) in db.execute("SELECT name FROM segments")}

    def totals(self) -> tuple[int, int]:
        """(vectors indexed, segments), from the segment table alone: fast at any size."""
        with self._guard() as db:
            entries, segments = db.execute("SELECT COALESCE(SUM(live), 0), COUNT(*) FROM segments").fetchone()
        return int(entries), int(segments)

    def close(self) -> None:
        self.connection.close()


def read_segment(path: Path, strict: bool = True) -> tuple[list[tuple[bytes, int]], np.ndarray, int] | None:
    """A segment's intact records: ([(key, record number)], vectors, number of corrupt records). None when the
    file is missing or not a segment, and, with `strict`, when any record is corrupt or cut short."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < SEGMENT_HEADER.size:
        return None
    magic, dim, _ = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or dim == 0:
        return None
    dtype = record_dtype(dim)
    count, tail = divmod(len(data) - SEGMENT_HEADER.size, dtype.itemsize)
    records = np.frombuffer(data, dtype=dtype, count=count, offset=SEGMENT_HEADER.size)
    keys, rows = [], []
    for number, record in enumerate(records):
        key = record["key"].tobytes()
        if record_crc(key, record["vector"].tobytes()) == int(record["crc"]):
            keys.append((key, number))
            rows.append(number)
    damaged = count - len(rows)  # a record cut short at the end (a writer still at work, or a crash) is skipped
    if strict and (damaged or tail):
        return None
    return keys, records["vector"][rows].astype(np.float32), damaged


def read_chunk(path: Path) -> tuple[list[bytes], np.ndarray] | None:
    """(keys, vectors) of a cache file, or None when it is damaged: a segment with a truncated or corrupt record,
    or a chunk file of an older cache whose header, length or checksum is wrong."""
    if path.suffix == SEGMENT_SUFFIX:
        content = read_segment(path)
        return None if content is None else ([key for key, _ in content[0]], content[1])
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < HEADER.size:
        return None
    magic, n, dim, checksum = HEADER.unpack_from(data)
    body = memoryview(data)[HEADER.size :]
    if magic != MAGIC or len(body) != n * (KEY_BYTES + 4 * dim) or hashlib.sha256(body).digest() != checksum:
        return None
    keys = [bytes(body[i * KEY_BYTES : (i + 1) * KEY_BYTES]) for i in range(n)]
    vectors = np.frombuffer(body[n * KEY_BYTES :], dtype="<f4").reshape(n, dim).astype(np.float32)
    return keys, vectors


def _atomic_write(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def cache_info(root: Path | None = None) -> dict[str, Any]:
    """Location, total size, and per model key: its settings and how many vectors it holds, from the index
    (segments it does not know yet, and chunk files of an older cache, are registered first)."""
    root = root or embeddings_root()
    models = []
    total = 0
    for folder in _model_folders(root):
        cache = EmbeddingCache.at(folder)
        entries, segments = cache._with_index(False, lambda index: index.totals()) or (0, 0)
        cache.close()
        try:
            files = [p.stat() for p in folder.iterdir() if p.is_file()]
        except FileNotFoundError:  # cleared meanwhile
            continue
        size = sum(stat.st_size for stat in files)
        newest = max((stat.st_mtime for stat in files), default=None)
        written = datetime.fromtimestamp(newest).isoformat(timespec="seconds") if newest else None
        record = {"key": folder.name, "entries": entries, "segments": segments, "bytes": size, "last_written": written}
        models.append({**record, **cache.settings})
        total += size
    return {"location": str(root), "bytes": total, "models": models}


def model_keys(root: Path | None = None) -> list[str]:
    """The model keys (folder names) the cache holds."""
    return [folder.name for folder in _model_folders(root or embeddings_root())]


def clear_cache(root: Path | None = None, *, model: str | None = None, before: datetime | None = None) -> int:
    """Delete cached embeddings: all of them, or those of the model keys starting with `model`, and of those
    only the vectors written before `before` when it is given. Returns the number of bytes freed (of files
    deleted; vectors forgotten inside a segment that still holds newer ones free space when it goes). Safe while
    runs use the cache: they recompute what they can no longer read, and keep writing."""
    root = root or embeddings_root()
    freed = 0
    for folder in _model_folders(root):
        if model is not None and not folder.name.startswith(model):
            continue
        if before is None:
            freed += _folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            freed += _clear_older(folder, before.timestamp())
    if model is None and before is None:
        shutil.rmtree(root, ignore_errors=True)
    return freed


def _folder_bytes(folder: Path) -> int:
    """The size of a folder's files, those that other processes delete meanwhile left out."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size if entry.is_file() else 0
    return total


def _clear_older(folder: Path, cutoff: float) -> int:
    """Forget one model key's vectors written before `cutoff` (epoch seconds); delete the segments left empty."""
    cache = EmbeddingCache.at(folder)
    empty = cache._with_index(False, lambda index: index.drop_older(cutoff)) or []
    freed = 0
    for name in empty:
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            freed += size
    cache._with_index(False, lambda index: index.drop_segments(empty))
    cache.close()
    return freed
