"""Reference metrics for generated answers (mode sft): chrF and BLEU from sacrebleu, ROUGE-L and exact match.

- BLEU: sacrebleu's corpus BLEU with its `zh` tokenizer (every CJK character a token, 13a rules for the rest), so
  Chinese answers are scored on characters instead of on whole unsegmented sentences; chrF: sacrebleu's default
  (character 6-grams, beta 2), which needs no segmentation at all. Both 0-100, with sacrebleu's signature recorded.
- ROUGE-L: the F-measure (beta 1) of the longest common subsequence, per answer, averaged, on a 0-100 scale; tokens
  are CJK characters and lower-cased ASCII letter/digit runs (punctuation dropped), the normalisation of Google's
  rouge-score extended to Chinese, whose default tokenizer drops every CJK character and scores Chinese 0.
- exact match: the share of answers equal to the reference after NFKC, case folding, and removing white space and
  punctuation at either end; meaningful for short answers (labels, names, numbers).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

TEXT_METRICS = ("chrf", "bleu", "rouge_l", "exact_match")
LOSS_METRICS = ("loss", "perplexity")
LOWER_IS_BETTER = frozenset(LOSS_METRICS)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[a-z0-9]+")
ROUGE_L_SIGNATURE = "rouge_l|lcs-f1|beta:1|tok:cjk-char+lower-alnum-words|mean-of-answers"
EXACT_MATCH_SIGNATURE = "exact_match|nfkc+casefold|strip-space-and-edge-punctuation"


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def rouge_l(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """LCS F-measure (beta 1) of two token lists, 0 when either is empty (as rouge-score computes it)."""
    if not reference or not hypothesis:
        return 0.0
    previous = [0] * (len(hypothesis) + 1)
    for ref_token in reference:
        current = [0]
        for j, hyp_token in enumerate(hypothesis):
            current.append(previous[j] + 1 if ref_token == hyp_token else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = re.sub(r"\s+", "", folded)
    return re.sub(r"^[\W_]+|[\W_]+$", "", folded)


def reference_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus chrF and BLEU, mean ROUGE-L (0-100) and the exact-match share of `hypotheses` against `references`."""
    from sacrebleu.metrics import BLEU, CHRF

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers but {len(references)} references")
    if not hypotheses:
        return {"n": 0, **dict.fromkeys(TEXT_METRICS)}
    rouge = [rouge_l(rouge_tokens(r), rouge_tokens(h)) for h, r in zip(hypotheses, references, strict=True)]
    exact = [normalize_answer(h) == normalize_answer(r) for h, r in zip(hypotheses, references, strict=True)]
    return {
        "n": len(hypotheses),
        "chrf": round(CHRF().corpus_score(hypotheses, [references]).score, 4),
        "bleu": round(BLEU(tokenize="zh").corpus_score(hypotheses, [references]).score, 4),
        "rouge_l": round(100 * sum(rouge) / len(rouge), 4),
        "exact_match": round(sum(exact) / len(exact), 4),
    }


def signatures() -> dict[str, str]:
    """How each metric was computed (sacrebleu's own signatures with its version), for metrics.json and the report."""
    from sacrebleu.metrics import BLEU, CHRF

    chrf, bleu = CHRF(), BLEU(tokenize="zh")
    for metric in (chrf, bleu):  # a signature names the number of references, known once a metric has scored
        metric.corpus_score(["a"], [["a"]])
    return {
        "chrf": str(chrf.get_signature()),
        "bleu": str(bleu.get_signature()),
        "rouge_l": ROUGE_L_SIGNATURE,
        "exact_match": EXACT_MATCH_SIGNATURE,
    }
