"""Benchmark the data layer on a generated 1,000,000-row CSV: load -> clean (+ dedup) -> split.

    python scripts/bench_data.py [--rows 1000000] [--seed 0]

The CSV is written to a temporary folder: distinct reviews plus ~15% exact duplicates, ~5% near duplicates
(case, punctuation, spacing), dirty white space, control characters, URLs, and a few texts with both labels.
Each stage runs through the package's own functions; it prints rows/s per stage and the process's peak RSS
(which includes the ~0.3 GB of imported libraries; the CSV is generated in a child process).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qlora_pipeline.config import DataConfig, SourceConfig  # noqa: E402
from qlora_pipeline.data.clean import clean  # noqa: E402
from qlora_pipeline.data.sources import load_source  # noqa: E402
from qlora_pipeline.data.split import make_splits  # noqa: E402

WORDS = np.array(
    [
        "the",
        "a",
        "great",
        "terrible",
        "service",
        "room",
        "food",
        "price",
        "staff",
        "bed",
        "quiet",
        "noisy",
        "clean",
        "dirty",
        "slow",
        "fast",
    ]
)


def generate(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    distinct = int(rows * 0.8)
    words = WORDS[rng.integers(0, len(WORDS), size=(distinct, 8))]
    texts = pd.Series([" ".join(w) for w in words.tolist()]) + " #" + pd.Series(np.arange(distinct)).astype(str)
    labels = rng.integers(0, 2, size=distinct)
    exact = rng.integers(0, distinct, size=int(rows * 0.15))
    near = rng.integers(0, distinct, size=rows - distinct - len(exact))
    frame = pd.DataFrame(
        {
            "text": pd.concat(
                [texts, texts.iloc[exact], "  " + texts.iloc[near].str.upper() + " !!\t"], ignore_index=True
            ),
            "label": np.concatenate([labels, labels[exact], labels[near]]),
        }
    )
    dirty = rng.random(len(frame))
    frame.loc[dirty < 0.05, "text"] = frame["text"] + "\u200b  see https://example.com/x"
    frame.loc[(dirty >= 0.05) & (dirty < 0.06), "text"] = "\t" + frame["text"] + "\x07"
    conflicts = rng.integers(0, len(frame), size=200)
    frame.loc[conflicts, "label"] = 1 - frame.loc[conflicts, "label"]
    frame.sample(frac=1.0, random_state=seed).to_csv(path, index=False)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024 / 1024  # Linux: KiB, macOS: bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.csv"
        start = time.perf_counter()
        # Generate in a child process, so the peak RSS printed below is the data layer's alone.
        child = multiprocessing.get_context("spawn").Process(target=generate, args=(path, args.rows, args.seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"generating the CSV failed (exit code {child.exitcode})")
        print(
            f"generated {args.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s"
        )
        cfg = DataConfig(
            sources=[SourceConfig(name="bench", type="local", path=str(path))], mask_urls=True, mask_mentions=True
        )
        timings = []

        def stage(name: str, rows_in: int, fn, *fn_args):  # type: ignore[no-untyped-def]
            begin = time.perf_counter()
            result = fn(*fn_args)
            seconds = time.perf_counter() - begin
            timings.append((name, rows_in, seconds))
            print(
                f"{name:<22} {rows_in:>9,} rows  {seconds:6.2f} s  {rows_in / seconds:>11,.0f} rows/s  "
                f"peak RSS {peak_rss_mb():,.0f} MB"
            )
            return result

        source = stage("load (csv + labels)", args.rows, load_source, cfg.sources[0])
        cleaned, removed = stage("clean + dedup", len(source.frame), clean, source.frame, cfg)
        splits = stage("split (stratified)", len(cleaned), make_splits, cleaned, cfg, source.label_names, args.seed)
        total = sum(seconds for _, _, seconds in timings)
        print(f"{'total':<22} {args.rows:>9,} rows  {total:6.2f} s  {args.rows / total:>11,.0f} rows/s")
        print("removed:", ", ".join(f"{k} {v:,}" for k, v in removed.items()))
        print("splits:", ", ".join(f"{n} {len(splits.get(n)):,}" for n in ("train", "validation", "test")))


if __name__ == "__main__":
    main()
