"""Run the `qlora` command in this process with a pause at one named point, so a test can interrupt it exactly there.

    HOLD_FILE=/tmp/held python tests/reliability/harness.py POINT -- run --config quick_test ...

The command is the real one (`qlora_pipeline.cli.main`, as `python -m qlora_pipeline` runs it). The harness only
wraps one function or hook so that when the run reaches POINT it writes $HOLD_FILE ("<pid> <point>") and waits:
until the test sends a signal (which then arrives inside that function, as it would in a real run), or, when
$RELEASE_FILE is set, until that file exists (the run then goes on). The package knows nothing of this: pauses
are test code, installed from outside, so no test hook sits in the package's own paths.

POINT is `name` or `name:N` (the N-th time the point is reached, default 1):
  start           before the command begins (to start several at the same moment)
  data            inside the data stage, before cleaning
  model           embeddings: loading the encoder
  encode:N        inside the N-th forward pass of a decoder layer while encoding (mid-batch)
  cache_put:N     the N-th write of a chunk to the embedding cache, before it is written
  heads           embeddings: fitting the first classifier head
  evaluation      evaluating the first split
  report          writing experiment_report.md
  train_step:N    qlora: at the start of optimizer step N+1 (N steps done, their checkpoints complete)
  checkpoint:N    qlora: saving checkpoint-N, its adapter written, its optimizer, RNG and trainer state not yet
  rotation        qlora: the Trainer deleting an old checkpoint, one of its files (optimizer.pt) already gone
  adapter_save    qlora: saving the trained adapter into models/all
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def hold(point: str) -> None:
    Path(os.environ["HOLD_FILE"]).write_text(f"{os.getpid()} {point}\n", encoding="utf-8")
    release = os.environ.get("RELEASE_FILE")
    while not (release and Path(release).exists()):
        time.sleep(0.02)  # a signal interrupts the sleep: its handler raises here, inside the wrapped function


def wrap(owner: Any, name: str, point: str, nth: int) -> None:
    """Hold the `nth` time `owner.name` is called, before it runs."""
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            hold(point)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def install(point: str, nth: int) -> None:
    if point == "start":
        return  # `main` holds before the command
    if point == "data":
        from qlora_pipeline.data import prepare

        wrap(prepare, "clean", point, nth)
    elif point == "model":
        from qlora_pipeline.embeddings import encoding

        wrap(encoding, "load_model", point, nth)  # the embeddings path loads its model here, when a vector is missing
    elif point == "encode":
        import torch

        calls = 0

        def layer_forward(module: Any, inputs: Any) -> None:
            nonlocal calls
            if type(module).__name__.endswith("DecoderLayer"):
                calls += 1
                if calls == nth:
                    hold(point)

        torch.nn.modules.module.register_module_forward_pre_hook(layer_forward)
    elif point == "cache_put":
        from qlora_pipeline.embeddings.cache import EmbeddingCache

        wrap(EmbeddingCache, "put", point, nth)
    elif point == "heads":
        from qlora_pipeline.embeddings import run

        wrap(run, "fit_head", point, nth)
    elif point == "evaluation":
        from qlora_pipeline.embeddings import run as embeddings_run
        from qlora_pipeline.finetune import run as finetune_run

        wrap(embeddings_run, "evaluate_split", point, nth)
        wrap(finetune_run, "evaluate_split", point, nth)
    elif point == "report":
        from qlora_pipeline import pipeline

        wrap(pipeline, "write_report", point, nth)
    elif point == "train_step":
        from transformers import TrainerCallback

        from qlora_pipeline.finetune import recipe

        class Hold(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == nth:
                    hold(point)

        original = recipe.training_callbacks
        recipe.training_callbacks = lambda cfg, marker: [*original(cfg, marker), Hold()]  # type: ignore[assignment]
    elif point == "checkpoint":
        from transformers import Trainer

        original_save = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self: Any, output_dir: str) -> None:
            if self.state.global_step == nth:
                hold(point)
            original_save(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer  # type: ignore[method-assign]
    elif point == "rotation":
        import shutil

        from transformers import trainer_utils

        deletions = 0

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            nonlocal deletions
            if Path(path).name.startswith("checkpoint-"):
                deletions += 1
                if deletions == nth:
                    Path(path, "optimizer.pt").unlink(missing_ok=True)  # rmtree had got this far when the signal came
                    hold(point)
            shutil.rmtree(path, *args, **kwargs)

        trainer_utils.shutil = types.SimpleNamespace(rmtree=rmtree)  # type: ignore[assignment] # its one use of shutil
    elif point == "adapter_save":
        from qlora_pipeline.finetune import recipe

        wrap(recipe, "save", point, nth)
    else:
        raise SystemExit(f"harness: unknown point {point!r}")


def main() -> int:
    separator = sys.argv.index("--")
    point, _, nth = sys.argv[1].partition(":")
    sys.path.insert(0, str(REPO))
    install(point, int(nth or 1))
    from qlora_pipeline.cli import main as qlora

    if point == "start":
        hold(point)

    return qlora(sys.argv[separator + 1 :])


if __name__ == "__main__":
    raise SystemExit(main())
