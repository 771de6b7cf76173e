"""One loaded model version: an ONNX Runtime session, its labels and preprocessing."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from headswap import metrics
from headswap.errors import CorruptModel
from headswap.inference.images import Preprocessing


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    label: str
    index: int
    score: float


class ModelRuntime:
    """An ONNX Runtime session for one (model, version), reused for every request."""

    def __init__(self, name: str, version: int, path: Path, manifest: dict[str, Any], threads: int) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.labels: list[str] = list(manifest.get("labels") or [])
        self.preprocessing = Preprocessing.from_manifest(manifest)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = True
        # Spinning intra-op threads wait hot for the next op; in a server, decoding threads need
        # those cores, and spinning halved throughput under concurrent load here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CorruptModel(f"{name} version {version}: ONNX Runtime cannot load {path.name}: {err}") from err
        self.input_name = self.session.get_inputs()[0].name
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.probabilities_output = manifest.get("outputs", {}).get("probabilities", "probabilities")
        if self.probabilities_output not in outputs:
            raise CorruptModel(f"{name} version {version}: the ONNX graph has no output "
                               f"{self.probabilities_output!r} (has {sorted(outputs)})")
        self.ready = threading.Event()
        self.images_counter = metrics.IMAGES.labels(name, str(version))
        self.size_bytes = path.stat().st_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocessing.height, self.preprocessing.width, 3

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NHWC model input -> probabilities [N, classes]."""
        return self.session.run([self.probabilities_output], {self.input_name: batch})[0]

    def warm_up(self) -> None:
        """Run one real batch so the first request does not pay for lazy initialisation."""
        h, w, c = self.input_shape
        self.infer(np.zeros((1, h, w, c), dtype=np.float32))
        self.ready.set()
