"""Classification use cases on top of the model manager: bytes or pixels in, top-k out.

Decoding runs in the caller's thread (one per concurrent request) while the model's batcher
runs inference, so decoding overlaps inference instead of queuing in front of it.

What a caller controls is bounded here: a request's images go to the batcher in chunks of at
most `max_batch_size` (so ONNX Runtime never sees a larger batch, and its memory is set by
configuration, not by callers), decoded image by image with the deadline and cancellation checked
between images, within a per-request pixel budget read from the headers before anything is
decoded; and at most `max_inference_calls` requests are handled at once.

ONNX Runtime's CPU arena keeps the peak of the largest batch it has run. Chunking makes that peak
the one of a `max_batch_size` batch, whatever callers send, so the arena stays on: measured here
(EfficientNet-Lite0, 2 threads), the arena at batch 8 held ~110 MB over warm-up; turning it off
saved ~40 MB but ran about 2x slower per image, and per-run arena shrinkage about 1.5x slower.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from headswap.admission import Slots
from headswap.config import Settings
from headswap.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidInput, ResourceExhausted
from headswap.inference.decoding import DecodeSlots
from headswap.inference.images import decode, pixel_count, to_pixels
from headswap.inference.manager import LoadedModel, ModelManager
from headswap.inference.batcher import Pending
from headswap.inference.rollout import ShadowInput
from headswap.inference.ood import OodSpec, max_softmax_score
from headswap.inference.runtime import Prediction
from headswap.inference.stats import RequestTiming

MAX_TOP_K = 1000
# Chunks of one request queued or running at once: enough to keep decoding and inference
# overlapped, few enough that a request's decoded pixels stay bounded.
CHUNKS_IN_FLIGHT = 2

ShouldStop = Callable[[], bool]
Chunks = Callable[[LoadedModel, Callable[[], None]], Iterator[np.ndarray]]


def top_k_indices(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties keep index order)."""
    k = min(k, row.shape[-1])
    order = np.argpartition(-row, k - 1)[:k]
    return order[np.argsort(-row[order], kind="stable")]


def check_version(version: int) -> int:
    if version < 0:
        raise InvalidInput(f"version must be 0 (the active version) or a positive version number, got {version}")
    return version


@dataclass(frozen=True)
class Answer:
    model: str
    version: int
    probabilities: np.ndarray  # [N, classes]
    labels: list[str]
    ood_scores: np.ndarray | None = None  # [N], higher = less like the version's training images
    ood: OodSpec | None = None  # how the version scores (method, threshold)

    @property
    def in_distribution(self) -> np.ndarray | None:
        """[N] bool: under the version's threshold; None when the version has none."""
        return None if self.ood is None or self.ood_scores is None else self.ood.in_distribution(self.ood_scores)


@dataclass(frozen=True)
class Embedded:
    """`Classifier.embed_encoded`'s answer: the probabilities, the embeddings, the version's other files."""

    answer: Answer
    embeddings: np.ndarray  # [N, D]
    files: dict[str, Path]  # `Registry.verified_extra_files` (a fine-tune's training set)


class Classifier:
    """Runs requests against the right model version, through its batcher."""

    def __init__(self, manager: ModelManager, settings: Settings, default_model: str) -> None:
        self.manager = manager
        self.settings = settings
        self.default_model = default_model
        # Bounds concurrent decoding: past the core count, more decoders only steal CPU from
        # inference and lengthen everyone's latency. Slots are taken per image, in arrival order.
        self._decoders = DecodeSlots(settings.decode_threads)
        # At most max_inference_calls requests at once: the rest are refused at once, never queued on
        # threads that health checks and other callers need (the pool is sized for it in server.py).
        self._calls = Slots("inference calls in progress", settings.max_inference_calls, "--max-inference-calls")

    def classify(self, images: list[bytes], top_k: int, model: str = "", version: int = 0,
                 deadline: float | None = None, should_stop: ShouldStop | None = None,
                 routing_key: str | None = None) -> tuple[Answer, list[list[Prediction]]]:
        """Encoded images -> top-k predictions per image. `routing_key`: who asks, for a rollout's
        sticky split (headswap.inference.rollout)."""
        top_k = top_k or 5
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        answer = self.infer_encoded(images, model, version, deadline, should_stop, routing_key)
        runtime_k = min(top_k, answer.probabilities.shape[-1])
        return answer, [self._top_k(answer, row, runtime_k) for row in answer.probabilities]

    def infer_pixels(self, pixels: np.ndarray, model: str = "", version: int = 0,
                     deadline: float | None = None, normalized: bool = False,
                     should_stop: ShouldStop | None = None, routing_key: str | None = None) -> Answer:
        """Already-sized NHWC pixels (uint8 0..255, or float32 model input when normalized)."""
        if pixels.ndim >= 1 and len(pixels) > self.settings.max_images_per_request:
            raise ResourceExhausted(f"{len(pixels)} images in one request; the limit is "
                                    f"{self.settings.max_images_per_request}")

        def chunks(loaded: LoadedModel, check: Callable[[], None]) -> Iterator[np.ndarray]:
            expected = loaded.runtime.input_shape
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
                raise InvalidInput(f"input shape {list(pixels.shape)} does not match the model's "
                                   f"[N, {expected[0]}, {expected[1]}, {expected[2]}]")
            step = self.settings.max_batch_size
            for start in range(0, len(pixels), step):
                check()
                part = pixels[start:start + step]
                if normalized:
                    part = np.ascontiguousarray(part, dtype=np.float32)
                    loaded.runtime.preprocessing.check_fp32(part, first_index=start)
                    yield part
                else:
                    yield loaded.runtime.preprocessing.normalize(part)

        return self._run(model, version, chunks, deadline, should_stop, routing_key)

    def infer_encoded(self, images: list[bytes], model: str = "", version: int = 0,
                      deadline: float | None = None, should_stop: ShouldStop | None = None,
                      routing_key: str | None = None) -> Answer:
        """Encoded images (JPEG, PNG, WebP, BMP) -> probabilities, decoded as the manifest says."""
        return self._run(model, version, self._encoded_chunks(images), deadline, should_stop, routing_key)

    def embed_encoded(self, images: list[bytes], model: str = "", version: int = 0, deadline: float | None = None,
                      should_stop: ShouldStop | None = None) -> "Embedded":
        """Encoded images -> probabilities and embeddings, decoded and bounded as `infer_encoded`, run
        chunk by chunk in this thread on the version's own session: a bulk call (RankForLabelling)
        that leaves Classify's batcher and its one-output batches alone."""
        return self._run(model, version, self._encoded_chunks(images), deadline, should_stop,
                         run_loaded=self._run_embedding)

    def _encoded_chunks(self, images: list[bytes]) -> Chunks:
        """The request's bounds, checked now; then its images decoded chunk by chunk, as the model takes them."""
        s = self.settings
        if not images:
            raise InvalidInput("no images in the request: send at least one encoded image")
        if len(images) > s.max_images_per_request:
            raise ResourceExhausted(f"{len(images)} images in one request; the limit is {s.max_images_per_request}")

        def chunks(loaded: LoadedModel, check: Callable[[], None]) -> Iterator[np.ndarray]:
            # Headers only: the whole request is bounded before a single pixel is decoded.
            opened: list = [decode(data, s.max_image_pixels, i) for i, data in enumerate(images)]
            sizes = [pixel_count(image) for image in opened]
            if sum(sizes) > s.max_request_pixels:
                raise ResourceExhausted(f"the request's {len(images)} images hold {sum(sizes)} pixels in all, over "
                                        f"the per-request limit of {s.max_request_pixels}; send fewer or smaller "
                                        "images")
            h, w, _ = loaded.runtime.input_shape
            for start in range(0, len(opened), s.max_batch_size):
                rows = []
                for i in range(start, min(len(opened), start + s.max_batch_size)):
                    check()  # stop within one image's decode after the deadline or a cancel
                    with self._decoders.hold(sizes[i], check):
                        rows.append(to_pixels(opened[i], h, w, i))
                    opened[i] = None  # let the decoded source go now
                yield loaded.runtime.preprocessing.normalize(np.stack(rows))

        return chunks

    def _run(self, model: str, version: int, chunks: Chunks, deadline: float | None,
             should_stop: ShouldStop | None, routing_key: str | None = None,
             run_loaded: Callable[..., Any] | None = None) -> Any:
        name = model or self.default_model
        check_version(version)

        def check() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the request's deadline passed while its images were decoded")
            if should_stop is not None and should_stop():
                raise Cancelled("the call was cancelled; its work was stopped")

        if run_loaded is not None:  # a bulk call (RankForLabelling): the version asked for, or the stable one
            return self._run_version(name, version, chunks, check, deadline, run_loaded)
        rollouts = self.manager.rollouts
        route = rollouts.route(name, version, routing_key)
        if route.rollout is None:
            return self._run_version(name, route.version, chunks, check, deadline)
        # In a rollout: the answer (or failure) counts for the version that gave it, and a mirrored
        # request's model input is kept for the shadow candidate (the caller does not wait for it).
        copy = ShadowInput()
        keep: Chunks = (lambda loaded, check: copy.passing(chunks(loaded, check))) if route.mirror else chunks
        started = time.perf_counter()
        try:
            answer = self._run_version(name, route.version, keep, check, deadline)
        except BaseException as err:
            rollouts.record(name, route, route.version or route.rollout.stable, time.perf_counter() - started, err)
            raise
        rollouts.record(name, route, answer.version, time.perf_counter() - started, None)
        if route.mirror:
            rollouts.mirror(name, route, copy, answer.probabilities)
        return answer

    def _run_version(self, name: str, version: int, chunks: Chunks, check: Callable[[], None],
                     deadline: float | None, run_loaded: Callable[..., Any] | None = None) -> Any:
        with self._calls.take(), self.manager.lease(name, version) as loaded:
            started_ns = time.perf_counter_ns()
            try:
                return (run_loaded or self._run_loaded)(loaded, chunks(loaded, check), check, deadline, started_ns)
            except BaseException:
                loaded.runtime.stats.failed(time.perf_counter_ns() - started_ns)
                raise

    @staticmethod
    def _run_loaded(loaded: LoadedModel, chunks: Iterator[np.ndarray], check: Callable[[], None],
                    deadline: float | None, started_ns: int) -> Answer:
        """Decode chunk by chunk, queue each as soon as it is ready, gather the answers in order."""
        batcher = loaded.batcher
        pending: deque[Future] = deque()
        results: list = []  # each chunk's outputs: probabilities, or (probabilities, ood scores)
        submitted: list[Pending] = []  # for the statistics: when each chunk queued and ran
        decode_ns = 0
        queued = 0  # images of this request queued so far: later chunks yield to others' first ones
        try:
            while True:
                batcher.announce()  # a chunk is being decoded: worth waiting for in the batcher
                decode_started_ns = time.perf_counter_ns()
                try:
                    chunk = next(chunks, None)
                    if chunk is not None:
                        check()
                except BaseException:
                    batcher.withdraw()
                    raise
                decode_ns += time.perf_counter_ns() - decode_started_ns
                if chunk is None:
                    batcher.withdraw()
                    break
                # a lone one-chunk request runs in this thread (no hand-offs) when the model is idle
                inline = None if submitted else batcher.run_inline(chunk)
                submitted.append(inline or batcher.submit(chunk, deadline, rank=queued))
                queued += len(chunk)
                pending.append(submitted[-1])
                while len(pending) >= CHUNKS_IN_FLIGHT:
                    results.append(Classifier._wait(pending.popleft(), deadline))
            while pending:
                results.append(Classifier._wait(pending.popleft(), deadline))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        runtime = loaded.runtime
        if isinstance(results[0], tuple):
            probabilities = np.concatenate([r[0] for r in results]) if len(results) > 1 else results[0][0]
            scores = np.concatenate([r[1] for r in results]) if len(results) > 1 else results[0][1]
        else:
            probabilities = results[0] if len(results) == 1 else np.concatenate(results)
            scores = max_softmax_score(probabilities)
        runtime.images_counter.inc(len(probabilities))
        done_ns = time.perf_counter_ns()
        runtime.stats.succeeded(len(probabilities), RequestTiming(
            decode_ns=decode_ns, queue_ns=sum(f.infer_started_ns - f.queued_ns for f in submitted),
            infer_ns=sum(f.infer_done_ns - f.infer_started_ns for f in submitted),
            output_ns=done_ns - submitted[-1].infer_done_ns, total_ns=done_ns - started_ns))
        return Answer(runtime.name, runtime.version, probabilities, runtime.labels, scores,
                      getattr(runtime, "ood", None))

    @staticmethod
    def _run_embedding(loaded: LoadedModel, chunks: Iterator[np.ndarray], check: Callable[[], None],
                       deadline: float | None, started_ns: int) -> "Embedded":
        """`embed_encoded`'s inference: each chunk through the runtime's two outputs, in this thread."""
        runtime = loaded.runtime
        if runtime.embedding_output is None:
            reason = ("it is a bf16/int8 tier, whose engine gives no embeddings; ask for an fp32 version"
                      if not runtime.returns_embeddings else "its ONNX graph has no embedding output")
            raise FailedPrecondition(f"{runtime.name} version {runtime.version} cannot rank images: {reason}")
        probabilities, embeddings = [], []
        for chunk in chunks:
            check()
            p, e = runtime.infer_with_embedding(chunk)
            probabilities.append(p)
            embeddings.append(e.reshape(len(e), -1))
        runtime.images_counter.inc(sum(len(p) for p in probabilities))
        return Embedded(Answer(runtime.name, runtime.version, np.concatenate(probabilities), runtime.labels),
                        np.concatenate(embeddings), dict(runtime.files))

    @staticmethod
    def _wait(future: Future, deadline: float | None) -> np.ndarray:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.05
        try:
            return future.result(timeout=wait)
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded("the request's deadline passed while it waited for inference") from None

    @staticmethod
    def _top_k(answer: Answer, row: np.ndarray, k: int) -> list[Prediction]:
        labels = answer.labels
        return [Prediction(labels[i] if i < len(labels) else str(i), int(i), float(row[i]))
                for i in top_k_indices(row, k)]
