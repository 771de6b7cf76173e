"""One loaded model version: an ONNX Runtime session, its labels and preprocessing."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from headswap import metrics
from headswap.errors import CorruptModel
from headswap.inference.images import Preprocessing
from headswap.inference.measured_choice import Fastest
from headswap.inference.ood import OodSpec
from headswap.inference.stats import ModelStats


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    label: str
    index: int
    score: float


_ARENA_LOCK = threading.Lock()
_arena_registered = False


def _use_shared_arena(options: ort.SessionOptions) -> None:
    """Every session allocates from one process-wide ORT arena instead of an arena each.

    Each session's arena grows to its largest batch and never shrinks; with lanes plus a lone
    session per model that was three arenas (436 MB resident for three sessions of the built-in
    model after batches 1-8, 239 MB with one shared arena). The lone session never runs beside a
    lane, so one arena peaks at what runs at once, and a swapped-in version reuses the blocks of
    the version it replaced.
    """
    global _arena_registered
    with _ARENA_LOCK:
        if not _arena_registered:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # ORT's defaults (no cap, extend by powers of two): extending by exactly what is requested
            # left more fragments behind (326 MB in the measurement above)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
            _arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


# How ONNX Runtime's intra-op threads wait between ops: "adaptive" keeps a session whose threads
# spin during a run, a candidate for requests that run alone (see `infer_lone`).
SPINNING = ("adaptive", "on", "off")


class ModelRuntime:
    """ONNX Runtime sessions for one (model, version), reused for every request.

    Lanes: `lanes` sessions, the threads split between them, run batches side by side under
    concurrent load. One small convolutional batch keeps two intra-op threads busy only part of
    the time (thread wake-ups and joins between ops), so two 1-thread sessions ran 1.02-1.37x the
    images/s of one 2-thread session on 2 cores (batch 8 to batch 1). A request that runs alone
    instead goes to `lone_session`, which has every thread (and spins, when that measures faster):
    one image runs 1.3x faster on 2 threads than on 1.
    """

    lone_session: ort.InferenceSession | None = None  # every thread, for requests that run alone
    reads_ood_output = True  # whether `infer` returns the graph's ood_score output beside the probabilities
    returns_embeddings = True  # `infer_with_embedding` works (an engine subclass may say no)
    lane_count = 1  # how many batches may run at once (`infer(batch, lane)`)
    lane_runs_on_caller = False  # each lane is a one-thread session: it runs on the thread that calls it

    def __init__(self, name: str, version: int, path: Path, manifest: dict[str, Any], threads: int,
                 spinning: str = "adaptive", lanes: int = 1, files: dict[str, Path] | None = None) -> None:
        self.name = name
        self.version = version
        self.spinning = spinning
        self.manifest = manifest
        self.files = files or {}  # the version's other verified files (`Registry.verified_extra_files`)
        self.labels: list[str] = list(manifest.get("labels") or [])
        self.preprocessing = Preprocessing.from_manifest(manifest)
        outputs = self._open(path, threads, lanes)
        self.probabilities_output = manifest.get("outputs", {}).get("probabilities", "probabilities")
        if self.probabilities_output not in outputs:
            raise CorruptModel(f"{name} version {version}: the ONNX graph has no output "
                               f"{self.probabilities_output!r} (has {sorted(outputs)})")
        # The out-of-distribution score: a second output of the same run when the graph has one
        # (fine-tunes since issue 23), else max-softmax from the probabilities (`Classifier`).
        self.ood = OodSpec.from_manifest(manifest, outputs, engine_reads_output=self.reads_ood_output)
        self._outputs = [self.probabilities_output] + ([self.ood.output] if self.ood.output else [])
        embedding = manifest.get("outputs", {}).get("embedding")
        # for RankForLabelling (`infer_with_embedding`); None where the graph or the engine has none
        self.embedding_output: str | None = embedding if self.returns_embeddings and embedding in outputs else None
        self.ready = threading.Event()
        self.images_counter = metrics.IMAGES.labels(name, str(version))
        self.stats = ModelStats(name, version)  # Triton-style statistics and latency histograms
        self.size_bytes = self.weights_bytes(path)  # for the memory budget

    def weights_bytes(self, path: Path) -> int:
        """What the weights this runtime holds take: every session has its own copy."""
        return path.stat().st_size * (self.lane_count + (self.lone_session is not None))

    def _open(self, path: Path, threads: int, lanes: int) -> list[str]:
        """Create the sessions (`lane_sessions`, `session` = lane 0, `lone_session`) and `input_name`;
        returns the output names. A runtime for another engine (OpenVINO, see `load_runtime`)
        overrides this and `infer`."""
        name, version = self.name, self.version
        lanes = max(1, min(lanes, threads))
        try:
            self.lane_sessions = [self._session(path, max(1, threads // lanes), spin=self.spinning == "on")
                                  for _ in range(lanes)]
            if lanes > 1:  # a lone request gets every thread, spinning unless told not to
                self.lone_session = self._session(path, threads, spin=self.spinning != "off")
            elif self.spinning == "adaptive":
                self.lone_session = self._session(path, threads, spin=True)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CorruptModel(f"{name} version {version}: ONNX Runtime cannot load {path.name}: {err}") from err
        self.lane_count = lanes
        self.lane_runs_on_caller = threads // lanes <= 1
        self.session = self.lane_sessions[0]
        self._lone_choice = Fastest()  # lone runs: lone_session, or lane 0 when that measures faster
        self.input_name = self.session.get_inputs()[0].name
        return [o.name for o in self.session.get_outputs()]

    def _session(self, path: Path, threads: int, spin: bool) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), self._options(threads, spin), providers=["CPUExecutionProvider"])

    @staticmethod
    def _options(threads: int, spin: bool) -> ort.SessionOptions:
        """Session options; `spin`: intra-op threads wait hot for the next op during a run.

        Spinning saves a thread wake-up per parallel op, which a lone request pays in full; under
        concurrent load the spinning threads take the cores that decoding and gRPC need (it halved
        throughput here). So a spinning session also stops spinning as soon as its run returns.
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = True
        _use_shared_arena(options)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocessing.height, self.preprocessing.width, 3

    def infer(self, batch: np.ndarray, lane: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """float32 NHWC model input -> probabilities [N, classes], on lane `lane`'s session; with an
        in-graph out-of-distribution score, (probabilities, ood_score [N]) from the same run."""
        return self._run(self.lane_sessions[lane], batch)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        results = session.run(self._outputs, {self.input_name: batch})
        return results[0] if len(results) == 1 else (results[0], results[1])

    def infer_with_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 NHWC model input -> (probabilities, embeddings), on lane 0's session, outside the
        batcher: for bulk calls (RankForLabelling), so Classify's batches stay one output."""
        if self.embedding_output is None:
            raise ValueError(f"{self.name} version {self.version} has no embedding output")
        probabilities, embeddings = self.session.run([self.probabilities_output, self.embedding_output],
                                                     {self.input_name: batch})
        return probabilities, embeddings

    def infer_lone(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """`infer` for a batch that runs while nothing else runs, is queued or is being decoded: on
        whichever of the every-thread session and lane 0 has been faster for lone runs on this
        machine (see `headswap.inference.measured_choice`)."""
        if self.lone_session is None:
            return self.infer(batch)
        option = self._lone_choice.pick()
        session = self.lone_session if option else self.session
        started = time.perf_counter_ns()
        outputs = self._run(session, batch)
        self._lone_choice.record(option, (time.perf_counter_ns() - started) / len(batch))
        return outputs

    def close(self) -> None:
        """Drop the sessions now (ORT's arenas with them), not when the last reference dies."""
        self.lane_sessions = []
        self.session = None
        self.lone_session = None

    def warm_up(self) -> None:
        """Run one real batch on every session so the first request does not pay for lazy initialisation."""
        h, w, c = self.input_shape
        zeros = np.zeros((1, h, w, c), dtype=np.float32)
        for lane in range(self.lane_count):
            outputs = self.infer(zeros, lane)
            if isinstance(outputs, tuple) and outputs[1].shape != (1,):
                raise CorruptModel(f"{self.name} version {self.version}: its out-of-distribution output "
                                   f"{self.ood.output!r} has shape {list(outputs[1].shape)} for one image; "
                                   "expected one score per image")
        if self.lone_session is not None:  # not timed: a first run pays for lazy initialisation
            self._run(self.lone_session, zeros)
        self.ready.set()


RUNTIMES = ("onnxruntime", "openvino")


def load_runtime(name: str, version: int, path: Path, manifest: dict[str, Any], threads: int,
                 spinning: str = "adaptive", lanes: int = 1, files: dict[str, Path] | None = None) -> ModelRuntime:
    """The engine a version's manifest names: ONNX Runtime (default), or OpenVINO for the bf16/int8
    precision tiers (`headswap.export.precision`), which is an optional extra of the serving install."""
    runtime = manifest.get("runtime") or "onnxruntime"
    if runtime == "onnxruntime":
        return ModelRuntime(name, version, path, manifest, threads, spinning, lanes, files)
    if runtime == "openvino":
        from headswap.inference.openvino_runtime import OpenVinoRuntime

        return OpenVinoRuntime(name, version, path, manifest, threads, files=files)
    raise CorruptModel(f"{name} version {version}: its manifest asks for runtime {runtime!r}; "
                       f"this server runs {', '.join(RUNTIMES)}")


def expected_bytes(path: Path, manifest: dict[str, Any], threads: int, lanes: int, spinning: str) -> int:
    """What loading a version will hold, known before it is loaded (for the residency bounds):
    the weights once per session, as `ModelRuntime.weights_bytes` counts them once it is loaded.
    An OpenVINO tier holds its file and an fp32 re-check copy (an estimate, on the high side)."""
    size = path.stat().st_size
    if (manifest.get("runtime") or "onnxruntime") == "openvino":
        return size * 2
    lanes = max(1, min(lanes, threads))
    return size * (lanes + (lanes > 1 or spinning == "adaptive"))
