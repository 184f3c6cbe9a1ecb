"""Concurrency: runs started at the same moment get their own run directories and all succeed; processes filling
one embedding cache neither corrupt it nor lose an entry; `qlora cache clear` during a run does not break the run."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from procs import EMBEDDINGS, REPO, WAIT_S, child_env, read_json, start

from qlora_pipeline.cli import main
from qlora_pipeline.embeddings.cache import EmbeddingCache
from qlora_pipeline.reproduce import compare_runs


@pytest.mark.slow  # 8 processes of ~10 s of CPU each
def test_eight_runs_started_at_once_get_eight_run_directories_and_all_succeed(
    tmp_path: Path, fresh_cache: Path
) -> None:
    """Held until every process is ready, then released together: they allocate run directories, encode the same
    texts into the same cache and write their outputs at the same time."""
    go = tmp_path / "go"
    root = tmp_path / "out"
    processes = [
        start([*EMBEDDINGS, "--output-dir", str(root)], tmp_path, fresh_cache, point="start", release=go, tag=f"p{i}")
        for i in range(8)
    ]
    for process in processes:
        process.wait_held()
    go.touch()
    codes = [process.wait() for process in processes]
    assert codes == [0] * 8, [p.stderr()[-2000:] for p in processes if p.popen.returncode]
    runs = sorted(p.name for p in root.iterdir() if p.name.startswith("run_"))
    assert runs == [f"run_{i:03d}" for i in range(1, 9)]
    for run in runs:
        assert read_json(root / run / "status.json")["state"] == "succeeded"
        comparison = compare_runs(root / "run_001", root / run)  # same config, same results, whoever ran first
        assert comparison["matches"], (run, comparison["checks"])


FILL = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    import numpy as np
    from qlora_pipeline.embeddings.cache import EmbeddingCache

    index, start = int(sys.argv[1]), Path(sys.argv[2])
    while not start.exists():
        time.sleep(0.005)
    cache = EmbeddingCache({"model": "concurrency-test"})
    for batch in range(12):  # overlapping ranges: every key is written by several processes
        first = (index * 15 + batch * 10) % 200
        keys = [hashlib.sha256(str(k).encode()).digest() for k in range(first, first + 25)]
        rows = [np.random.default_rng(k).standard_normal(16).astype(np.float32) for k in range(first, first + 25)]
        vectors = np.stack(rows)
        cache.put(keys, vectors)
    """
)


def expected_vector(key: int) -> np.ndarray:
    return np.random.default_rng(key).standard_normal(16).astype(np.float32)


def test_processes_filling_one_cache_at_once_leave_every_entry_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    fillers = [
        subprocess.Popen([sys.executable, "-c", FILL, str(i), str(go)], cwd=REPO, env=child_env(cache))
        for i in range(4)
    ]
    time.sleep(0.5)
    go.touch()
    assert [f.wait(timeout=WAIT_S) for f in fillers] == [0] * 4
    monkeypatch.setenv("QLORA_CACHE_DIR", str(cache))
    written = sorted({(i * 15 + b * 10) % 200 + k for i in range(4) for b in range(12) for k in range(25)})
    keys = {hashlib.sha256(str(k).encode()).digest(): k for k in written}
    found = EmbeddingCache({"model": "concurrency-test"}).lookup(list(keys))
    assert len(found) == len(keys)
    assert all(np.array_equal(vector, expected_vector(keys[key])) for key, vector in found.items())


@pytest.mark.parametrize("point", ["cache_put:1", pytest.param("encode:3", marks=pytest.mark.slow)])
def test_cache_clear_while_a_run_encodes_does_not_break_the_run(
    point: str, tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache is cleared while the run is about to write its first vectors (or is mid-batch): it writes them
    into a fresh cache and ends as it would have."""
    go = tmp_path / "go"
    process = start(
        [*EMBEDDINGS, "--output-dir", str(tmp_path / "out")], tmp_path, fresh_cache, point=point, release=go
    )
    process.wait_held()
    monkeypatch.setenv("QLORA_CACHE_DIR", str(fresh_cache))
    assert main(["cache", "clear", "--yes"]) == 0
    assert "deleted" in capsys.readouterr().out
    go.touch()
    assert process.wait() == 0, process.stderr()
    assert read_json(tmp_path / "out" / "run_001" / "status.json")["state"] == "succeeded"
    assert main(["cache", "info"]) == 0


@pytest.mark.slow  # two runs (~10 s of CPU each)
def test_a_run_does_not_recompute_what_another_process_finished_meanwhile(tmp_path: Path, fresh_cache: Path) -> None:
    """B has looked the cache up (empty) and is in its first forward pass; A then writes the train split's vectors.
    B should take them from the cache instead of computing them again."""
    release_a, release_b = tmp_path / "go_a", tmp_path / "go_b"
    root = tmp_path / "out"
    args = [*EMBEDDINGS, "--output-dir", str(root)]
    a = start(args, tmp_path, fresh_cache, point="cache_put:1", release=release_a, tag="a")
    a.wait_held()  # A computed the train split and is about to write it
    b = start(args, tmp_path, fresh_cache, point="encode:1", release=release_b, tag="b")
    b.wait_held()  # B found nothing cached and started its first batch
    release_a.touch()
    assert a.wait() == 0, a.stderr()
    release_b.touch()
    assert b.wait() == 0, b.stderr()
    computed = read_json(root / "run_002" / "config.json")["embedding"]["splits"]["train"]["computed"]
    assert computed < 84  # 84 train texts, all of them finished by A before B got past its first batch
