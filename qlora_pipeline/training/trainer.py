"""The HF Trainer as the QLoRA recipe uses it: arguments, our loss hook, callbacks, validation metrics.

Checkpoints land in the run's checkpoints/ (see `checkpoints.py`); with early stopping the Trainer keeps the
best one and restores it at the end (`load_best_model_at_end`: the LoRA adapter and the head, which peft saves
as `modules_to_save`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.metrics import accuracy_macro_f1
from qlora_pipeline.models.loading import quiet_library_logs, quiet_library_warnings

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainingConfig
    from qlora_pipeline.models.loading import LoadedModel

log = logging.getLogger(__name__)


def make_trainer_class() -> type:
    import transformers
    from transformers import Trainer

    if "loss_is_scaled_for_ga" not in vars(Trainer):  # pyproject asks for >= 5.19; an install that bypassed it
        raise UserError(
            f"transformers {transformers.__version__} is too old: QLoRA training needs >= 5.19, whose Trainer reads "
            "loss_is_scaled_for_ga (gradient accumulation would be off by its factor); pip install -U transformers"
        )

    class ClassificationTrainer(Trainer):
        """Trainer whose loss is ours: class-weighted cross-entropy or focal loss (`losses.ClassLoss`) on the class
        logits that `logits_fn(model, inputs)` returns (the head's output, or label-word logits).

        The loss of an optimizer step is the weighted mean over all of its examples, Σ w_i l_i / Σ w_i, summed over
        every accumulation micro-batch and every process: the Trainer fetches a step's micro-batches together
        (`get_batch_samples`), where Σ w_i is taken from the labels (and summed across processes), and each
        micro-batch then contributes Σ_its w_i l_i / Σ w_i. So 8 x 1, 4 x 2 and 2 processes x 4 give one loss and
        one gradient, as transformers does for token losses with `num_items_in_batch`. transformers >= 5.19
        reads `loss_is_scaled_for_ga` (pyproject pins it): True, the loss is not divided again. (Under DDP the
        sampler still repeats a few examples to fill the last uneven batch, as DDP does for any loss.)

        `training.loss_normalization: micro_batch` keeps 0.1.0's loss instead, each micro-batch's own weighted
        mean divided by the accumulation steps, so that its archived runs reproduce."""

        loss_is_scaled_for_ga = True  # normalised over the whole step here: training_step must not divide it

        def __init__(self, *args: Any, loss_fn: Any, logits_fn: Any, per_micro_batch: bool = False, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.loss_fn = loss_fn
            self.logits_fn = logits_fn
            self.per_micro_batch = per_micro_batch
            if per_micro_batch:
                self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the steps
            # The model never sees num_items_in_batch (the loss is ours): the Trainer then skips counting labels.
            self.model_accepts_loss_kwargs = False
            self._step_weight: float | None = None

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
            """The micro-batches of one optimizer step, and Σ w_i over them and over all processes."""
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            total = torch.zeros((), dtype=torch.float64)
            for batch in batches:
                total += self.loss_fn.example_weights(batch["labels"].cpu()).double().sum()
            if self.accelerator.num_processes > 1:  # every process fetches once per optimizer step
                total = self.accelerator.reduce(total.to(self.accelerator.device), reduction="sum").cpu()
            self._step_weight = float(total)
            return batches, num_items

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            labels = inputs.pop("labels")
            logits = self.logits_fn(model, inputs)
            scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
            if self.per_micro_batch:
                loss = self.loss_fn.micro_batch_mean(scores, labels)
            elif model.training and self._step_weight is not None:
                # This micro-batch's share of the step's weighted mean; times the processes because DDP averages
                # their gradients (and the Trainer averages their logged losses).
                weighted, _ = self.loss_fn.terms(scores, labels)
                loss = weighted.sum() * (self.accelerator.num_processes / self._step_weight)
            else:  # evaluation: this batch's weighted mean
                loss = self.loss_fn(scores, labels)
            return (loss, {"logits": logits}) if return_outputs else loss  # evaluation reads "logits"

    return ClassificationTrainer


def check_optimizer(name: str) -> None:
    """training.optimizer is an optimizer of the installed transformers (the config checks its own list,
    config.TRAINER_OPTIMIZERS; another release may differ)."""
    import transformers
    from transformers.training_args import OptimizerNames

    known = sorted(option.value for option in OptimizerNames)
    if name not in known:
        raise UserError(
            f"training.optimizer {name!r} is not an optimizer of the installed transformers "
            f"{transformers.__version__}; choose one of: {', '.join(known)}"
        )


def training_arguments(train: TrainingConfig, loaded: LoadedModel, out_dir: Path, seed: int, notes: list[str]) -> Any:
    """Trainer settings; checkpoints go to `out_dir` (the run's checkpoints/)."""
    from transformers import TrainingArguments

    check_optimizer(train.optimizer)
    cuda = loaded.device == "cuda"
    bf16 = cuda and loaded.compute_dtype == "bfloat16"  # mixed precision follows the compute dtype on a GPU;
    fp16 = cuda and loaded.compute_dtype == "float16"  # CPUs train in float32
    # Paging moves optimizer state to CPU memory under GPU memory pressure; on a CPU there is nothing to page and
    # bitsandbytes runs the same 32-bit AdamW update unpaged. Same math, so the requested optimizer is kept (no
    # switch to adamw_torch) and the difference is recorded.
    if train.optimizer.startswith("paged_") and not cuda:
        notes.append(
            f"optimizer {train.optimizer} on {loaded.device}: bitsandbytes runs it unpaged (paging needs CUDA)"
        )
    if cuda:
        notes.append("GPU training is seeded but not bit-for-bit deterministic (full_determinism is CPU-only)")
    early_stopping = bool(train.early_stopping_patience)
    # An int counts optimizer steps; a float below 1 is a fraction of the total steps (warmup_ratio).
    warmup: float = train.warmup_steps if train.warmup_steps is not None else (train.warmup_ratio or 0.0)
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps is not None else -1,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=warmup,
        optim=train.optimizer,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        eval_strategy="steps" if train.eval_steps else "epoch",
        eval_steps=train.eval_steps,
        # A checkpoint at every evaluation unless save_steps says otherwise: resume and best-model restore need them.
        save_strategy="steps" if (train.save_steps or train.eval_steps) else "epoch",
        save_steps=train.save_steps or train.eval_steps or 500,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=early_stopping,
        metric_for_best_model=train.early_stopping_metric if early_stopping else None,
        restore_callback_states_from_checkpoint=True,  # the early-stopping patience counter survives a resume
        logging_strategy="steps",
        logging_steps=1,  # every optimizer step: training_log.csv
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        # Deterministic kernels: free on CPU (and a rerun then matches bit for bit); on GPUs they cost speed and
        # some ops refuse to run, so there the run is seeded only (a note says so).
        full_determinism=not cuda,
        dataloader_num_workers=0,
        # Under torchrun (DDP): every trainable parameter (LoRA matrices, the head) takes part in every forward, so
        # DDP need not search the graph for unused ones each step (the Trainer would, for a peft-wrapped model).
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
    )


def training_callbacks(train_cfg: TrainingConfig, marker: Any) -> list[Any]:
    """The checkpoint marker, progress (a bar or a line every 30 s, and each evaluation's metrics), and early
    stopping when a patience is set."""
    from transformers import EarlyStoppingCallback

    callbacks = [marker, progress_callback()]
    if train_cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train_cfg.early_stopping_patience))
    return callbacks


AUC_METRICS = ("roc_auc", "pr_auc")


def check_early_stopping_metric(train_cfg: TrainingConfig, num_labels: int, validation_labels: Any) -> None:
    """roc_auc and pr_auc rank P(second class): binary tasks only, and a validation split with both classes."""
    metric = train_cfg.early_stopping_metric
    if metric not in AUC_METRICS:
        return
    if num_labels != 2:
        raise UserError(
            f"training.early_stopping_metric {metric} needs a binary task, but this data has {num_labels} "
            "classes; use macro_f1, accuracy or loss"
        )
    if len(np.unique(np.asarray(validation_labels))) < 2:
        raise UserError(
            f"training.early_stopping_metric {metric} is undefined on a validation split with one class; use "
            "macro_f1, accuracy or loss, or a larger data.val_ratio"
        )


def eval_metrics(prediction: Any) -> dict[str, float]:
    """Validation accuracy and macro-F1 of the argmax at each evaluation during training; for binary tasks also
    ROC-AUC and PR-AUC of P(second class) (when validation holds both classes)."""
    logits = np.asarray(prediction.predictions, dtype=np.float64)
    labels = np.asarray(prediction.label_ids)
    metrics = accuracy_macro_f1(labels, logits.argmax(axis=-1))
    if logits.shape[-1] == 2 and len(np.unique(labels)) == 2:
        from sklearn.metrics import average_precision_score, roc_auc_score

        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))  # a softmax that cannot overflow
        positive = shifted[:, 1] / shifted.sum(axis=-1)
        metrics["roc_auc"] = float(roc_auc_score(labels, positive))
        metrics["pr_auc"] = float(average_precision_score(labels, positive))
    return metrics


def progress_callback() -> Any:
    """A TrainerCallback showing step / total, loss, learning rate, samples/s and ETA (`progress.Progress`: a tqdm bar
    on a terminal, else an INFO line at most every 30 s), and an INFO line with each evaluation's metrics. Only the
    main process shows it (under torchrun the other ranks train in step)."""
    from transformers import TrainerCallback

    from qlora_pipeline.progress import Progress

    class TrainingProgress(TrainerCallback):
        progress: Progress | None = None
        samples_per_step = 0  # all processes together

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self.progress = Progress(state.max_steps, "training", "step", logger=log, initial=state.global_step)
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
                self.samples_per_step = batch * args.world_size

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.progress is None or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.progress.start
            done = state.global_step - self.progress.initial
            self.progress.update(
                state.global_step,
                loss=float(logs["loss"]),
                lr=float(logs.get("learning_rate", 0.0)),
                **{"samples/s": round(done * self.samples_per_step / max(elapsed, 1e-9), 1)},
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress.update(state.global_step)

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not metrics:
                return
            shown = ", ".join(
                f"{key.removeprefix('eval_')} {value:.4f}"
                for key, value in metrics.items()
                if isinstance(value, float) and not key.endswith(("_runtime", "_per_second"))
            )
            log.info("validation at step %d / %d: %s", state.global_step, state.max_steps, shown)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

        def close(self) -> None:
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return TrainingProgress()


def run_trainer(build: Callable[[], Any], resume_from: Path | None) -> tuple[Any, float]:
    """Build the Trainer (`build()`) and train it (from the checkpoint `resume_from` when given): the trained Trainer
    and the seconds training took. The Trainer switches deterministic algorithms on for the whole process
    (full_determinism, set up when it is built): switched back afterwards, so a notebook that trains and then
    predicts is not left on slower kernels. An interrupted run's progress bar is closed."""
    from transformers import PrinterCallback

    deterministic_before = torch.are_deterministic_algorithms_enabled()
    trainer = None
    try:
        trainer = build()
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; training_log.csv keeps them
        start = time.perf_counter()
        with quiet_library_warnings(), quiet_library_logs():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        seconds = time.perf_counter() - start
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if trainer is not None:  # an interrupted run: the progress bar ends, and the console is itself again
            close_progress(trainer)
    return trainer, seconds


def close_progress(trainer: Any) -> None:
    """End the progress bar of a training that stopped early (an error, an interrupt): `on_train_end` never ran."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TrainingProgress":
            callback.close()
