"""The one place that loads a tokenizer + model, with the quantization the config asks for.

Used by the embeddings path (`task="encoder"`), QLoRA fine-tuning and prediction. Every decision that
differs from what the config literally says (an `auto` resolved, a fallback taken, a pad token borrowed)
is logged and returned in `LoadedModel.notes`, for config.json and the report.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models import pairs
from qlora_pipeline.models.device import DTYPES, dtype_name, free_memory, resolve_compute_dtype, resolve_device
from qlora_pipeline.models.pairs import PairEncoding
from qlora_pipeline.models.tiny import BUILTIN_PREFIX, TINY_QWEN3, resolve_model_path

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from qlora_pipeline.config import ModelConfig

log = logging.getLogger(__name__)

Task = Literal["encoder", "causal_lm", "sequence_classification"]
# The classification head of a *ForSequenceClassification model: `score` in Qwen/Llama-style decoders, `classifier`
# in BERT-style encoders, where the encoder's `pooler` (dense + tanh over the first token) feeds it.
HEAD_NAMES = ("score", "classifier")
POOLER = "pooler"
# Loaded in full precision for sequence classification, to be trained in full: bitsandbytes' skip list, where a
# name matches as a prefix, a regex from the start or a suffix ("bert.pooler.dense" by the pattern).
UNQUANTIZED_MODULES = [*HEAD_NAMES, rf"(.*\.)?{POOLER}"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FIX_HINT = f"point model.name_or_path at a local model directory or at {BUILTIN_PREFIX}{TINY_QWEN3}"


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    quantization: str  # what was actually used: "4bit-nf4", "4bit-fp4", "8bit" or "none"
    compute_dtype: str  # "float32" / "bfloat16" / "float16"
    device: str  # "cpu" / "cuda"
    source: str  # resolved local path or hub id
    revision: str | None  # hub commit hash when known, else the requested revision
    notes: list[str] = field(default_factory=list)
    new_weights: tuple[str, ...] = ()  # parameters freshly initialised: missing from the checkpoint, or mismatched
    load_report: dict[str, list[str]] = field(default_factory=dict)  # missing / unexpected / mismatched keys
    pair_encoding: PairEncoding = PairEncoding(None)  # how text pairs are joined (model.pair_template, resolved)


class _KernelProbeFilter(logging.Filter):
    """bitsandbytes' CPU backend tries, at import, to fetch an optional fused kernel from the hub and warns when
    it cannot ("Failed to load CPU gemm_4bit_forward from kernels-community"). Its built-in kernels are used
    instead and give the same NF4 results, so this is demoted to a debug line rather than alarm every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"):
            log.debug("bitsandbytes: optional hub kernel unavailable, using built-in CPU kernels")
            return False
        return True


def import_bitsandbytes() -> None:
    """Import bitsandbytes (when installed) with its optional-kernel probe demoted to a debug line. Its first import
    logs the probe, and peft and the Trainer import it too: loading calls this first, so that import is this one.
    The filter is attached for the import only; nothing is installed at import time of this module."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    probe = logging.getLogger("bitsandbytes.backends.cpu.ops")
    quiet = _KernelProbeFilter()
    probe.addFilter(quiet)
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError):  # a broken install: `bitsandbytes_problem` says why when it matters
        pass
    finally:
        probe.removeFilter(quiet)


@contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Warnings about library internals that no setting of ours changes, silenced for the call only (nothing is
    installed globally): transformers 5 renamed gradient checkpointing, and peft and the Trainer still call the old
    names on every run (wrapping the model, k-bit preparation, training); a paged optimizer on CPU runs unpaged,
    which a note in config.json already says."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated",
            category=FutureWarning,
        )
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield


class _LoadReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT table (missing / unexpected / mismatched keys): `load_model` reports the same
    keys itself from the loading info, in config.json, the report, and a warning for each one that is a surprise
    (everything but the new head), rather than a table that lists an expected new head as MISSING on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


# Library log lines that report nothing a user can act on, by the logger that writes them (message prefixes).
HARMLESS_LIBRARY_LOGS = {
    # Checkpoints saved less than a second apart (a small model, fast steps) have equal mtimes; the Trainer then
    # orders them by step number instead, which is what their names (checkpoint-<step>) say anyway.
    "transformers.trainer_utils": ("mtime may not be reliable on this filesystem",),
}


class _DemoteFilter(logging.Filter):
    """Drops the known harmless lines of one library logger from the console, keeping them as debug lines of ours
    (experiment.log with -v); every other line of that logger passes untouched."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefixes):
            log.debug("%s (from %s)", message, record.name)
            return False
        return True


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    """`HARMLESS_LIBRARY_LOGS` kept off the console for the call only: a filter on each of those loggers, removed
    afterwards (nothing is installed at import time or left behind)."""
    attached = []
    try:
        for name, prefixes in HARMLESS_LIBRARY_LOGS.items():
            logger, quiet = logging.getLogger(name), _DemoteFilter(prefixes)
            logger.addFilter(quiet)
            attached.append((logger, quiet))
        yield
    finally:
        for logger, quiet in attached:
            logger.removeFilter(quiet)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar, and no LOAD REPORT table (see `_LoadReportFilter`), while a model loads;
    every other warning of the load passes. Both are undone when the load ends: no verbosity, warnings filter or
    logger state is left changed."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    report = logging.getLogger("transformers.modeling_utils")
    quiet = _LoadReportFilter()
    report.addFilter(quiet)
    try:
        yield
    finally:
        report.removeFilter(quiet)
        if bar:
            hf_logging.enable_progress_bar()


def bitsandbytes_problem(device: str) -> str | None:
    """Why bitsandbytes cannot quantize on `device`, or None when it can."""
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

    import_bitsandbytes()
    if not is_bitsandbytes_available():
        return f"bitsandbytes>={BITSANDBYTES_MIN_VERSION} is not installed"
    try:
        import bitsandbytes
    except (ImportError, RuntimeError) as exc:  # a broken native library raises RuntimeError on import
        return f"bitsandbytes fails to import ({exc})"
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    if device not in supported:
        version = bitsandbytes.__version__
        return f"bitsandbytes {version} has no {device} backend (it supports {sorted(supported)})"
    return None


def _bnb_config(
    quantization: str, cfg: ModelConfig, compute_dtype: torch.dtype, keep: list[str] | None = None
) -> BitsAndBytesConfig | None:
    """`keep`: modules left unquantized (None: transformers' default, the model's last layer and tied weights)."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=keep,  # despite the name, 4-bit loading honours it too
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    if quantization == "none":
        return None
    raise ValueError(f"resolve quantization {quantization!r} to 4bit/8bit/none before building a config")


def resolve_quantization(cfg: ModelConfig, device: str, notes: list[str]) -> Literal["4bit", "8bit", "none"]:
    """What `model.quantization` becomes on `device` (auto resolved; an explicit 4bit/8bit that bitsandbytes cannot
    do there is a UserError); a decision beyond the config is appended to `notes`."""
    if cfg.quantization == "none":
        return "none"
    problem = bitsandbytes_problem(device)
    if cfg.quantization == "auto":
        if problem is None:
            notes.append(f"quantization auto → 4bit ({cfg.quant_type}) on {device}")
            return "4bit"
        notes.append(f"quantization auto → none: {problem}; the model runs in full precision")
        log.warning("4-bit quantization unavailable (%s); loading the model unquantized", problem)
        return "none"
    if problem is not None:  # explicit 4bit/8bit: never fall back silently
        raise UserError(f"model.quantization is {cfg.quantization!r} but {problem}; set it to 'auto' or 'none'")
    return cfg.quantization


def _config_file(source: str, cfg: ModelConfig) -> Path:
    """Locate config.json, locally or through the hub cache: the one place an unreachable model fails."""
    from transformers.utils.hub import cached_file

    # A hub id is "name" or "namespace/name"; anything else path-like that does not exist is a typo'd path.
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local and not Path(source).expanduser().exists():
        raise UserError(f"model.name_or_path: directory {source!r} does not exist; {FIX_HINT}")
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UserError(f"model.name_or_path: {source!r} has no config.json, so it is not a model directory")
    try:
        found = cached_file(source, "config.json", revision=cfg.revision)
    except OSError as exc:  # transformers turns hub, network and repo-id errors into OSError
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"model {source!r} cannot be loaded ({first_line}); {FIX_HINT}") from exc
    if found is None:
        raise UserError(f"model {source!r} has no config.json; {FIX_HINT}")
    return Path(found)


def _load_tokenizer(source: str, cfg: ModelConfig, notes: list[str]) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # padding_side stays as the checkpoint sets it
        if tokenizer.eos_token is None:
            raise UserError(
                f"the tokenizer of {source!r} has neither a pad nor an eos token, and batched encoding needs one "
                "to pad with (decoders borrow eos; encoders such as BERT ship [PAD]): add a pad_token to its "
                "tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"tokenizer has no pad token; padding with eos {tokenizer.eos_token!r}")
    return tokenizer


@dataclass(frozen=True)
class ModelIdentity:
    """What `load_model` will load, resolved without loading any weights: the fields of `LoadedModel` that
    name the model and how it runs. The embedding cache keys vectors by these, so a run whose vectors are all
    cached never loads the model."""

    source: str
    revision: str | None
    quantization: str  # as LoadedModel.quantization: "4bit-nf4", "4bit-fp4", "8bit" or "none"
    quantization_kind: Literal["4bit", "8bit", "none"]
    compute_dtype: str
    device: str
    max_positions: int | None  # the model's position limit (config.json max_position_embeddings)
    notes: tuple[str, ...] = ()
    pair_encoding: PairEncoding = PairEncoding(None)  # as LoadedModel.pair_encoding


def resolve_identity(cfg: ModelConfig, *, resolve_pairs: bool = True) -> ModelIdentity:
    """Resolve `cfg` as `load_model` does (path, device, quantization, compute dtype, hub commit) from the
    config file alone, and model.pair_template (`auto` reads the tokenizer's files; `resolve_pairs` False leaves it to
    the caller). Cheap: no weights are read (a built-in model is built on first use)."""
    import json

    notes: list[str] = []
    source = resolve_model_path(cfg.name_or_path)
    if cfg.trust_remote_code:  # off by default; when on, it is said where it is decided, and recorded
        notes.append(f"trust_remote_code on: Python code shipped with {source} may run in this process")
        log.warning("model.trust_remote_code is on: Python code shipped with %s may run in this process", source)
    device = resolve_device(cfg)
    if cfg.device == "auto":
        notes.append(f"device auto → {device}")
    quantization = resolve_quantization(cfg, device, notes)
    dtype = resolve_compute_dtype(cfg, device, quantization)
    if cfg.compute_dtype == "auto":
        bf16_cpu = device == "cpu" and dtype == torch.bfloat16
        notes.append(f"compute dtype auto → {dtype_name(dtype)} on {device}" + (" (native bf16)" if bf16_cpu else ""))
    config_file = _config_file(source, cfg)
    # A hub download lives in .../snapshots/<commit hash>/config.json: record the exact commit.
    commit = config_file.parent.name if config_file.parent.parent.name == "snapshots" else None
    limit = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
    return ModelIdentity(
        source=source,
        revision=commit or cfg.revision,
        quantization={"4bit": f"4bit-{cfg.quant_type}", "8bit": "8bit", "none": "none"}[quantization],
        quantization_kind=quantization,
        compute_dtype=dtype_name(dtype),
        device=device,
        max_positions=limit if isinstance(limit, int) else None,
        notes=tuple(notes),
        # `load_model` resolves it from the tokenizer it loads anyway
        pair_encoding=_pair_encoding(source, cfg) if resolve_pairs else PairEncoding(None),
    )


def _pair_encoding(source: str, cfg: ModelConfig) -> PairEncoding:
    """model.pair_template resolved; `auto` reads the tokenizer (its files only, no weights)."""
    if cfg.pair_template != "auto":
        return pairs.resolve(None, cfg.pair_template)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return pairs.resolve(tokenizer, cfg.pair_template)


def load_model(
    cfg: ModelConfig,
    task: Task = "encoder",
    num_labels: int | None = None,
    *,
    seed: int = 0,
    unsupported: str | None = None,
) -> LoadedModel:
    """Load tokenizer + model for `task`: "encoder" (base model, hidden states for embeddings),
    "causal_lm" (QLoRA on the LM head) or "sequence_classification" (QLoRA with a `num_labels` head).
    `unsupported`: the UserError message when transformers has no class of `task` for the model's architecture
    (without it, transformers' ValueError propagates).

    Deterministic: freshly initialised weights (a classification head) are drawn under `seed` in a forked
    RNG, so the caller's random state is untouched; NF4 quantization itself has no randomness.
    """
    import_bitsandbytes()  # before transformers imports it: its kernel probe is quiet then
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    identity = resolve_identity(cfg, resolve_pairs=False)
    notes, source, device = list(identity.notes), identity.source, identity.device
    quantization, dtype = identity.quantization_kind, DTYPES[identity.compute_dtype]

    tokenizer = _load_tokenizer(source, cfg, notes)
    auto_class = {
        "encoder": AutoModel,
        "causal_lm": AutoModelForCausalLM,
        "sequence_classification": AutoModelForSequenceClassification,
    }[task]
    extra: dict[str, Any] = {}
    if task == "sequence_classification":
        if num_labels is None:
            raise ValueError("task='sequence_classification' needs num_labels")
        extra["num_labels"] = num_labels
    # The head stays in full precision, to be trained in full. transformers' default keeps only the module of the
    # model's last parameter: Qwen's `score` (no bias), but BERT's last parameter is `classifier.bias`, which names no
    # module, so its classifier would be quantized and could not be trained. A pooler missing from the checkpoint
    # would be left as a 4-bit layer holding unquantized weights, which fails on its first forward.
    keep = UNQUANTIZED_MODULES if task == "sequence_classification" else None
    qconfig = _bnb_config(quantization, cfg, dtype, keep)
    if qconfig is not None:
        extra["quantization_config"] = qconfig
    # bitsandbytes places weights while quantizing, so the device goes in device_map (it is required with
    # quantization; {"": "cpu"} also works on CPU). Under torchrun each rank takes its own GPU.
    gpu = int(os.environ.get("LOCAL_RANK", 0))
    target = f"cuda:{gpu}" if device == "cuda" else "cpu"
    with torch.random.fork_rng(devices=[gpu] if device == "cuda" else []), _quiet_loading():
        torch.manual_seed(seed)
        try:
            model, info = auto_class.from_pretrained(
                source,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                dtype=dtype,
                device_map={"": target},
                output_loading_info=True,
                # A weight whose shape differs from the checkpoint's (a classifier trained for another label count)
                # is drawn fresh and reported below, instead of stopping the load.
                ignore_mismatched_sizes=True,
                **extra,
            )
        except ValueError as exc:  # transformers' Auto class has no class of this task for the architecture
            if unsupported is None or "Unrecognized configuration class" not in str(exc):
                raise
            raise UserError(unsupported) from exc
    if quantization == "4bit" and device == "cpu":
        _keep_cpu_4bit_weights_unpacked(model, notes)
    report = load_report(info)
    new_weights = tuple(sorted([*report["missing"], *(m.split(":")[0] for m in report["mismatched"])]))
    if new_weights:
        shown = ", ".join(new_weights[:4]) + (f" and {len(new_weights) - 4} more" if len(new_weights) > 4 else "")
        notes.append(f"not in the checkpoint (or of another shape), initialised under seed {seed}: {shown}")
    _warn_about_surprises(report, task, source)
    if model.config.pad_token_id is None:  # sequence classification pools at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    label, revision = identity.quantization, identity.revision
    for note in notes:
        log.info("model: %s", note)
    log.info("loaded %s (%s, %s, %s, %s) on %s", source, task, label, dtype_name(dtype), revision or "local", target)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        quantization=label,
        compute_dtype=dtype_name(dtype),
        device=device,
        source=source,
        revision=revision,
        notes=notes,
        new_weights=new_weights,
        load_report=report,
        pair_encoding=pairs.resolve(tokenizer, cfg.pair_template),
    )


def load_report(info: dict[str, Any]) -> dict[str, list[str]]:
    """`from_pretrained`'s loading info as sorted key lists (a mismatch as "key: checkpoint shape -> model shape")."""
    mismatched = [f"{key}: {list(ckpt)} -> {list(model)}" for key, ckpt, model in info.get("mismatched_keys", ())]
    return {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": sorted(info.get("unexpected_keys", ())),
        "mismatched": sorted(mismatched),
    }


# What a task leaves out of the checkpoint on purpose: a sequence-classification model's new head (and a BERT
# pooler the checkpoint lacks) is drawn fresh; the pretraining heads (a causal LM's lm_head, BERT's cls.*) are unused
# by an encoder or a classifier.
_EXPECTED_NEW = {"sequence_classification": re.compile(rf"^(.*\.)?({'|'.join(HEAD_NAMES)}|{POOLER})\.")}
_EXPECTED_UNUSED = {
    "encoder": re.compile(r"^(lm_head|cls)\."),
    "sequence_classification": re.compile(r"^(lm_head|cls)\."),
}


def _warn_about_surprises(report: dict[str, list[str]], task: Task, source: str) -> None:
    """A console warning for each weight the task did not expect: a base weight drawn fresh (missing from the
    checkpoint, or of another shape), or a checkpoint weight that nothing loaded."""
    new, unused = _EXPECTED_NEW.get(task), _EXPECTED_UNUSED.get(task)
    fresh = [k for k in report["missing"] + report["mismatched"] if new is None or not new.match(k)]
    left = [k for k in report["unexpected"] if unused is None or not unused.match(k)]
    for keys, what in (
        (fresh, "freshly initialised, not loaded from the checkpoint"),
        (left, "in the checkpoint but unused by the model"),
    ):
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            log.warning(
                "%s: %d weight(s) %s: %s; check that the checkpoint matches its config (config.json lists them)",
                source,
                len(keys),
                what,
                shown,
            )


def checkpoint_parameters(cfg: ModelConfig) -> int | None:
    """Parameters in the checkpoint's safetensors files, from their headers (nothing is loaded); None for a checkpoint
    in another format."""
    from safetensors import safe_open

    folder = _config_file(resolve_model_path(cfg.name_or_path), cfg).parent
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def would_not_fit(cfg: ModelConfig, dtype: str, margin: float = 1.2) -> str | None:
    """Why the model of `cfg`, loaded unquantized in `dtype`, would not fit in the memory free on its device now
    (parameters x bytes per parameter x `margin` for buffers and activations); None when it fits or cannot be told."""
    count = checkpoint_parameters(cfg)
    device = resolve_device(cfg)
    free = free_memory(device)
    if count is None or free is None:
        return None
    needed = count * DTYPE_BYTES[dtype] * margin
    if needed <= free:
        return None
    return (
        f"the unquantized model ({count / 1e9:.2f} B parameters in {dtype}, about {needed / 2**30:.1f} GiB) would "
        f"not fit in the {free / 2**30:.1f} GiB free on {device}"
    )


def position_limit(model: LoadedModel | ModelIdentity | Any) -> int | None:
    """The model's position limit (config.json max_position_embeddings) of a loaded model, a resolved identity or a
    transformers config; None when it has none."""
    if isinstance(model, ModelIdentity):
        return model.max_positions
    hf_config = model.model.config if isinstance(model, LoadedModel) else model
    limit = getattr(hf_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def check_positions(limit: int | None, max_length: int, setting: str, source: str) -> None:
    """A max_length (`setting` names it) above the model's position limit would index past its position table
    (BERT's 512 learned positions) or run past the lengths it was trained on (rotary decoders)."""
    if limit is not None and max_length > limit:
        raise UserError(
            f"{setting} is {max_length} but {source} has {limit} positions; set {setting} to {limit} or less"
        )


def check_max_length(model: LoadedModel | ModelIdentity, max_length: int, setting: str) -> None:
    """`check_positions` against the limit of a loaded model or of its resolved identity."""
    check_positions(position_limit(model), max_length, setting, model.source)


def _keep_cpu_4bit_weights_unpacked(model: Any, notes: list[str]) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight on its first no-grad eval
    forward (a bf16 kernel, ~3e-3 off the float32 dequantized result, and no faster on our sizes), and
    `state_dict()` packs it back lossily: the saved NF4 bytes change, and without double quant the layer's
    later outputs are wrong by ~0.3. Keeping the plain dequantize path makes inference match training and
    leaves the quantized weights untouched."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers):
        for layer in layers:
            layer.support_avx512bf16_for_cpu = False
        notes.append("bitsandbytes CPU weight repacking (AVX512-BF16 inference path) disabled")
