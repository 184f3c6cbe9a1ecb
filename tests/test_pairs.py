"""Text pairs on a tokenizer without a pair template (the tiny Qwen one, as Qwen's own): joined by model.pair_template
so the model can tell where the first text ends, in embeddings, both fine-tuning heads and prediction alike; a
tokenizer that marks pairs itself (BERT) keeps its own encoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from helpers import MINILM

from qlora_pipeline.config import DEFAULT_PAIR_TEMPLATE, EmbeddingConfig, ModelConfig
from qlora_pipeline.embeddings.cache import EmbeddingCache
from qlora_pipeline.embeddings.encoding import cache_settings, encode
from qlora_pipeline.finetune import lm_label
from qlora_pipeline.finetune.scoring import predict_proba
from qlora_pipeline.models import pairs
from qlora_pipeline.models.loading import LoadedModel, load_model

# Split differently, the same characters: a tokenizer that only concatenates the two cannot tell them apart.
FIRSTS, SECONDS = ["ab", "a"], ["c", "bc"]
MODEL = ModelConfig(device="cpu", compute_dtype="float32")
EMB = EmbeddingConfig(pooling="mean", max_length=64, batch_size=8, cache=False)


@pytest.fixture(scope="module")
def classifier() -> LoadedModel:
    return load_model(MODEL, task="sequence_classification", num_labels=3, seed=1)


def test_the_tiny_qwen_tokenizer_has_no_pair_template(tokenizer: Any) -> None:
    assert tokenizer(*FIRSTS[:1], *SECONDS[:1])["input_ids"] == tokenizer(FIRSTS[1], SECONDS[1])["input_ids"]
    assert not pairs.marks_pairs(tokenizer)
    assert pairs.resolve(tokenizer, "auto") == pairs.PairEncoding(DEFAULT_PAIR_TEMPLATE)
    assert pairs.resolve(tokenizer, "tokenizer") == pairs.PairEncoding(None)


def test_pairs_split_differently_get_different_ids(tokenizer: Any) -> None:
    encoding = pairs.resolve(tokenizer, "auto")
    first, second = pairs.encode(tokenizer, FIRSTS, SECONDS, 32, encoding, setting="x")["input_ids"]
    assert first != second
    separator = tokenizer.encode("\n---\n", add_special_tokens=False)
    a, b, c = (tokenizer.encode(t, add_special_tokens=False) for t in "abc")
    assert first == a + b + separator + c and second == a + separator + b + c


def test_a_classification_head_scores_such_pairs_differently(classifier: LoadedModel) -> None:
    proba = predict_proba(classifier, None, FIRSTS, 32, 8, SECONDS)
    assert np.abs(proba[0] - proba[1]).max() > 1e-4


def test_the_embeddings_of_such_pairs_differ() -> None:
    loaded = load_model(MODEL, task="encoder")
    vectors = encode(FIRSTS, loaded, EMB, pairs=SECONDS).vectors
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-4
    # With an instruction, the joined pair is the one query inside it.
    instructed = dataclasses.replace(EMB, instruction="同一个问题吗")
    inside = encode(FIRSTS, loaded, instructed, pairs=SECONDS).vectors
    assert np.abs(inside[0] - inside[1]).max() > 1e-4 and np.abs(inside - vectors).max() > 1e-4


def test_lm_label_puts_the_joined_pair_into_a_prompt_without_text_pair(tokenizer: Any) -> None:
    words = lm_label.LabelWords(["差", "好"], [485, 307], "问：{text}\n答：")
    encoding = pairs.resolve(tokenizer, "auto")
    first, second = lm_label.encode(tokenizer, words, FIRSTS, SECONDS, 32, encoding)
    encode_piece = tokenizer.encode
    before, after = (encode_piece(p, add_special_tokens=False) for p in ("问：", "\n答："))
    joined = pairs.encode(tokenizer, FIRSTS, SECONDS, 32, encoding, setting="x")["input_ids"]
    assert first == before + joined[0] + after and second == before + joined[1] + after


def test_a_long_first_text_leaves_the_second_its_room(tokenizer: Any) -> None:
    encoding = pairs.resolve(tokenizer, "auto")
    separator = tokenizer.encode("\n---\n", add_special_tokens=False)
    long_text, short = "这本书很好看，物流也很快！" * 20, "太差了"
    (ids,) = pairs.encode(tokenizer, [long_text], [short], 24, encoding, setting="x")["input_ids"]
    tail = separator + tokenizer.encode(short, add_special_tokens=False)
    assert len(ids) == 24 and ids[-len(tail) :] == tail  # the second text whole, the first cut
    (both,) = pairs.encode(tokenizer, [long_text], [long_text + "!"], 24, encoding, setting="x")["input_ids"]
    room = 24 - len(separator)
    assert both[room // 2 : room // 2 + len(separator)] == separator  # half the room each


def test_a_template_that_leaves_no_room_is_a_user_error(tokenizer: Any) -> None:
    from qlora_pipeline.errors import UserError

    encoding = pairs.PairEncoding("第一个问题是：{text}\n第二个问题是：{text_pair}")
    with pytest.raises(UserError, match=r"^embedding.max_length \(with model.pair_template\) 6 leaves no room"):
        pairs.encode(tokenizer, ["好"], ["差"], 6, encoding, setting="embedding.max_length")


def test_bert_pairs_keep_the_tokenizers_own_encoding() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    assert pairs.marks_pairs(tokenizer)
    encoding = pairs.resolve(tokenizer, "auto")
    assert encoding == pairs.PairEncoding(None)
    texts, second = ["the book was great " * 30, "awful"], ["buy it", "never again " * 30]
    ours = pairs.encode(tokenizer, texts, second, 48, encoding, setting="x")
    assert ours == dict(tokenizer(texts, second, truncation=True, max_length=48))
    # An explicit template applies to BERT too: one segment, [CLS] ... [SEP] around the joined pair.
    joined = pairs.encode(tokenizer, ["a"], ["b"], 48, pairs.PairEncoding("{text} | {text_pair}"), setting="x")
    assert tokenizer.convert_ids_to_tokens(joined["input_ids"][0]) == ["[CLS]", "a", "|", "b", "[SEP]"]
    assert joined["token_type_ids"] == [[0, 0, 0, 0, 0]]


def test_the_cache_key_changes_with_the_pair_encoding(classifier: LoadedModel) -> None:
    keys = {
        EmbeddingCache(cache_settings(dataclasses.replace(classifier, pair_encoding=encoding), EMB)).key
        for encoding in (
            pairs.PairEncoding(None),
            pairs.PairEncoding(DEFAULT_PAIR_TEMPLATE),
            pairs.PairEncoding("{text}|{text_pair}"),
        )
    }
    assert len(keys) == 3
