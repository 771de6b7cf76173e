"""Out-of-distribution scores fitted on a job's training embeddings, and their ONNX form.

A head over k classes answers with a softmax that sums to one for any image, so a photo of a cat
given to a three-defect model still gets "scratch, 0.91". A score fitted on the training
embeddings tells such images apart. The candidates (higher = further from the training data):

- `mahalanobis++` (Mueller & Hein 2025): L2-normalise the base's embedding, then the smallest
  Mahalanobis distance to a class mean under one shared covariance. With a few hundred images
  and 1280 dimensions the covariance is singular: it is shrunk (Ledoit-Wolf).
- `knn` (Sun et al. 2022): 1 - cosine similarity to the k-th nearest training embedding.
- `energy` (Liu et al. 2020): -logsumexp of the head's logits.
- `max_softmax` (the baseline every softmax gives): 1 - the largest probability.

`bench/bench_quality.py` measures them against images of other kinds; the default is the one it
picked (`DEFAULT_METHOD`). The chosen score is appended to the composed ONNX graph as a second
output, `ood_score` (`score_nodes`), so a server gets it from the same ONNX Runtime call as the
probabilities. Its threshold accepts `ACCEPTED_FRACTION` of the validation images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from headswap.inference.ood import ACCEPTED_FRACTION, MAX_SOFTMAX, OOD_OUTPUT, max_softmax_score

MAHALANOBIS = "mahalanobis++"
KNN = "knn"
ENERGY = "energy"
METHODS = (MAHALANOBIS, KNN, ENERGY, MAX_SOFTMAX)
# Measured by bench/bench_quality.py (faces vs background, against textures, digits and photos):
# see docs/ood.md for the figures.
DEFAULT_METHOD = MAHALANOBIS
KNN_K = 5
NORM_EPSILON = 1e-12
PREFIX = "headswap_ood"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), in float32 as the ONNX graph does."""
    x = np.asarray(x, np.float32)
    norm = np.sqrt(np.sum(x * x, axis=1, keepdims=True, dtype=np.float32))
    return x / np.maximum(norm, np.float32(NORM_EPSILON))


@dataclass
class OodScore:
    """One fitted score: its method and the arrays it needs (float32)."""

    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def times_precision(self, z: np.ndarray) -> np.ndarray:
        """z P, with P the full matrix or its low-rank form (`precision_factors`)."""
        if "precision" in self.arrays:
            return z @ self.arrays["precision"]
        return (z - (z @ self.arrays["basis_t"]) @ self.arrays["weights"]) * self.arrays["inverse_b"]

    def score(self, embeddings: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Scores [N], higher = less like the training data (numpy reference of `score_nodes`)."""
        if self.method == MAHALANOBIS:
            z = l2_normalise(embeddings)
            zp = self.times_precision(z)
            quadratic = np.sum(zp * z, axis=1)
            distances = quadratic[:, None] - 2.0 * (zp @ self.arrays["means_t"]) + self.arrays["mean_terms"]
            return distances.min(axis=1)
        if self.method == KNN:
            similarity = l2_normalise(embeddings) @ self.arrays["bank_t"]
            k = min(KNN_K, similarity.shape[1])
            return 1.0 - np.sort(similarity, axis=1)[:, -k]
        if self.method == ENERGY:
            top = logits.max(axis=1, keepdims=True)
            return -(top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        if self.method == MAX_SOFTMAX:
            return max_softmax_score(softmax(logits))
        raise ValueError(f"unknown OOD method {self.method!r}")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit(method: str, embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> OodScore:
    """Fit `method` on the training embeddings and their class ids."""
    if method == MAHALANOBIS:
        z = l2_normalise(embeddings).astype(np.float64)
        means = np.stack([z[labels == c].mean(axis=0) if np.any(labels == c) else np.zeros(z.shape[1])
                          for c in range(num_classes)])
        factors = {k: v.astype(np.float32) for k, v in precision_factors(z - means[labels]).items()}
        means32 = means.astype(np.float32)
        fitted = OodScore(method, {**factors, "means_t": np.ascontiguousarray(means32.T)})
        fitted.arrays["mean_terms"] = np.sum(fitted.times_precision(means32) * means32, axis=1).astype(np.float32)
        return fitted
    if method == KNN:
        return OodScore(method, {"bank_t": np.ascontiguousarray(l2_normalise(embeddings).T)})
    if method in (ENERGY, MAX_SOFTMAX):
        return OodScore(method)
    raise ValueError(f"unknown OOD method {method!r}; known: {', '.join(METHODS)}")


def _ledoit_wolf(x: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(a, b, gram) with the Ledoit-Wolf shrunk covariance = a S + b I, S = X'X / n, of already
    centred rows; gram = XX' (n < d) or X'X. The shrinkage as sklearn's `ledoit_wolf_shrinkage`
    computes it (Ledoit & Wolf 2004), from the row norms and the smaller Gram matrix: sklearn forms
    two D x D products and inverts with an eigendecomposition (20 s for 1280 dimensions on a busy
    2-core machine)."""
    n, d = x.shape
    gram = x @ x.T if n < d else x.T @ x  # same nonzero spectrum: ||X'X||_F = ||XX'||_F
    squares = np.einsum("ij,ij->i", x, x)  # ||x_k||^2
    mu = float(squares.sum()) / (n * d)  # trace(S) / d
    frobenius = float(np.sum(gram * gram)) / n ** 2  # ||S||_F^2
    beta = (float(np.sum(squares ** 2)) / n - frobenius) / (d * n)
    delta = (frobenius - 2.0 * mu * float(squares.sum()) / n + d * mu ** 2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    return 1.0 - shrinkage, shrinkage * mu, gram


def precision_factors(centred: np.ndarray) -> dict[str, np.ndarray]:
    """The shrunk covariance's inverse, in the smaller of two forms: with fewer images than half
    the dimensions (the usual fine-tune), Woodbury's identity
    (bI + (a/n) X'X)^-1 = (I - X' W) / b,  W = ((nb/a) I + XX')^-1 X,
    stored as X' [d, n], W [n, d] and 1/b (2 n d instead of d^2 numbers: 1.5 MB against 6.5 MB for 150
    images of 1280 dimensions, and as many fewer multiply-adds per image); else the d x d matrix."""
    x = np.asarray(centred, np.float64)
    n, d = x.shape
    a, b, gram = _ledoit_wolf(x)
    if 2 * n < d and a > 0.0 and b > 0.0:
        weights = np.linalg.solve(n * b / a * np.eye(n) + gram, x)
        return {"basis_t": np.ascontiguousarray(x.T), "weights": weights, "inverse_b": np.array(1.0 / b)}
    return {"precision": shrunk_precision(centred)}


def shrunk_precision(centred: np.ndarray) -> np.ndarray:
    """The inverse of the Ledoit-Wolf shrunk covariance of already centred rows (one shared
    covariance: the class means are taken out), as sklearn's `LedoitWolf(assume_centered=True)`
    gives it (tests compare the two)."""
    x = np.asarray(centred, np.float64)
    n, d = x.shape
    a, b, gram = _ledoit_wolf(x)
    if b <= 0.0:  # no shrinkage (or all-zero rows): the plain inverse, where it exists
        return np.linalg.pinv(x.T @ x / n)
    if a <= 0.0:
        return np.eye(d) / b
    if n < d:  # Woodbury: an n x n solve
        precision = (np.eye(d) - x.T @ np.linalg.solve(n * b / a * np.eye(n) + gram, x)) / b
    else:
        precision = np.linalg.inv(a * gram / n + b * np.eye(d))
    return (precision + precision.T) / 2


def threshold_for(scores: np.ndarray, accepted: float = ACCEPTED_FRACTION) -> float:
    """The score below which `accepted` of the (in-distribution) validation images fall."""
    if not len(scores):
        return float("inf")
    return float(np.quantile(np.asarray(scores, np.float64), accepted, method="higher"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve, out-of-distribution images as the positive class."""
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(truth, np.concatenate([in_scores, out_scores])))


def fpr_at_95_tpr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Fraction of out-of-distribution images accepted at the threshold that keeps 95% of the
    in-distribution ones (the usual FPR95, in-distribution as the positive class)."""
    threshold = threshold_for(in_scores, 0.95)
    return float(np.mean(np.asarray(out_scores) <= threshold))


def validation_figures(scores: np.ndarray, threshold: float, correct: np.ndarray) -> dict[str, Any]:
    """What the manifest and the job's evaluation say about the score on the validation split."""
    scores = np.asarray(scores, np.float64)
    accepted = scores <= threshold
    figures: dict[str, Any] = {
        "samples": int(len(scores)),
        "accepted_fraction": round(float(accepted.mean()), 6) if len(scores) else 0.0,
        "score_quantiles": {q: round(float(np.quantile(scores, float(q))), 6) for q in ("0.05", "0.5", "0.95")}
        if len(scores) else {},
    }
    if len(scores):
        figures["accuracy_accepted"] = round(float(correct[accepted].mean()), 6) if accepted.any() else None
        figures["accuracy_rejected"] = round(float(correct[~accepted].mean()), 6) if (~accepted).any() else None
    return figures


# --- the score as ONNX nodes -----------------------------------------------------------------


def _reduce(op: str, inputs: str, output: str, opset: int, keepdims: int) -> tuple[list[onnx.NodeProto],
                                                                                  list[onnx.TensorProto]]:
    """A Reduce* over axis 1; the axes are an input from opset 18 on (13 for ReduceSum)."""
    since = 13 if op == "ReduceSum" else 18
    if opset >= since:
        axes = f"{output}/axes"
        return ([helper.make_node(op, [inputs, axes], [output], name=output, keepdims=keepdims)],
                [numpy_helper.from_array(np.array([1], np.int64), axes)])
    return [helper.make_node(op, [inputs], [output], name=output, axes=[1], keepdims=keepdims)], []


def score_nodes(score: OodScore, embedding: str, logits: str, probabilities: str, opset: int,
                output: str = OOD_OUTPUT) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes computing `output` [N] from the graph's embedding, logits or probabilities."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), f"{PREFIX}/{name}"))
        return f"{PREFIX}/{name}"

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = name if name == output else f"{PREFIX}/{name}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(op: str, x: str, name: str, keepdims: int) -> str:
        out = name if name == output else f"{PREFIX}/{name}"
        more, consts = _reduce(op, x, out, opset, keepdims)
        nodes.extend(more)
        inits.extend(consts)
        return out

    def normalised(x: str) -> str:
        squares = reduce("ReduceSum", node("Mul", [x, x], "squares"), "sum_squares", 1)
        norm = node("Max", [node("Sqrt", [squares], "norm"), const("epsilon", np.array(NORM_EPSILON, np.float32))],
                    "norm_clipped")
        return node("Div", [x, norm], "normalised")

    if score.method == MAHALANOBIS:
        z = normalised(embedding)
        if "precision" in score.arrays:
            zp = node("MatMul", [z, const("precision", score.arrays["precision"])], "z_precision")
        else:  # (z - (z X') W) / b
            projected = node("MatMul", [z, const("basis_t", score.arrays["basis_t"])], "z_basis")
            correction = node("MatMul", [projected, const("weights", score.arrays["weights"])], "correction")
            zp = node("Mul", [node("Sub", [z, correction], "z_residual"),
                              const("inverse_b", score.arrays["inverse_b"])], "z_precision")
        quadratic = reduce("ReduceSum", node("Mul", [zp, z], "z_p_z"), "quadratic", 1)
        cross = node("MatMul", [zp, const("means_t", score.arrays["means_t"])], "cross")
        twice = node("Mul", [cross, const("two", np.array(2.0, np.float32))], "twice_cross")
        distances = node("Add", [node("Sub", [quadratic, twice], "q_minus_cross"),
                                 const("mean_terms", score.arrays["mean_terms"])], "distances")
        reduce("ReduceMin", distances, output, 0)
    elif score.method == KNN:
        similarity = node("MatMul", [normalised(embedding), const("bank_t", score.arrays["bank_t"])], "similarity")
        k = min(KNN_K, score.arrays["bank_t"].shape[1])
        values = f"{PREFIX}/topk_values"
        nodes.append(helper.make_node("TopK", [similarity, const("k", np.array([k], np.int64))],
                                      [values, f"{PREFIX}/topk_indices"], name=f"{PREFIX}/topk", axis=1))
        kth = node("Gather", [values, const("last", np.array(k - 1, np.int64))], "kth", axis=1)
        node("Sub", [const("one", np.array(1.0, np.float32)), kth], output)
    elif score.method == ENERGY:
        lse = reduce("ReduceLogSumExp", logits, "logsumexp", 0)
        node("Neg", [lse], output)
    elif score.method == MAX_SOFTMAX:
        top = reduce("ReduceMax", probabilities, "max_probability", 0)
        node("Sub", [const("one", np.array(1.0, np.float32)), top], output)
    else:
        raise ValueError(f"unknown OOD method {score.method!r}")
    return nodes, inits
