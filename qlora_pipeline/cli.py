"""The `qlora` command. Parses arguments, sets up logging once, calls plain functions.

Nothing heavy is imported at module level: `qlora --help` must stay fast and must not import torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora_pipeline import __version__, distributed
from qlora_pipeline.errors import UserError

log = logging.getLogger("qlora_pipeline")

QUICK_TEST_CONFIG = "quick_test.yaml"
QLORA_QUICK_TEST_CONFIG = "qlora_tiny.yaml"
SFT_QUICK_TEST_CONFIG = "instruction_sft_tiny.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora",
        description="Config-driven experiments with 4-bit (NF4) Qwen models: text classifiers and instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an experiment from a config file into outputs/run_XXX")
    run.add_argument("--config", required=True, help="YAML/JSON config: a path, or the name of a shipped config")
    add_run_options(run)
    add_check_options(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, data and model files and print the plan (rows, steps, tokens, parameters, "
        "estimated GPU memory) without training or creating a run directory; exit 2 with one line per problem",
    )
    run.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="qlora and sft modes: continue from a checkpoint into a new run directory that records resumed_from; "
        "auto: the newest unfinished run of this config under the output root; PATH: a run directory or its "
        "checkpoints/checkpoint-N (default: none)",
    )

    sweep = commands.add_parser(
        "sweep",
        help="many runs of one config (grid, random or bayesian search over its sweep section) into outputs/sweep_NNN",
    )
    sweep.add_argument("--config", help="YAML/JSON config with a sweep section (or --grid options)")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=[V1,V2]",
        help="values to try for a config field, e.g. --grid classifier.C=[0.1,1,10] (repeatable; replaces that "
        "field's list in sweep.grid)",
    )
    sweep.add_argument("--method", help="grid, random or bayesian (default: the config's sweep.method)")
    sweep.add_argument("--trials", type=int, help="points to run (random, bayesian)")
    sweep.add_argument("--metric", help="validation metric that ranks the points (default: sweep.metric)")
    sweep.add_argument("--jobs", type=int, help="points run at once, each in its own process (default: sweep.jobs)")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep (outputs/sweep_NNN)")
    add_run_options(sweep)

    resume = commands.add_parser(
        "resume", help="continue an interrupted qlora or sft run from its latest checkpoint, with its archived config"
    )
    resume.add_argument("run_path", help="the interrupted run directory (outputs/run_XXX)")
    resume.add_argument("--output-dir", help="root for the new run directory (default: beside the original)")

    quick = commands.add_parser(
        "quick-test", help="offline smoke test: the real pipeline on a small sample of the bundled corpus"
    )
    quick.add_argument(
        "--mode",
        choices=["embeddings", "qlora", "sft"],
        default="embeddings",
        help=f"embeddings: {QUICK_TEST_CONFIG}; qlora: {QLORA_QUICK_TEST_CONFIG} (trains a LoRA adapter, ~1 min); "
        f"sft: {SFT_QUICK_TEST_CONFIG} (instruction fine-tuning, generations, ~1 min)",
    )
    add_run_options(quick)

    check = commands.add_parser(
        "check", help="the dry run of `qlora run --dry-run`: is this config ready to run, and what will it cost?"
    )
    check.add_argument("config", help="YAML/JSON config: a path, or the name of a shipped config")
    add_run_options(check)
    add_check_options(check)

    reproduce = commands.add_parser(
        "reproduce", help="rerun an archived run and check that every metric and prediction matches"
    )
    reproduce.add_argument("run_path", help="a run directory (outputs/run_XXX) or the path of its config.json")
    reproduce.add_argument("--output-dir", help="root for the new run directory (default: beside the original)")

    compare = commands.add_parser(
        "compare", help="side-by-side config differences and metrics of finished runs (markdown + chart)"
    )
    compare.add_argument("runs", nargs="+", help="two or more run directories (outputs/run_XXX)")
    compare.add_argument(
        "--out",
        help="markdown file to write (default: compare_<run>_vs_<run>.md beside the first run); "
        "the chart goes beside it as .png",
    )

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print the fully resolved config (defaults filled in)")
    show.add_argument("file", help="YAML/JSON config: a path, or the name of a shipped config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    config_commands.add_parser("reference", help="print the reference of every config field (markdown)")

    from qlora_pipeline.generate_cli import add_generate_parsers
    from qlora_pipeline.predict_cli import add_predict_parser

    add_predict_parser(commands)
    add_evaluate_parser(commands)
    add_generate_parsers(commands)

    cache = commands.add_parser("cache", help="inspect or clear the embedding cache shared by all runs")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    info = cache_commands.add_parser("info", help="where the cache is, its size, and the vectors held per model key")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    clear = cache_commands.add_parser(
        "clear", help="delete cached embeddings: all of them, or those of one model key, or those older than a date"
    )
    clear.add_argument(
        "--model", metavar="KEY", help="only this model key (a prefix will do; `qlora cache info` lists them)"
    )
    clear.add_argument(
        "--older-than", metavar="DATE", help="only vectors written before this date (2026-01-31 or 2026-01-31T12:00)"
    )
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument("--output-dir", help="root for run directories (default: the config's output.root)")


def add_check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quick run of any config: at most 300 examples per dataset, one short epoch, a small evaluation "
        "(recorded in config.json and the report; --set still wins)",
    )


# ---- qlora evaluate ----------------------------------------------------------------------------------------


def add_evaluate_parser(commands: Any) -> None:
    from qlora_pipeline.predict_cli import add_encoding_option

    evaluate = commands.add_parser(
        "evaluate",
        help="score a finished run on a new labelled file, as it scored its test split; writes RUN/evaluations/",
    )
    evaluate.add_argument("--run", required=True, help="a run directory that succeeded (outputs/run_XXX)")
    evaluate.add_argument("--file", required=True, help="the labelled file (.csv, .tsv, .jsonl, .parquet)")
    evaluate.add_argument("--text-column", default="text", help="the column of texts (default: text)")
    evaluate.add_argument("--text-pair-column", help="the column of second texts, for pair runs (default: text_pair)")
    evaluate.add_argument(
        "--label-column",
        default="label",
        help="the column of labels: class names, class indices, or the raw values the run's data source maps "
        "(default: label)",
    )
    evaluate.add_argument(
        "--dataset", help="the run's dataset the rows belong to (default: the file's dataset column, or the only one)"
    )
    add_encoding_option(evaluate)
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default: the run's)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the metrics table")


def evaluate_command(args: argparse.Namespace) -> int:
    import json

    from qlora_pipeline.evaluate import evaluate_file
    from qlora_pipeline.evaluation.metrics import HEADLINE, metric_cell

    result = evaluate_file(
        args.run,
        args.file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        dataset=args.dataset,
        encoding=args.encoding,
        device=args.device,
    )
    if args.json:
        record = result.record
        keys = ("run", "file", "output", "rows_read", "rows_scored", "removed", "primary_head")
        print(json.dumps({**{k: record[k] for k in keys}, "metrics": result.metrics}, ensure_ascii=False, indent=2))
        return 0
    record = result.record
    print(f"evaluation of {record['run']} on {record['file']}: {record['rows_scored']} rows scored")
    for head, metrics in result.metrics.items():
        overall = metrics["overall"]
        print(f"  {head}")
        for name in HEADLINE:
            print(f"    {name:<10} {metric_cell(overall, name, with_ci=True)}")
    print(f"written: {result.out_dir} (summary.md, metrics.json, predictions, figures)")
    return 0


class _ConsoleHandler(logging.StreamHandler):
    """The one console handler `qlora` installs; marked so that calling main() again replaces it."""


def setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(old)
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # Under torchrun the other ranks repeat rank 0's progress: they log only warnings and errors.
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if distributed.is_replica() else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    from qlora_pipeline.runs import RunInterrupted, disk_full, sigterm_interrupts

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    where = f" (rank {distributed.rank()})" if distributed.is_replica() else ""
    try:
        with sigterm_interrupts():  # SIGTERM ends any command as Ctrl-C does: recorded, one line, no traceback
            return dispatch(args)
    except UserError as exc:
        print(f"qlora: error{where}: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora: interrupted{where} (SIGINT)", file=sys.stderr)
        return 130
    except RunInterrupted as exc:
        print(
            f"qlora: interrupted{where} ({exc.args[0].removeprefix('received ') if exc.args else 'SIGTERM'})",
            file=sys.stderr,
        )
        return 143
    except OSError as exc:
        if not disk_full(exc):
            raise
        at = f" ({exc.filename})" if exc.filename else ""
        print(
            f"qlora: error{where}: {exc.strerror}{at}: free some space or write elsewhere (--output-dir, --out)",
            file=sys.stderr,
        )
        return 2


def one_line(message: str) -> str:
    """A message as the one line the console shows (a data value or a library's text may hold line breaks)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        return config_command(args)
    if args.command == "cache":
        return cache_command(args)
    if args.command == "predict":
        from qlora_pipeline.predict_cli import predict_command

        return predict_command(args)
    if args.command == "evaluate":
        return evaluate_command(args)
    if args.command in ("generate", "export"):
        from qlora_pipeline.generate_cli import export_command, generate_command

        return generate_command(args) if args.command == "generate" else export_command(args)
    if args.command == "reproduce":
        return reproduce_command(args.run_path, args.output_dir)
    if args.command == "resume":
        return resume_command(args.run_path, args.output_dir)
    if args.command == "sweep":
        return sweep_command(args)
    if args.command == "compare":
        from qlora_pipeline.reporting.compare import compare

        markdown, path = compare(args.runs, args.out)
        print(markdown)
        print(f"written: {path} (chart: {path.with_suffix('.png')})")
        return 0
    from qlora_pipeline.config import load_config

    if args.command == "quick-test":
        quick = {"qlora": QLORA_QUICK_TEST_CONFIG, "sft": SFT_QUICK_TEST_CONFIG}
        config_path = quick.get(args.mode, QUICK_TEST_CONFIG)
    else:
        config_path = args.config
    config = load_config(config_path, args.overrides, quick=getattr(args, "quick", False))
    if args.command == "check" or getattr(args, "dry_run", False):
        return check_command(config, args.output_dir)
    return run_command(config, args.output_dir, resume=getattr(args, "resume", None))


def check_command(config: Any, output_dir: str | None) -> int:
    """`qlora check` / `qlora run --dry-run`: the plan, or one line per problem and exit 2. Nothing is written."""
    from qlora_pipeline.plan import make_plan

    plan = make_plan(config, output_dir)
    print(plan.text())
    for problem in plan.problems:
        print(f"qlora: problem: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


def run_command(
    config: Any, output_dir: str | None, reproduce_of: Path | None = None, resume: str | None = None
) -> int:
    from qlora_pipeline.pipeline import run_experiment

    result = run_experiment(config, output_dir, reproduce_of=reproduce_of, resume=resume)
    if result.replica:
        return 0  # rank 0 prints the summary
    print_summary(result.run_dir, result.metrics)
    if result.reproduction is not None:
        verdict = "MATCH" if result.reproduction["matches"] else "MISMATCH"
        print(f"reproduction of {result.reproduction['original']}: {verdict}")
        for check in result.reproduction["checks"]:
            print(f"  {'ok ' if check['match'] else 'NO '} {check['what']}: {check['detail']}")
        return 0 if result.reproduction["matches"] else 1
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from qlora_pipeline import sweep

    if args.resume is not None:
        given = [
            f"--{n}"
            for n in ("config", "grid", "method", "trials", "metric", "set", "output_dir")
            if getattr(args, "overrides" if n == "set" else n) not in (None, [])
        ]
        if given:
            raise UserError(f"--resume continues a sweep with its own config and options; drop {', '.join(given)}")
        result = sweep.resume_sweep(args.resume, args.jobs)
    else:
        if args.config is None:
            raise UserError("qlora sweep needs --config FILE (or --resume SWEEP_DIR to continue one)")
        options = {name: getattr(args, name) for name in ("method", "trials", "metric", "jobs")}
        config = sweep.sweep_config(args.config, args.overrides, args.grid, **options)
        result = sweep.start_sweep(config, args.output_dir)
    print(result.markdown)
    print(f"sweep directory: {result.sweep_dir}")
    return 0 if result.best is not None else 1


def reproduce_command(run_path: str, output_dir: str | None) -> int:
    from qlora_pipeline.reproduce import check_original, check_processes, load_archive, locate_archive

    run_dir, config_json = locate_archive(run_path)
    check_original(run_dir)
    config, record = load_archive(config_json)
    check_processes(run_dir, record)
    return run_command(config, output_dir or str(run_dir.parent), reproduce_of=run_dir)


def resume_command(run_path: str, output_dir: str | None) -> int:
    from qlora_pipeline.reproduce import load_archived_config, locate_archive

    run_dir, config_json = locate_archive(run_path)
    config = load_archived_config(config_json)
    return run_command(config, output_dir or str(run_dir.parent), resume=str(run_dir))


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    from qlora_pipeline.evaluation.metrics import format_metric

    print(f"run directory: {run_dir}")
    for split, per_head in metrics.items():
        for head, result in per_head.items():
            overall = result["overall"]
            if "perplexity" in overall:  # an instruction (sft) run: the tuned model and the base without adapter
                print(
                    f"  {split:<10} {head:<6} loss {format_metric(overall['loss'])}  perplexity "
                    f"{format_metric(overall['perplexity'])}  chrF {format_metric(overall['chrf'])}  BLEU "
                    f"{format_metric(overall['bleu'])}  ROUGE-L {format_metric(overall['rouge_l'])}  exact match "
                    f"{format_metric(overall['exact_match'])}"
                )
                continue
            print(
                f"  {split:<10} {head:<20} accuracy {format_metric(overall['accuracy'])}  "
                f"macro-F1 {format_metric(overall['macro_f1'])}  ROC-AUC {format_metric(overall['roc_auc'])}"
            )
    print(f"report: {run_dir / 'experiment_report.md'}")


def cache_command(args: argparse.Namespace) -> int:
    from qlora_pipeline.embeddings import cache

    if args.cache_command == "info":
        info = cache.cache_info()
        if args.json:
            import json

            print(json.dumps(info, indent=2, ensure_ascii=False))
            return 0
        print(f"embedding cache: {info['location']} ({info['bytes'] / 2**20:.1f} MiB)")
        for model in info["models"]:
            settings = f"{model.get('quantization')}, {model.get('compute_dtype')}, {model.get('pooling')}"
            print(f"  {model['key']}  {model['entries']:>8} vectors  {model['bytes'] / 2**20:8.1f} MiB  ", end="")
            print(f"{model.get('model')} ({settings}, max length {model.get('max_length')})")
        if not info["models"]:
            print("  (empty)")
        return 0
    location = cache.embeddings_root()
    what, before = f"every cached embedding under {location}", None
    if args.model is not None:
        keys = [key for key in cache.model_keys() if key.startswith(args.model)]
        if not keys or not args.model:
            raise UserError(f"no model key starts with {args.model!r} in {location}; `qlora cache info` lists them")
        what = f"the cached embeddings of model key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
    if args.older_than is not None:
        from datetime import datetime

        try:
            before = datetime.fromisoformat(args.older_than)
        except ValueError:
            raise UserError(
                f"--older-than must be a date like 2026-01-31 or 2026-01-31T12:00, got {args.older_than!r}"
            ) from None
        what += f" written before {before.isoformat(sep=' ')}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"qlora cache clear would delete {what}; pass --yes to confirm")
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    freed = cache.clear_cache(model=args.model, before=before)
    print(f"deleted {what} ({freed / 2**20:.1f} MiB)")
    return 0


def config_command(args: argparse.Namespace) -> int:
    from qlora_pipeline import config as config_module

    if args.config_command == "reference":
        print(config_module.config_reference_markdown())
        return 0
    resolved = config_module.load_config(args.file, args.overrides).to_dict()
    if args.format == "json":
        import json

        print(json.dumps(resolved, indent=2, ensure_ascii=False))
    else:
        import yaml

        print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
