"""Run by tests/test_accumulation.py under torchrun: each process trains every case of argv[2:] ("head:weights")
with batch 4 and no accumulation, and rank 0 writes the per-step losses and final probabilities to argv[1]."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from helpers import accumulation_config, train_briefly

from qlora_pipeline import distributed


def main(out: str, cases: list[str]) -> None:
    distributed.start("cpu")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for case in cases:
            head, weights = case.split(":")
            work_dir = Path(distributed.share(work)) / case.replace(":", "_")
            losses, proba = train_briefly(accumulation_config(head, weights, 4, 1), work_dir)
            results[case] = {"losses": losses, "proba": proba.tolist()}
    if distributed.rank() == 0:
        Path(out).write_text(json.dumps(results), encoding="utf-8")
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
