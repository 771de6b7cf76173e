"""Classification use cases on top of the model manager: bytes or pixels in, top-k out.

Decoding runs in the caller's thread (one per concurrent request) while the model's batcher
runs inference, so decoding overlaps inference instead of queuing in front of it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from headswap.config import Settings
from headswap.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from headswap.inference.images import load_pixels
from headswap.inference.manager import LoadedModel, ModelManager
from headswap.inference.runtime import Prediction

MAX_TOP_K = 1000


def top_k_indices(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties keep index order)."""
    k = min(k, row.shape[-1])
    order = np.argpartition(-row, k - 1)[:k]
    return order[np.argsort(-row[order], kind="stable")]


@dataclass(frozen=True)
class Answer:
    model: str
    version: int
    probabilities: np.ndarray  # [N, classes]
    labels: list[str]


class Classifier:
    """Runs requests against the right model version, through its batcher."""

    def __init__(self, manager: ModelManager, settings: Settings, default_model: str) -> None:
        self.manager = manager
        self.settings = settings
        self.default_model = default_model
        # Bounds concurrent decoding: past the core count, more decoders only steal CPU from
        # inference and lengthen everyone's latency.
        self._decoders = threading.BoundedSemaphore(settings.decode_threads)

    def classify(self, images: list[bytes], top_k: int, model: str = "", version: int = 0,
                 deadline: float | None = None) -> tuple[Answer, list[list[Prediction]]]:
        """Encoded images -> top-k predictions per image."""
        top_k = top_k or 5
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        answer = self.infer_encoded(images, model, version, deadline)
        runtime_k = min(top_k, answer.probabilities.shape[-1])
        return answer, [self._top_k(answer, row, runtime_k) for row in answer.probabilities]

    def infer_pixels(self, pixels: np.ndarray, model: str = "", version: int = 0,
                     deadline: float | None = None, normalized: bool = False) -> Answer:
        """Already-sized NHWC pixels (uint8 0..255, or float32 model input when normalized)."""

        def prepare(loaded: LoadedModel) -> np.ndarray:
            expected = loaded.runtime.input_shape
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
                raise InvalidInput(f"input shape {list(pixels.shape)} does not match the model's "
                                   f"[N, {expected[0]}, {expected[1]}, {expected[2]}]")
            if normalized:
                return np.ascontiguousarray(pixels, dtype=np.float32)
            return loaded.runtime.preprocessing.normalize(pixels)

        return self._run(model, version, prepare, deadline)

    def infer_encoded(self, images: list[bytes], model: str = "", version: int = 0,
                      deadline: float | None = None) -> Answer:
        """Encoded images (JPEG, PNG, WebP, BMP) -> probabilities, decoded as the manifest says."""
        if not images:
            raise InvalidInput("no images in the request: send at least one encoded image")
        if len(images) > self.settings.max_images_per_request:
            raise ResourceExhausted(f"{len(images)} images in one request; the limit is "
                                    f"{self.settings.max_images_per_request}")

        def prepare(loaded: LoadedModel) -> np.ndarray:
            h, w, _ = loaded.runtime.input_shape
            with self._decoders:
                pixels = np.stack([load_pixels(data, h, w, self.settings.max_image_pixels, i)
                                   for i, data in enumerate(images)])
                return loaded.runtime.preprocessing.normalize(pixels)

        return self._run(model, version, prepare, deadline)

    def _run(self, model: str, version: int, prepare, deadline: float | None) -> Answer:
        name = model or self.default_model
        with self.manager.lease(name, version) as loaded:
            loaded.batcher.announce()
            try:
                batch = prepare(loaded)
            except BaseException:
                loaded.batcher.withdraw()
                raise
            if deadline is not None and time.monotonic() > deadline:
                loaded.batcher.withdraw()
                raise DeadlineExceeded("the request's deadline passed while its images were decoded")
            future = loaded.batcher.submit(batch, deadline)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.05
            try:
                probabilities = future.result(timeout=wait)
            except TimeoutError:
                future.cancel()
                raise DeadlineExceeded("the request's deadline passed while it waited for inference") from None
            runtime = loaded.runtime
            runtime.images_counter.inc(len(batch))
            return Answer(runtime.name, runtime.version, probabilities, runtime.labels)

    @staticmethod
    def _top_k(answer: Answer, row: np.ndarray, k: int) -> list[Prediction]:
        labels = answer.labels
        return [Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i]))
                for i in top_k_indices(row, k)]
