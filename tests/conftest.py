"""Fixtures several test modules share: an isolated cache, the step-4 checkpoint run (whole and interrupted), the
tiny model's tokenizer, and what transformers logs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session builds the tiny model into its own cache, never the user's."""
    cache = tmp_path_factory.mktemp("qlora_cache")
    previous = os.environ.get("QLORA_CACHE_DIR")
    os.environ["QLORA_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("QLORA_CACHE_DIR", None)
    else:
        os.environ["QLORA_CACHE_DIR"] = previous


# The step-4 checkpoint run (helpers.CHECKPOINTED). Its users copy a run before changing it; a resume writes the next
# run_00N beside `interrupted`, and nothing counts or resolves `auto` among the runs of these folders.


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import CHECKPOINTED as CONFIG
    from helpers import checkpointed_args as args

    from qlora_pipeline.cli import main

    root = tmp_path_factory.mktemp("whole")
    assert main(args(root, CONFIG)) == 0
    return root / "run_001"


@pytest.fixture(scope="session")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, interrupted right after its step-4 checkpoint (as SIGTERM would: RunInterrupted): checkpoints
    2 and 4 complete."""
    from helpers import CHECKPOINTED as CONFIG
    from helpers import INTERRUPT_AT
    from helpers import checkpointed_args as args
    from transformers import TrainerCallback

    from qlora_pipeline.cli import main
    from qlora_pipeline.finetune import recipe
    from qlora_pipeline.runs import RunInterrupted

    class Interrupt(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == INTERRUPT_AT:
                raise RunInterrupted(f"test interruption after the step-{INTERRUPT_AT} checkpoint")

    root = tmp_path_factory.mktemp("cut")
    original = recipe.training_callbacks
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "training_callbacks", lambda cfg, marker: [*original(cfg, marker), Interrupt()])
        assert main(args(root, CONFIG)) == 143  # as SIGTERM ends it: one line, exit 128 + 15
    run = root / "run_001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return run


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny model's tokenizer, loaded once: its users never change it (they change deep copies)."""
    from transformers import AutoTokenizer

    from qlora_pipeline.models.tiny import ensure_tiny_qwen3

    return AutoTokenizer.from_pretrained(ensure_tiny_qwen3())


@pytest.fixture
def transformers_log() -> Iterator[list[str]]:
    """What transformers logs (its loggers do not propagate to the root, so caplog cannot see them)."""
    from helpers import transformers_records

    with transformers_records() as handler:
        yield handler.messages
