"""OpenVINO as the engine of the fast precision tiers (bf16, int8): measured faster than ONNX Runtime
on an AVX-512 BF16/VNNI CPU (see `headswap.export.precision`).

OpenVINO is an optional extra of the serving install (`pip install 'headswap[openvino]'`): a server
without it refuses such a version with a message that says so (the previous version keeps serving)
rather than serving it slowly in fp32. The export's accuracy gate compiles the model through
`compile_model` here too, and applies the same re-check rule (`needs_recheck`), so the figures in
the manifest come from what the server runs.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from headswap import metrics
from headswap.errors import CorruptModel, shown_name
from headswap.inference.measured_choice import Fastest
from headswap.inference.runtime import ModelRuntime
from headswap.registry.registry import RECHECK_FILE

INSTALL_HINT = "install the serving extra with pip install 'headswap[openvino]'"
# The OpenVINO inference precision behind each tier. int8 is carried by the QDQ nodes of the file;
# f32 keeps whatever the graph does not quantize in full precision.
INFERENCE_PRECISION = {"bf16": "bf16", "int8": "f32"}


def top1_lead(probabilities: np.ndarray) -> np.ndarray:
    """Per row: the top-1 probability minus the runner-up's."""
    top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def needs_recheck(probabilities: np.ndarray, margin: float) -> np.ndarray:
    """Rows whose top-1 leads by no more than `margin`: near ties that a tier runs again in fp32
    (see `headswap.export.precision`). A negative margin re-checks nothing."""
    return top1_lead(probabilities) <= margin


class OpenVinoMissing(CorruptModel):
    """A version that needs OpenVINO on a server that does not have it."""


def import_openvino() -> Any:
    """The openvino module, or OpenVinoMissing with what to install."""
    try:
        import openvino
    except ImportError as err:
        raise OpenVinoMissing(f"OpenVINO is not installed ({err}); {INSTALL_HINT}") from None
    return openvino


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin reports it can run natively here (e.g. FP32, BF16, INT8)."""
    openvino = import_openvino()
    return [str(c) for c in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def compile_model(path: Path, precision: str, threads: int) -> Any:
    """Compile an ONNX file for the CPU at the tier's precision, one stream of `threads` threads.
    One stream: the dynamic batcher already gathers concurrent requests into one call."""
    if precision not in INFERENCE_PRECISION:
        raise CorruptModel(f"precision {precision!r} has no OpenVINO setting; "
                           f"expected one of {', '.join(INFERENCE_PRECISION)}")
    openvino = import_openvino()
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "NUM_STREAMS": "1",
              "PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OpenVinoRuntime(ModelRuntime):
    """A compiled OpenVINO model for one (model, version); same interface as the ONNX Runtime one."""

    recheck_session: Any = None  # fp32 (ONNX Runtime) on every thread, for near ties and lone batches
    recheck_path: Path | None = None  # the file the fp32 sessions run
    _fp32_halves: tuple[Any, ...] = ()  # two 1-thread fp32 sessions, for batches answered in fp32
    _helper: ThreadPoolExecutor | None = None  # runs the second half
    reads_ood_output = False  # `infer` returns probabilities only: the score is max-softmax
    returns_embeddings = False  # RankForLabelling asks the fp32 version instead

    def _open(self, path: Path, threads: int, lanes: int) -> list[str]:
        """One compiled model and one lane: OpenVINO's stream runs every thread on each batch."""
        precision = str(self.manifest.get("precision") or "")
        try:
            import_openvino()
        except OpenVinoMissing as err:
            raise OpenVinoMissing(f"{self.name} version {self.version} is a {precision or 'non-fp32'} tier that "
                                  f"runs in OpenVINO, and {err}; or activate an fp32 version") from None
        try:
            self.session = compile_model(path, precision, threads)
        except CorruptModel as err:
            raise CorruptModel(f"{self.name} version {self.version}: {err}") from None
        except Exception as err:  # OpenVINO raises RuntimeError for unreadable or unsupported files
            raise CorruptModel(f"{self.name} version {self.version}: OpenVINO cannot load {path.name}: {err}") from err
        self.input_name = self.session.inputs[0].get_any_name()
        self._request = self.session.create_infer_request()
        self._lock = threading.Lock()  # an infer request runs one call at a time
        outputs = [name for output in self.session.outputs for name in output.get_names()]
        self._open_recheck(path, threads)
        return outputs

    def _open_recheck(self, path: Path, threads: int) -> None:
        """The fp32 sessions that answer near ties and whole fp32 batches (manifest `recheck`): on the
        same file for bf16, on the fp32 file beside it (RECHECK_FILE) for int8. They run under the
        same lock as OpenVINO, so the two never compete for the threads (see `infer`)."""
        recheck = self.manifest.get("recheck") or {}
        margin = recheck.get("margin", -1.0) if isinstance(recheck, dict) else None
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not -1.0 <= margin <= 1.0:
            raise CorruptModel(f"{self.name} version {self.version}: its manifest's recheck margin must be a number "
                               f"from -1 (no re-check) to 1, got {shown_name(str(margin))}")
        self.recheck_margin = float(margin)
        if "margin" not in recheck:
            return
        fp32_path = self.files.get(RECHECK_FILE) or (path if self.manifest.get("precision") == "bf16" else None)
        if fp32_path is None:
            raise CorruptModel(f"{self.name} version {self.version}: its manifest asks for a re-check in fp32, but "
                               f"the version has no fp32 file ({RECHECK_FILE}) to re-check on")
        self._recheck_choice = Fastest(rare_factor=1)  # 0: the tier + re-check of near ties; 1: fp32
        self.fp32_counters = {reason: metrics.TIER_FP32_IMAGES.labels(self.name, str(self.version), reason)
                              for reason in ("near tie", "whole batch")}
        try:
            self.recheck_session = self._session(fp32_path, threads, spin=False)
            self.recheck_input = self.recheck_session.get_inputs()[0].name
            if threads >= 2:  # several images: halves side by side, as the fp32 tier's lanes run them
                self._fp32_halves = tuple(self._session(fp32_path, 1, spin=False) for _ in range(2))
                self._helper = ThreadPoolExecutor(1, thread_name_prefix=f"fp32-half-{self.name}")
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CorruptModel(f"{self.name} version {self.version}: ONNX Runtime cannot load {fp32_path.name} "
                               f"for the fp32 re-check: {err}") from err
        self.recheck_path = fp32_path

    @property
    def session(self) -> Any:
        """The compiled model; setting None (the manager's unload) also drops the infer request's buffers."""
        return self._compiled

    @session.setter
    def session(self, compiled: Any) -> None:
        self._compiled = compiled
        if compiled is None:
            self._request = None

    def weights_bytes(self, path: Path) -> int:
        fp32_sessions = (self.recheck_session is not None) + len(self._fp32_halves)
        fp32_bytes = self.recheck_path.stat().st_size if self.recheck_path is not None else 0
        return path.stat().st_size + fp32_bytes * fp32_sessions

    def warm_up(self) -> None:
        """First runs pay for lazy initialisation: made here, and not timed for the re-check choice."""
        zeros = np.zeros((1, *self.input_shape), np.float32)
        with self._lock:
            self._infer_tier(zeros)
            if self.recheck_session is not None:
                self._infer_fp32(zeros)
                self._infer_fp32(np.zeros((2, *self.input_shape), np.float32))  # the halves
        self.ready.set()

    def close(self) -> None:
        self.recheck_session = None
        self._fp32_halves = ()
        if self._helper is not None:
            self._helper.shutdown(wait=False)
        super().close()

    def infer(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        """float32 NHWC model input -> probabilities [N, classes] (a copy: the request reuses its buffers).

        With a re-check: the tier, its near ties run again in fp32; or, while that measures slower (when
        many images are near ties), the whole batch in fp32, which gives fp32's answers outright."""
        with self._lock:
            if self.recheck_session is None:
                return self._infer_tier(batch)
            option = self._recheck_choice.pick()
            started = time.perf_counter_ns()
            if option == 0:
                probabilities = self._infer_tier(batch)
                rows = np.flatnonzero(needs_recheck(probabilities, self.recheck_margin))
                if rows.size:
                    probabilities[rows] = self._infer_fp32(np.ascontiguousarray(batch[rows]))
                    self.fp32_counters["near tie"].inc(rows.size)
            else:
                probabilities = self._infer_fp32(batch)
                self.fp32_counters["whole batch"].inc(len(batch))
            self._recheck_choice.record(option, (time.perf_counter_ns() - started) / len(batch))
            return probabilities

    def _infer_tier(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({self.input_name: batch})
        return np.array(result[self.probabilities_output], dtype=np.float32, copy=True)

    def _infer_fp32(self, batch: np.ndarray) -> np.ndarray:
        """fp32 answers: one image on every thread; more split in two halves run side by side on
        1-thread sessions (two 1-thread sessions ran 1.0-1.3x one 2-thread session here)."""
        if len(batch) < 2 or not self._fp32_halves:
            return self.recheck_session.run([self.probabilities_output], {self.recheck_input: batch})[0]
        half = len(batch) // 2
        second = self._helper.submit(self._fp32_halves[1].run, [self.probabilities_output],
                                     {self.recheck_input: batch[half:]})
        first = self._fp32_halves[0].run([self.probabilities_output], {self.recheck_input: batch[:half]})[0]
        return np.concatenate([first, second.result()[0]])
