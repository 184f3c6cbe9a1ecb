"""Progress of long work: without a terminal an INFO line at most every LOG_EVERY_S seconds, with one a tqdm bar that
leaves the console's logging as it found it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import pytest

from qlora_pipeline import progress
from qlora_pipeline.data.sources import read_table
from qlora_pipeline.progress import Progress, duration

LOGGER = logging.getLogger("qlora_pipeline.test_progress")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_without_a_terminal_a_line_shows_count_fields_rate_and_eta(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    with Progress(40, "training", "step", logger=LOGGER, initial=10) as bar:
        bar.update(20, loss=0.41234, lr=0.00019)
    (line,) = lines(caplog)
    assert line.startswith("training: 20 / 40 steps (50%), loss 0.4123, lr 1.90e-04, ")
    assert "steps/s, ETA " in line


def test_without_a_terminal_nothing_is_logged_before_the_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    with Progress(100, "scoring", "text", logger=LOGGER) as bar:
        for _ in range(100):
            bar.advance(1)
    assert lines(caplog) == []


def test_a_terminal_gets_a_bar_and_the_console_logging_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    root = logging.getLogger()
    before = list(root.handlers)
    with Progress(10, "scoring", "text", logger=LOGGER) as bar:
        assert bar._bar is not None  # a tqdm bar, shown once the work outlasts BAR_DELAY_S
        bar.advance(10, loss=0.5)
        assert bar._bar.n == 10
    assert root.handlers == before


def test_durations_read_as_hours_minutes_seconds() -> None:
    assert [duration(s) for s in (4.2, 125, 3723)] == ["4 s", "2:05", "1:02:03"]


def test_reading_a_large_file_reports_its_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="qlora_pipeline.data.sources")
    path = tmp_path / "big.csv"
    pd.DataFrame({"text": [f"第{i}条评论" * 20 for i in range(30000)], "label": [i % 2 for i in range(30000)]}).to_csv(
        path, index=False
    )
    assert len(read_table(path)) == 30000
    found = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reading big.csv: ")]
    assert found and " MB / " in found[-1] and "MB/s" in found[-1]
