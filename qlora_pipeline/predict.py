"""Load a finished run and score new texts with exactly what the run evaluated: its model, settings and threshold.

    predictor = load_predictor("outputs/run_007")
    predictor.predict(["这本书很好看"])  # a frame: prediction, prediction_name, confidence, prob_<class> ...

Embeddings runs: the encoder is loaded with the archived model settings (config.json), texts are cleaned as the
data stage cleaned them (`data.clean.rewrite`), encoded with the archived embedding settings, and scored by the
run's primary head (or `head=`) with the threshold it tuned on validation. QLoRA runs: the NF4 base with a fresh
classification head, then `PeftModel.from_pretrained` restores the adapter and the trained head; prediction is
the argmax, or a calibrated threshold when the run saved one in labels.json.

The embedding cache is not used: new texts are computed, never written into the cache shared by all runs (a
service would otherwise fill it with every text it sees), and the run's own texts then test the computation
itself. A vector can differ from the run's by ~1e-7 when its batch-mates differ (see embeddings/cache.py), so
probabilities agree with the run's predictions.csv to float tolerance rather than bit for bit. `qlora evaluate` is
the exception (`as_the_run_scored`): it scores a labelled file as a run scores a split, and reproduces a run's own
test split bit for bit.

Security: classifier heads are joblib pickles, and unpickling runs code. Heads are therefore read only from a
run directory that records a successful run (status.json `succeeded`, config.json), from its own models/
folder, and only when they match the checksums recorded when the run saved them (`integrity.py`: a damaged or
swapped file is refused, as are a changed config.json or data_summary.json); never point `qlora predict` at a run
directory from someone you do not trust.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from qlora_pipeline.errors import DataError, UserError
from qlora_pipeline.evaluation.baseline import BASELINE, baseline_texts
from qlora_pipeline.integrity import CHECKSUMS, verify_checksums, verify_manifest
from qlora_pipeline.reproduce import load_archive
from qlora_pipeline.runs import dataset_folder, read_json, run_state
from qlora_pipeline.training.log import ADAPTER_DIR

if TYPE_CHECKING:
    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "labels.json")
Scorer = Callable[[list[str], "list[str] | None"], tuple[np.ndarray, np.ndarray]]  # -> (proba, prediction)


@dataclass
class Predictor:
    """A finished run, ready to score texts. Models load on first use of each model folder."""

    run_dir: Path
    config: Config
    mode: str  # "embeddings" or "qlora"
    head: str
    label_names: list[str]
    datasets: list[str]
    pairs: bool  # whether the run's texts are pairs (text, text_pair)
    batch_size: int
    # As the run scored its own splits (`load_predictor(..., as_the_run_scored=True)`): QLoRA batches in input order,
    # not by length; an embeddings run reads (and fills) the embedding cache as the run did.
    by_length: bool = True
    use_cache: bool = False
    # How the run's model loaded (config.json's `model`: device, quantization, compute_dtype), to compare a load with.
    recorded_model: dict[str, Any] = field(default_factory=dict, repr=False)
    _scorers: dict[Path, Scorer] = field(default_factory=dict, repr=False)
    _encoder: Any = field(default=None, repr=False)
    _verified: set[Path] = field(default_factory=set, repr=False)  # model folders checked against their checksums

    def model_dir(self, dataset: str | None = None) -> Path:
        """models/<dataset>/ when the run trained one for `dataset` (experiment.per_dataset), else models/all/ (the
        pooled model, and always the TF-IDF baseline)."""
        if dataset is not None and dataset not in self.datasets:
            raise UserError(f"run {self.run_dir} has no dataset {dataset!r}; its datasets: {', '.join(self.datasets)}")
        specific = self.run_dir / "models" / dataset_folder(dataset) if dataset else None
        if self.head != BASELINE and specific is not None and specific.is_dir():
            return specific
        if self.head != BASELINE and not self.config.experiment.pooled:
            raise UserError(
                f"run {self.run_dir} trained one model per dataset and no pooled one (experiment.pooled false); "
                f"choose one with --dataset: {', '.join(self.datasets)}"
            )
        return self.run_dir / "models" / "all"

    def predict(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, dataset: str | None = None
    ) -> pd.DataFrame:
        """One row per text: text[, text_pair], prediction, prediction_name, confidence, prob_<class> ..."""
        from qlora_pipeline.data.clean import rewrite

        texts = list(texts)
        if self.pairs and pairs is None:
            raise UserError(f"run {self.run_dir} was trained on text pairs; give a second text for each text")
        if pairs is not None and not self.pairs:
            raise UserError(f"run {self.run_dir} scores single texts (its data had no text_pair); give no second texts")
        if pairs is not None and len(pairs) != len(texts):
            raise UserError(f"{len(texts)} texts but {len(pairs)} pairs; give one second text per text")
        clean = rewrite(pd.Series(texts, dtype=object), self.config.data).tolist()
        clean_pairs = (
            None if pairs is None else rewrite(pd.Series(list(pairs), dtype=object), self.config.data).tolist()
        )
        for column, values in (("text", clean), ("text_pair", clean_pairs or [])):
            empty = [i + 1 for i, value in enumerate(values) if not value]
            if empty:
                shown = ", ".join(map(str, empty[:5])) + (" …" if len(empty) > 5 else "")
                raise DataError(f"{len(empty)} empty {column} input(s) (number {shown}); give non-empty texts")
        proba, prediction = self.scorer(dataset)(clean, clean_pairs) if texts else (np.zeros((0, 0)), np.zeros(0))
        frame = pd.DataFrame({"text": texts, **({"text_pair": list(pairs)} if pairs is not None else {})})
        frame["prediction"] = prediction.astype(int)
        frame["prediction_name"] = [self.label_names[i] for i in frame["prediction"]]
        frame["confidence"] = proba[np.arange(len(texts)), frame["prediction"]] if texts else []
        for index, name in enumerate(self.label_names):
            frame[f"prob_{name}"] = proba[:, index] if texts else []
        return frame

    def scorer(self, dataset: str | None = None) -> Scorer:
        folder = self.model_dir(dataset)
        if folder not in self._scorers:
            _check_model_files(self, folder)
            self._scorers[folder] = self._load_scorer(folder)
        return self._scorers[folder]

    def _load_scorer(self, folder: Path) -> Scorer:
        if self.head == BASELINE:
            return _head_scorer(_read_head(self.run_dir, folder, BASELINE), baseline=True)
        if self.mode == "qlora":
            return _qlora_scorer(self, folder)
        head = _read_head(self.run_dir, folder, self.head)
        if self._encoder is None:
            self._encoder = _load_encoder(self)
        return _head_scorer(head, encoder=self._encoder)


def load_predictor(
    run_dir: str | Path,
    *,
    dataset: str | None = None,
    head: str | None = None,
    batch_size: int | None = None,
    device: Literal["auto", "cpu", "cuda"] | None = None,
    as_the_run_scored: bool = False,
) -> Predictor:
    """Check that `run_dir` is a run that succeeded, with its model files, and load what predicting needs.

    `head`: another head the run saved (e.g. "tfidf_logreg"); default the run's primary head. `dataset`: check
    and load that dataset's model up front (`predict(..., dataset=...)` picks the model per call). `device`:
    "cpu", "cuda" or "auto" for where the model runs; default the run's `model.device`, so a run trained on a GPU
    predicts on a CPU-only machine with device="cpu" (a warning says its probabilities may then differ slightly).
    `as_the_run_scored`: compute exactly as the run scored its splits, so its own rows score bit for bit as it did
    (`qlora evaluate`): a QLoRA run in its training batch size, in input order; an embeddings run through the
    embedding cache when the run used it (vectors it cached are read back, new ones are added).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; pass a run directory such as outputs/run_007")
    if not (run / "status.json").is_file():
        raise UserError(f"{run} has no status.json: not a finished qlora run directory")
    status = run_state(run)  # a `running` run whose process died reads as interrupted
    state = status.get("state")
    if state != "succeeded":
        why = f" ({status['error']})" if status.get("error") else ""
        still = "; wait for it to finish" if state == "running" else "; predict from a run that succeeded"
        raise UserError(f"run {run} is {state}{why}{still}")
    for name in ("config.json", "data_summary.json"):
        if not (run / name).is_file():
            raise UserError(f"{run} has no {name}: not a finished qlora run directory")
    verify_manifest(run, ["config.json", "data_summary.json"])  # what decides how texts are scored
    config, record = load_archive(run / "config.json")
    mode = config.experiment.mode
    if mode == "sft":
        raise UserError(
            f"run {run} is an instruction (sft) run: it writes answers instead of scoring classes; use `qlora "
            f"generate --run {run}` or qlora_pipeline.load_generator"
        )
    primary = "qlora" if mode == "qlora" else config.classifier.heads[0]
    if mode == "qlora" and head not in (None, primary, BASELINE):
        raise UserError(f"run {run} is a QLoRA run: its heads are {primary} and {BASELINE}, not {head!r}")
    if device is not None:
        if device not in DEVICES:
            raise UserError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
        config = replace(config, model=replace(config.model, device=device))
    if (head or primary) != BASELINE:  # the TF-IDF baseline needs no model
        _check_device(run, config.model.device, explicit=device is not None)
    predictor = Predictor(
        run_dir=run,
        config=config,
        mode=mode,
        head=head or primary,
        label_names=list(read_json(run / "data_summary.json")["label_names"]),
        datasets=[source.name for source in config.data.sources],
        pairs=any(source.text_pair_column for source in config.data.sources),
        # Inference keeps no activations for backward and no optimizer state: 4x the training batch fits where
        # training fit, and amortizes the per-forward NF4 dequantization (~3x the texts/s of the training batch
        # on CPU). Batch-mates move a text's probabilities by ~1e-7 only.
        batch_size=batch_size or _default_batch_size(config, as_the_run_scored),
        by_length=not as_the_run_scored,
        use_cache=as_the_run_scored and config.embedding.cache,
        recorded_model=record.get("model") or {},
    )
    _check_model_files(predictor, predictor.model_dir(dataset))
    if dataset is not None:
        predictor.scorer(dataset)
    return predictor


def _default_batch_size(config: Config, as_the_run_scored: bool) -> int:
    if config.experiment.mode != "qlora":
        return config.embedding.batch_size
    return config.training.batch_size if as_the_run_scored else 4 * config.training.batch_size


def _check_device(run: Path, device: str, explicit: bool) -> None:
    """A run trained with model.device cuda, predicted where no GPU is visible: say how to run it on the CPU."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        asked = "device 'cuda' was asked for" if explicit else f"run {run} ran with model.device 'cuda'"
        raise UserError(f"{asked} but no CUDA GPU is visible; predict on the CPU with --device cpu (or auto)")


def _check_model_files(predictor: Predictor, folder: Path) -> None:
    """The model files are there, and match the checksums the run recorded when it saved them."""
    if predictor.mode == "qlora" and predictor.head != BASELINE:
        needed = [folder / ADAPTER_DIR / name for name in ADAPTER_FILES]
    else:
        needed = [folder / f"{predictor.head}.joblib"]
    missing = [str(p.relative_to(predictor.run_dir)) for p in needed if not p.is_file()]
    if missing:
        saved = sorted(p.stem for p in folder.glob("*.joblib")) if folder.is_dir() else []
        hint = f" (heads saved: {', '.join(saved)})" if saved and predictor.mode != "qlora" else ""
        raise UserError(
            f"run {predictor.run_dir} is missing {', '.join(missing)}{hint}; its model files are incomplete"
        )
    if folder in predictor._verified:
        return
    if predictor.mode == "qlora" and predictor.head != BASELINE:  # every file PeftModel.from_pretrained may read
        loaded = sorted(p for p in (folder / ADAPTER_DIR).rglob("*") if p.is_file())
    else:
        loaded = [p for p in (needed[0], needed[0].with_suffix(".ubj")) if p.is_file()]
    # The folder's checksums.json as the run left it (manifest.json), then each file as it was saved (checksums.json).
    verify_manifest(predictor.run_dir, [(folder / CHECKSUMS).relative_to(predictor.run_dir).as_posix()])
    verify_checksums(folder, [p.relative_to(folder).as_posix() for p in loaded])
    predictor._verified.add(folder)


def _read_head(run_dir: Path, folder: Path, name: str) -> Any:
    """A head's joblib pickle, only from inside this run directory (unpickling executes code)."""
    from qlora_pipeline.evaluation.trained_head import load_head

    path = (folder / f"{name}.joblib").resolve()
    if not path.is_relative_to(run_dir.resolve() / "models"):
        raise UserError(f"{folder / f'{name}.joblib'} resolves outside {run_dir}/models; refusing to unpickle it")
    try:
        return load_head(path)
    except (EOFError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        raise UserError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); the run's model files are not intact"
        ) from exc


def _head_scorer(head: Any, *, encoder: Any = None, baseline: bool = False) -> Scorer:
    def score(texts: list[str], pairs: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
        if baseline:
            frame = pd.DataFrame({"text": texts, **({"text_pair": pairs} if pairs is not None else {})})
            features = baseline_texts(frame)
        else:
            features = encoder(texts, pairs)
        proba = head.predict_proba(features)
        return proba, head.predict(proba)

    return score


def _load_encoder(predictor: Predictor) -> Callable[[list[str], list[str] | None], np.ndarray]:
    from qlora_pipeline.embeddings.encoding import encode
    from qlora_pipeline.models.loading import check_max_length, load_model

    config = predictor.config
    loaded = load_model(config.model, task="encoder", seed=config.experiment.seed)
    _compare_with_record(predictor, loaded)
    embedding = replace(config.embedding, batch_size=predictor.batch_size)
    check_max_length(loaded, embedding.max_length, "embedding.max_length")
    cache = None
    if predictor.use_cache:
        from qlora_pipeline.embeddings.cache import EmbeddingCache
        from qlora_pipeline.embeddings.encoding import cache_settings

        cache = EmbeddingCache(cache_settings(loaded, embedding))
    last: list[Any] = []  # the last inputs and their vectors: every head of a run scores the same texts

    def encoder(texts: list[str], pairs: list[str] | None) -> np.ndarray:
        if last and last[0] == texts and last[1] == pairs:
            return last[2]
        vectors = encode(texts, loaded, embedding, pairs=pairs, cache=cache).vectors
        last[:] = [list(texts), None if pairs is None else list(pairs), vectors]
        return vectors

    return encoder


def _compare_with_record(predictor: Predictor, loaded: Any) -> None:
    """Warn when the model loads differently from the run (another device, or quantization or dtype after a
    fallback): the same weights, but float results that can differ slightly from the run's."""
    recorded = predictor.recorded_model
    for key in ("device", "quantization", "compute_dtype"):
        if recorded.get(key) not in (None, getattr(loaded, key)):
            log.warning(
                "the run used %s %s, this load gives %s: predictions may differ from the run's",
                key,
                recorded[key],
                getattr(loaded, key),
            )


def _qlora_scorer(predictor: Predictor, folder: Path) -> Scorer:
    from qlora_pipeline.finetune import lm_label
    from qlora_pipeline.finetune.scoring import predict_proba
    from qlora_pipeline.models.loading import load_model, quiet_library_warnings

    config, adapter = predictor.config, folder / ADAPTER_DIR
    labels = read_json(adapter / "labels.json")
    if labels["label_names"] != predictor.label_names:
        raise UserError(f"{adapter}/labels.json names {labels['label_names']}, the run {predictor.label_names}")
    words = lm_label.LabelWords.from_dict(labels["lm_label"]) if labels.get("lm_label") else None
    if words is None:
        num_labels = len(labels["label_names"])
        loaded = load_model(
            config.model, task="sequence_classification", num_labels=num_labels, seed=config.experiment.seed
        )
    else:
        loaded = load_model(config.model, task="causal_lm", seed=config.experiment.seed)
        again = lm_label.resolve(loaded.tokenizer, words.words, labels["label_names"], words.template)
        if again.token_ids != words.token_ids:
            raise UserError(
                f"{adapter}/labels.json scores tokens {words.token_ids} for {words.words}, but this model's "
                f"tokenizer gives {again.token_ids}: predict with the base model the run was trained on"
            )
    _compare_with_record(predictor, loaded)
    trained = labels.get("pair_encoding")
    if trained is not None and trained != loaded.pair_encoding.record():
        raise UserError(
            f"{adapter}/labels.json says the run joined text pairs as {trained}, but model.pair_template now gives "
            f"{loaded.pair_encoding.record()} for this tokenizer: predict with the tokenizer the run was trained on"
        )
    from peft import PeftModel

    from qlora_pipeline.training.lora import use_training_precision

    base = use_training_precision(loaded, labels.get("trained_in_full") or [])  # float32 where the run trained
    with quiet_library_warnings():
        adapted = replace(loaded, model=PeftModel.from_pretrained(base, adapter).eval())
    # The P(second class) cut calibrated on validation, when the run tuned one (training.threshold_metric).
    threshold = (labels.get("threshold") or {}).get("value")
    max_length, batch_size, by_length = config.training.max_length, predictor.batch_size, predictor.by_length

    def score(texts: list[str], pairs: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
        proba = predict_proba(adapted, words, texts, max_length, batch_size, pairs, by_length=by_length)
        if threshold is not None and proba.shape[1] == 2:
            return proba, (proba[:, 1] >= threshold).astype(int)
        return proba, proba.argmax(axis=1)

    return score
