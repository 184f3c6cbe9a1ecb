"""Fixtures of the reliability suite: the tiny model built once, a fresh cache per test that shares it, and the
small embeddings run."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cache_with_model


@pytest.fixture(scope="session")
def tiny_model(isolated_cache: Path) -> Path:
    """The built-in tiny checkpoint, built once into the session's cache."""
    from qlora_pipeline.models.tiny import ensure_tiny_qwen3

    return ensure_tiny_qwen3()


@pytest.fixture
def fresh_cache(tmp_path: Path, tiny_model: Path) -> Path:
    return cache_with_model(tmp_path, tiny_model)


@pytest.fixture(scope="session")
def embeddings_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """A small embeddings run (procs.EMBEDDINGS) that succeeded with a cold cache of its own, and that cache. Its
    users read both, or change copies."""
    from procs import EMBEDDINGS

    from qlora_pipeline.cli import main

    folder = tmp_path_factory.mktemp("embeddings")
    cache = cache_with_model(folder, tiny_model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_CACHE_DIR", str(cache))
        assert main([*EMBEDDINGS, "--output-dir", str(folder / "out")]) == 0
    return folder / "out" / "run_001", cache
