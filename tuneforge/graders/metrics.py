"""`text_similarity`'s metrics, each from its maintained library, as a score in [0, 1]:
fuzzy_match from rapidfuzz, bleu and gleu from NLTK, rouge_* from Google's rouge-score.

`meteor` needs the WordNet corpus, which no PyPI package ships and which cannot be downloaded at
run time here, and `cosine` needs an embedding model: both are refused (`UNAVAILABLE_METRICS`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

#: The longest text (after templates) a similarity metric compares: ROUGE-L is quadratic in pure
#: Python (about a second at this size); longer is a `truncated_observation_error`.
MAX_SIMILARITY_CHARS = 10_000

UNAVAILABLE_METRICS = {
    "meteor": "it needs the WordNet corpus, which is not installed on this service",
    "cosine": "it needs an embedding model, which this service does not serve yet",
}


def _tokens(text: str) -> list[str]:
    from nltk.tokenize import wordpunct_tokenize  # a regular expression: needs no NLTK data

    return wordpunct_tokenize(text.lower())


def fuzzy_match(output: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return float(fuzz.WRatio(output, reference, processor=utils.default_process)) / 100.0


def bleu(output: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hypothesis, references = _tokens(output), [_tokens(reference)]
    if not hypothesis or not references[0]:
        return float(hypothesis == references[0])
    return float(sentence_bleu(references, hypothesis, smoothing_function=SmoothingFunction().method1))


def gleu(output: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    hypothesis, references = _tokens(output), [_tokens(reference)]
    if not hypothesis or not references[0]:
        return float(hypothesis == references[0])
    return float(sentence_gleu(references, hypothesis))


@cache
def _rouge(kind: str) -> Callable[[str, str], float]:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer([kind])

    def score(output: str, reference: str) -> float:
        return float(scorer.score(reference, output)[kind].fmeasure)

    return score


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": (lambda kind: lambda o, r: _rouge(kind)(o, r))(f"rouge{n}") for n in "12345"},
    "rouge_l": lambda o, r: _rouge("rougeL")(o, r),
}


def similarity(metric: str, output: str, reference: str) -> float:
    return min(1.0, max(0.0, METRICS[metric](output, reference)))
