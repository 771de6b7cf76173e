"""What a served version says about out-of-distribution images, read from its manifest.

A fine-tuned version published since issue 23 carries `manifest["ood"]`: the method fitted on its
training embeddings (`headswap.training.ood`), the name of the ONNX output that computes it, and a
threshold that accepts 95% of its validation images. Every other version (zero-shot ImageNet
models, versions published before, precision tiers run by OpenVINO) scores with max-softmax,
1 - the largest probability, computed here from the probabilities, and says so; it has a
threshold only when its manifest measured one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OOD_OUTPUT = "ood_score"
MAX_SOFTMAX = "max_softmax"
ACCEPTED_FRACTION = 0.95


def max_softmax_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - the largest probability per row: the baseline score any classifier has."""
    return (1.0 - probabilities.max(axis=1)).astype(np.float32)


@dataclass(frozen=True)
class OodSpec:
    """How a version scores images: method, ONNX output (None: max-softmax here), threshold."""

    method: str
    output: str | None
    threshold: float | None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], graph_outputs: list[str] | None = None,
                      engine_reads_output: bool = True) -> "OodSpec":
        """The version's score; max-softmax when its manifest names none, or when the output it names
        is not in the graph or not read by the engine (OpenVINO tiers)."""
        ood = manifest.get("ood") or {}
        output = ood.get("output")
        threshold = ood.get("threshold")
        threshold = float(threshold) if isinstance(threshold, (int, float)) and np.isfinite(threshold) else None
        if output and engine_reads_output and (graph_outputs is None or output in graph_outputs):
            return cls(str(ood.get("method") or "unknown"), str(output), threshold)
        if ood.get("method") == MAX_SOFTMAX:
            return cls(MAX_SOFTMAX, None, threshold)
        return cls(MAX_SOFTMAX, None, None)

    @classmethod
    def for_manifest(cls, manifest: dict[str, Any]) -> "OodSpec":
        """What a server will return for this version, known from its manifest alone (the graph is
        checked when it is loaded): OpenVINO tiers read only the probabilities."""
        return cls.from_manifest(manifest, engine_reads_output=(manifest.get("runtime") or "onnxruntime")
                                 == "onnxruntime")

    def describe(self) -> dict[str, Any]:
        """For model metadata: the method, the threshold (None: not calibrated), where it runs."""
        return {"method": self.method, "threshold": self.threshold, "in_graph": self.output is not None,
                "calibrated": self.threshold is not None}

    def in_distribution(self, scores: np.ndarray) -> np.ndarray | None:
        """Per image: at or under the threshold; None when the version has no threshold."""
        return None if self.threshold is None else scores <= self.threshold
