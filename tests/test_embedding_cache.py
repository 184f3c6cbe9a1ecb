"""The embedding cache on its own (no model): the index, old caches, damage, several processes at once, clearing
while in use, and `qlora cache info | clear` with its filters. Vectors here are made up, one per key."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from qlora_pipeline.cli import main
from qlora_pipeline.embeddings import cache as cache_module
from qlora_pipeline.embeddings.cache import INDEX, EmbeddingCache, cache_info, clear_cache, read_chunk, text_key

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"model": "made-up", "pooling": "mean"}
DIM = 16


def vector_of(key: bytes) -> np.ndarray:
    """A vector determined by its key, so any process can check what it reads."""
    return np.frombuffer(hashlib.sha512(key).digest(), dtype=np.uint8)[:DIM].astype(np.float32) / 255


def keys_of(numbers: range) -> list[bytes]:
    return [text_key(f"text {i}") for i in numbers]


def fill(cache: EmbeddingCache, numbers: range, per_chunk: int = 50) -> list[bytes]:
    keys = keys_of(numbers)
    for start in range(0, len(keys), per_chunk):
        part = keys[start : start + per_chunk]
        cache.put(part, np.stack([vector_of(k) for k in part]))
    return keys


def assert_right(found: dict[bytes, np.ndarray]) -> None:
    for key, vector in found.items():
        np.testing.assert_array_equal(vector, vector_of(key))


def test_a_lookup_opens_only_the_chunks_holding_the_keys_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(500))  # 10 chunks of 50
    cache.lookup(keys[:1])  # opens the index
    opened: list[str] = []
    real_open = Path.open

    def recording_open(self: Path, *args: object, **kwargs: object) -> object:
        if self.parent == cache.folder:
            opened.append(self.name)
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", recording_open)
    monkeypatch.setattr(cache_module, "read_chunk", lambda path: pytest.fail("a lookup read a whole chunk"))
    asked = keys[120:130] + keys_of(range(1000, 1005))  # ten in the third chunk, five never cached
    found = cache.lookup(asked)
    assert sorted(found) == sorted(keys[120:130])
    assert_right(found)
    assert len(opened) == 1 and opened[0].endswith(".emb")


def test_a_cache_written_before_the_index_existed_is_read(tmp_path: Path) -> None:
    """Chunk files alone (the 0.1 layout: the same chunk format, no index.sqlite) are verified and registered."""
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(120))
    cache.close()
    for path in cache.folder.glob(f"{INDEX}*"):
        path.unlink()
    assert all(read_chunk(p) is not None for p in cache.folder.glob("*.emb"))
    again = EmbeddingCache(SETTINGS, root=tmp_path)
    found = again.lookup(keys)
    assert len(found) == 120
    assert_right(found)
    assert cache_info(tmp_path)["models"][0]["entries"] == 120


def test_a_damaged_index_is_rebuilt_from_the_chunks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(100))
    cache.close()
    for path in cache.folder.glob(f"{INDEX}-*"):
        path.unlink()
    (cache.folder / INDEX).write_bytes(b"not a database" * 100)
    found = EmbeddingCache(SETTINGS, root=tmp_path).lookup(keys)
    assert len(found) == 100
    assert_right(found)
    assert "is damaged" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_or_missing_chunk_is_never_used(tmp_path: Path, damage: str) -> None:
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(100))  # two chunks
    first = sorted(cache.folder.glob("*.emb"))[0]
    data = bytearray(first.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x10
        first.write_bytes(bytes(data))
    elif damage == "truncate":
        first.write_bytes(bytes(data[:-64]))
    else:
        first.unlink()
    found = cache.lookup(keys)
    assert sorted(found) == sorted(keys[50:])  # nothing of the damaged chunk, not even its intact rows
    assert_right(found)
    assert not first.exists()
    assert cache_info(tmp_path)["models"][0]["entries"] == 50


WORKER = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from test_embedding_cache import SETTINGS, assert_right, keys_of, vector_of
from qlora_pipeline.embeddings.cache import EmbeddingCache

root, worker = Path(sys.argv[1]), int(sys.argv[2])
cache = EmbeddingCache(SETTINGS, root=root)
keys = keys_of(range(worker * 300, worker * 300 + 600))  # half shared with the next worker
for start in range(0, len(keys), 30):
    part = keys[start : start + 30]
    have = cache.lookup(part)
    assert_right(have)
    todo = [k for k in part if k not in have]
    if todo:
        cache.put(todo, np.stack([vector_of(k) for k in todo]))
    assert_right(cache.lookup(keys[: start + 30]))
print("ok")
"""


def test_processes_filling_one_cache_at_once_while_it_is_cleared(tmp_path: Path) -> None:
    """Four processes write overlapping keys into one model key's cache while this one clears the whole cache
    twice: no process fails, every vector read is the one written, and the index stays consistent."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path / "embeddings"
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), str(w)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    cleared_while_running = 0
    deadline = time.monotonic() + 120
    while cleared_while_running < 2 and time.monotonic() < deadline:
        if any(root.glob("*/*.emb")):  # a worker has written: clear under all of them
            running = sum(w.poll() is None for w in workers)
            clear_cache(root)
            cleared_while_running += running > 0
            time.sleep(0.3)
        time.sleep(0.05)
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, [err[-2000:] for _, err in results]
    assert cleared_while_running == 2
    cache = EmbeddingCache(SETTINGS, root=root)
    found = cache.lookup(keys_of(range(1500)))
    assert_right(found)
    with sqlite3.connect(cache.folder / INDEX) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        indexed = db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    assert indexed == len(found) == cache_info(root)["models"][0]["entries"]


def test_cache_clear_by_model_key_and_by_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    one = EmbeddingCache({"model": "one"})
    two = EmbeddingCache({"model": "two"})
    fill(one, range(100))
    fill(two, range(100))
    old = sorted(two.folder.glob("*.emb"))[0]
    with sqlite3.connect(two.folder / INDEX) as db:  # written "a week ago"
        db.execute("UPDATE chunks SET created = ? WHERE name = ?", (time.time() - 7 * 86400, old.name))
    two.close()

    day = (datetime.now() - timedelta(days=2)).date().isoformat()
    assert main(["cache", "clear", "--older-than", day, "--yes"]) == 0
    entries = {m["model"]: m["entries"] for m in cache_info()["models"]}
    assert entries == {"one": 100, "two": 50} and not old.exists()

    assert main(["cache", "clear", "--model", one.key[:8], "--yes"]) == 0
    assert [m["model"] for m in cache_info()["models"]] == ["two"]
    assert main(["cache", "clear", "--model", "ffff", "--yes"]) == 2
    assert "no model key starts with 'ffff'" in capsys.readouterr().err
    assert main(["cache", "clear", "--older-than", "last tuesday", "--yes"]) == 2
    assert "--older-than" in capsys.readouterr().err

    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(m["key"], m["entries"], m["chunks"]) for m in info["models"]] == [(two.key, 50, 1)]
