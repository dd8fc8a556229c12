import numpy as np

from cma_clip.metrics import (METRIC_NAMES, macro_f1, mean_metrics, recall_at_precision, task_metrics,
                             threshold_at_precision)


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
