"""Classification metrics, including the catalogue's "recall at 90% precision", and the
confidence thresholds that keep a precision promise on unseen data (docs/THRESHOLDS.md)."""
from __future__ import annotations

import math

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


def _tie_aware_prefixes(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The confidence thresholds a classifier can use on these items, highest first, each with
    the number of items it accepts (confidence >= threshold) and how many of them are correct."""
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    ends = np.append(ranked[1:] != ranked[:-1], True) if len(ranked) else np.zeros(0, bool)
    hits = np.cumsum(correct[order])[ends]
    return ranked[ends], np.nonzero(ends)[0] + 1, hits


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


# ----------------------------------------------------------------------------- precision you can promise

def binomial_tail(successes, trials, p) -> np.ndarray:
    """P(X >= successes) for X ~ Binomial(trials, p), elementwise (exact: the regularised
    incomplete beta function I_p(k, n - k + 1); no scipy needed)."""
    k, n, p = np.broadcast_arrays(np.asarray(successes, float), np.asarray(trials, float), np.asarray(p, float))
    out = np.where(k <= 0, 1.0, np.where(k > n, 0.0, 0.0))
    inside = (k > 0) & (k <= n)
    if inside.any():
        out[inside] = _betainc(k[inside], n[inside] - k[inside] + 1, p[inside])
    return out


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided `level` interval of a binomial proportion: the
    proportions p whose one-sided tail probabilities of the observed count are both above
    (1 - level) / 2. (0, 1) when there are no trials."""
    k, n = int(successes), int(trials)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else _bisect(lambda p: binomial_tail(k, n, p) - tail)  # P(X >= k | low) = tail
    high = 1.0 if k == n else _bisect(lambda p: tail - (1 - binomial_tail(k + 1, n, p)))  # P(X <= k | high) = tail
    return low, high


def precision_lower_bound(successes: int, trials: int, level: float = 0.95) -> float:
    """The lower end of the exact two-sided `level` interval (a one-sided (1 + level) / 2 bound)."""
    return binomial_interval(successes, trials, level)[0]


def threshold_with_confidence(correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9,
                              level: float = 0.95) -> float | None:
    """The lowest confidence threshold t whose accepted items {confidence >= t} have a precision
    whose exact two-sided `level` interval lies wholly above `precision` (lower end >= it).

    Tie-aware like `threshold_at_precision`: t takes all items of one confidence or none.
    None when no threshold qualifies (e.g. too few items to certify the precision). Over
    unseen items of the same distribution the precision at t is then >= `precision` with
    confidence about (1 + level) / 2 per candidate; docs/THRESHOLDS.md measures what the
    choice among candidates costs."""
    correct = np.asarray(correct, float)
    confidence = np.asarray(confidence, float)
    if not len(correct):
        return None
    thresholds, accepted, hits = _tie_aware_prefixes(correct, confidence)
    # lower bound >= precision  <=>  P(X >= hits | accepted, precision) <= (1 - level) / 2
    ok = np.nonzero((hits > 0) & (binomial_tail(hits, accepted, precision) <= (1 - level) / 2))[0]
    return float(thresholds[ok[-1]]) if len(ok) else None


def operating_point(correct: np.ndarray, confidence: np.ndarray, threshold: float | None,
                    level: float = 0.95) -> dict:
    """What auto-accepting the items with confidence >= `threshold` does on these items: how
    many it accepts, their precision with its exact `level` interval (None when none is
    accepted), and the operating recall: correct auto-accepts / all labelled items."""
    correct = np.asarray(correct, float)
    accepted = np.zeros(len(correct), bool) if threshold is None else np.asarray(confidence) >= threshold
    n, hits = int(accepted.sum()), int(correct[accepted].sum())
    return {"threshold": threshold, "auto_accepted": n,
            "auto_accept_precision": hits / n if n else None,
            "auto_accept_precision_ci": list(binomial_interval(hits, n, level)) if n else None,
            "operating_recall": hits / len(correct) if len(correct) else float("nan")}


def _bisect(increasing, low: float = 0.0, high: float = 1.0, steps: int = 60) -> float:
    """The root of an increasing function on [low, high], to 2**-steps."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if increasing(mid) < 0 else (low, mid)
    return (low + high) / 2


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, elementwise: the continued fraction
    (modified Lentz), on the side of the mean where it converges fast."""
    a, b, x = (np.array(v, float, ndmin=1) for v in np.broadcast_arrays(a, b, x))
    out = np.where(x <= 0, 0.0, 1.0)
    inside = (x > 0) & (x < 1)
    if not inside.any():
        return out
    a, b, x = a[inside], b[inside], x[inside]
    swap = x > (a + 1) / (a + b + 2)
    a, b, x = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, 1 - x, x)
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    front = np.exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * np.log(x) + b * np.log1p(-x)) / a
    tiny = 1e-300
    c, d = np.ones_like(x), 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + numerator / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < 1e-15):
            break
    value = np.clip(front * h, 0.0, 1.0)
    out[inside] = np.where(swap, 1 - value, value)
    return out


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
