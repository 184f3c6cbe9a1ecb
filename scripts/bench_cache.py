"""Benchmark the embedding cache at 10k, 100k and 1M cached vectors (width 128, the tiny model's), side by side.

For each size a cache is filled 512 vectors at a time (as encoding flushes them), then a fresh process measures:
opening it, lookups of a fixed number of asked texts (half cached, half not, spread at random over the cache;
best of the repeats) for 100, 1,000 and 10,000 asked, `qlora cache info`, a `cache clear --older-than` that finds
nothing to delete, its peak RSS, and, for contrast, reading every vector file whole (what a lookup cost before
the index, when it read every chunk). Lookup time and memory should follow the texts asked for, not the size of
the cache.

Usage: PYTHONPATH=. python scripts/bench_cache.py [--sizes 10000 100000 1000000] [--repeats 5] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

DIM = 128
CHUNK = 512
ASKED = (100, 1_000, 10_000)
SETTINGS = {"bench": "cache", "dim": DIM}


def key(i: int) -> bytes:
    from qlora_pipeline.embeddings.cache import text_key

    return text_key(f"cached text {i}")


def fill(root: Path, size: int) -> float:
    from qlora_pipeline.embeddings.cache import EmbeddingCache

    cache = EmbeddingCache(SETTINGS, root=root)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for begin in range(0, size, CHUNK):
        n = min(CHUNK, size - begin)
        cache.put([key(i) for i in range(begin, begin + n)], rng.standard_normal((n, DIM)).astype(np.float32))
    return time.perf_counter() - start


def measure(root: Path, size: int, repeats: int) -> dict[str, float]:
    """In a fresh process: open, lookups, info, clear-by-date, full scan; peak RSS before the full scan."""
    from qlora_pipeline.embeddings.cache import EmbeddingCache, cache_info, clear_cache, read_segment

    rng = np.random.default_rng(1)
    result: dict[str, float] = {}
    start = time.perf_counter()
    cache = EmbeddingCache(SETTINGS, root=root)
    cache.lookup([key(0)])
    result["open_ms"] = 1000 * (time.perf_counter() - start)
    for asked in ASKED:
        present = [key(int(i)) for i in rng.choice(size, asked // 2, replace=False)]
        absent = [key(size + i) for i in range(asked - asked // 2)]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            found = cache.lookup(present + absent)
            best = min(best, time.perf_counter() - start)
        assert len(found) == len(present)
        result[f"lookup_{asked}_ms"] = 1000 * best
    start = time.perf_counter()
    info = cache_info(root)
    result["info_ms"] = 1000 * (time.perf_counter() - start)
    assert info["models"][0]["entries"] == size
    start = time.perf_counter()
    clear_cache(root, before=datetime(2000, 1, 1))  # deletes nothing: the index finds no chunk that old
    result["clear_older_ms"] = 1000 * (time.perf_counter() - start)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wanted = {key(int(i)) for i in rng.choice(size, ASKED[1], replace=False)}
    start = time.perf_counter()
    for segment in sorted(cache.folder.glob("*.seg")):  # what a lookup read before the index: everything
        content = read_segment(segment)
        assert content is not None
        _ = [k for k, _ in content[0] if k in wanted]
    result["full_scan_ms"] = 1000 * (time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where the caches go (default: a temporary folder, removed)")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "ROOT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, root, size = args.child[0], Path(args.child[1]), int(args.child[2])
        out = {"fill_s": fill(root, size)} if what == "fill" else measure(root, size, args.repeats)
        print(json.dumps(out))
        return

    base = args.dir or Path(tempfile.mkdtemp(prefix="qlora-bench-cache-"))
    rows = {}
    try:
        for size in args.sizes:
            root = base / f"cache_{size}"
            shutil.rmtree(root, ignore_errors=True)
            child = [sys.executable, __file__, "--repeats", str(args.repeats), "--child"]
            filled = json.loads(
                subprocess.run(
                    [*child, "fill", str(root), str(size)], capture_output=True, text=True, check=True
                ).stdout
            )
            measured = json.loads(
                subprocess.run(
                    [*child, "measure", str(root), str(size)], capture_output=True, text=True, check=True
                ).stdout
            )
            on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
            rows[size] = {**filled, **measured, "disk_mb": on_disk}
            print(f"  {size:>9,} vectors done ({filled['fill_s']:.1f} s to fill)", file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    sizes = list(rows)
    print(
        f"embedding cache, {DIM}-dim vectors in chunks of {CHUNK}; lookups: half of the asked texts cached, "
        f"best of {args.repeats}"
    )
    print(f"  {'cached vectors':<34}" + "".join(f"{s:>12,}" for s in sizes))
    lines = [
        ("fill (s, 512 vectors a put)", "fill_s", "{:>12.1f}"),
        ("on disk (MiB)", "disk_mb", "{:>12.0f}"),
        ("open (ms)", "open_ms", "{:>12.1f}"),
        *[(f"lookup of {a:,} texts (ms)", f"lookup_{a}_ms", "{:>12.1f}") for a in ASKED],
        ("qlora cache info (ms)", "info_ms", "{:>12.1f}"),
        ("clear --older-than, nothing old (ms)", "clear_older_ms", "{:>12.1f}"),
        ("peak RSS of the reader (MiB)", "peak_rss_mb", "{:>12.0f}"),
        ("reading every vector file (ms)", "full_scan_ms", "{:>12.0f}"),
    ]
    for label, name, form in lines:
        print(f"  {label:<34}" + "".join(form.format(rows[s][name]) for s in sizes))
    first, last = sizes[0], sizes[-1]
    mid = f"lookup_{ASKED[1]}_ms"
    growth = rows[last][mid] / rows[first][mid]
    print(
        f"  {last // first}x the cached vectors: lookup of {ASKED[1]:,} texts x{growth:.2f}, "
        f"peak RSS x{rows[last]['peak_rss_mb'] / rows[first]['peak_rss_mb']:.2f}, reading everything "
        f"x{rows[last]['full_scan_ms'] / rows[first]['full_scan_ms']:.0f}"
    )
    a, b = f"lookup_{ASKED[0]}_ms", f"lookup_{ASKED[-1]}_ms"
    print(
        f"  {ASKED[-1] // ASKED[0]}x the texts asked, at {last:,} cached: lookup x{rows[last][b] / rows[last][a]:.1f}"
    )


if __name__ == "__main__":
    main()
