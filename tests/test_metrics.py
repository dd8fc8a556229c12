import math

import numpy as np
import pytest

from cma_clip.metrics import (METRIC_NAMES, binomial_interval, binomial_tail, effective_sizes, macro_f1,
                              mean_metrics, operating_point, precision_lower_bound, recall_at_precision,
                              task_metrics, threshold_at_precision, threshold_with_confidence)


def test_recall_at_90_precision_takes_the_longest_precise_prefix():
    # sorted by confidence: 10 correct, 1 wrong (precision 10/11 = 0.909), then 3 wrong
    confidence = np.linspace(1.0, 0.5, 14)
    correct = np.array([1] * 10 + [0] + [0] * 3, dtype=float)
    assert recall_at_precision(correct, confidence, 0.9) == 10 / 14
    assert threshold_at_precision(correct, confidence, 0.9) == confidence[10]


def test_recall_at_precision_is_order_independent_and_zero_when_never_precise():
    rng = np.random.default_rng(0)
    confidence = rng.random(50)
    correct = (rng.random(50) > 0.5).astype(float)
    perm = rng.permutation(50)
    assert recall_at_precision(correct, confidence) == recall_at_precision(correct[perm], confidence[perm])
    assert recall_at_precision(np.zeros(5), np.ones(5)) == 0.0
    assert threshold_at_precision(np.zeros(5), np.ones(5)) is None


def test_tied_confidences_are_taken_all_or_none():
    # twelve items at confidence 1.0, nine of them correct (precision 0.75), then one correct at 0.5
    confidence = np.array([1.0] * 12 + [0.5])
    for correct in (np.array([1] * 9 + [0] * 3 + [1], dtype=float), np.array([0] * 3 + [1] * 10, dtype=float)):
        assert recall_at_precision(correct, confidence, 0.9) == 0.0
        assert threshold_at_precision(correct, confidence, 0.9) is None
    # ten at 1.0 with nine correct (0.9), then two wrong at 0.8: the ten are taken, whatever their order
    confidence = np.array([1.0] * 10 + [0.8] * 2)
    for correct in (np.array([1] * 9 + [0] * 3, dtype=float), np.array([0] + [1] * 9 + [0] * 2, dtype=float)):
        assert recall_at_precision(correct, confidence, 0.9) == 9 / 12
        assert threshold_at_precision(correct, confidence, 0.9) == 1.0


def test_macro_f1_counts_every_class():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 2])  # class 1 never right, class 2 only wrong
    f1_class0 = 2 * 2 / (2 * 2 + 1 + 0)
    assert np.isclose(macro_f1(y_true, y_pred), f1_class0 / 3)


def test_the_mean_over_tasks_leaves_out_tasks_without_labelled_items():
    empty = task_metrics(np.array([], dtype=int), np.array([], dtype=int), np.array([]))
    full = task_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0.9, 0.8, 0.7]))
    mean = mean_metrics({"a": full, "b": empty})
    assert mean == {m: full[m] for m in METRIC_NAMES}
    assert all(np.isnan(v) for v in mean_metrics({"b": empty}).values())



def test_macro_f1_makes_no_class_of_labels_outside_the_vocabulary():
    y_true = np.array([0, 1, -2])  # -2: a label the model never learned; it counts as wrong
    y_pred = np.array([0, 1, 0])
    f1_class0 = 2 * 1 / (2 * 1 + 1 + 0)
    assert np.isclose(macro_f1(y_true, y_pred), (f1_class0 + 1.0) / 2)


# ----------------------------------------------------------------------------- precision you can promise

@pytest.mark.parametrize("k, n, low, high", [
    (9, 10, 0.554984, 0.997471),  # exact Clopper-Pearson values (R binom.test, scipy beta.ppf)
    (90, 100, 0.823777, 0.950995),
    (0, 10, 0.0, 0.308497),  # 1 - 0.025 ** (1 / 10)
    (10, 10, 0.691503, 1.0),  # 0.025 ** (1 / 10)
    (0, 0, 0.0, 1.0),  # nothing observed: nothing known
])
def test_the_exact_binomial_interval_matches_known_values(k, n, low, high):
    got = binomial_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-6)
    assert precision_lower_bound(k, n) == got[0]


def test_the_binomial_interval_matches_scipy_and_the_tail_matches_the_sum():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(1, 1), (35, 36), (3600, 4000), (5, 4000), (1234, 1235), (500, 1000)]:
        for level in (0.9, 0.95, 0.99):
            tail = (1 - level) / 2
            low, high = binomial_interval(k, n, level)
            assert low == pytest.approx(stats.beta.ppf(tail, k, n - k + 1) if k else 0.0, abs=1e-9)
            assert high == pytest.approx(stats.beta.ppf(1 - tail, k + 1, n - k) if k < n else 1.0, abs=1e-9)
    for k, n, p in [(9, 10, 0.9), (3, 40, 0.2), (0, 5, 0.5), (6, 5, 0.5)]:
        exact = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert float(binomial_tail(k, n, p)) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        binomial_interval(11, 10)


def test_the_bound_threshold_needs_enough_correct_items_and_takes_ties_whole():
    assert threshold_with_confidence(np.ones(10), np.linspace(1, 0.5, 10)) is None  # 10/10: bound 0.69
    assert threshold_with_confidence(np.ones(36), np.linspace(1, 0.5, 36)) == 0.5  # 36/36: bound 0.903
    tied = np.ones(100)
    assert threshold_with_confidence(np.r_[np.ones(95), np.zeros(5)], tied) is None  # 95/100: bound 0.887
    assert threshold_with_confidence(np.r_[np.ones(99), np.zeros(1)], tied) == 1.0  # 99/100: bound 0.946
    # 60 sure items all correct, then a tie of 40 holding 8 errors: the tie is taken whole or not at all
    confidence = np.r_[np.linspace(1.0, 0.9, 60), np.full(40, 0.5)]
    correct = np.r_[np.ones(60), np.ones(32), np.zeros(8)]
    assert threshold_with_confidence(correct, confidence) == pytest.approx(0.9)  # 92/100: bound 0.848
    rng = np.random.default_rng(0)
    perm = rng.permutation(100)
    assert threshold_with_confidence(correct[perm], confidence[perm]) == pytest.approx(0.9)
    assert threshold_with_confidence(np.zeros(0), np.zeros(0)) is None


def test_the_point_rule_over_promises_and_the_bound_rule_keeps_the_promise():
    """A calibrated model: confidence ~ U(0, 1), right with probability = confidence. The items
    with confidence >= t are right (1 + t) / 2 of the time, so the promise of 90% holds exactly
    when t >= 0.8. Over 200 val sets of 1000 items, the point rule breaks it about half of the
    time (58%); the bound rule in 2.5% of them, its nominal one-sided level: choosing the
    lowest certified threshold among many does not erode the bound here. The price: a
    higher threshold (median 0.89), and no threshold at all for 1 val set in 6."""
    rng = np.random.default_rng(0)
    point, bound = [], []
    for _ in range(200):
        confidence = rng.random(1000)
        correct = (rng.random(1000) < confidence).astype(float)
        point.append(threshold_at_precision(correct, confidence, 0.9))
        bound.append(threshold_with_confidence(correct, confidence, 0.9))
    point, bound = np.array(point, float), np.array(bound, float)
    assert np.mean(point < 0.8) > 0.4
    assert np.mean(bound < 0.8) < 0.05
    assert np.mean(np.isnan(bound)) < 0.25 and np.nanmedian(bound) < 0.9


def test_the_operating_point_counts_what_the_threshold_accepts():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.2])
    correct = np.array([1, 1, 0, 1, 0, 1], float)
    point = operating_point(correct, confidence, 0.8)
    assert point["threshold"] == 0.8 and point["auto_accepted"] == 4
    assert point["auto_accept_precision"] == 0.75 and point["operating_recall"] == 0.5
    assert point["auto_accept_precision_ci"] == pytest.approx(list(binomial_interval(3, 4)))
    nothing = operating_point(correct, confidence, None)
    assert nothing["auto_accepted"] == 0 and nothing["operating_recall"] == 0.0
    assert nothing["auto_accept_precision"] is None and nothing["auto_accept_precision_ci"] is None


def test_items_that_are_right_or_wrong_together_count_as_one():
    rng = np.random.default_rng(0)
    correct = rng.permutation(np.r_[np.ones(95), np.zeros(5)])
    alone = np.arange(100)
    assert effective_sizes(correct, alone) == pytest.approx(np.arange(1, 101))  # groups of one: n itself
    copies, groups = np.repeat(correct, 4), np.repeat(alone, 4)  # each item 4 times, as 4 colour variants
    assert effective_sizes(copies, groups)[-1] == pytest.approx(100)
    assert effective_sizes(np.ones(8), [0, 0, 0, 0, 1, 1, 1, 1])[-1] == 2  # no error: count the groups
    tied = np.ones(400)
    assert threshold_with_confidence(copies, tied) == 1.0  # 380 of 400 "independent" items: bound 0.918
    assert threshold_with_confidence(copies, tied, groups=groups) is None  # 95 of 100: bound 0.887
    assert threshold_with_confidence(correct, tied[:100], groups=alone) is None
    low, high = operating_point(copies, tied, 0.5, groups=groups)["auto_accept_precision_ci"]
    assert (low, high) == pytest.approx(binomial_interval(95, 100))
    assert operating_point(copies, tied, 0.5)["auto_accept_precision_ci"] == pytest.approx(
        list(binomial_interval(380, 400)))
