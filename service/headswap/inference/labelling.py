"""RankForLabelling's use case: unlabelled images in, the ones worth labelling next out.

The images are decoded and bounded exactly as Classify's (`Classifier.embed_encoded`), run through
the version's graph for both outputs, matched by sha256 against the images the version was
trained on (`headswap.registry.training_set`), and ranked by `headswap.inference.ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headswap.admission import Slots
from headswap.errors import InvalidInput
from headswap.inference import ranking
from headswap.inference.classifier import Classifier, ShouldStop
from headswap.registry import training_set

DEFAULT_TOP = 10


@dataclass(frozen=True)
class RankedImage:
    """One image of the request: where it was, its place in the ranking (0: not recommended)."""

    index: int
    rank: int
    uncertainty: float
    label: str
    score: float
    already_labelled: bool


@dataclass(frozen=True)
class LabellingAdvice:
    model: str
    version: int
    uncertainty: str  # the measure used: margin or entropy
    images: list[RankedImage]  # the recommended ones by rank, then those already labelled
    training_set_known: bool  # False: the version records no training set (zero-shot, or older)
    training_set_size: int
    near_duplicates: int  # images left out as near-duplicates of a recommended or labelled one


class LabellingRanker:
    """Ranks a request's images for one model version; at most --max-ranking-calls at once."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        settings = classifier.settings
        self.max_top = settings.max_rank_top
        self._calls = Slots("ranking calls in progress", settings.max_ranking_calls, "--max-ranking-calls")

    def rank(self, images: list[bytes], top: int, model: str = "", version: int = 0, method: str = "",
             deadline: float | None = None, should_stop: ShouldStop | None = None) -> LabellingAdvice:
        top = top or DEFAULT_TOP
        if not 1 <= top <= self.max_top:
            raise InvalidInput(f"top must be between 1 and {self.max_top} (the server's --max-rank-top), got {top}")
        method = method or "margin"
        if method not in ranking.UNCERTAINTIES:
            raise InvalidInput(f"uncertainty must be one of {', '.join(ranking.UNCERTAINTIES)}, got {method[:40]!r}")
        with self._calls.take():
            embedded = self.classifier.embed_encoded(images, model, version, deadline, should_stop)
        answer = embedded.answer
        path = embedded.files.get(training_set.TRAINING_SET_FILE)
        known = training_set.load(path) if path is not None else None
        labelled = (known.contains(training_set.digests_of(images)) if known is not None
                    else np.zeros(len(images), dtype=bool))
        result = ranking.rank(answer.probabilities, embedded.embeddings, top, labelled, method)
        best = answer.probabilities.argmax(axis=1)

        def image(i: int, place: int) -> RankedImage:
            k = int(best[i])
            label = answer.labels[k] if k < len(answer.labels) else str(k)
            return RankedImage(i, place, float(result.uncertainty[i]), label, float(answer.probabilities[i, k]),
                               bool(labelled[i]))

        chosen = [image(i, place) for place, i in enumerate(result.order, start=1)]
        already = [image(int(i), 0) for i in np.flatnonzero(labelled)]
        return LabellingAdvice(answer.model, answer.version, method, chosen + already, known is not None,
                               len(known) if known is not None else 0, result.duplicates)
