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


def _tie_aware_prefixes(correct: np.ndarray, confidence: np.ndarray,
                        groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The confidence thresholds a classifier can use on these items, highest first, each with
    the number of items it accepts (confidence >= threshold), how many of them are correct,
    and their effective number (`effective_sizes`; the number itself without `groups`)."""
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    ends = np.append(ranked[1:] != ranked[:-1], True) if len(ranked) else np.zeros(0, bool)
    hits = np.cumsum(correct[order])[ends]
    accepted = np.nonzero(ends)[0] + 1
    effective = accepted.astype(float) if groups is None else effective_sizes(correct[order], groups[order])[ends]
    return ranked[ends], accepted, hits, effective


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

def binomial_tail(successes, trials, p):
    """P(X >= successes) for X ~ Binomial(trials, p), elementwise over arrays (a float for
    scalars). Exact: the regularised incomplete beta function I_p(k, n - k + 1); no scipy."""
    k, n, p = np.broadcast_arrays(np.asarray(successes, float), np.asarray(trials, float), np.asarray(p, float))
    out = np.array([_tail(*args) for args in zip(k.ravel(), n.ravel(), p.ravel())], float).reshape(k.shape)
    return float(out) if out.ndim == 0 else out


def binomial_interval(successes: float, trials: float, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided `level` interval of a binomial proportion: the
    proportions p whose one-sided tail probabilities of the observed count are both above
    (1 - level) / 2; (0, 1) when there are no trials. Non-integer counts are an effective
    sample (Korn & Graubard 1998; see `effective_sizes`): the Beta quantiles extend to them."""
    k, n = float(successes), float(trials)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else _bisect(lambda p: _tail(k, n, p) - tail)  # P(X >= k | low) = tail
    high = 1.0 if k == n else _bisect(lambda p: tail - _beta_cdf_upper(k, n, p))  # P(X <= k | high) = tail
    return low, high


def precision_lower_bound(successes: float, trials: float, level: float = 0.95) -> float:
    """The lower end of the exact two-sided `level` interval (a one-sided (1 + level) / 2 bound)."""
    return binomial_interval(successes, trials, level)[0]


def effective_sizes(correct: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For each prefix of the items (in the order given), its effective number of independent
    items: n / max(1, design effect), the design effect being the cluster-robust variance of
    the prefix's precision over the binomial one (Korn & Graubard 1998). Items of one group
    (e.g. colour variants of one product, which share their text) tend to be right or wrong
    together, so they count for less than as many independent items; groups of one item give
    n itself. A prefix with a single group, or without an error or without a right item
    (which shows no variance to measure the design effect by), counts its groups."""
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    size = int(group.max()) + 1 if len(group) else 0
    n_g, k_g = [0.0] * size, [0.0] * size
    snn = skk = skn = hits = 0.0
    clusters = 0
    out = np.empty(len(group))
    for i, (g, c) in enumerate(zip(group.ravel().tolist(), np.asarray(correct, float).tolist())):
        snn += 2 * n_g[g] + 1  # running sums over the groups of n_g^2, k_g^2 and k_g n_g
        skk += 2 * k_g[g] * c + c * c
        skn += k_g[g] + c * n_g[g] + c
        clusters += n_g[g] == 0
        n_g[g] += 1
        k_g[g] += c
        hits += c
        n = i + 1
        p = hits / n
        variance = (skk - 2 * p * skn + p * p * snn) / (n * n)  # of the ratio p, between groups
        if not 0 < p < 1 or clusters < 2 or variance <= 0:
            out[i] = clusters
        else:
            out[i] = min(n, p * (1 - p) / variance)
    return out


def threshold_with_confidence(correct: np.ndarray, confidence: np.ndarray, precision: float = 0.9,
                              level: float = 0.95, groups: np.ndarray | None = None) -> float | None:
    """The lowest confidence threshold t whose accepted items {confidence >= t} have a precision
    whose exact two-sided `level` interval lies wholly above `precision` (lower end >= it).
    With `groups` (one label per item: items of a group are right or wrong together more
    often than chance), the interval is over the effective sample (`effective_sizes`).

    Tie-aware like `threshold_at_precision`: t takes all items of one confidence or none.
    None when no threshold qualifies (e.g. too few items to certify the precision). Over
    unseen items of the same distribution the precision at t is then >= `precision` with
    confidence about (1 + level) / 2; docs/THRESHOLDS.md measures it."""
    correct = np.asarray(correct, float)
    confidence = np.asarray(confidence, float)
    if not len(correct):
        return None
    thresholds, accepted, hits, effective = _tie_aware_prefixes(correct, confidence,
                                                                None if groups is None else np.asarray(groups))
    tail = (1 - level) / 2
    for i in range(len(thresholds) - 1, -1, -1):  # the lowest threshold first
        # lower bound >= precision  <=>  P(X >= k | n, precision) <= tail, over the effective n and
        # k = n * hits / accepted; it needs hits / accepted > precision
        n = effective[i]
        if hits[i] > precision * accepted[i] and _tail(n * hits[i] / accepted[i], n, precision) <= tail:
            return float(thresholds[i])
    return None


def operating_point(correct: np.ndarray, confidence: np.ndarray, threshold: float | None,
                    level: float = 0.95, groups: np.ndarray | None = None) -> dict:
    """What auto-accepting the items with confidence >= `threshold` does on these items: how
    many it accepts, their precision with its exact `level` interval (None when none is
    accepted; over the effective sample with `groups`, as `threshold_with_confidence`), and
    the operating recall: correct auto-accepts / all labelled items."""
    correct = np.asarray(correct, float)
    accepted = np.zeros(len(correct), bool) if threshold is None else np.asarray(confidence) >= threshold
    n, hits = int(accepted.sum()), int(correct[accepted].sum())
    interval = None
    if n:
        effective = n if groups is None else float(effective_sizes(correct[accepted], np.asarray(groups)[accepted])[-1])
        interval = list(binomial_interval(effective * hits / n, effective, level))
    return {"threshold": threshold, "auto_accepted": n,
            "auto_accept_precision": hits / n if n else None,
            "auto_accept_precision_ci": interval,
            "operating_recall": hits / len(correct) if len(correct) else float("nan")}


def _bisect(increasing, low: float = 0.0, high: float = 1.0, steps: int = 60) -> float:
    """The root of an increasing function on [low, high], to 2**-steps."""
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if increasing(mid) < 0 else (low, mid)
    return (low + high) / 2


def _tail(k: float, n: float, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): I_p(k, n - k + 1), also for non-integer k and n."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return _betainc(k, n - k + 1, p)


def _beta_cdf_upper(k: float, n: float, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): 1 - I_p(k + 1, n - k), also for non-integer k and n."""
    return 1.0 - _betainc(k + 1, n - k, p)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0: its continued fraction (modified
    Lentz), on the side of the mean where it converges fast (Numerical Recipes, 6.4)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        step = 1.0
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = d * c
            h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return min(max(front * h, 0.0), 1.0)


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
