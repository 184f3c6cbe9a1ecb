"""Fixtures of the reliability suite: the tiny model built once, and a fresh cache per test that shares it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(isolated_cache: Path) -> Path:
    """The built-in tiny checkpoint, built once into the session's cache."""
    from qlora_pipeline.models.tiny import ensure_tiny_qwen3

    return ensure_tiny_qwen3()


def cache_with_model(folder: Path, model: Path) -> Path:
    """A cache folder of its own (an empty embedding cache) that reaches the tiny model through a link."""
    cache = folder / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / model.name).symlink_to(model, target_is_directory=True)
    return cache


@pytest.fixture
def fresh_cache(tmp_path: Path, tiny_model: Path) -> Path:
    return cache_with_model(tmp_path, tiny_model)
