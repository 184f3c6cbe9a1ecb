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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora",
        description="Config-driven text-classification experiments with 4-bit (NF4) Qwen models.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an experiment from a config file into outputs/run_XXX")
    run.add_argument("--config", required=True, help="YAML/JSON config: a path, or the name of a shipped config")
    add_run_options(run)
    run.add_argument(
        "--resume",
        default="none",
        metavar="auto|none|PATH",
        help="qlora mode: continue from a checkpoint into a new run directory that records resumed_from; auto: "
        "the newest unfinished run of this config under the output root; PATH: a run directory or its "
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
        "resume", help="continue an interrupted qlora run from its latest checkpoint, with its archived config"
    )
    resume.add_argument("run_path", help="the interrupted run directory (outputs/run_XXX)")
    resume.add_argument("--output-dir", help="root for the new run directory (default: beside the original)")

    quick = commands.add_parser(
        "quick-test", help="offline smoke test: the real pipeline on a small sample of the bundled corpus"
    )
    quick.add_argument(
        "--mode",
        choices=["embeddings", "qlora"],
        default="embeddings",
        help=f"embeddings: {QUICK_TEST_CONFIG}; qlora: {QLORA_QUICK_TEST_CONFIG} (trains a LoRA adapter, ~1 min)",
    )
    add_run_options(quick)

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

    from qlora_pipeline.predict_cli import add_predict_parser

    add_predict_parser(commands)

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
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return dispatch(args)
    except UserError as exc:
        where = f" (rank {distributed.rank()})" if distributed.is_replica() else ""
        print(f"qlora: error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        return config_command(args)
    if args.command == "cache":
        return cache_command(args)
    if args.command == "predict":
        from qlora_pipeline.predict_cli import predict_command

        return predict_command(args)
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
        config_path = QLORA_QUICK_TEST_CONFIG if args.mode == "qlora" else QUICK_TEST_CONFIG
    else:
        config_path = args.config
    config = load_config(config_path, args.overrides)
    return run_command(config, args.output_dir, resume=getattr(args, "resume", None))


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
    from qlora_pipeline.reproduce import check_processes, load_archived_config, locate_archive

    run_dir, config_json = locate_archive(run_path)
    config = load_archived_config(config_json)
    check_processes(run_dir, config_json)
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
            print(
                f"  {split:<10} {head:<14} accuracy {format_metric(overall['accuracy'])}  "
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
