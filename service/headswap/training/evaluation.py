"""A job's evaluation beyond accuracy: calibration, the out-of-distribution score on the validation
split, and how the new version compares with the model's active one on the same images.

Users decide from it whether to activate a version (`headswap jobs JOB_ID` prints it as tables):
its figures are all measured on the job's own validation split.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from headswap.inference.ood import ACCEPTED_FRACTION, MAX_SOFTMAX, OOD_OUTPUT, max_softmax_score
from headswap.registry.registry import Registry
from headswap.training import ood
from headswap.training.ood import OodScore

log = logging.getLogger(__name__)

CALIBRATION_BINS = 15
COMPARISON_IMAGES = 512  # validation images the active version runs on when it needs whole images


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE (Guo et al. 2017): |accuracy - confidence| per confidence bin, weighted by the bin's share."""
    if not len(y_true):
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def head_logits(layers: list, x: np.ndarray) -> np.ndarray:
    """The composed head's pre-softmax output in numpy (same layers as `compose.head_nodes`)."""
    out = np.asarray(x, np.float32)
    for layer in layers:
        out = out @ layer.kernel + layer.bias
        if layer.activation == "relu":
            out = np.maximum(out, 0)
    return out


def fit_ood(head: Any, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            val_probabilities: np.ndarray, num_classes: int) -> tuple[OodScore | None, dict[str, Any]]:
    """The score to put in the composed graph (None: max-softmax, computed by the server) and the
    manifest's `ood` entry: method, output, threshold at 95% of validation images, their figures."""
    correct = val_probabilities.argmax(axis=1) == y_val
    if head is not None:
        from headswap.training import compose

        fitted = ood.fit(ood.DEFAULT_METHOD, x_train, y_train, num_classes)
        scores = fitted.score(x_val, head_logits(compose.dense_layers_of(head), x_val))
        output: str | None = OOD_OUTPUT
    else:
        fitted, scores, output = None, max_softmax_score(val_probabilities), None
    threshold = ood.threshold_for(scores, ACCEPTED_FRACTION)
    threshold_value = threshold if np.isfinite(threshold) else None
    entry = {"method": fitted.method if fitted is not None else MAX_SOFTMAX, "output": output,
             "threshold": threshold_value, "target_accepted_fraction": ACCEPTED_FRACTION,
             "fitted_on": {"training_images": int(len(x_train)), "embedding": "base"} if fitted is not None else {},
             "validation": ood.validation_figures(scores, threshold, correct)}
    return fitted, entry


def compare_with_active(registry: Registry, name: str, labels: list[str], base_manifest: dict[str, Any],
                        x_val: np.ndarray, y_val: np.ndarray, val_probabilities: np.ndarray,
                        pixels: Callable[[np.ndarray], np.ndarray], val_positions: np.ndarray) -> dict[str, Any]:
    """The new version against the model's active version on the same validation images, when that
    version has the same classes in the same order. Never fails the job: a comparison that cannot
    run says why."""
    try:
        active = registry.active_version(name)
    except Exception as err:  # the model store's own errors: the job still publishes
        return {"available": False, "reason": f"the active version could not be read: {err}"}
    if active is None:
        return {"available": False, "reason": f"{name} has no active version yet"}
    try:
        path, manifest = registry.verified_fp32_path(name, active)
        if list(manifest.get("labels") or []) != list(labels):
            return {"available": False, "active_version": active,
                    "reason": f"version {active} has other classes ({len(manifest.get('labels') or [])})"}
        if manifest.get("preprocessing") != base_manifest.get("preprocessing") or \
                (manifest.get("input") or {}) != (base_manifest.get("input") or {}):
            return {"available": False, "active_version": active,
                    "reason": f"version {active} takes its images another way (input size or preprocessing)"}
        if not len(y_val):
            return {"available": False, "active_version": active, "reason": "no validation images"}
        active_probabilities, rows = _active_probabilities(path, manifest, base_manifest, x_val, pixels,
                                                           val_positions)
    except Exception as err:
        log.warning("comparison with %s version %s failed: %s", name, active, err)
        return {"available": False, "active_version": active, "reason": f"version {active} could not run: {err}"}
    y, new = y_val[rows], val_probabilities[rows]
    new_pred, old_pred = new.argmax(axis=1), active_probabilities.argmax(axis=1)
    return {
        "available": True, "active_version": int(active), "samples": int(len(rows)),
        "how": "its head on the same embeddings" if _same_base(manifest, base_manifest)
        else "the whole version on the validation images",
        "new": {"accuracy": round(float((new_pred == y).mean()), 6),
                "expected_calibration_error": round(expected_calibration_error(new, y), 6)},
        "active": {"accuracy": round(float((old_pred == y).mean()), 6),
                   "expected_calibration_error": round(expected_calibration_error(active_probabilities, y), 6)},
        "fixed": int(np.sum((new_pred == y) & (old_pred != y))),  # wrong before, right now
        "broken": int(np.sum((new_pred != y) & (old_pred == y))),  # right before, wrong now
        "disagreements": int(np.sum(new_pred != old_pred)),
    }


def _same_base(manifest: dict[str, Any], base_manifest: dict[str, Any]) -> bool:
    export = manifest.get("export") or {}
    return export.get("method") == "composed" and export.get("base_sha256") == base_manifest.get("sha256")


def _active_probabilities(path: Any, manifest: dict[str, Any], base_manifest: dict[str, Any], x_val: np.ndarray,
                          pixels: Callable[[np.ndarray], np.ndarray], val_positions: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The active version's probabilities and the validation rows they are for: its head alone on
    the cached embeddings when it was composed on the same base, else the whole model on (at most
    COMPARISON_IMAGES of) the validation images."""
    import onnx
    import onnxruntime as ort

    from headswap.training import compose

    output = (manifest.get("outputs") or {}).get("probabilities", compose.PROBABILITIES)
    if _same_base(manifest, base_manifest):
        head = compose.head_only(onnx.load(str(path)), output)
        session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run([output], {compose.EMBEDDING: x_val})[0], np.arange(len(x_val))
    rows = np.arange(len(val_positions))
    if len(rows) > COMPARISON_IMAGES:
        rows = np.linspace(0, len(rows) - 1, COMPARISON_IMAGES).round().astype(int)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = pixels(val_positions[rows])
    input_name = session.get_inputs()[0].name
    out = np.concatenate([session.run([output], {input_name: images[i:i + 32]})[0] for i in range(0, len(images), 32)])
    return out, rows
