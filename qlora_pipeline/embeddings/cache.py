"""Content-addressed embedding cache, shared by every run under `cache_root()/embeddings`.

Layout: one folder per *model key* (a hash of everything that decides a vector except the text: model id,
revision, a fingerprint of local weights, quantization, compute dtype, device, prompt, pooling, max length,
normalization, library versions), holding `settings.json` (the key in readable form) and chunk files.
A chunk is written atomically (temp file + rename) as encoding goes, so an interrupted encode keeps every
finished chunk and the next run computes only what is missing. Each chunk carries a SHA-256 of its body;
a truncated or corrupt chunk is logged, deleted and its vectors recomputed, never used.

Chunk format (`*.emb`): magic `QLEMB1\\n\\0`, uint32 n, uint32 dim, 32-byte SHA-256 of the body, then the body:
n 32-byte text keys followed by n x dim little-endian float32 vectors.

Exactness: a hit returns the bytes the first encode wrote. Vectors depend on their batch-mates at the level
of float rounding (measured on the tiny Qwen3, mean and last-token pooling, NF4 and float32: up to 1.2e-7 on
unit vectors, from GEMM blocking and padded lengths), so a run whose texts were partly cached by a different
text set can differ from a cold-cache run of the same config by that much. A rerun of the same config, and
`qlora reproduce`, read back the very bytes of the first run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.models.tiny import cache_root

log = logging.getLogger(__name__)

MAGIC = b"QLEMB1\n\0"
HEADER = struct.Struct("<8sII32s")
KEY_BYTES = 32
FULL_HASH_LIMIT = 64 * 2**20  # weight files up to this size are hashed whole; larger ones by header+size+mtime


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


class EmbeddingCache:
    """The vectors cached for one model key. `lookup` reads every valid chunk; `put` writes one new chunk."""

    def __init__(self, settings: dict[str, Any], root: Path | None = None) -> None:
        self.settings = settings
        self.key = model_key(settings)
        self.folder = (root or embeddings_root()) / self.key

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """Cached vectors for those of `keys` that are present (corrupt chunks are deleted and skipped)."""
        wanted = set(keys)
        found: dict[bytes, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for chunk in sorted(self.folder.glob("*.emb")):
            content = read_chunk(chunk)
            if content is None:
                log.warning("embedding cache: %s is truncated or corrupt; deleted, its vectors are recomputed", chunk)
                chunk.unlink(missing_ok=True)
                continue
            chunk_keys, vectors = content
            for i, key in enumerate(chunk_keys):
                if key in wanted and key not in found:
                    found[key] = vectors[i]
        return found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> Path:
        """Write one chunk atomically; readers never see a partial file."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if len(keys) != len(vectors) or vectors.ndim != 2:
            raise ValueError(f"put needs one 2-D vector per key, got {len(keys)} keys and shape {vectors.shape}")
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():
            _atomic_write(settings_file, json.dumps(self.settings, indent=2, ensure_ascii=False).encode("utf-8"))
        body = b"".join(keys) + vectors.tobytes()
        header = HEADER.pack(MAGIC, len(keys), vectors.shape[1], hashlib.sha256(body).digest())
        path = self.folder / f"{time.time_ns():020d}-{os.getpid()}.emb"
        _atomic_write(path, header + body)
        return path


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


def cache_info(root: Path | None = None) -> dict[str, Any]:
    """Location, total size, and per model key: what it is and how many vectors it holds (headers only)."""
    root = root or embeddings_root()
    models = []
    total = 0
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        chunks = sorted(folder.glob("*.emb"))
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        entries = 0
        for chunk in chunks:
            with chunk.open("rb") as handle:
                head = handle.read(HEADER.size)
            if len(head) == HEADER.size and head[:8] == MAGIC:
                entries += HEADER.unpack(head)[1]
        settings_file = folder / "settings.json"
        settings = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
        models.append({"key": folder.name, "entries": entries, "chunks": len(chunks), "bytes": size, **settings})
        total += size
    return {"location": str(root), "bytes": total, "models": models}


def clear_cache(root: Path | None = None) -> int:
    """Delete every cached embedding; returns the number of bytes freed."""
    root = root or embeddings_root()
    freed = cache_info(root)["bytes"]
    shutil.rmtree(root, ignore_errors=True)
    return int(freed)
