"""A job's evaluation as plain aligned tables (`headswap jobs JOB_ID`): what a person reads before
activating a version. Plain text: the serving install has no table library."""

from __future__ import annotations

from typing import Any, Sequence

LABEL_WIDTH = 30
MAX_MATRIX_CLASSES = 20  # wider confusion matrices do not fit a terminal: `--json` has them whole


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Columns as wide as their widest cell; the first left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [value.rjust(width) for value, width in zip(row[1:], widths[1:])]
        lines.append(indent + "  ".join(parts).rstrip())
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _label(text: str) -> str:
    return text if len(text) <= LABEL_WIDTH else text[:LABEL_WIDTH - 1] + "…"


def evaluation_lines(metrics: dict[str, Any], version: int = 0) -> list[str]:
    """The evaluation tables for a job's metrics (empty when the job has none yet)."""
    if "val_accuracy" not in metrics:
        return []
    lines = [f"evaluation on the validation split ({metrics.get('num_val', 0)} images; trained on "
             f"{metrics.get('num_train', 0)})"]
    lines += table(["", "value"], [["accuracy", metrics.get("val_accuracy")],
                                   ["expected calibration error", metrics.get("expected_calibration_error")]])
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += ["", "per class"]
        lines += table(["class", "precision", "recall", "support"],
                       [[_label(label), f["precision"], f["recall"], f["support"]]
                        for label, f in list(per_class.items())[:50]])
    labels = list(per_class)
    matrix = metrics.get("confusion_matrix") or []
    if matrix and len(labels) == len(matrix) <= MAX_MATRIX_CLASSES:
        lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
        short = [_label(label)[:12] for label in labels]
        lines += table(["true \\ predicted", *short], [[_label(label), *row] for label, row in zip(labels, matrix)])
    ood = metrics.get("ood") or {}
    if ood:
        figures = ood.get("validation") or {}
        quantiles = figures.get("score_quantiles") or {}
        threshold = ood.get("threshold")
        lines += ["", f"out-of-distribution score: {ood.get('method')}, threshold "
                      f"{'-' if threshold is None else f'{threshold:.6g}'} (set to accept "
                      f"{ood.get('target_accepted_fraction', 0.95):.0%} of validation images)"]
        lines += table(["validation images", "accepted", "accuracy accepted", "accuracy rejected", "score p5",
                        "p50", "p95"],
                       [[figures.get("samples", 0), figures.get("accepted_fraction"), figures.get("accuracy_accepted"),
                         figures.get("accuracy_rejected"), quantiles.get("0.05"), quantiles.get("0.5"),
                         quantiles.get("0.95")]])
    comparison = metrics.get("comparison") or {}
    if comparison:
        lines += [""]
        if not comparison.get("available"):
            lines.append(f"against the active version: not compared ({comparison.get('reason', 'unknown')})")
        else:
            active = comparison["active_version"]
            lines.append(f"against the active version {active} on the same {comparison['samples']} validation "
                         f"images ({comparison.get('how', '')})")
            new, old = comparison["new"], comparison["active"]
            lines += table(["version", "accuracy", "calibration error"],
                           [[f"new{f' (v{version})' if version else ''}", new["accuracy"],
                             new["expected_calibration_error"]],
                            [f"active (v{active})", old["accuracy"], old["expected_calibration_error"]]])
            lines.append(f"  fixed {comparison['fixed']} (wrong before, right now), broken {comparison['broken']} "
                         f"(right before, wrong now), {comparison['disagreements']} answers differ")
    return lines
