"""Several processes under torchrun, on CPUs (gloo). QLoRA: two processes train one run of the tiny model; rank 0
alone writes the run directory, and the run records that it took two processes to reproduce. Embeddings: two
processes share the encoding through the cache, and the run equals a one-process run byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import sets, torchrun

from qlora_pipeline.cli import main

CONFIG = "configs/qlora_tiny.yaml"
STEPS, BATCH = 4, 8
SETTINGS = [
    "data.max_samples=160",
    f"training.max_steps={STEPS}",
    f"training.batch_size={BATCH}",
    "training.eval_steps=2",  # checkpoints at steps 2 and 4
    "training.gradient_accumulation_steps=1",
    "training.early_stopping_patience=5",  # never stops in 4 steps, but every rank restores the best checkpoint
    "evaluation.bootstrap=0",
    "evaluation.figures=false",
]


def failure(done: subprocess.CompletedProcess[str]) -> str:
    """What a failed launch printed: the first lines of every rank's traceback (a crash on one rank shows on the
    others only as a closed connection), then the end of stderr."""
    ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank") and "]:" in line]
    return "\n".join(ranks[:60]) + "\n...\n" + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("ddp")
    done = torchrun("run", "--config", CONFIG, "--output-dir", str(root), *sets(*SETTINGS))
    assert done.returncode == 0, failure(done)
    return root / "run_001", done


def test_two_processes_make_one_run_directory_written_by_rank_0(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, done = ddp_run
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run_001"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    assert done.stdout.count("run directory:") == 1  # the summary is printed once, by rank 0
    assert "rank 0 of 2 joined the process group (gloo)" in done.stderr
    assert "rank 1 of 2" not in done.stderr  # the other rank logs warnings only
    log = (run_dir / "experiment.log").read_text()
    assert log.count("stage training: started") == 1 and log.count("adapter saved to") == 1


def test_both_processes_trained_and_the_run_records_two(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = ddp_run
    training = json.loads((run_dir / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["effective_batch_size"] == 2 * BATCH
    # Each optimizer step consumed a batch per process: the epoch count is twice that of one process.
    train_rows = json.loads((run_dir / "data_summary.json").read_text())["splits"]["train"]["rows"]
    assert training["epochs"] == round(STEPS * 2 * BATCH / train_rows, 4)
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in checkpoints:  # every rank saved its RNG state into the shared checkpoint folder
        assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
        assert json.loads((checkpoint / "qlora_checkpoint.json").read_text())["world_size"] == 2
    report = (run_dir / "experiment_report.md").read_text()
    assert f"x 2 processes = {2 * BATCH} per optimizer step" in report
    assert "a rerun reproduces with the same number of processes" in report


def test_adapter_of_a_two_process_run_reproduces_its_predictions(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from qlora_pipeline.predict import load_predictor

    run_dir, _ = ddp_run
    expected = pd.read_csv(run_dir / "snownlp_sentiment" / "test" / "predictions.csv")
    scored = load_predictor(run_dir).predict(expected["text"].tolist())
    assert (scored["prediction"] == expected["prediction"]).all()
    assert (scored["prob_positive"] - expected["prob_positive"]).abs().max() < 1e-5


def test_a_two_process_checkpoint_does_not_resume_in_one_process(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = ddp_run
    args = ["run", "--config", CONFIG, "--output-dir", str(tmp_path), *sets(*SETTINGS)]
    assert main([*args, "--resume", str(run_dir / "checkpoints" / "checkpoint-2")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "trained on 2 process(es), this run has 1; resume it with the same number (torchrun --nproc_per_node 2)"
    )
    assert not list(tmp_path.iterdir())


def test_a_two_process_run_is_not_reproduced_in_one_process(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = ddp_run
    assert main(["reproduce", str(run_dir), "--output-dir", str(tmp_path)]) == 2
    assert "trained on 2 process(es) and this reproduction has 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a second torchrun job: ~20 s here
def test_a_two_process_run_resumed_on_two_processes_matches_the_uninterrupted_one(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from qlora_pipeline.reproduce import compare_runs

    run_dir, _ = ddp_run
    root = run_dir.parent
    resume = str(run_dir / "checkpoints" / "checkpoint-2")
    done = torchrun("run", "--config", CONFIG, "--output-dir", str(root), *sets(*SETTINGS), "--resume", resume)
    assert done.returncode == 0, failure(done)
    resumed = root / "run_002"
    assert sorted(p.name for p in (resumed / "checkpoints" / "checkpoint-2").glob("rng_state_*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    comparison = compare_runs(run_dir, resumed)  # metrics.json and every predictions.csv, byte for byte
    assert comparison["matches"], comparison["checks"]


EMBEDDING_SETTINGS = [
    "data.max_samples=160",
    "embedding.batch_size=8",  # several batches for each process
    # A model key of its own: vectors of these texts cached with other batch-mates would differ at float rounding
    # from what other tests of this session (sharing its cache) compute.
    "embedding.max_length=48",
    "embedding.fidelity_sample=16",
    "evaluation.bootstrap=0",
    "evaluation.figures=false",
]


def test_an_embeddings_run_on_two_processes_equals_the_one_process_run(tmp_path: Path) -> None:
    """Each process computes every other batch of the same plan into a cache of its own (not the session's, so
    the one-process run below starts cold too); rank 0 reads them back and writes the run."""
    from qlora_pipeline.reproduce import compare_runs

    args = ["run", "--config", "quick_test.yaml", *sets(*EMBEDDING_SETTINGS)]
    done = torchrun(*args, "--output-dir", str(tmp_path / "two"), cache=tmp_path / "cache")
    assert done.returncode == 0, failure(done)
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    two, one = tmp_path / "two" / "run_001", tmp_path / "one" / "run_001"
    assert sorted(p.name for p in two.parent.iterdir()) == ["run_001"]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone writes and prints
    comparison = compare_runs(one, two)  # metrics.json and every predictions.csv, byte for byte
    assert comparison["matches"], comparison["checks"]
    embedding = json.loads((two / "config.json").read_text())["embedding"]
    computed = sum(split["computed"] for split in embedding["splits"].values())
    assert embedding["processes"] == 2 and computed == 160
    first, second = embedding["computed_per_process"]
    assert first + second == computed and first > 0 and second > 0  # both processes encoded
    assert "| encoding processes | 2 (vectors computed by each:" in (two / "experiment_report.md").read_text()


def test_a_launch_of_an_embeddings_run_without_the_cache_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_pipeline.config import load_config
    from qlora_pipeline.embeddings.run import preflight
    from qlora_pipeline.errors import UserError

    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    config = load_config("quick_test", ["embedding.cache=false"])
    with pytest.raises(UserError, match="embedding.cache is false, but 2 processes were launched"):
        preflight(config, Path("unused"), None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines, one process each
    with pytest.raises(UserError, match="share vectors through the cache on one machine"):
        preflight(load_config("quick_test"), Path("unused"), None)


@pytest.mark.slow  # a torchrun job that stops at once: ~8 s here
def test_when_rank_0_cannot_start_the_run_every_rank_leaves_without_one(tmp_path: Path) -> None:
    args = ["run", "--config", CONFIG, "--output-dir", str(tmp_path), "--resume", str(tmp_path / "missing")]
    done = torchrun(*args)
    assert done.returncode != 0
    assert "qlora: error: --resume" in done.stderr
    assert "qlora: error (rank 1): rank 0 did not start the run" in done.stderr
    assert not list(tmp_path.glob("run_*"))


def test_a_built_in_model_that_save_pretrained_skipped_is_never_put_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers saves on rank 0 only once a process group exists; the build refuses to install the
    tokenizer-only folder that a rank other than 0 would get (the pipeline builds before joining the group)."""
    from transformers import PreTrainedModel

    from qlora_pipeline.models.tiny import build_tiny_qwen3

    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    with pytest.raises(RuntimeError, match="wrote no config.json, model.safetensors"):
        build_tiny_qwen3(tmp_path / "tiny")
    assert not list(tmp_path.iterdir())  # neither the model folder nor the temporary one
