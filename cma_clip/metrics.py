"""Classification metrics, including the catalogue's "recall at 90% precision"."""
from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over every class that occurs in the truth or the predictions."""
    if not len(y_true):
        return float("nan")
    scores = []
    for cls in np.union1d(y_true[y_true >= 0], y_pred):  # a label outside the vocabulary (< 0) is no class
        tp = np.sum((y_pred == cls) & (y_true == cls))
        fp = np.sum((y_pred == cls) & (y_true != cls))
        fn = np.sum((y_pred != cls) & (y_true == cls))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def _longest_precise_prefix(correct: np.ndarray, confidence: np.ndarray, precision: float) -> int:
    """Length of the longest confidence-sorted prefix whose precision is >= `precision`.

    A prefix never splits items of equal confidence: a confidence threshold takes all of
    them or none, so the result does not depend on the items' order."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    prefix_precision = hits / np.arange(1, len(order) + 1)
    ranked = confidence[order]
    ends = np.append(ranked[1:] != ranked[:-1], True)  # the last item of each run of equal confidence
    ok = np.nonzero((prefix_precision >= precision) & ends)[0]
    return int(ok[-1] + 1) if len(ok) else 0


def recall_at_precision(correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9) -> float:
    """Share of all labelled items that are auto-labelled correctly at the given precision.

    Sort items by top-1 confidence, take the longest prefix with precision >= `precision`,
    and divide its correct predictions by all items (../shared/data/README.md).
    """
    if not len(correct):
        return float("nan")
    k = _longest_precise_prefix(correct, confidence, precision)
    order = np.argsort(-confidence, kind="stable")
    return float(correct[order[:k]].sum() / len(correct))


def threshold_at_precision(correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9) -> float | None:
    """Lowest confidence in the longest prefix with the given precision; None when none exists."""
    k = _longest_precise_prefix(correct, confidence, precision)
    if k == 0:
        return None
    return float(np.sort(confidence)[::-1][k - 1])


def task_metrics(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray) -> dict[str, float]:
    correct = (y_true == y_pred).astype(np.float64)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "recall_at_90_precision": recall_at_precision(correct, confidence, 0.9),
        "n": int(len(y_true)),
    }


METRIC_NAMES = ("accuracy", "macro_f1", "recall_at_90_precision")


def mean_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over the tasks that have labelled items (NaN when none has)."""
    scored = [t for t in per_task.values() if t["n"] > 0]
    return {m: float(np.mean([t[m] for t in scored])) if scored else float("nan") for m in METRIC_NAMES}
