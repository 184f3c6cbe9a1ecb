"""`qlora evaluate`: score a finished run on a new labelled file, exactly as the run scored its own test split.

    result = evaluate_file("outputs/run_007", "labelled.csv", label_column="label")
    result.metrics  # {head: {"overall": ..., "per_dataset": ...}}: what metrics.json holds for a split

The file is read as a local data source (csv, tsv, jsonl, parquet; `encoding`), its labels become the run's classes
through the rule of the run's data source (`labels.map`, `threshold`, `positive`; class names and indices always
work), its texts are cleaned by the run's `data` settings (rows that cleaning empties, or that fall outside the
length limits, are dropped and counted; duplicates are kept: an evaluation file is taken as given), and every head
the run saved scores it with the run's model, settings and threshold (`predict.load_predictor(...,
as_the_run_scored=True)`). Metrics, bootstrap intervals, figures and summaries come from the code that evaluates
runs, so the run's own test split, given back as a file, reproduces its test metrics exactly.

Everything lands in a new `RUN/evaluations/<file stem>_NNN/`; nothing of the run itself is touched:

    evaluation.json        what was evaluated: the run, the file (sha256, encoding), rows kept and dropped, heads
    metrics.json           {"primary_head", "splits": {"evaluation": {head: {overall, per_dataset}}}}, as a run's
    summary.md             the metrics with 95% intervals, and links to the rest
    <dataset>/evaluation/  predictions.csv, evaluation_results.json, evaluation_summary.md, figures
    figures/               metrics per dataset
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qlora_pipeline.errors import DataError, UserError
from qlora_pipeline.evaluation.baseline import BASELINE
from qlora_pipeline.runs import allocate_numbered_dir, dataset_folder, now_iso, package_versions, write_json

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig
    from qlora_pipeline.data.encodings import Encoding
    from qlora_pipeline.predict import Predictor

log = logging.getLogger(__name__)

SPLIT = "evaluation"  # the split name of an evaluation's files: <dataset>/evaluation/
EVALUATIONS_DIR = "evaluations"


@dataclass(frozen=True)
class Evaluation:
    out_dir: Path
    primary_head: str
    metrics: dict[str, Any]  # {head: {"overall": ..., "per_dataset": ...}}, as metrics.json holds for a split
    record: dict[str, Any]  # evaluation.json


def evaluate_file(
    run_dir: str | Path,
    file: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    dataset: str | None = None,
    encoding: str | None = None,
    device: str | None = None,
) -> Evaluation:
    """Score every head of the finished run `run_dir` on the labelled `file`; write `run_dir/evaluations/<stem>_NNN/`.

    `dataset`: the run's dataset the rows belong to (its label rule, and its model when the run trained one per
    dataset); default the file's `dataset` column when it has one, else the run's only dataset."""
    from qlora_pipeline.models.device import cpu_threads
    from qlora_pipeline.predict import load_predictor

    path = Path(file)
    if not path.is_file():
        raise UserError(f"labelled file {path} does not exist")
    predictor = load_predictor(run_dir, device=device, as_the_run_scored=True)  # type: ignore[arg-type]
    if dataset is not None:
        predictor.model_dir(dataset)  # refuses a dataset the run does not have
    table, used, digest = _read(path, encoding)
    frame = labelled_rows(
        predictor,
        table,
        path,
        text_column=text_column,
        pair_column=text_pair_column,
        label_column=label_column,
        dataset=dataset,
    )
    frame = _with_codes(predictor, frame, path, label_column)
    frame, removed = _clean(predictor, frame, path)
    heads = saved_heads(predictor)
    with cpu_threads(predictor.config.model.cpu_threads):  # as the run trained and scored
        predictions = _score(predictor, heads, frame)
    record = {
        "run": str(predictor.run_dir.resolve()),
        "file": str(path.resolve()),
        "sha256": digest,
        **(used.record() if used else {}),
        "columns": {"text": text_column, "text_pair": _pair_column(predictor, text_pair_column), "label": label_column},
        "rows_read": len(table),
        "removed": removed,
        "rows_scored": len(frame),
        "per_dataset": {str(k): int(v) for k, v in frame["dataset"].value_counts().sort_index().items()},
        "label_names": predictor.label_names,
        "primary_head": heads[0],
        "heads": heads,
        "seed": predictor.config.experiment.seed,
        "created_at": now_iso(),
        "packages": package_versions(),
    }
    return _write(predictor, path, predictions, record)


def _read(path: Path, encoding: str | None) -> tuple[pd.DataFrame, Encoding | None, str]:
    import hashlib

    from qlora_pipeline.config import check_encoding_option
    from qlora_pipeline.data.sources import read_local_file

    check_encoding_option(encoding)
    raw = path.read_bytes()
    table, used = read_local_file(path, encoding, option="--encoding", data=raw)
    if table.empty:
        raise DataError(f"{path} has no rows to evaluate")
    return table, used, hashlib.sha256(raw).hexdigest()


def _pair_column(predictor: Predictor, given: str | None) -> str | None:
    return (given or "text_pair") if predictor.pairs else None


def labelled_rows(
    predictor: Predictor,
    table: pd.DataFrame,
    path: Path,
    *,
    text_column: str,
    pair_column: str | None,
    label_column: str,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Rows `id, dataset, text, [text_pair,] raw_label` from the file's columns; the run's kind of input (single
    texts or pairs) is checked. Each row's dataset: `dataset`, else the file's dataset column, else the run's only
    dataset."""
    if pair_column is not None and not predictor.pairs:
        raise UserError(
            f"run {predictor.run_dir} scores single texts (its data had no text_pair); drop --text-pair-column"
        )
    pairs = _pair_column(predictor, pair_column)
    wanted = [
        (text_column, "--text-column"),
        *([(pairs, "--text-pair-column")] if pairs else []),
        (label_column, "--label-column"),
    ]
    for column, flag in wanted:
        if column not in table.columns:
            found = ", ".join(map(str, table.columns))
            why = " (the run was trained on text pairs)" if flag == "--text-pair-column" else ""
            raise DataError(f"{path} has no column {column!r}{why}; its columns: {found}; choose with {flag}")
    table = table.reset_index(drop=True)
    ids = table["id"].astype(str) if "id" in table and "id" not in (text_column, pairs) else None
    frame = pd.DataFrame({"id": ids if ids is not None else [f"{path.name}:{i}" for i in range(len(table))]})
    if dataset is not None:
        frame["dataset"] = dataset
    elif "dataset" not in table or "dataset" in (text_column, pairs, label_column):
        frame["dataset"] = _only_dataset(predictor)
    else:
        frame["dataset"] = table["dataset"].astype(str)
        unknown = frame.loc[~frame["dataset"].isin(predictor.datasets), "dataset"].value_counts().head(5)
        if len(unknown):
            shown = ", ".join(f"'{v}' ({n} rows)" for v, n in unknown.items())
            raise DataError(
                f"{path}: its dataset column names datasets the run {predictor.run_dir} does not have: {shown} "
                f"(its datasets: {', '.join(predictor.datasets)}); pass --dataset NAME to score every row as one of "
                "them"
            )
    frame["text"] = table[text_column].astype(object).where(table[text_column].notna(), None)
    if pairs:
        frame["text_pair"] = table[pairs].astype(object).where(table[pairs].notna(), None)
    frame["raw_label"] = table[label_column]
    return frame


def _only_dataset(predictor: Predictor) -> str:
    if len(predictor.datasets) == 1:
        return predictor.datasets[0]
    raise UserError(
        f"run {predictor.run_dir} has several datasets ({', '.join(predictor.datasets)}): say which one the file "
        "belongs to with --dataset NAME, or give the file a dataset column"
    )


def _source(predictor: Predictor, name: str) -> SourceConfig:
    return next(source for source in predictor.config.data.sources if source.name == name)


def _with_codes(predictor: Predictor, frame: pd.DataFrame, path: Path, label_column: str) -> pd.DataFrame:
    """`label` (class index) from `raw_label`, by each row's dataset's rule; values outside the run's classes stop
    the evaluation with examples."""
    codes = pd.Series(np.nan, index=frame.index, dtype=float)
    for name, rows in frame.groupby("dataset", sort=False):
        found = class_codes(rows["raw_label"], _source(predictor, str(name)), predictor.label_names)
        codes.loc[rows.index] = found.to_numpy()
    bad = codes.isna()
    if bad.any():
        from qlora_pipeline.data.labels import as_text

        values = as_text(frame.loc[bad, "raw_label"].astype(object))
        shown = ", ".join(f"'{v}' ({n} rows)" for v, n in values.fillna("<missing>").value_counts().head(5).items())
        raise DataError(
            f"{path}: {int(bad.sum())} values in column '{label_column}' are outside the run's classes "
            f"{predictor.label_names}: {shown}; give class names or indices (0-{len(predictor.label_names) - 1}), "
            "or the raw values the run's data source maps, or choose the column with --label-column"
        )
    return frame.drop(columns="raw_label").assign(label=codes.astype(int))


def class_codes(values: pd.Series, source: SourceConfig, label_names: list[str]) -> pd.Series:
    """Class indices (NaN where not a class of the run) for raw label values: first the source's label rule (map,
    threshold, positive set), then class names and class indices, as the data layer reads `label_names`."""
    from qlora_pipeline.data.labels import apply_labels, as_text

    values = values.reset_index(drop=True)
    codes = pd.Series(np.nan, index=values.index, dtype=float)
    if source.labels.map is not None or source.labels.binary_rule is not None:
        rules = dataclasses.replace(source.labels, unmatched="drop")
        ruled = dataclasses.replace(source, label_names=list(label_names), labels=rules)
        labelled = apply_labels(values, ruled)  # rows the rule does not cover are left out (unmatched: drop)
        codes.loc[labelled.codes.index] = labelled.codes.to_numpy()
    lookup: dict[str, int] = {name: i for i, name in enumerate(label_names)}
    lookup.update({str(i): i for i in range(len(label_names))})
    rest = codes.isna()
    codes.loc[rest] = as_text(values[rest]).map(lookup)
    return codes


def _clean(predictor: Predictor, frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The run's text cleaning (normalization, masks, length limits); duplicates and repeated texts are kept."""
    from qlora_pipeline.data.clean import clean

    rules = dataclasses.replace(predictor.config.data, dedupe=False, dedupe_normalized=False, drop_conflicting=False)
    cleaned, removed = clean(frame, rules)
    removed = {reason: count for reason, count in removed.items() if count}
    if cleaned.empty:
        steps = ", ".join(f"{k}: {v}" for k, v in removed.items())
        raise DataError(f"{path}: no rows left after the run's cleaning (removed {steps}); check --text-column")
    return cleaned, removed


def saved_heads(predictor: Predictor) -> list[str]:
    """The heads the run evaluated and saved, primary first: QLoRA's adapter or the classifier heads, then the
    TF-IDF baseline when the run fitted one."""
    config, folder = predictor.config, predictor.run_dir / "models" / "all"
    others = [] if predictor.mode == "qlora" else config.classifier.heads[1:]
    baseline = [BASELINE] if (folder / f"{BASELINE}.joblib").is_file() else []
    return [predictor.head, *others, *baseline]


def _score(predictor: Predictor, heads: list[str], frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each head's predictions frame (as the run's evaluation builds it), each dataset by its own model. Heads take
    turns on a dataset's rows, so the embedding heads, sharing the primary head's encoder, encode them once."""
    from qlora_pipeline.evaluation.metrics import predictions_frame

    shape = (len(frame), len(predictor.label_names))
    proba = {head: np.zeros(shape) for head in heads}
    predicted = {head: np.zeros(len(frame), dtype=int) for head in heads}
    scorers_of = {predictor.head: predictor}
    for name, rows in frame.groupby("dataset", sort=False):
        where = frame.index.get_indexer(rows.index)
        texts, pairs = rows["text"].tolist(), rows["text_pair"].tolist() if "text_pair" in rows else None
        for head in heads:
            if head not in scorers_of:  # copied once the primary head has loaded the encoder the copies share
                scorers_of[head] = dataclasses.replace(predictor, head=head, _scorers={})
            proba[head][where], predicted[head][where] = scorers_of[head].scorer(str(name))(texts, pairs)
    labels = tuple(predictor.label_names)
    return {head: predictions_frame(frame, proba[head], predicted[head], labels) for head in heads}


def _write(
    predictor: Predictor, path: Path, predictions: dict[str, pd.DataFrame], record: dict[str, Any]
) -> Evaluation:
    """Metrics, per-dataset files, figures and summaries into a new evaluations/<stem>_NNN/; removed again when
    anything fails, so no half-written folder looks like a finished evaluation."""
    from qlora_pipeline.evaluation.results import evaluate_split
    from qlora_pipeline.reporting.summary import write_summaries

    root = predictor.run_dir / EVALUATIONS_DIR
    out = allocate_numbered_dir(root, dataset_folder(path.stem), f"check the permissions of {root}")
    config, label_names = predictor.config, list(predictor.label_names)
    try:
        metrics = evaluate_split(out, SPLIT, predictions, label_names, config.evaluation, config.experiment.seed)
        if config.evaluation.figures:
            from qlora_pipeline.reporting.figures import plot_run

            plot_run(out)
        write_summaries(out)
        primary = record["primary_head"]
        write_json(out / "metrics.json", {"primary_head": primary, "splits": {SPLIT: metrics}})
        (out / "summary.md").write_text(summary_markdown(record, metrics, out), encoding="utf-8")
        write_json(out / "evaluation.json", record | {"output": str(out)})  # last: its presence means complete
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("evaluation of %s written to %s", path.name, out)
    return Evaluation(out, record["primary_head"], metrics, record | {"output": str(out)})


def summary_markdown(record: dict[str, Any], metrics: dict[str, Any], out: Path) -> str:
    from qlora_pipeline.evaluation.metrics import HEADLINE, metric_cell
    from qlora_pipeline.reporting.markdown import table

    removed = ", ".join(f"{k} {v}" for k, v in record["removed"].items()) or "none"
    lines = [
        f"# Evaluation of {Path(record['run']).name} on {Path(record['file']).name}",
        "",
        f"- run: `{record['run']}`",
        f"- file: `{record['file']}` (sha256 {record['sha256'][:16]}…"
        + (f", {record['encoding']}" if record.get("encoding") else "")
        + ")",
        f"- rows: {record['rows_read']} read, {record['rows_scored']} scored; removed by the run's cleaning: {removed}",
        f"- classes: {', '.join(record['label_names'])}; primary head: {record['primary_head']}",
        "",
        "Values with bootstrap 95% intervals in brackets where computed.",
        "",
    ]
    rows = [[head, *(metric_cell(m["overall"], k, with_ci=True) for k in HEADLINE)] for head, m in metrics.items()]
    lines += table(["head", *HEADLINE], rows)
    per_dataset = sorted(metrics[record["primary_head"]]["per_dataset"])
    lines += ["## Per dataset", ""] if per_dataset else []
    for name in per_dataset:
        folder = f"{dataset_folder(name)}/{SPLIT}"
        lines.append(f"- {name}: [summary]({folder}/evaluation_summary.md), figures and predictions in `{folder}/`")
    return "\n".join(lines).rstrip("\n") + "\n"
