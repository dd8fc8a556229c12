"""The lab's linear late-fusion baseline and probability ensembles (cma_clip/lab/late_ensembles.py)."""
import numpy as np
import pytest

from cma_clip.lab.late_ensembles import linear_probabilities, mixed, run


def test_linear_probabilities_cover_the_checkpoint_classes_in_its_order():
    from scipy import sparse

    rng = np.random.default_rng(0)
    target = np.array([0, 2, 0, 2, -1, 0, 2, -2] * 6)  # class 1 never seen in train; -1 missing, -2 unknown
    design = sparse.csr_matrix(np.eye(3)[np.clip(target, 0, 2)] + rng.normal(0, 0.1, (len(target), 3)))
    splits = {"train": np.arange(0, 32), "val": np.arange(32, 40), "test": np.arange(40, 48)}
    probs = linear_probabilities(design, {"t": target}, {"t": ["a", "b", "c"]}, splits, log=lambda _: None)["t"]
    assert probs.shape == (48, 3)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.all(probs[:, 1] == 0)  # a class without training rows gets no probability
    known = target >= 0
    assert np.mean(probs[known].argmax(1) == target[known]) > 0.9  # columns in the vocabulary's order


def test_mixed_is_the_weighted_mean():
    a, b = {"t": np.array([[1.0, 0.0]])}, {"t": np.array([[0.0, 1.0]])}
    assert np.allclose(mixed([a, b], [0.75, 0.25])["t"], [[0.75, 0.25]])


def test_every_method_is_scored_on_test_with_thresholds_from_val(small_checkpoint, cache_dir, tmp_path, capsys):
    kept = tmp_path / "linear.npz"
    doc = run([small_checkpoint, small_checkpoint], cache_dir=str(cache_dir), linear_file=kept, log=lambda _: None)
    reports = doc["methods"]
    assert len(reports) == 5  # each checkpoint, linear, their mean, mean + linear
    single, ensemble = reports[f"checkpoint 1 ({small_checkpoint})"], reports["mean of 2 checkpoints"]
    for report in reports.values():
        assert report["tasks"].keys() == single["tasks"].keys()
        for figures in report["tasks"].values():
            assert figures["n"] <= 48 and {"threshold", "operating_recall", "auto_accept_precision"} <= figures.keys()
    # the mean of one checkpoint twice is that checkpoint
    assert ensemble["mean"]["recall_at_90_precision"] == pytest.approx(single["mean"]["recall_at_90_precision"])
    assert set(doc["mix_weight_val_r90p"]) == {f"{w:.1f}" for w in np.linspace(0, 1, 11)}
    # the linear model's probabilities are kept: a second run reads them and scores the same
    again = run([small_checkpoint], cache_dir=str(cache_dir), linear_file=kept, log=print)
    assert "linear late fusion: fitting" not in capsys.readouterr().out
    assert again["methods"]["linear late fusion"] == reports["linear late fusion"]
