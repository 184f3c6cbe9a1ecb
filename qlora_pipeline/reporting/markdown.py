"""Markdown tables for the report, the per-split summaries, `qlora compare` and the trackers."""

from __future__ import annotations


def flat(text: str, limit: int | None = None) -> str:
    """Whitespace (line breaks included) flattened to single spaces, cut to `limit` characters with an ellipsis."""
    flattened = " ".join(str(text).split())
    if limit is not None and len(flattened) > limit:
        flattened = flattened[: limit - 1] + "…"
    return flattened


def cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return flat(text).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table, every cell made safe, then a blank line."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return [*lines, ""]
