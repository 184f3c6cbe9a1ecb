from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
