"""The one place that loads a tokenizer + model, with the quantization the config asks for.

Used by the embeddings path (`task="encoder"`), QLoRA fine-tuning and prediction. Every decision that
differs from what the config literally says (an `auto` resolved, a fallback taken, a pad token borrowed)
is logged and returned in `LoadedModel.notes`, for config.json and the report.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models.device import DTYPES, dtype_name, resolve_compute_dtype, resolve_device
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
    new_weights: tuple[str, ...] = ()  # parameters the checkpoint lacked, freshly initialised (a new head)


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
    """No "Loading weights" progress bar and no LOAD REPORT table of missing keys on stderr while a model loads:
    the freshly initialised weights (a new classification head) are a note in config.json instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
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
    return _resolve_quantization(cfg, device, notes)


def _resolve_quantization(cfg: ModelConfig, device: str, notes: list[str]) -> Literal["4bit", "8bit", "none"]:
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


def resolve_identity(cfg: ModelConfig) -> ModelIdentity:
    """Resolve `cfg` as `load_model` does (path, device, quantization, compute dtype, hub commit) from the
    config file alone. Cheap: no weights are read (a built-in model is built on first use)."""
    import json

    notes: list[str] = []
    source = resolve_model_path(cfg.name_or_path)
    if cfg.trust_remote_code:  # off by default; when on, it is said where it is decided, and recorded
        notes.append(f"trust_remote_code on: Python code shipped with {source} may run in this process")
        log.warning("model.trust_remote_code is on: Python code shipped with %s may run in this process", source)
    device = resolve_device(cfg)
    if cfg.device == "auto":
        notes.append(f"device auto → {device}")
    quantization = _resolve_quantization(cfg, device, notes)
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
    )


def load_model(
    cfg: ModelConfig,
    task: Task = "encoder",
    num_labels: int | None = None,
    *,
    seed: int = 0,
) -> LoadedModel:
    """Load tokenizer + model for `task`: "encoder" (base model, hidden states for embeddings),
    "causal_lm" (QLoRA on the LM head) or "sequence_classification" (QLoRA with a `num_labels` head).

    Deterministic: freshly initialised weights (a classification head) are drawn under `seed` in a forked
    RNG, so the caller's random state is untouched; NF4 quantization itself has no randomness.
    """
    import_bitsandbytes()  # before transformers imports it: its kernel probe is quiet then
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    identity = resolve_identity(cfg)
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
        model, info = auto_class.from_pretrained(
            source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            device_map={"": target},
            output_loading_info=True,
            **extra,
        )
    if quantization == "4bit" and device == "cpu":
        _keep_cpu_4bit_weights_unpacked(model, notes)
    new_weights = tuple(sorted(info.get("missing_keys", ())))
    if new_weights:
        shown = ", ".join(new_weights[:4]) + (f" and {len(new_weights) - 4} more" if len(new_weights) > 4 else "")
        notes.append(f"not in the checkpoint, initialised under seed {seed}: {shown}")
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
    )


def check_max_length(loaded: LoadedModel, max_length: int, setting: str) -> None:
    """A max_length (`setting` names it) above the model's position limit would index past its position table
    (BERT's 512 learned positions) or run past the lengths it was trained on (rotary decoders)."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise UserError(
            f"{setting} is {max_length} but {loaded.source} has {limit} positions; set {setting} to {limit} or less"
        )


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
