"""Time `qlora quick-test` end to end (warm install, warm model cache) and `qlora --help`.

Usage: python scripts/bench_quick_test.py [--repeats 3]
Prints the wall time of each repeat, the median, and the fraction of the 60 s target it uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 60.0


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    qlora = [sys.executable, "-m", "qlora_pipeline"]
    with tempfile.TemporaryDirectory() as out:
        timed([*qlora, "quick-test", "--output-dir", out])  # warm-up: builds the tiny model into the cache if missing
        walls = [timed([*qlora, "quick-test", "--output-dir", out]) for _ in range(args.repeats)]
        stages = json.loads(sorted(Path(out).glob("run_*/status.json"))[-1].read_text())["stages"]
    help_s = statistics.median(timed([*qlora, "--help"]) for _ in range(5))
    print("quick-test wall (s): " + ", ".join(f"{w:.1f}" for w in walls))
    median = statistics.median(walls)
    print(f"median {median:.1f} s = {median / TARGET_S:.2f} of the {TARGET_S:.0f} s target")
    print("stages of the last run (s): " + ", ".join(f"{k} {v['seconds']:.2f}" for k, v in stages.items()))
    print(f"qlora --help: {help_s * 1000:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
