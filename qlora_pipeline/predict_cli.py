"""`qlora predict`: score texts with a finished run from the command line (a thin layer over `predict.py`).

Inputs: --text (repeatable), --file (.csv, .tsv, .jsonl, .parquet), --interactive (a line in, an answer out, until EOF;
`text<TAB>second text` for pair runs) or --demo. Output: a table, or --json, or --out FILE.
Nothing heavy is imported at module level: `qlora --help` builds this parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.errors import DataError, UserError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

    from qlora_pipeline.predict import Predictor

# A few examples per language, each class represented; pair runs get pairs (same meaning or not).
DEMO = {
    "zh": [
        "这本书写得很好，内容充实，值得一读。",
        "质量太差了，用了两天就坏了，非常失望。",
        "物流很快，包装完好，好评！",
        "一般般吧，没有想象中那么好。",
    ],
    "en": [
        "This was a thoughtful, well-argued comment.",
        "You are an idiot and everyone hates you.",
        "Great product, works as described.",
        "Terrible service, never again.",
    ],
}
DEMO_PAIRS = {
    "zh": [("花呗怎么还款", "花呗如何还钱"), ("借呗额度怎么提高", "怎么关闭花呗")],
    "en": [
        ("How do I reset my password?", "How can I change my password?"),
        ("Where is the station?", "What time is it?"),
    ],
}


def add_predict_parser(commands: Any) -> None:
    predict = commands.add_parser(
        "predict", help="score texts with a finished run: label, confidence and every class probability"
    )
    predict.add_argument("--run", required=True, help="a run directory that succeeded (outputs/run_XXX)")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to score (repeatable)")
    source.add_argument("--file", help="a file of texts, as data sources read them (.csv, .tsv, .jsonl, .parquet)")
    source.add_argument("--interactive", action="store_true", help="read one text per line until EOF")
    source.add_argument("--demo", action="store_true", help="score a few built-in examples in the run's language")
    predict.add_argument("--text-pair", action="append", help="the second text of a pair, one per --text")
    predict.add_argument("--text-column", default="text", help="--file: the column of texts (default: text)")
    predict.add_argument("--text-pair-column", help="--file: the column of second texts, for pair runs")
    add_encoding_option(predict)
    predict.add_argument("--out", help="write the predictions here (.csv, or .jsonl) instead of printing them")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--dataset", help="use the model the run trained for this dataset, when it trained one")
    predict.add_argument("--head", help="another head the run saved (e.g. tfidf_logreg); default: its primary head")
    predict.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: the run's model.device); a run trained on a GPU predicts on a "
        "CPU-only machine with --device cpu",
    )
    predict.add_argument(
        "--batch-size",
        type=positive_int,
        help="texts per forward pass (default: the run's embedding batch size; QLoRA runs: 4x its training batch)",
    )


def add_encoding_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoding",
        help="--file (.csv, .tsv, .jsonl): its encoding, e.g. gbk, gb18030, utf-16, or auto to detect it "
        "(default: UTF-8)",
    )


def positive_int(value: str) -> int:
    """argparse type: an integer of 1 or more."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def predict_command(args: argparse.Namespace) -> int:
    from qlora_pipeline.predict import load_predictor

    if (args.interactive or args.json) and not getattr(args, "verbose", False):
        # Only answers on the console: how the model loaded is INFO, shown with -v (interactive prompts on a
        # terminal get one line saying what answers, before the first prompt).
        logging.getLogger("qlora_pipeline").setLevel(logging.WARNING)
    predictor = load_predictor(
        args.run, dataset=args.dataset, head=args.head, batch_size=args.batch_size, device=args.device
    )
    from qlora_pipeline.models.device import cpu_threads

    with cpu_threads(predictor.config.model.cpu_threads):  # as the run trained and scored
        return _predict(predictor, args)


def _predict(predictor: Predictor, args: argparse.Namespace) -> int:
    if args.interactive:
        return interactive(predictor, args)
    ids = None
    if args.file:
        table = read_table(Path(args.file), args.text_column, args.text_pair_column, args.encoding)
        texts = table[args.text_column].tolist()
        pairs = table[args.text_pair_column].tolist() if args.text_pair_column else None
        ids = table["id"].tolist() if "id" in table and args.text_column != "id" else None
    elif args.demo:
        texts, pairs = demo_inputs(predictor)
    else:
        texts, pairs = args.text, args.text_pair
    frame = predictor.predict(texts, pairs, dataset=args.dataset)
    if ids is not None:
        frame.insert(0, "id", ids)
    if args.out:
        write_predictions(frame, Path(args.out))
        print(f"written: {args.out} ({len(frame)} predictions, run {predictor.run_dir}, head {predictor.head})")
    elif args.json:
        print(json.dumps(records(frame, predictor.label_names), ensure_ascii=False, indent=2))
    else:
        print(format_table(frame, predictor.label_names))
    return 0


def interactive(predictor: Predictor, args: argparse.Namespace) -> int:
    """One line in, one answer out, until EOF. Blank lines are skipped with a notice, not fatal."""
    prompt = sys.stdin.isatty()
    header = not args.json
    if prompt:
        kind = "text<TAB>second text" if predictor.pairs else "text"
        print(
            f"{predictor.run_dir} ({predictor.mode}, head {predictor.head}, classes {', '.join(predictor.label_names)})"
            f": one {kind} per line, Ctrl-D to end",
            file=sys.stderr,
        )
    for number, line in enumerate(input_lines(prompt), start=1):
        text, _, pair = line.rstrip("\n").partition("\t")
        if not text.strip():
            print(f"line {number}: empty, skipped", file=sys.stderr)
            continue
        try:
            frame = predictor.predict([text], [pair] if predictor.pairs else None, dataset=args.dataset)
        except DataError as exc:  # e.g. a text that cleaning empties: say so and read on
            print(f"line {number}: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(records(frame, predictor.label_names)[0], ensure_ascii=False), flush=True)
        else:
            print(format_table(frame, predictor.label_names, header=header), flush=True)
            header = False
    return 0


def input_lines(prompt: bool) -> Iterator[str]:
    """Lines of stdin until EOF, each after a `> ` prompt on stderr when `prompt` (a terminal)."""
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def read_table(path: Path, text_column: str, pair_column: str | None, encoding: str | None = None) -> pd.DataFrame:
    """The file's text columns as strings (empty where missing), read as the data layer reads a local source."""
    from qlora_pipeline.config import check_encoding_option
    from qlora_pipeline.data.sources import read_table as read_file

    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    check_encoding_option(encoding)
    table = read_file(path, encoding, option="--encoding")
    for column, flag in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
        if column is not None and column not in table.columns:
            found = ", ".join(map(str, table.columns))
            raise DataError(f"{path} has no column {column!r}; its columns: {found}; choose with {flag}")
    for column in filter(None, (text_column, pair_column)):
        table[column] = table[column].fillna("").astype(str)
    return table


def demo_inputs(predictor: Predictor) -> tuple[list[str], list[str] | None]:
    language = run_language(predictor.run_dir)
    if predictor.pairs:
        return [a for a, _ in DEMO_PAIRS[language]], [b for _, b in DEMO_PAIRS[language]]
    return list(DEMO[language]), None


def run_language(run_dir: Path) -> str:
    """ "zh" when most characters of the run's evaluated texts are CJK, else "en"."""
    import pandas as pd

    found = sorted(run_dir.glob("*/*/predictions.csv"))
    if not found:
        return "en"
    sample = "".join(pd.read_csv(found[0], usecols=["text"], nrows=200)["text"].astype(str))
    letters = [c for c in sample if c.isalpha()]
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in letters)
    return "zh" if letters and cjk / len(letters) > 0.3 else "en"


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(path, index=False)


def records(frame: pd.DataFrame, label_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for row in frame.to_dict("records"):
        record = {k: row[k] for k in ("id", "text", "text_pair") if k in row}
        record |= {"label": row["prediction_name"], "confidence": float(row["confidence"])}
        record["probabilities"] = {name: float(row[f"prob_{name}"]) for name in label_names}
        rows.append(record)
    return rows


def format_table(frame: pd.DataFrame, label_names: list[str], header: bool = True, width: int = 48) -> str:
    label_width = max(5, *(len(name) for name in label_names))
    columns = [f"{'label':<{label_width}}", "confidence", *(f"{'P(' + n + ')':>10}" for n in label_names), "text"]
    lines = ["  ".join(columns)] if header else []
    for row in frame.to_dict("records"):
        text = row["text"] + (f" ‖ {row['text_pair']}" if "text_pair" in row else "")
        text = text if len(text) <= width else text[: width - 1] + "…"
        probs = [f"{row[f'prob_{name}']:>10.4f}" for name in label_names]
        lines.append(
            "  ".join([f"{row['prediction_name']:<{label_width}}", f"{row['confidence']:>10.4f}", *probs, text])
        )
    return "\n".join(lines)
