"""Corrupt state: truncated or bit-flipped cache files, checkpoints with a file missing or damaged, run directories
with a file removed or edited. Each is detected (checksums, structure), reported in one line, and recomputed or
refused: never silently used."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import CHECKPOINTED, cache_with_model
from procs import EMBEDDINGS, QLORA, error_lines, read_json

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config
from qlora_pipeline.embeddings.cache import EmbeddingCache, embeddings_root
from qlora_pipeline.errors import UserError
from qlora_pipeline.integrity import CHECKSUMS, MANIFEST
from qlora_pipeline.training.checkpoints import MARKER, resolve_resume

# ---- the embedding cache --------------------------------------------------------------------------------------

SETTINGS = {"model": "reliability-test", "pooling": "mean", "max_length": 16}


def keys_and_vectors(start: int, count: int) -> tuple[list[bytes], np.ndarray]:
    keys = [hashlib.sha256(f"text {i}".encode()).digest() for i in range(start, start + count)]
    vectors = np.random.default_rng(start).standard_normal((count, 8)).astype(np.float32)
    return keys, vectors


@pytest.fixture
def filled_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], np.ndarray]:
    """Three writes of 5 vectors each into an empty cache; the keys and vectors written."""
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    cache = EmbeddingCache(SETTINGS)
    parts = [keys_and_vectors(5 * i, 5) for i in range(3)]
    for keys, vectors in parts:
        cache.put(keys, vectors)
    return [k for keys, _ in parts for k in keys], np.concatenate([v for _, v in parts])


def corruptions(data: bytes) -> dict[str, bytes]:
    middle = len(data) // 2
    return {
        "truncated to half": data[:middle],
        "emptied": b"",
        "a bit flipped in the middle": data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :],
        "a bit flipped at the start": bytes([data[0] ^ 0x01]) + data[1:],
        "a bit flipped in the last byte": data[:-1] + bytes([data[-1] ^ 0x80]),
        "garbage appended": data + b"\x00garbage",
    }


def test_a_damaged_cache_file_is_detected_and_never_used(
    filled_cache: tuple[list[bytes], np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """Every file of the cache, damaged six ways in turn: a lookup returns only vectors exactly as written (the
    rest is recomputed by the run that asked), says what it dropped, and never fails."""
    keys, vectors = filled_cache
    expected = dict(zip(keys, vectors, strict=True))
    root = embeddings_root()
    pristine = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert len(pristine) >= 3
    tried = 0
    for path, data in pristine.items():
        for how, damaged in corruptions(data).items():
            for other, original in pristine.items():
                if not other.exists() or other.read_bytes() != original:
                    other.parent.mkdir(parents=True, exist_ok=True)
                    other.write_bytes(original)
            path.write_bytes(damaged)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
                found = EmbeddingCache(SETTINGS).lookup(keys)
            wrong = [k for k, v in found.items() if not np.array_equal(v, expected[k])]
            assert not wrong, f"{path.name} {how}: {len(wrong)} vectors returned wrong"
            if len(found) < len(keys) and path.suffix != ".json":
                assert caplog.records, f"{path.name} {how}: vectors dropped without a word"
            tried += 1
    assert tried >= 18


def test_a_rerun_over_a_damaged_cache_recomputes_and_matches(
    embeddings_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora_pipeline.reproduce import compare_runs

    run, cache = embeddings_run
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, symlinks=True)
    chunks = sorted(p for p in (copy / "embeddings").rglob("*") if p.is_file() and p.suffix != ".json")
    for chunk in chunks:  # every vector file truncated or bit-flipped
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 2] if len(chunks) % 2 else data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setenv("QLORA_CACHE_DIR", str(copy))
    assert main([*EMBEDDINGS, "--output-dir", str(tmp_path / "out")]) == 0
    again = tmp_path / "out" / "run_001"
    splits = read_json(again / "config.json")["embedding"]["splits"]
    assert sum(s["computed"] for s in splits.values()) > 0  # the damaged vectors were computed again
    comparison = compare_runs(run, again)
    assert comparison["matches"], comparison["checks"]


# ---- checkpoints ----------------------------------------------------------------------------------------------


# `interrupted` (tests/conftest.py): the QLoRA run of procs.QLORA interrupted right after its step-4 checkpoint.


def qlora_config() -> Any:
    return load_config("qlora_tiny", CHECKPOINTED)


def damaged_copy(run: Path, tmp_path: Path, damage: str) -> Path:
    copy = Path(shutil.copytree(run, tmp_path / "out" / run.name))
    checkpoint = copy / "checkpoints" / "checkpoint-4"
    if damage == "file removed":
        (checkpoint / "optimizer.pt").unlink()
    elif damage == "bit flipped":
        weights = checkpoint / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x04
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        path = checkpoint / "scheduler.pt"
        path.write_bytes(path.read_bytes()[:10])
    elif damage == "state edited":
        state = read_json(checkpoint / "trainer_state.json")
        state["global_step"] = 3
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return copy


DAMAGES = ["file removed", "bit flipped", "truncated", "state edited"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_is_skipped_by_resume_with_a_warning(
    damage: str, interrupted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before checksums, the newest checkpoint with a marker was resumed whatever it held (the Trainer silently
    starts a fresh optimizer when optimizer.pt is missing)."""
    copy = damaged_copy(interrupted, tmp_path, damage)
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        chosen = resolve_resume(str(copy), qlora_config(), copy.parent)
        assert chosen == copy / "checkpoints" / "checkpoint-2"
        assert resolve_resume("auto", qlora_config(), copy.parent) == chosen
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_named_explicitly_is_refused_in_one_line(
    damage: str, interrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = damaged_copy(interrupted, tmp_path, damage)
    argv = ["run", "--config", "qlora_tiny", *QLORA[3:], "--output-dir", str(tmp_path / "new")]
    assert main([*argv, "--resume", str(copy / "checkpoints" / "checkpoint-4")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "the checkpoint is damaged" in lines[0]
    assert not (tmp_path / "new").exists()  # refused before any run directory


def test_a_run_whose_config_json_was_edited_is_not_resumed(
    interrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(interrupted, tmp_path / "out" / interrupted.name))
    record = read_json(copy / "config.json")
    record["config"]["training"]["learning_rate"] = 0.5
    (copy / "config.json").write_text(json.dumps(record))
    assert main(["resume", str(copy)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "config.json was edited after the checkpoint was written" in lines[0]


def test_a_checkpoint_is_not_continued_on_other_data(interrupted: Path, tmp_path: Path) -> None:
    from qlora_pipeline.training.checkpoints import check_data

    checkpoint = interrupted / "checkpoints" / "checkpoint-4"
    recorded = read_json(checkpoint / MARKER)["data_fingerprint"]
    assert recorded == read_json(interrupted / "data_summary.json")["fingerprint"]
    check_data(checkpoint, recorded)
    with pytest.raises(UserError, match="trained on other data"):
        check_data(checkpoint, "0" * 64)


def test_every_file_of_a_checkpoint_is_in_its_marker(interrupted: Path) -> None:
    checkpoint = interrupted / "checkpoints" / "checkpoint-4"
    listed = set(read_json(checkpoint / MARKER)["files"])
    present = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MARKER}
    assert listed == present and {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors"} <= listed


# ---- run directories: predict, reproduce, compare -------------------------------------------------------------


def edited_copy(run: Path, tmp_path: Path, relative: str, how: str) -> Path:
    copy = Path(shutil.copytree(run, tmp_path / run.name))
    path = copy / relative
    if how == "removed":
        path.unlink()
    elif how == "edited" and path.suffix == ".json":
        record = read_json(path)
        if relative == "config.json":
            record["config"]["embedding"]["max_length"] = 32
        else:
            record["edited"] = True
        path.write_text(json.dumps(record))
    elif how == "edited":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "swapped":
        shutil.copyfile(path.with_name("tfidf_logreg.joblib"), path)
    return copy


PREDICT_CASES = [
    ("config.json", "edited", "config.json has changed since the run recorded it"),
    ("data_summary.json", "edited", "data_summary.json has changed since the run recorded it"),
    ("models/all/logreg.joblib", "edited", "does not match the checksum recorded when the run saved it"),
    ("models/all/logreg.joblib", "swapped", "does not match the checksum recorded when the run saved it"),
    ("models/all/logreg.joblib", "removed", "is missing models/all/logreg.joblib"),
    ("models/all/checksums.json", "removed", "checksums.json is missing"),
    ("models/all/checksums.json", "edited", "checksums.json has changed since the run recorded it"),
]


@pytest.mark.parametrize(("relative", "how", "message"), PREDICT_CASES, ids=lambda v: str(v))
def test_predict_refuses_a_run_directory_with_a_file_removed_or_edited(
    relative: str,
    how: str,
    message: str,
    embeddings_run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = edited_copy(embeddings_run[0], tmp_path, relative, how)
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), "--text", "好"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines


def test_an_intact_copy_of_a_run_still_predicts(embeddings_run: tuple[Path, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(embeddings_run[0], tmp_path / "copy"))
    assert main(["predict", "--run", str(copy), "--head", "tfidf_logreg", "--text", "好"]) == 0
    assert set(read_json(copy / MANIFEST)) >= {"config.json", "metrics.json", f"models/all/{CHECKSUMS}"}


@pytest.mark.parametrize(
    ("relative", "how"),
    [("metrics.json", "edited"), ("snownlp_sentiment/test/predictions.csv", "removed"), ("config.json", "edited")],
)
def test_reproduce_and_compare_refuse_a_run_whose_files_changed(
    relative: str, how: str, embeddings_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = edited_copy(embeddings_run[0], tmp_path, relative, how)
    capsys.readouterr()
    assert main(["reproduce", str(copy), "--output-dir", str(tmp_path / "again")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and relative.rsplit("/", 1)[-1] in lines[0], lines
    assert not (tmp_path / "again").exists()
    if relative.endswith(".json"):
        assert main(["compare", str(embeddings_run[0]), str(copy), "--out", str(tmp_path / "c.md")]) == 2
        assert relative in capsys.readouterr().err


def test_a_damaged_status_file_is_one_line(embeddings_run: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    copy = Path(shutil.copytree(embeddings_run[0], tmp_path / "copy"))
    (copy / "status.json").write_text('{"state": "succ')
    assert main(["predict", "--run", str(copy), "--text", "好"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "status.json cannot be read" in lines[0]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("qlora")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_CACHE_DIR", str(cache_with_model(folder, tiny_model)))
        assert main([*QLORA, "--set", "training.max_steps=4", "--output-dir", str(folder / "out")]) == 0
    return folder / "out" / "run_001"


@pytest.mark.slow  # a QLoRA run of its own (~15 s of CPU)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "labels.json", "tokenizer.json"])
def test_predict_refuses_a_damaged_adapter_file(
    name: str, qlora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = edited_copy(qlora_run, tmp_path, f"models/all/lora_adapter/{name}", "edited")
    capsys.readouterr()
    assert main(["predict", "--run", str(copy), "--text", "好"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"lora_adapter/{name}" in lines[0] and "checksum" in lines[0], lines
    intact = pd.read_csv(qlora_run / "snownlp_sentiment" / "test" / "predictions.csv")["text"].head(2).tolist()
    assert main(["predict", "--run", str(qlora_run), "--text", intact[0]]) == 0


def test_a_checkpoint_saved_as_training_stopped_is_passed_over(interrupted: Path, tmp_path: Path) -> None:
    """Resumed from the checkpoint early stopping ended on, the Trainer trains on past the stop (the resumed run had
    8 steps where the uninterrupted one had 6); an earlier checkpoint retrains to the same end."""
    from qlora_pipeline.training.checkpoints import file_checksums

    copy = Path(shutil.copytree(interrupted, tmp_path / "out" / interrupted.name))
    last = copy / "checkpoints" / "checkpoint-4"
    state = read_json(last / "trainer_state.json")
    state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] = True
    (last / "trainer_state.json").write_text(json.dumps(state))
    marker = read_json(last / MARKER)
    (last / MARKER).write_text(json.dumps({**marker, "files": file_checksums(last)}))  # as the Trainer saved it
    assert resolve_resume(str(copy), qlora_config(), copy.parent) == copy / "checkpoints" / "checkpoint-2"
    shutil.rmtree(copy / "checkpoints" / "checkpoint-2")
    assert resolve_resume(str(copy), qlora_config(), copy.parent) == last  # the only one left: taken, with a warning
