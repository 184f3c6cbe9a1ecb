"""`qlora check CONFIG` and `qlora run --config CONFIG --dry-run`: is a config ready to run, and what will it cost?

A dry run reads the data (every source, cleaned, sampled and split as the run would), resolves the model files
(config.json and the tokenizer, locally or in the Hugging Face cache), builds the model from its config on the
meta device (no weights: a 1.5B model costs seconds), and checks what would otherwise fail hours later: label words
that are not single tokens, target_modules that match no layer, a max_length beyond the model's positions, files
that are missing, an estimated peak memory above the visible GPU. It prints the plan — rows per split and class,
optimizer steps, the effective batch, tokens per example against max_length, trainable parameters, the memory
estimate (`models/memory.py`) — and lists one line per problem. It trains nothing and creates no run directory.

When the hub cannot be reached (HF_HUB_OFFLINE, or no connection to it within a few seconds), hub datasets and
model files are looked up in the local caches only, so an offline check answers at once instead of after the
libraries' retries.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from qlora_pipeline import distributed
from qlora_pipeline.errors import UserError

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.data.prepare import PreparedData
    from qlora_pipeline.models.memory import Estimate

log = logging.getLogger(__name__)

TOKEN_SAMPLE = 20_000  # texts tokenized for the length percentiles (seeded sample beyond this)
PROBE_TIMEOUT_S = 3.0


@dataclass
class Plan:
    config_name: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # the numbers printed, for tests and scripts

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def problem(self, error: BaseException | str) -> None:
        self.problems.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)

    def text(self) -> str:
        verdict = (
            "ready: every check passed; nothing was trained and no run directory was created"
            if not self.problems
            else f"not ready: {len(self.problems)} problem(s), one per line on stderr"
        )
        return "\n".join([*self.lines, "", verdict])


def make_plan(config: Config, output_dir: str | None = None) -> Plan:
    """Everything `qlora check` checks and prints, without training or writing a run directory."""
    from qlora_pipeline.models.loading import import_bitsandbytes

    import_bitsandbytes()  # first, so its optional-kernel probe stays a debug line
    exp = config.experiment
    plan = Plan(exp.name)
    plan.add(f"plan for {exp.name} (experiment.mode {exp.mode}{', quick run' if exp.quick else ''})")
    if exp.mode == "sft":
        with hub_access(plan):
            sft_part(config, plan)
        plan.facts["output_root"] = str(output_dir or config.output.root)
        return plan
    _preflight(config, plan)
    with hub_access(plan):
        prepared = data_part(config, plan)
        model_part(config, plan, prepared)
    plan.facts["output_root"] = str(output_dir or config.output.root)
    return plan


def _preflight(config: Config, plan: Plan) -> None:
    """What each path checks before its run directory exists (heads and their options; per-dataset launches)."""
    try:
        if config.experiment.mode == "qlora":
            from qlora_pipeline.finetune.run import check_per_dataset_launch
            from qlora_pipeline.training.trainer import check_optimizer

            if config.experiment.per_dataset:
                check_per_dataset_launch(None)
            check_optimizer(config.training.optimizer)
        else:
            from qlora_pipeline.embeddings.classifiers import check_heads

            check_heads(config.classifier)
    except UserError as exc:
        plan.problem(exc)


# ---- the hub -------------------------------------------------------------------------------------------------


def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host takes no connection within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@contextmanager
def hub_access(plan: Plan) -> Iterator[None]:
    """Offline, the hub libraries read their caches only (instead of retrying for ~25 s per file)."""
    online = hub_reachable()
    plan.facts["hub_reachable"] = online
    if online:
        yield
        return
    plan.add("hub: not reachable (offline): hub datasets and model files are looked up in the local caches only")
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


# ---- data ----------------------------------------------------------------------------------------------------


def data_part(config: Config, plan: Plan) -> PreparedData | None:
    """Every source read (each unreachable one named), then cleaned, sampled and split as the run would."""
    from qlora_pipeline.data.prepare import prepare_data
    from qlora_pipeline.data.sources import load_source
    from qlora_pipeline.errors import DataError

    loaded, failed = [], False
    for source in config.data.sources:
        try:
            loaded.append(load_source(source))
        except DataError as exc:
            plan.problem(exc)
            failed = True
    if failed:
        plan.add("data: not read (see the problems)")
        return None
    try:
        prepared = prepare_data(config.data, config.experiment.seed, loaded=loaded)
    except DataError as exc:
        plan.problem(exc)
        return None
    summary, names = prepared.summary, list(prepared.splits.label_names)
    plan.add(
        "",
        f"data: {summary['rows_read']:,} rows read, {summary['rows_after_cleaning']:,} after cleaning, "
        f"{summary['rows_after_sampling']:,} used",
    )
    rows: dict[str, dict[str, dict[str, int]]] = {}
    for split, counts in summary["splits"].items():
        rows[split] = counts["per_dataset"]
        for dataset, per_class in counts["per_dataset"].items():
            classes = ", ".join(f"{name} {per_class.get(name, 0):,}" for name in names)
            plan.add(f"  {split:<10} {dataset:<22} {sum(per_class.values()):>9,} rows  ({classes})")
    plan.facts["rows"] = rows
    for source in summary["sources"]:
        if source.get("rows_label_defaulted"):
            plan.add(f"  {source['name']}: {source['rows_label_defaulted']:,} rows given labels.unmatched's class")
    if config.experiment.per_dataset:
        _check_per_dataset(config, prepared, plan)
    return prepared


def _check_per_dataset(config: Config, prepared: PreparedData, plan: Plan) -> None:
    from qlora_pipeline.errors import DataError
    from qlora_pipeline.evaluation.per_dataset import check_dataset

    binary = len(prepared.splits.label_names) == 2
    metric = (
        config.training.threshold_metric if config.experiment.mode == "qlora" else config.classifier.threshold_metric
    )
    for source in config.data.sources:
        try:
            check_dataset(prepared.splits.of_dataset(source.name), source.name, binary and metric != "none")
        except DataError as exc:
            plan.problem(exc)


# ---- model ---------------------------------------------------------------------------------------------------


@dataclass
class _Model:
    source: str
    hf_config: Any
    tokenizer: Any
    where: str


def model_part(config: Config, plan: Plan, prepared: PreparedData | None) -> None:
    found = _model_files(config, plan)
    if found is None:
        return
    plan.add("", f"model: {config.model.name_or_path} ({found.where})")
    try:
        _model_plan(config, plan, prepared, found)
    except UserError as exc:
        plan.problem(exc)


def _model_files(config: Config, plan: Plan) -> _Model | None:
    """config.json and the tokenizer, locally or in the Hugging Face cache (downloaded when the hub is reachable)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from qlora_pipeline.models.tiny import BUILTIN_PREFIX, resolve_model_path

    cfg = config.model
    try:
        source = resolve_model_path(cfg.name_or_path)
    except UserError as exc:
        plan.problem(exc)
        return None
    local = Path(source).is_dir()
    fix = (
        f"download it where the hub is reachable (`hf download {cfg.name_or_path}`) or set model.name_or_path to a "
        "local directory with config.json and the tokenizer files"
    )
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        plan.problem(f"model.name_or_path: directory {source!r} does not exist; {fix}")
        return None
    what = "config.json"
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        what = "the tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        where = "in that directory" if local else "locally or in the Hugging Face cache"
        offline = "" if plan.facts.get("hub_reachable") or local else ", and the hub is not reachable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        plan.problem(f"model {cfg.name_or_path!r}: {what} not found {where}{offline} ({first}); {fix}")
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as loading does (a note in the run's config.json)
    where = (
        "built-in, in the package cache"
        if cfg.name_or_path.startswith(BUILTIN_PREFIX)
        else "local directory"
        if local
        else "Hugging Face cache"
    )
    return _Model(source, hf_config, tokenizer, where)


def _model_plan(config: Config, plan: Plan, prepared: PreparedData | None, found: _Model) -> None:
    from qlora_pipeline.models.loading import check_positions, position_limit
    from qlora_pipeline.models.memory import Architecture

    mode = config.experiment.mode
    label_names = list(prepared.splits.label_names) if prepared else _config_label_names(config)
    model, head, decoder = _meta_model(config, found, len(label_names))
    hf = found.hf_config
    arch = Architecture.of(hf, decoder=decoder)
    total = sum(p.numel() for p in model.parameters())
    plan.add(
        f"  {hf.model_type}, {arch.layers} layers, hidden {arch.hidden}, {total:,} parameters "
        f"(built on the meta device from config.json: no weights loaded)"
    )
    plan.facts["model_parameters"] = total
    max_length = config.training.max_length if mode == "qlora" else config.embedding.max_length
    setting = "training.max_length" if mode == "qlora" else "embedding.max_length"
    try:
        check_positions(position_limit(hf), max_length, setting, found.source)
    except UserError as exc:
        plan.problem(exc)
    targets: list[str] = []
    words = None
    if mode == "qlora":
        model, targets, words = _lora_plan(config, plan, model, head, label_names, found)
    if prepared is not None:
        lengths = _token_lengths(config, prepared, found.tokenizer, words)
        longest = _tokens_plan(plan, lengths, max_length, setting)
        if mode == "qlora":
            _steps_plan(config, plan, len(prepared.splits.train))
        else:
            needed = sum(len(prepared.splits.get(s)) for s in {"train", *config.evaluation.splits})
            plan.add(f"encoding: {needed:,} texts in batches of {config.embedding.batch_size} (cached ones skipped)")
    else:
        longest = max_length
    _memory_plan(config, plan, model, arch, targets, min(longest, max_length))


def _config_label_names(config: Config) -> list[str]:
    names = config.data.sources[0].class_names()
    return names if names else ["negative", "positive"]


def _meta_model(config: Config, found: _Model, num_labels: int) -> tuple[Any, str | None, bool]:
    """The model the run would build, on the meta device: (model, head name, decoder or not)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    hf, train = found.hf_config, config.training
    encoder = hf.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf, "is_decoder", False)
    mode = config.experiment.mode
    name = config.model.name_or_path
    if mode == "qlora" and train.head == "lm_label" and encoder:
        raise UserError(
            f"model {name!r} is an encoder ({hf.model_type}), and training.head lm_label needs a causal (decoder) LM "
            "that predicts the word after the prompt; use training.head classification for this base"
        )
    auto: Any = AutoModel
    if mode == "qlora" and train.head == "lm_label":
        auto = AutoModelForCausalLM
    elif mode == "qlora":
        hf.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            model = auto.from_config(hf, trust_remote_code=config.model.trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        wanted = {AutoModelForCausalLM: "causal-LM", AutoModelForSequenceClassification: "sequence-classification"}
        raise UserError(
            f"model.name_or_path {name!r}: its architecture has no {wanted.get(auto, 'base model')} class in "
            "transformers; choose another training.head or base model"
        ) from exc
    head = None
    if mode == "qlora":
        from qlora_pipeline.training.lora import classification_head, output_layer_name

        if train.head == "lm_label":
            head = (output_layer_name(model) or "lm_head").rsplit(".", 1)[-1]
        else:
            head = classification_head(model, name)
    return model, head, not encoder


def _lora_plan(
    config: Config,
    plan: Plan,
    model: Any,
    head: str | None,
    label_names: list[str],
    found: _Model,
) -> tuple[Any, list[str], Any]:
    """Label words, target modules and trainable parameters (LoRA added on the meta device, as the run adds it).
    Returns the wrapped model, the adapted layers' names and the resolved label words (lm_label, when valid)."""
    import torch

    from qlora_pipeline.finetune import lm_label
    from qlora_pipeline.training.lora import add_lora, check_target_modules, trained_in_full

    train = config.training
    resolved = None
    if train.head == "lm_label":
        try:
            resolved = lm_label.resolve(found.tokenizer, train.label_words, label_names, train.prompt_template)
        except UserError as exc:
            plan.problem(exc)
        else:
            plan.facts["label_words"] = dict(zip(resolved.words, resolved.token_ids, strict=True))
            shown = ", ".join(f"{w} -> token {t}" for w, t in zip(resolved.words, resolved.token_ids, strict=True))
            plan.add(f"  label words: {shown} (one token each)")
    assert head is not None
    try:
        targets = check_target_modules(model, train.target_modules, head)
    except UserError as exc:
        plan.problem(exc)
        return model, [], resolved
    in_full = [] if train.head == "lm_label" else trained_in_full(model, head)
    with torch.device("meta"):
        wrapped = add_lora(model, train, targets, in_full, config.experiment.seed, causal_lm=train.head == "lm_label")
    trainable, total = wrapped.get_nb_trainable_parameters()
    plan.facts["trainable_parameters"], plan.facts["total_parameters"] = trainable, total
    names = targets if isinstance(targets, str) else ", ".join(targets)
    plan.add(
        f"  trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%): LoRA r {train.lora_r} "
        f"on {names}" + (f"; {' and '.join(in_full)} trained in full" if in_full else "")
    )
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")})
    return wrapped, adapted, resolved


def sft_part(config: Config, plan: Plan) -> None:
    """Mode sft: the instruction records read, cleaned and split, the model files and the prompt format resolved
    against the tokenizer, tokens per example and what truncation will cut, the steps. The memory estimate
    (`models/memory.py`) models the classification paths and is not made here."""
    from qlora_pipeline.data.instructions import prepare_instructions
    from qlora_pipeline.errors import DataError
    from qlora_pipeline.models.loading import check_positions, position_limit
    from qlora_pipeline.sft.prompts import Prompter, encode_split, resolve_format
    from qlora_pipeline.training.trainer import check_optimizer

    try:
        check_optimizer(config.training.optimizer)
    except UserError as exc:
        plan.problem(exc)
    try:
        data = prepare_instructions(config.data, config.sft, config.experiment.seed)
    except DataError as exc:
        plan.problem(exc)
        data = None
    if data is not None:
        summary = data.summary
        removed = ", ".join(f"{k} {v:,}" for k, v in summary["removed"].items() if v) or "nothing"
        plan.add(
            "",
            f"data: {summary['rows_read']:,} records read, {summary['rows_after_cleaning']:,} after cleaning "
            f"(removed: {removed}), {summary['rows_after_sampling']:,} used",
        )
        plan.facts["rows"] = {split: counts["per_dataset"] for split, counts in summary["splits"].items()}
        for split, counts in summary["splits"].items():
            plan.add(f"  {split:<10} {counts['rows']:>9,} records (splits drawn by prompt)")
    found = _model_files(config, plan)
    if found is None:
        return
    plan.add("", f"model: {config.model.name_or_path} ({found.where})")
    train = config.training
    try:
        check_positions(position_limit(found.hf_config), train.max_length, "training.max_length", found.source)
    except UserError as exc:
        plan.problem(exc)
    try:
        prompt = resolve_format(found.tokenizer, config.sft, found.source)
    except UserError as exc:
        plan.problem(exc)
        return
    plan.add(f"  prompts: {prompt.kind} (sft.prompt_format {config.sft.prompt_format}); answers end with "
             f"{prompt.stop_token!r}")  # fmt: skip
    if data is None:
        return
    prompter = Prompter(found.tokenizer, prompt)
    frame = data.splits.train
    if len(frame) > TOKEN_SAMPLE:
        frame = frame.sample(TOKEN_SAMPLE, random_state=config.experiment.seed)
    lengths = [len(example.input_ids) for messages in frame["messages"] for example in prompter.encode(messages)]
    _tokens_plan(plan, lengths, train.max_length, "training.max_length")
    rows = encode_split(prompter, frame, train.max_length, config.sft.truncation)
    counts = prompter.counts
    plan.add(
        f"  truncation ({config.sft.truncation}): {counts.truncated:,} examples cut, {counts.answers_cut:,} of them "
        f"into the answer, {counts.dropped:,} left without one"
    )
    if not rows:
        plan.problem(
            f"every train example loses its whole answer to truncation: raise training.max_length "
            f"({train.max_length}) or use sft.truncation: keep_answer"
        )
        return
    _steps_plan(config, plan, len(data.splits.train))
    plan.add("memory: not estimated for mode sft (the estimate models the classification paths)")


# ---- tokens and steps ----------------------------------------------------------------------------------------


def _token_lengths(config: Config, prepared: PreparedData, tokenizer: Any, words: Any) -> list[int]:
    """Untruncated tokens per training text (or pair), as the run builds its inputs; a seeded sample of big splits."""
    import warnings

    frame = prepared.splits.train
    if len(frame) > TOKEN_SAMPLE:
        frame = frame.sample(TOKEN_SAMPLE, random_state=config.experiment.seed)
    texts = frame["text"].tolist()
    pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "sequence length is longer than the specified maximum" is the point
        try:
            from qlora_pipeline.models import pairs as pair_inputs

            encoding = pair_inputs.resolve(tokenizer, config.model.pair_template)  # pairs joined as the run joins them
            if config.experiment.mode == "qlora" and config.training.head == "lm_label":
                if not words:
                    return []
                from qlora_pipeline.finetune import lm_label

                return [len(ids) for ids in lm_label.encode(tokenizer, words, texts, pairs, 10**9, encoding)]
            around = ("", "")
            if config.experiment.mode != "qlora":
                from qlora_pipeline.embeddings.encoding import instruction_around

                around = instruction_around(config.embedding)
            inputs = pair_inputs.encode(tokenizer, texts, pairs, 10**9, encoding, setting="max_length", around=around)
            return [len(ids) for ids in inputs["input_ids"]]
        finally:
            hf_logging.set_verbosity(verbosity)


def _tokens_plan(plan: Plan, lengths: list[int], max_length: int, setting: str) -> int:
    """p50 / p95 / max tokens against max_length; returns the longest batch's length (capped by max_length)."""
    if not lengths:
        return max_length
    import numpy as np

    values = np.asarray(lengths)
    p50, p95, longest = (int(np.percentile(values, q)) for q in (50, 95, 100))
    cut = int((values > max_length).sum())
    plan.facts["tokens"] = {"p50": p50, "p95": p95, "max": longest, "max_length": max_length, "truncated": cut}
    plan.add(
        f"tokens per example (train, the model's tokenizer{', a sample' if len(values) == TOKEN_SAMPLE else ''}): "
        f"p50 {p50}, p95 {p95}, max {longest} against {setting} {max_length}: "
        f"{cut:,} of {len(values):,} ({100 * cut / len(values):.1f}%) cut"
    )
    return min(longest, max_length)


def _steps_plan(config: Config, plan: Plan, train_rows: int) -> None:
    """Optimizer steps as the HF Trainer counts them: batches per process, over gradient accumulation."""
    train = config.training
    world = distributed.world_size()
    effective = train.batch_size * train.gradient_accumulation_steps * world
    batches = math.ceil(math.ceil(train_rows / world) / train.batch_size)
    per_epoch = max(
        batches // train.gradient_accumulation_steps + int(batches % train.gradient_accumulation_steps > 0), 1
    )
    total = train.max_steps if train.max_steps is not None else math.ceil(train.epochs * per_epoch)
    evaluations = total // train.eval_steps if train.eval_steps else math.ceil(total / per_epoch)
    plan.facts.update({"effective_batch": effective, "steps_per_epoch": per_epoch, "optimizer_steps": total})
    plan.add(
        f"training: effective batch {effective} = {train.batch_size} per process x "
        f"{train.gradient_accumulation_steps} accumulation x {world} process(es); {per_epoch:,} steps per epoch, "
        f"{total:,} optimizer steps"
        + (" (training.max_steps)" if train.max_steps is not None else f" ({train.epochs:g} epochs)")
        + f", {evaluations} evaluation(s)"
        + (
            f", early stopping after {train.early_stopping_patience} without gain"
            if train.early_stopping_patience
            else ""
        )
    )
    if config.experiment.per_dataset:
        plan.add("  and one adapter per dataset on its own train rows (experiment.per_dataset), one after another")


# ---- memory --------------------------------------------------------------------------------------------------


def visible_gpu() -> tuple[str, int] | None:
    """(name, bytes) of the GPU this process would use, or None when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0))
    properties = torch.cuda.get_device_properties(index)
    return properties.name, int(properties.total_memory)


def _memory_plan(config: Config, plan: Plan, model: Any, arch: Any, targets: list[str], length: int) -> None:
    from qlora_pipeline.models import memory

    cfg, mode = config.model, config.experiment.mode
    device = "cpu" if cfg.device == "cpu" else "cuda"
    notes: list[str] = []
    try:
        from qlora_pipeline.models.loading import resolve_quantization

        quantization = resolve_quantization(cfg, device, notes)
    except UserError as exc:
        plan.problem(exc)
        return
    compute_bytes, dtype_note = _compute_bytes(config, device, quantization)
    training = mode == "qlora"
    work = memory.Workload(
        quantization=quantization,
        double_quant=cfg.double_quant,
        compute_bytes=compute_bytes,
        device=device,
        batch=config.training.batch_size if training else config.embedding.batch_size,
        length=length,
        training=training,
        gradient_checkpointing=config.training.gradient_checkpointing,
        optimizer=config.training.optimizer,
        lora_dropout=config.training.lora_dropout,
        lm_label=training and config.training.head == "lm_label",
    )
    estimate = memory.estimate(model, arch, work, targets, config.training.lora_r)
    fidelity = None
    if not training and quantization != "none" and config.embedding.fidelity_sample:
        from dataclasses import replace

        fidelity = memory.estimate(model, arch, replace(work, quantization="none"))  # the unquantized reload
    peak = max(estimate.total, fidelity.total if fidelity else 0)
    plan.facts["memory"] = {"parts": dict(estimate.parts), "total": estimate.total, "peak": peak}
    what = "GPU" if device == "cuda" else "CPU (RAM)"
    plan.add(
        "",
        f"memory: estimated peak on the {what}, batch {work.batch} x {length} tokens, {_quant_text(work)}, "
        f"{dtype_note}"
        + (f", gradient checkpointing {'on' if work.gradient_checkpointing else 'off'}" if training else ""),
        *_estimate_lines(estimate),
    )
    if fidelity is not None:
        plan.add(
            f"  the quantization-fidelity check reloads the model unquantized after encoding: "
            f"{memory.gib(fidelity.total)} (embedding.fidelity_sample 0 skips it)"
        )
    if device != "cuda":
        return
    needed = memory.needed_on_gpu(peak)
    plan.facts["memory"]["needed_on_gpu"] = needed
    gpu = visible_gpu()
    if gpu is None:
        plan.add(
            f"  a GPU needs about {memory.gib(needed)} with allocator headroom and the CUDA context "
            "(no GPU is visible here to compare with)"
        )
        return
    name, total = gpu
    plan.add(
        f"  needs about {memory.gib(needed)} with allocator headroom and the CUDA context; {name}: {memory.gib(total)}"
    )
    if needed > total:
        fixes = (
            "lower training.batch_size (raise gradient_accumulation_steps to keep the effective batch) or "
            "training.max_length, turn on training.gradient_checkpointing, or use model.quantization 4bit"
            if training
            else "lower embedding.batch_size or embedding.max_length, or use model.quantization 4bit"
        )
        plan.problem(
            f"estimated peak GPU memory {memory.gib(needed)} exceeds the visible GPU ({name}, {memory.gib(total)}): "
            f"{fixes}"
        )


def _compute_bytes(config: Config, device: str, quantization: str) -> tuple[int, str]:
    import torch

    from qlora_pipeline.models.device import DTYPES, resolve_compute_dtype

    cfg = config.model
    if cfg.compute_dtype != "auto":
        dtype = DTYPES[cfg.compute_dtype]
    elif device == "cuda" and not torch.cuda.is_available():
        return 2, "bfloat16 (compute dtype auto on a GPU from Ampere on; assumed, no GPU visible)"
    else:
        dtype = resolve_compute_dtype(cfg, device, quantization)
    return torch.finfo(dtype).bits // 8, str(dtype).removeprefix("torch.")


def _quant_text(work: Any) -> str:
    if work.quantization == "4bit":
        return "4-bit NF4" + (" with double quantization" if work.double_quant else "")
    return "8-bit" if work.quantization == "8bit" else "unquantized"


LABELS = {
    "weights_quantized": "base weights, quantized",
    "weights_other": "other weights (embeddings, norms, head)",
    "lora": "LoRA matrices (float32)",
    "trained_copies": "modules trained in full (peft's copy)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "dequantization_workspace": "dequantization workspace",
}


def _estimate_lines(estimate: Estimate) -> list[str]:
    from qlora_pipeline.models.memory import gib

    lines = [f"  {LABELS.get(name, name):<42} {gib(count):>11}" for name, count in estimate.parts.items() if count]
    return [*lines, f"  {'total (what torch allocates)':<42} {gib(estimate.total):>11}"]
