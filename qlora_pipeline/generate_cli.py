"""`qlora generate` and `qlora export`: answers from a finished instruction (sft) run, and its adapter merged into a
full-precision model directory (thin layers over `sft/generation.py` and `sft/export.py`).

Inputs of generate: --prompt (repeatable; each one user turn), --file (.jsonl, .csv, .parquet: a `messages` column,
the run's alpaca columns, or a `prompt` column; a JSON-lines file out, each input record with its `answer`), or
--interactive (a line in, an answer out, until EOF; --history keeps the conversation). Nothing heavy is imported at
module level: `qlora --help` builds these parsers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.errors import DataError, UserError
from qlora_pipeline.predict_cli import input_lines, positive_int

if TYPE_CHECKING:
    from qlora_pipeline.sft.generation import Generator


def add_generate_parsers(commands: Any) -> None:
    generate = commands.add_parser(
        "generate", help="answer prompts with a finished sft run (its NF4 base + adapter, its prompt format)"
    )
    generate.add_argument("--run", required=True, help="an sft run directory that succeeded (outputs/run_XXX)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt",
        action="append",
        help="a prompt, one user turn (repeatable); for a run trained on a fixed sft.instruction, its input",
    )
    source.add_argument(
        "--file",
        help="records to answer (.jsonl, .csv, .parquet): a messages column, the run's alpaca columns "
        "(instruction[, input]; input alone for a fixed sft.instruction) or a prompt column",
    )
    source.add_argument("--interactive", action="store_true", help="read one prompt per line until EOF")
    generate.add_argument("--out", help="--file: write JSON lines here (default: print them)")
    generate.add_argument("--history", action="store_true", help="--interactive: keep the conversation (multi-turn)")
    generate.add_argument("--json", action="store_true", help="print a JSON line per answer instead of plain text")
    generate.add_argument("--max-new-tokens", type=positive_int, help="most tokens per answer (default: the run's)")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    generate.add_argument("--temperature", type=_positive_float, help="sampling temperature (default: the run's)")
    generate.add_argument("--top-p", type=_probability, help="sampling nucleus mass (default: the run's)")
    generate.add_argument("--top-k", type=_non_negative, help="sampling: keep the k likeliest tokens; 0 keeps all")
    generate.add_argument("--seed", type=_non_negative, help="sampling seed (default: the run's experiment.seed)")
    generate.add_argument("--no-adapter", action="store_true", help="answer with the base model alone (to compare)")
    generate.add_argument("--batch-size", type=positive_int, help="prompts per forward pass (default: the run's)")
    generate.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default: the run's model.device)"
    )

    export = commands.add_parser(
        "export", help="merge an sft run's adapter into its base: a model directory plain transformers loads"
    )
    export.add_argument("--run", required=True, help="an sft run directory that succeeded (outputs/run_XXX)")
    export.add_argument("--merge", required=True, metavar="OUT", help="the new model directory (absent or empty)")
    export.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="saved weights (default float32)"
    )


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return number


def _probability(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def export_command(args: argparse.Namespace) -> int:
    from qlora_pipeline.sft.export import export_merged

    target = export_merged(args.run, args.merge, dtype=args.dtype)
    print(f"written: {target} (load it with AutoModelForCausalLM.from_pretrained; prompts as in its sft.json)")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from qlora_pipeline.models.device import cpu_threads
    from qlora_pipeline.sft.generation import load_generator

    if args.out and not args.file:
        raise UserError("--out writes the answers to --file's records; with --prompt or --interactive they print")
    if args.history and not args.interactive:
        raise UserError("--history keeps an --interactive conversation; give --interactive too")
    generator = load_generator(args.run, device=args.device, batch_size=args.batch_size)
    options = {
        "adapter": not args.no_adapter,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": True if args.sample else None,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    with cpu_threads(generator.config.model.cpu_threads):  # as the run trained and evaluated
        if args.interactive:
            return interactive(generator, args, options)
        if args.file:
            return answer_file(generator, args, options)
        answers = generator.answers(args.prompt, **options)
        for prompt, answer in zip(args.prompt, answers, strict=True):
            if args.json:
                record = {"prompt": prompt, "answer": answer.text, "answer_tokens": answer.tokens}
                print(json.dumps(record | {"stopped": answer.stopped}, ensure_ascii=False))
            else:
                print(answer.text)
    return 0


def read_prompts(path: Path, generator: Generator) -> tuple[list[dict[str, Any]], list[Any]]:
    """The file's records, and the prompt of each: its `messages`, its alpaca fields (the run's column names) or its
    `prompt`."""
    from qlora_pipeline.data.sources import read_table

    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    table = read_table(path)
    sft = generator.config.sft
    records = [{k: _plain(v) for k, v in row.items()} for row in table.to_dict("records")]
    prompts: list[Any] = []
    if sft.messages_column in table.columns:
        for number, record in enumerate(records, start=1):
            value = record[sft.messages_column]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: record {number}: {sft.messages_column} is not JSON ({exc.msg})") from exc
            turns = [t for t in value or [] if isinstance(t, dict)]
            if turns and turns[-1].get("role") == "assistant":
                turns = turns[:-1]  # a conversation that ends with its answer: answer it afresh
            prompts.append(turns)
        return records, prompts
    if sft.instruction is not None and sft.input_column in table.columns:  # trained on one fixed instruction
        return records, [{"instruction": sft.instruction, "input": r[sft.input_column] or ""} for r in records]
    if sft.instruction_column in table.columns:
        prompts = [
            {
                "instruction": record[sft.instruction_column] or "",
                "input": record.get(sft.input_column) or "",
                **({"system": record[sft.system_column]} if record.get(sft.system_column) else {}),
            }
            for record in records
        ]
        return records, prompts
    if "prompt" in table.columns:
        return records, [str(record["prompt"] or "") for record in records]
    raise DataError(
        f"{path} has none of the columns {sft.messages_column!r}, {sft.instruction_column!r} or 'prompt' "
        f"(its columns: {', '.join(map(str, table.columns))})"
    )


def _plain(value: Any) -> Any:
    """A table value as JSON can hold it (NaN -> null, arrays -> lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def answer_file(generator: Generator, args: argparse.Namespace, options: dict[str, Any]) -> int:
    records, prompts = read_prompts(Path(args.file), generator)
    answers = generator.answers(prompts, **options)
    lines = [
        json.dumps(
            record | {"answer": answer.text, "answer_tokens": answer.tokens, "stopped": answer.stopped},
            ensure_ascii=False,
            default=str,
        )
        for record, answer in zip(records, answers, strict=True)
    ]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"written: {out} ({len(lines)} answers, run {generator.run_dir})")
    else:
        print("\n".join(lines))
    return 0


def interactive(generator: Generator, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """One line in, one answer out, until EOF. Blank lines are skipped; with --history the turns accumulate."""
    prompt = sys.stdin.isatty()
    history: list[dict[str, Any]] = []
    for line in input_lines(prompt):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        turns = [*history, {"role": "user", "content": text}] if args.history else [{"role": "user", "content": text}]
        answer = generator.answers([turns], **options)[0]
        if args.history:
            history = [*turns, {"role": "assistant", "content": answer.text}]
        if args.json:
            print(json.dumps({"prompt": text, "answer": answer.text, "stopped": answer.stopped}, ensure_ascii=False))
        else:
            print(answer.text, flush=True)
    return 0
