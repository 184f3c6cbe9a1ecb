"""Content-addressed embedding cache, shared by every run and process under `cache_root()/embeddings`.

Layout: one folder per *model key* (a hash of everything that decides a vector except the text: model id,
revision, a fingerprint of local weights, quantization, compute dtype, device, prompt, pooling, max length,
normalization, library versions), holding `settings.json` (the key in readable form), chunk files of vectors,
and `index.sqlite`, which maps each text key to (chunk, row, CRC-32 of the vector).

Why this shape: a lookup asks the index for the keys it wants (a primary-key search per key) and reads only
those rows from the chunks (memory-mapped), so it costs what is asked for, not what the cache holds, and memory
stays bounded by the vectors returned. Writes append: each flush of an encode becomes a new chunk file, written
atomically (temp file + rename), then registered in the index in one transaction. SQLite (stdlib) in WAL mode
lets any number of processes on one machine read while one writes (each write transaction takes a few
milliseconds); a key that two processes both computed keeps the first registration. Chunk files are never
rewritten, so a reader never sees a partial vector.

Integrity: a chunk carries a SHA-256 of its body and the index a CRC-32 of every vector. A lookup checks each
row it reads, and the chunk's length; a truncated or corrupt chunk is logged, deleted with its index rows, and
every vector it held is recomputed, never used. A chunk on disk that the index does not know (a writer killed
between rename and commit, an index deleted or damaged, or a cache written before the index existed: chunk
files of the same format) is verified whole by its SHA-256 and registered when a cache is opened, so old caches
are read, not rebuilt. A damaged index file is moved aside and rebuilt from the chunks the same way.

Deletion under a running process (`qlora cache clear`): a reader whose chunk vanished counts a miss and
recomputes; a writer whose folder or index vanished starts a new one and carries on.

Chunk format (`*.emb`): magic `QLEMB1\\n\\0`, uint32 n, uint32 dim, 32-byte SHA-256 of the body, then the body:
n 32-byte text keys followed by n x dim little-endian float32 vectors.

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
import mmap
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
from typing import Any, TypeVar

import numpy as np

from qlora_pipeline.models.tiny import cache_root

log = logging.getLogger(__name__)

MAGIC = b"QLEMB1\n\0"
HEADER = struct.Struct("<8sII32s")
KEY_BYTES = 32
FULL_HASH_LIMIT = 64 * 2**20  # weight files up to this size are hashed whole; larger ones by header+size+mtime
INDEX = "index.sqlite"
SETTINGS = "settings.json"
CHUNK_SUFFIX = ".emb"
QUERY_KEYS = 900  # keys per SELECT ... IN (...): well under SQLite's variable limit, few round trips
BUSY_TIMEOUT_S = 120.0  # a writer waits this long for another process's write transaction
DAMAGED = "embedding cache: %s is truncated or corrupt; deleted, its vectors are recomputed"
SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    rows INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    indexed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY,
    chunk INTEGER NOT NULL,
    row INTEGER NOT NULL,
    crc INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_chunk ON vectors(chunk);
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


def chunk_size(rows: int, dim: int) -> int:
    return HEADER.size + rows * (KEY_BYTES + 4 * dim)


class EmbeddingCache:
    """The vectors cached for one model key: `lookup` asks the index and reads only the rows asked for; `put`
    appends one chunk. Safe to use from several processes at once; one instance may be shared by threads."""

    def __init__(self, settings: dict[str, Any], root: Path | None = None) -> None:
        self.settings = settings
        self.key = model_key(settings)
        self.folder = (root or embeddings_root()) / self.key
        self._index: _Index | None = None
        self._lock = threading.Lock()

    @classmethod
    def at(cls, folder: Path) -> EmbeddingCache:
        """The cache in an existing model-key folder (for info and clear), whatever its settings hash to."""
        settings_file = folder / SETTINGS
        settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
        cache = cls(settings, root=folder.parent)
        cache.folder = folder
        return cache

    # ---- reading ----------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """Cached vectors for those of `keys` that are present and intact. A chunk found truncated or corrupt
        is deleted with its index rows, and none of its vectors is returned (they are recomputed)."""
        if not len(keys) or not self.folder.is_dir():
            return {}
        distinct = list(dict.fromkeys(keys))
        with self._lock:
            located = self._with_index(False, lambda index: index.locate(distinct))
            found: dict[bytes, np.ndarray] = {}
            for (name, n, dim), wanted in (located or {}).items():
                vectors = self._read_rows(name, n, dim, wanted)
                if vectors is not None:
                    found.update(vectors)
            return found

    def _read_rows(
        self, name: str, n: int, dim: int, wanted: list[tuple[bytes, int, int]]
    ) -> dict[bytes, np.ndarray] | None:
        """The wanted rows of one chunk, each checked against its CRC; None when the chunk is gone (deleted
        by a `cache clear`) or damaged (then also deleted)."""
        path = self.folder / name
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            log.debug("embedding cache: %s was deleted; its vectors count as misses", path)
            self._forget([name])
            return None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size != chunk_size(n, dim) or handle.read(len(MAGIC)) != MAGIC:
                self._damaged(path)
                return None
            rows = np.fromiter((row for _, row, _ in wanted), dtype=np.int64, count=len(wanted))
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                vectors = _rows_of(view, n, dim, rows)
        found = {}
        for (key, _, crc), vector in zip(wanted, vectors, strict=True):
            if zlib.crc32(vector.tobytes()) != crc:
                self._damaged(path)
                return None
            found[key] = vector
        return found

    def _damaged(self, path: Path) -> None:
        log.warning(DAMAGED, path)
        path.unlink(missing_ok=True)
        self._forget([path.name])
        return None

    def _forget(self, names: list[str]) -> None:
        self._with_index(False, lambda index: index.drop_chunks(names))

    # ---- writing ----------------------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> Path | None:
        """Append one chunk (atomically: readers never see a partial file) and register it in the index.
        Returns its path, or None when the cache folder kept vanishing while writing (`cache clear` racing
        this write three times): the vectors are then not cached, and the caller carries on."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if len(keys) != len(vectors) or vectors.ndim != 2:
            raise ValueError(f"put needs one 2-D vector per key, got {len(keys)} keys and shape {vectors.shape}")
        if not len(keys):
            return None
        body = b"".join(keys) + vectors.tobytes()
        header = HEADER.pack(MAGIC, len(keys), vectors.shape[1], hashlib.sha256(body).digest())
        crcs = [zlib.crc32(row.tobytes()) for row in vectors]
        name = f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident() % 10**6:06d}{CHUNK_SUFFIX}"
        path = self.folder / name

        def write(index: _Index) -> Path:
            _atomic_write(path, header + body)  # first the file, then its rows: a row always has its file
            index.register(name, list(keys), crcs, vectors.shape[1], len(header) + len(body), time.time())
            return path

        with self._lock:
            written = self._with_index(True, write)
        if written is None:
            log.warning(
                "embedding cache: %s kept vanishing while writing; %d vectors not cached", self.folder, len(keys)
            )
        return written

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
                log.info("embedding cache: %s vanished (%s); opening it again", self.folder, exc)
                self._close()
        return None

    def _open(self, create: bool) -> _Index | None:
        """The index connection, (re)opened when it is missing or its file was replaced; chunk files it does
        not know are verified and registered first. None when there is no cache and `create` is false."""
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
        self._adopt_orphans(self._index)
        return self._index

    def _adopt_orphans(self, index: _Index) -> None:
        """Register the chunk files on disk that the index does not know; forget the rows of chunks gone."""
        on_disk = {entry.name for entry in os.scandir(self.folder) if entry.name.endswith(CHUNK_SUFFIX)}
        known = index.chunk_names()
        if known - on_disk:
            index.drop_chunks(sorted(known - on_disk))
        orphans = sorted(on_disk - known)
        if orphans:
            log.info("embedding cache: registering %d chunk file(s) in %s", len(orphans), self.folder / INDEX)
        for name in orphans:
            path = self.folder / name
            content = read_chunk(path)
            if content is None:
                if path.exists():
                    log.warning(
                        "embedding cache: %s is truncated or corrupt; deleted, its vectors are recomputed", path
                    )
                    path.unlink(missing_ok=True)
                continue
            chunk_keys, vectors = content
            crcs = [zlib.crc32(row.tobytes()) for row in vectors.astype("<f4")]
            created = path.stat().st_mtime if path.exists() else time.time()
            index.register(name, chunk_keys, crcs, vectors.shape[1], chunk_size(*vectors.shape), created)

    def _close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def __del__(self) -> None:  # the sqlite3 module closes connections anyway; this makes it prompt
        index = getattr(self, "_index", None)
        if index is not None:
            index.close()


def _rows_of(view: mmap.mmap, n: int, dim: int, rows: np.ndarray) -> np.ndarray:
    """A copy of the given rows of a mapped chunk's vectors: only their pages are read. Every view of the
    mapping dies with this frame, so the mapping can be closed afterwards."""
    block = np.frombuffer(view, dtype="<f4", count=n * dim, offset=HEADER.size + n * KEY_BYTES).reshape(n, dim)
    return block[rows].astype(np.float32)


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
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never
            connection.executescript(SCHEMA)  # the index's consistency; lost rows become orphans, re-registered
            connection.execute("SELECT COUNT(*) FROM chunks").fetchone()  # reads a page: a damaged file fails here
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
        """Delete a damaged index (a cache is a cache); the chunks are registered again as orphans."""
        log.warning("embedding cache: %s is damaged (%s); rebuilt from the chunk files", path, cause)
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

    def locate(self, keys: list[bytes]) -> dict[tuple[str, int, int], list[tuple[bytes, int, int]]]:
        """(chunk name, rows, dim) -> [(key, row, crc)] for the keys the index holds."""
        by_chunk: dict[int, list[tuple[bytes, int, int]]] = {}
        with self._guard() as db:
            for start in range(0, len(keys), QUERY_KEYS):
                part = keys[start : start + QUERY_KEYS]
                marks = ",".join("?" * len(part))
                query = f"SELECT key, chunk, row, crc FROM vectors WHERE key IN ({marks})"
                for key, chunk, row, crc in db.execute(query, part):
                    by_chunk.setdefault(chunk, []).append((bytes(key), row, crc))
            found = {}
            ids = list(by_chunk)
            for start in range(0, len(ids), QUERY_KEYS):
                some = ids[start : start + QUERY_KEYS]
                marks = ",".join("?" * len(some))
                for chunk, name, rows, dim in db.execute(
                    f"SELECT id, name, rows, dim FROM chunks WHERE id IN ({marks})", some
                ):
                    found[name, rows, dim] = sorted(by_chunk[chunk], key=lambda item: item[1])
        return found

    def register(self, name: str, keys: list[bytes], crcs: list[int], dim: int, size: int, created: float) -> None:
        """One transaction: the chunk and those of its keys not registered yet (the first write of a key wins)."""
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR IGNORE INTO chunks (name, rows, dim, bytes, created) VALUES (?, ?, ?, ?, ?)",
                    (name, len(keys), dim, size, created),
                )
                (chunk,) = db.execute("SELECT id FROM chunks WHERE name = ?", (name,)).fetchone()
                db.executemany(
                    "INSERT OR IGNORE INTO vectors (key, chunk, row, crc) VALUES (?, ?, ?, ?)",
                    [(key, chunk, row, crc) for row, (key, crc) in enumerate(zip(keys, crcs, strict=True))],
                )
                db.execute(
                    "UPDATE chunks SET indexed = (SELECT COUNT(*) FROM vectors WHERE chunk = ?) WHERE id = ?",
                    (chunk, chunk),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def drop_chunks(self, names: list[str]) -> None:
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for name in names:
                    row = db.execute("SELECT id FROM chunks WHERE name = ?", (name,)).fetchone()
                    if row is not None:
                        db.execute("DELETE FROM vectors WHERE chunk = ?", row)
                        db.execute("DELETE FROM chunks WHERE id = ?", row)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def chunk_names(self, before: float | None = None) -> set[str]:
        with self._guard() as db:
            if before is None:
                return {name for (name,) in db.execute("SELECT name FROM chunks")}
            return {name for (name,) in db.execute("SELECT name FROM chunks WHERE created < ?", (before,))}

    def totals(self) -> tuple[int, int, int]:
        """(vectors indexed, chunk files, their bytes), from the chunk table alone: fast at any size."""
        with self._guard() as db:
            entries, chunks, size = db.execute(
                "SELECT COALESCE(SUM(indexed), 0), COUNT(*), COALESCE(SUM(bytes), 0) FROM chunks"
            ).fetchone()
        return int(entries), int(chunks), int(size)

    def close(self) -> None:
        self.connection.close()


def read_chunk(path: Path) -> tuple[list[bytes], np.ndarray] | None:
    """(keys, vectors) of a chunk, or None when its header, length or checksum is wrong."""
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
    (chunk files it does not know yet, such as a cache written before the index existed, are registered first)."""
    root = root or embeddings_root()
    models = []
    total = 0
    for folder in _model_folders(root):
        cache = EmbeddingCache.at(folder)
        entries, chunks, size = cache._with_index(False, lambda index: index.totals()) or (0, 0, 0)
        cache.close()
        size += sum(p.stat().st_size for p in folder.glob(f"{INDEX}*") if p.is_file())
        newest = max((p.stat().st_mtime for p in folder.glob(f"*{CHUNK_SUFFIX}")), default=None)
        written = datetime.fromtimestamp(newest).isoformat(timespec="seconds") if newest else None
        record = {"key": folder.name, "entries": entries, "chunks": chunks, "bytes": size, "last_written": written}
        models.append({**record, **cache.settings})
        total += size
    return {"location": str(root), "bytes": total, "models": models}


def model_keys(root: Path | None = None) -> list[str]:
    """The model keys (folder names) the cache holds."""
    return [folder.name for folder in _model_folders(root or embeddings_root())]


def clear_cache(root: Path | None = None, *, model: str | None = None, before: datetime | None = None) -> int:
    """Delete cached embeddings: all of them, or those of the model keys starting with `model`, and of those
    only the chunks written before `before` when it is given. Returns the number of bytes freed. Safe while
    runs use the cache: they recompute what they can no longer read, and keep writing."""
    root = root or embeddings_root()
    freed = 0
    for folder in _model_folders(root):
        if model is not None and not folder.name.startswith(model):
            continue
        if before is None:
            freed += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        else:
            freed += _clear_older(folder, before.timestamp())
    if model is None and before is None:
        shutil.rmtree(root, ignore_errors=True)
    return freed


def _clear_older(folder: Path, cutoff: float) -> int:
    """Delete the chunks of one model key written before `cutoff` (epoch seconds): the files first, then their
    index rows, so that a process opening the cache meanwhile cannot register them again."""
    cache = EmbeddingCache.at(folder)
    old = cache._with_index(False, lambda index: sorted(index.chunk_names(before=cutoff))) or []
    freed = 0
    for name in old:
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            freed += size
    cache._forget(old)
    cache.close()
    return freed
