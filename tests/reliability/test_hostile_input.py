"""Hostile and odd input. Generated YAML/JSON documents and `--set` values thrown at the config loader through the
command line: a valid config, or one line and exit 2, never a traceback or a hang. Data files with BOMs, CRLF,
NULs, a 1 MB text, emoji, RTL text, zero-width and bidi characters, mixed encodings, empty labels, duplicate
columns, and 100k rows with one bad row: cleaned with counts, or refused naming the line or row."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_pipeline import config as config_module
from qlora_pipeline.cli import main
from qlora_pipeline.config import DataConfig, LabelConfig, SourceConfig
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.errors import DataError

# ---- configs: generated documents and overrides ---------------------------------------------------------------

JUNK = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["{text}", "{", "}", "{text_pair}", "{instruction.x}", "{0}", "{text!r}", "..", "../x", ""])
)


def for_hint(hint: Any, depth: int) -> st.SearchStrategy[Any]:
    """Values shaped like the field's type (so validation deep in a section is reached), mixed with junk."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_hint(a, depth) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(for_hint(args[0], depth + 1), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=6) | st.integers(), for_hint(args[1], depth + 1), max_size=3)
    if dataclasses.is_dataclass(hint):
        return section(hint, depth + 1)
    simple = {
        int: st.integers(-3, 300) | st.integers(),
        float: st.floats(-2, 2) | st.floats(),
        str: st.text(max_size=12) | st.sampled_from(["{text}", "x{", "builtin:tiny-qwen3", "a", "{text}{text_pair}"]),
        bool: st.booleans(),
        type(None): st.none(),
    }
    return simple.get(hint, JUNK)


def section(cls: type, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields = config_module._hints(cls)
    if depth > 3:
        return st.just({})
    optional = {name: st.one_of(for_hint(hint, depth), JUNK) for name, hint in fields.items()}
    return st.fixed_dictionaries({}, optional=optional)  # type: ignore[arg-type]


YAML_PIECES = [
    "experiment:",
    "data:",
    "training:",
    "  seed: 1",
    "  sources:",
    "    - name: x",
    "  - type: hub",
    "&a",
    "*a",
    "<<: *a",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    "---",
    "...",
    "{",
    "}",
    "[",
    "]",
    ": ",
    "\t",
    "\x00",
    "\ufeff",
    "\u202e",
    "\r\n",
    "#",
    "'",
    '"',
    "|",
    ">",
    "?",
    "- ",
    "%YAML 1.1",
    "!!set {a}",
    "1e-4",
]
DOCUMENTS = (
    section(config_module.Config).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    | st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=30).map(lambda p: " ".join(p))
    | st.lists(st.sampled_from(YAML_PIECES), max_size=20).map("\n".join)
    | st.text(max_size=200)
)
OVERRIDES = st.lists(
    st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from(["experiment.seed", "data.sources", "training.lora_r", "model", "x.y", "", "embedding.pooling"])
        | st.text(max_size=10),
        st.text(max_size=20) | st.sampled_from(["[", "*a", "&a [*a]", "!!python/name:os.system", "{a: 1}", "null"]),
    ),
    max_size=3,
)


def config_show(path: Path, overrides: list[str]) -> tuple[int, str]:
    """`qlora config show PATH --set ...`: (exit code, stderr). Any exception other than the exits escapes."""
    argv = ["config", "show", str(path), "--format", "json"]
    argv += [f"--set={item}" for item in overrides]  # the = form: a value may start with '-' as a flag does
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_config_or_one_line(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("qlora: error: "), err
        assert "Traceback" not in err


# Derandomized: every CI pass tries the same 250 examples, so a failure there is a finding, not a coin toss; run with
# a random seed (derandomize off) to explore further.
HYPOTHESIS = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@HYPOTHESIS
@given(document=DOCUMENTS, overrides=OVERRIDES)
def test_any_yaml_document_and_overrides_give_a_config_or_one_line(document: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        assert_config_or_one_line(*config_show(path, overrides))


@HYPOTHESIS
@given(document=section(config_module.Config).map(json.dumps) | st.text(max_size=200))
def test_any_json_document_gives_a_config_or_one_line(document: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        assert_config_or_one_line(*config_show(path, []))


# A "billion laughs": 9 levels of 9 aliases, 387 million values once walked or written out to config.json.
ALIAS_BOMB = (
    "a: &a [x,x,x,x,x,x,x,x,x]\n"
    + "".join(f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    + "classifier: {options: {logreg: {tol: *i}}}\n"
)
KNOWN = {
    "duplicate key": (
        "experiment:\n  seed: 1\nexperiment:\n  seed: 2\n",
        "duplicate key 'experiment' (first at line 1)",
    ),
    "python tag": (
        "experiment: {name: !!python/object/apply:os.system ['true']}\n",
        "could not determine a constructor",
    ),
    "deep nesting": ("experiment: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "self reference": ("experiment: &a {name: *a}\n", "expands to more than"),
    "alias bomb": (ALIAS_BOMB, "expands to more than"),
    "open quote": ("\n\nexperiment:\n  name: 'a\n", "invalid YAML at line"),
    "line break in a dataset name": ('data:\n  sources:\n    - name: "a\\nb"\n', "without control characters"),
    "attribute in a template": (
        "embedding: {prompt_template: '{instruction.x} {text}'}\n",
        "may only use {instruction}",
    ),
    "line break in a key": ("'a\\nb': 1\n", "unknown key 'a\\nb'"),
}


@pytest.mark.parametrize("case", KNOWN)
def test_known_hostile_configs_are_refused_in_one_line(case: str) -> None:
    """Each of these crashed, hung or printed several lines before (a recursion error, an alias bomb walked for
    minutes, a key silently given twice, an AttributeError from a template, a path of '..')."""
    document, message = KNOWN[case]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(document, encoding="utf-8")
        code, err = config_show(path, [])
    assert code == 2 and message in err, err
    assert_config_or_one_line(code, err)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment.seed=[", "the value is not valid YAML"),
        ("experiment.name=*a", "the value is not valid YAML"),
        ("experiment.seed=!!python/name:os.system", "could not determine a constructor"),
        ("data.sources=[{name: ''}]", "a non-empty name"),
        ("experiment.name=&a [*a]", "expands to more than"),
    ],
)
def test_hostile_overrides_are_refused_in_one_line(override: str, message: str, tmp_path: Path) -> None:
    code, err = config_show(Path("quick_test"), [override])
    assert code == 2 and message in err, err
    assert_config_or_one_line(code, err)


# ---- data files -----------------------------------------------------------------------------------------------

ROWS = [(f"好评 物流很快 第{i}单", "pos") if i % 2 else (f"差评 质量太差 第{i}单", "neg") for i in range(60)]


def csv_bytes(rows: list[tuple[str, str]], newline: str = "\n", header: str = "text,label") -> bytes:
    lines = [header, *(f'"{text}",{label}' for text, label in rows)]
    return (newline.join(lines) + newline).encode("utf-8")


def prepare(path: Path, unmatched: Literal["error", "drop"] = "error") -> dict[str, Any]:
    """The data stage on one local file whose classes are neg and pos; its data_summary.json."""
    source = {"name": "odd", "type": "local", "path": str(path), "label_names": ["neg", "pos"]}
    config = DataConfig(sources=[SourceConfig(**source, labels=LabelConfig(unmatched=unmatched))], max_samples=None)
    return prepare_data(config, seed=1).summary


def texts_of(summary: dict[str, Any]) -> int:
    return int(summary["rows_after_cleaning"])


CLEANED = {  # name -> (file bytes, rows expected after cleaning)
    "byte-order mark": (b"\xef\xbb\xbf" + csv_bytes(ROWS), 60),
    "CRLF line ends": (csv_bytes(ROWS, "\r\n"), 60),
    "embedded NULs": (csv_bytes([(t + "\x00\x00" if i % 7 == 0 else t, y) for i, (t, y) in enumerate(ROWS)]), 60),
    "a 1 MB text": (csv_bytes([*ROWS, ("长" * 1_000_000, "pos")]), 61),
    "emoji": (csv_bytes([(t + " 😀👍🏽🇨🇳", y) for t, y in ROWS]), 60),
    "RTL text": (csv_bytes([(t + " مرحبا بالعالم שלום", y) for t, y in ROWS]), 60),
    "zero-width and bidi characters": (
        csv_bytes([(t + "\u200b\u200d\u202e\u2066x\u2069\ufeff", y) for t, y in ROWS]),
        60,
    ),
}


@pytest.mark.parametrize("case", CLEANED)
def test_odd_but_valid_data_files_are_read_and_cleaned(case: str, tmp_path: Path) -> None:
    data, rows = CLEANED[case]
    path = tmp_path / "odd.csv"
    path.write_bytes(data)
    summary = prepare(path)
    assert summary["rows_read"] == rows and texts_of(summary) == rows
    assert summary["text_length"]["max"] >= (1_000_000 if case == "a 1 MB text" else 10)


def test_invisible_characters_are_removed_and_duplicates_they_hid_are_found(tmp_path: Path) -> None:
    """Texts that differ only by zero-width or bidi characters are one text once cleaned (counted as duplicates)."""
    rows = ROWS + [
        (ROWS[0][0] + "\u200b", ROWS[0][1]),
        ("\u202e" + ROWS[2][0], ROWS[2][1]),
        (ROWS[4][0] + "\x00", "neg"),
    ]
    path = tmp_path / "hidden.csv"
    path.write_bytes(csv_bytes(rows))
    summary = prepare(path)
    assert summary["rows_read"] == 63 and summary["removed"]["duplicates"] == 3


REFUSED = {  # name -> (file name, bytes, fragments of the one-line error)
    "mixed encodings": (
        "mixed.csv",
        csv_bytes(ROWS[:30]) + "é,pos\n".encode("latin-1") + csv_bytes(ROWS[30:], header="").lstrip(b"\n"),
        ["not valid UTF-8", "(line 32)"],
    ),
    "UTF-16": ("utf16.csv", csv_bytes(ROWS).decode().encode("utf-16"), ["not valid UTF-8", "line 1"]),
    "empty labels": (
        "empty.csv",
        csv_bytes([(t, "" if i in (4, 9) else y) for i, (t, y) in enumerate(ROWS)]),
        ["2 label values", "'<missing>' (2 rows) at data rows 5, 10"],
    ),
    "a duplicate column": (
        "dup.csv",
        ("text,label,text\n" + "".join(f'"{t}",{y},"other"\n' for t, y in ROWS)).encode(),
        ["has the column 'text' twice"],
    ),
    "a bad JSON line": (
        "bad.jsonl",
        "\n".join(
            json.dumps({"text": t, "label": y}) if i != 41 else '{"text": "x",' for i, (t, y) in enumerate(ROWS)
        ).encode(),
        ["line 42 is not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unreadable_data_files_are_refused_naming_the_line(case: str, tmp_path: Path) -> None:
    name, data, fragments = REFUSED[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as caught:
        prepare(path)
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_a_bom_in_a_json_lines_file_is_read(tmp_path: Path) -> None:
    """pandas read the byte-order mark as part of the first object and failed ("Expected object or value")."""
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in ROWS]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    assert prepare(path)["rows_read"] == 60


def test_empty_labels_can_be_dropped_and_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(csv_bytes([(t, "" if i in (4, 9) else y) for i, (t, y) in enumerate(ROWS)]))
    summary = prepare(path, "drop")
    assert summary["removed"]["unmatched_label"] == 2 and summary["rows_read"] == 60


BIG = 100_000
BAD_ROW = 73_211  # data row number (1-based; line BAD_ROW + 1 of the file)


def big_file(path: Path, bad: str) -> Path:
    """100k distinct rows with one bad row."""
    rows = [f'"评论 {i} {"好" if i % 2 else "差"}",{"pos" if i % 2 else "neg"}' for i in range(BIG)]
    bad_rows = {
        "an extra field": '"多一列",pos,extra',
        "an unknown label": '"标签错了",maybe',
        "an empty text": '"",pos',
        "a byte that is not UTF-8": None,
    }
    lines = [b"text,label", *(r.encode() for r in rows)]
    lines[BAD_ROW] = b'"\xff\xfe",pos' if bad_rows[bad] is None else str(bad_rows[bad]).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("an extra field", f"line {BAD_ROW + 1}"),
        ("an unknown label", f"'maybe' (1 rows) at data row {BAD_ROW}"),
        ("a byte that is not UTF-8", f"(line {BAD_ROW + 1})"),
        ("an empty text", None),
    ],
)
def test_one_bad_row_in_100k_is_named_or_counted(bad: str, expected: str | None, tmp_path: Path) -> None:
    path = big_file(tmp_path / "big.csv", bad)
    if expected is None:  # cleaned: one row removed, counted
        summary = prepare(path)
        assert summary["rows_read"] == BIG and summary["removed"]["missing_text"] == 1
        assert texts_of(summary) == BIG - 1
        return
    with pytest.raises(DataError) as caught:
        prepare(path)
    assert expected in str(caught.value), caught.value
