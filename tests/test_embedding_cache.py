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
from helpers import CACHE_SETTINGS as SETTINGS
from helpers import DIM, REPO, assert_right, fill, keys_of, vector_of

from qlora_pipeline.cli import main
from qlora_pipeline.embeddings import cache as cache_module
from qlora_pipeline.embeddings.cache import INDEX, EmbeddingCache, cache_info, clear_cache, read_chunk


def test_a_lookup_reads_the_records_asked_for_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(500))
    cache.lookup(keys[:1])  # opens the index
    read: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, size: int, offset: int) -> bytes:
        read.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", recording_pread)
    monkeypatch.setattr(cache_module, "read_segment", lambda *a, **k: pytest.fail("a lookup read a whole segment"))
    assert cache.lookup(keys_of(range(1000, 1005))) == {}  # never cached: the index alone answers
    assert read == []
    asked = keys[120:130] + [keys[300]] + keys_of(range(1000, 1005))  # a run of ten, one more, five never cached
    found = cache.lookup(asked)
    assert sorted(found) == sorted(keys[120:130] + [keys[300]])
    assert_right(found)
    record = cache_module.record_dtype(DIM).itemsize
    assert read == [10 * record, record]  # one read per run of consecutive records


def write_old_chunk(path: Path, keys: list[bytes]) -> None:
    """A chunk file as caches wrote them before segments: header, SHA-256 of the body, keys, then vectors."""
    body = b"".join(keys) + np.stack([vector_of(k) for k in keys]).astype("<f4").tobytes()
    header = cache_module.HEADER.pack(cache_module.MAGIC, len(keys), DIM, hashlib.sha256(body).digest())
    path.write_bytes(header + body)


def test_a_cache_written_before_segments_is_read(tmp_path: Path) -> None:
    """Chunk files alone (the 0.1 layout, no index): each is verified, moved into a segment and deleted; a
    damaged one is deleted and its vectors are misses."""
    folder = EmbeddingCache(SETTINGS, root=tmp_path).folder
    folder.mkdir(parents=True)
    keys = keys_of(range(150))
    for i, start in enumerate(range(0, 150, 50)):
        write_old_chunk(folder / f"{i:020d}-1.emb", keys[start : start + 50])
    damaged = folder / f"{2:020d}-1.emb"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    found = EmbeddingCache(SETTINGS, root=tmp_path).lookup(keys)
    assert sorted(found) == sorted(keys[:100])
    assert_right(found)
    assert not list(folder.glob("*.emb")) and len(list(folder.glob("*.seg"))) == 1
    assert cache_info(tmp_path)["models"][0]["entries"] == 100


def test_segments_the_index_does_not_know_are_registered(tmp_path: Path) -> None:
    """The index deleted (or a writer killed before registering its segment): the segments are scanned."""
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(120))
    cache.close()
    for path in cache.folder.glob(f"{INDEX}*"):
        path.unlink()
    (segment,) = cache.folder.glob("*.seg")
    assert read_chunk(segment) is not None
    found = EmbeddingCache(SETTINGS, root=tmp_path).lookup(keys)
    assert len(found) == 120
    assert_right(found)
    assert cache_info(tmp_path)["models"][0]["entries"] == 120


def test_a_damaged_index_is_rebuilt_from_the_segments(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
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
def test_a_damaged_or_missing_record_is_never_used(tmp_path: Path, damage: str) -> None:
    cache = EmbeddingCache(SETTINGS, root=tmp_path)
    keys = fill(cache, range(100))
    (segment,) = cache.folder.glob("*.seg")
    record = cache_module.record_dtype(DIM).itemsize
    data = bytearray(segment.read_bytes())
    if damage == "flip":
        data[cache_module.SEGMENT_HEADER.size + 7 * record + 40] ^= 0x10  # in the vector of record 7
        segment.write_bytes(bytes(data))
        expected = keys[:7] + keys[8:]
    elif damage == "truncate":
        segment.write_bytes(bytes(data[: -record - 5]))  # the last record and 5 bytes of the one before
        expected = keys[:98]
    else:
        segment.unlink()
        expected = []
    found = cache.lookup(keys)
    assert sorted(found) == sorted(expected)
    assert_right(found)
    assert cache_info(tmp_path)["models"][0]["entries"] == len(expected)


WORKER = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from helpers import CACHE_SETTINGS as SETTINGS, assert_right, keys_of, vector_of
from qlora_pipeline.embeddings.cache import EmbeddingCache

root, worker = Path(sys.argv[1]), int(sys.argv[2])
cache = EmbeddingCache(SETTINGS, root=root)
keys = keys_of(range(worker * 300, worker * 300 + 600))  # half shared with the next worker


def fill():
    for start in range(0, len(keys), 30):
        part = keys[start : start + 30]
        have = cache.lookup(part)
        assert_right(have)
        todo = [k for k in part if k not in have]
        if todo:
            cache.put(todo, np.stack([vector_of(k) for k in todo]))
        assert_right(cache.lookup(keys[: start + 30]))


fill()
while not (root.parent / "cleared").exists():  # keep filling while the test clears under us
    fill()
    time.sleep(0.02)
fill()  # once more after the last clear: every key is in the cache at the end
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
        if any(root.glob("*/*.seg")):  # a worker has written: clear under all of them
            running = sum(w.poll() is None for w in workers)
            clear_cache(root)
            cleared_while_running += running > 0
            time.sleep(0.3)
        time.sleep(0.05)
    (tmp_path / "cleared").touch()
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, [err[-2000:] for _, err in results]
    assert cleared_while_running == 2
    cache = EmbeddingCache(SETTINGS, root=root)
    found = cache.lookup(keys_of(range(1500)))
    assert_right(found)
    assert len(found) == 1500  # the workers' last fill came after the last clear
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
    week_ago = time.time() - 7 * 86400
    with sqlite3.connect(two.folder / INDEX) as db:  # half of two's vectors were written a week ago
        db.execute("UPDATE vectors SET written = ? WHERE record < 50", (week_ago,))
        db.execute("UPDATE segments SET oldest = ?", (week_ago,))
    two.close()

    day = (datetime.now() - timedelta(days=2)).date().isoformat()
    assert main(["cache", "clear", "--older-than", day, "--yes"]) == 0
    entries = {m["model"]: m["entries"] for m in cache_info()["models"]}
    assert entries == {"one": 100, "two": 50}
    assert len(EmbeddingCache({"model": "two"}).lookup(keys_of(range(100)))) == 50

    assert main(["cache", "clear", "--model", one.key[:8], "--yes"]) == 0
    assert [m["model"] for m in cache_info()["models"]] == ["two"]
    assert main(["cache", "clear", "--model", "ffff", "--yes"]) == 2
    assert "no model key starts with 'ffff'" in capsys.readouterr().err
    assert main(["cache", "clear", "--older-than", "last tuesday", "--yes"]) == 2
    assert "--older-than" in capsys.readouterr().err

    assert main(["cache", "clear", "--older-than", datetime.now().isoformat(), "--yes"]) == 0
    assert not list(two.folder.glob("*.seg"))  # a segment left with no vector is deleted
    capsys.readouterr()
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(m["key"], m["entries"], m["segments"]) for m in info["models"]] == [(two.key, 0, 0)]
