"""Evaluation of an instruction-tuned model on the held-out splits, against the base model without its adapter.

- loss and perplexity: the mean cross-entropy per answer token over every record of the split (prompts truncated as
  in training), exp of it for perplexity;
- answers generated for a seeded sample of the split's prompts (`generation.samples`; greedy unless
  `generation.do_sample`), scored against the references: chrF, BLEU, ROUGE-L, exact match (`evaluation/
  text_metrics.py`).

Both for the tuned model ("sft") and, on the same records and prompts, for the base alone ("base",
`generation.compare_base`): the lift is the result. Files per dataset and split: generations.jsonl (each prompt with
its reference, the tuned answer and the base answer) and generation_results.json; metrics.json over all of them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline.data.instructions import last_answer_index
from qlora_pipeline.evaluation.text_metrics import LOSS_METRICS, TEXT_METRICS, reference_scores, signatures
from qlora_pipeline.runs import write_json
from qlora_pipeline.sft.generation import Answer, Generator
from qlora_pipeline.sft.prompts import IGNORE, fitted_examples
from qlora_pipeline.sft.recipe import PadRight, Tuned

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config
    from qlora_pipeline.data.instructions import InstructionSplits

log = logging.getLogger(__name__)

TUNED, BASE = "sft", "base"
GENERATIONS_FILE = "generations.jsonl"
RESULTS_FILE = "generation_results.json"


def evaluate(tuned: Tuned, config: Config, splits: InstructionSplits, run_dir: Path, seed: int) -> dict[str, Any]:
    """Score every split of `evaluation.splits`; write the per-dataset files and metrics.json. Returns
    {split: {"sft": {"overall": ..., "per_dataset": ...}, "base": ...}}."""
    generator = Generator(tuned.loaded, tuned.prompt, config)
    metrics: dict[str, Any] = {
        split: evaluate_split(tuned, generator, config, splits.get(split), split, run_dir, seed)
        for split in config.evaluation.splits
    }
    settings = config.generation
    write_json(
        run_dir / "metrics.json",
        {
            "primary_head": TUNED,
            "task": "instructions",
            "splits": metrics,
            "lift": {split: lift(per_head) for split, per_head in metrics.items()},
            "signatures": signatures(),
            "generation": {
                "decoding": "sampling" if settings.do_sample else "greedy",
                "max_new_tokens": settings.max_new_tokens,
                **(
                    {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
                    if settings.do_sample
                    else {}
                ),
                "seed": seed,
            },
        },
    )
    return metrics


def lift(per_head: dict[str, Any]) -> dict[str, float | None]:
    """Tuned minus base for every metric (loss and perplexity: negative is better)."""
    if BASE not in per_head:
        return {}
    ours, base = per_head[TUNED]["overall"], per_head[BASE]["overall"]
    return {
        name: None if ours.get(name) is None or base.get(name) is None else round(ours[name] - base[name], 6)
        for name in (*LOSS_METRICS, *TEXT_METRICS)
    }


def evaluate_split(
    tuned: Tuned, generator: Generator, config: Config, frame: pd.DataFrame, split: str, run_dir: Path, seed: int
) -> dict[str, Any]:
    compare = config.generation.compare_base
    rows, owners = loss_rows(tuned, config, frame)
    batch = config.training.batch_size
    nll = {TUNED: answer_nll(tuned.loaded.model, rows, batch, adapter=True)}
    if compare:
        nll[BASE] = answer_nll(tuned.loaded.model, rows, batch, adapter=False)
    picked = sample(len(frame), config.generation.samples, seed)
    conversations = [frame["messages"].iat[i] for i in picked]
    prompts = [m[: last_answer_index(m)] for m in conversations]
    references = [m[last_answer_index(m)]["content"] for m in conversations]
    answers = {TUNED: generator.answers(prompts)}
    if compare:
        answers[BASE] = generator.answers(prompts, adapter=False)
    datasets = frame["dataset"].to_numpy()
    owner_datasets = datasets[owners] if len(owners) else np.array([], dtype=object)
    picked_datasets = datasets[picked] if len(picked) else np.array([], dtype=object)
    result: dict[str, Any] = {}
    for head in nll:
        scopes = {"overall": (np.ones(len(rows), bool), np.ones(len(picked), bool), len(frame))}
        for dataset in sorted(set(datasets)):
            scopes[dataset] = (owner_datasets == dataset, picked_datasets == dataset, int((datasets == dataset).sum()))
        scored = {
            scope: scores(nll[head], in_loss, answers[head], references, in_generated, records)
            for scope, (in_loss, in_generated, records) in scopes.items()
        }
        result[head] = {"overall": scored.pop("overall"), "per_dataset": scored}
    for dataset in sorted(set(datasets)):
        folder = run_dir / str(dataset) / split
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [k for k, i in enumerate(picked) if datasets[i] == dataset]
        write_generations(folder / GENERATIONS_FILE, frame, picked, chosen, prompts, references, answers, generator)
        write_json(
            folder / RESULTS_FILE,
            {
                "dataset": str(dataset),
                "split": split,
                "heads": {head: result[head]["per_dataset"][dataset] for head in result},
            },
        )
    ours = result[TUNED]["overall"]
    log.info(
        "%s: loss %.4f (perplexity %.2f), chrF %s, BLEU %s, ROUGE-L %s, exact match %s on %d generated answers",
        split,
        ours["loss"],
        ours["perplexity"],
        ours["chrf"],
        ours["bleu"],
        ours["rouge_l"],
        ours["exact_match"],
        ours["generated"],
    )
    return result


def sample(records: int, samples: int | None, seed: int) -> list[int]:
    """The records whose prompts are generated: a seeded sample, in split order."""
    if samples is None or samples >= records:
        return list(range(records))
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(records)[:samples])


def loss_rows(tuned: Tuned, config: Config, frame: pd.DataFrame) -> tuple[list[dict[str, list[int]]], np.ndarray]:
    """Every record's answer-only examples, truncated as in training, and the record each one came from."""
    rows, owners = [], []
    for index, fitted in fitted_examples(tuned.prompter(), frame, config.training.max_length, config.sft.truncation):
        rows.append({"input_ids": fitted.input_ids, "labels": fitted.labels})
        owners.append(index)
    return rows, np.asarray(owners, dtype=int)


@torch.no_grad()
def answer_nll(model: Any, rows: list[dict[str, list[int]]], batch_size: int, *, adapter: bool) -> np.ndarray:
    """[rows, 2]: each example's summed cross-entropy over its answer tokens, and their number."""
    import contextlib

    model.eval()
    device = next(model.parameters()).device
    pad = PadRight(0)  # padded positions are masked out and labelled -100: the pad id is never read
    out = np.zeros((len(rows), 2))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    with contextlib.nullcontext() if adapter else model.disable_adapter():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = pad([rows[i] for i in batch])
            labels = inputs.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
            )
            out[batch, 0] = losses.sum(dim=1).double().cpu().numpy()
            out[batch, 1] = (labels[:, 1:] != IGNORE).sum(dim=1).cpu().numpy()
    return out


def scores(
    nll: np.ndarray,
    in_loss: np.ndarray,
    answers: list[Answer],
    references: list[str],
    in_generated: np.ndarray,
    records: int,
) -> dict[str, Any]:
    total, tokens = nll[in_loss].sum(axis=0) if len(nll) else (0.0, 0)
    loss = float(total / tokens) if tokens else None
    chosen = [k for k, keep in enumerate(in_generated) if keep]
    generated = [answers[k] for k in chosen]
    return {
        "n": records,
        "answer_tokens": int(tokens),
        "loss": None if loss is None else round(loss, 6),
        "perplexity": None if loss is None else round(math.exp(min(loss, 700.0)), 4),
        "generated": len(generated),
        **{
            k: v
            for k, v in reference_scores([a.text for a in generated], [references[k] for k in chosen]).items()
            if k != "n"
        },
        "stopped": round(sum(a.stopped for a in generated) / len(generated), 4) if generated else None,
    }


def write_generations(
    path: Path,
    frame: pd.DataFrame,
    picked: list[int],
    chosen: list[int],
    prompts: list[list[dict[str, Any]]],
    references: list[str],
    answers: dict[str, list[Answer]],
    generator: Generator,
) -> None:
    """One line per generated prompt: id, the conversation before the answer (`messages`, which `qlora generate
    --file` reads back), the rendered prompt, the reference, the tuned answer and the base answer."""
    with path.open("w", encoding="utf-8") as handle:
        for k in chosen:
            record = {
                "id": str(frame["id"].iat[picked[k]]),
                "messages": prompts[k],
                "prompt": generator.prompter.prompt_text(prompts[k]),
                "reference": references[k],
                "answer": answers[TUNED][k].text,
                "answer_tokens": answers[TUNED][k].tokens,
                "stopped": answers[TUNED][k].stopped,
            }
            if BASE in answers:
                record |= {"base_answer": answers[BASE][k].text, "base_stopped": answers[BASE][k].stopped}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
