"""Choosing which finished runs to keep in one checkpoint (cma_clip/lab/member_subsets.py)."""
from pathlib import Path

import pytest

from cma_clip import train
from cma_clip.lab import member_subsets
from test_ensemble import TINY


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory, cache_dir):
    """Two tiny recipes (colour + words, colour alone), two seeds each, and the first one joined as a baseline."""
    root = tmp_path_factory.mktemp("subsets")
    words_off = [a if previous != "--words-buckets" else "0" for previous, a in zip([None, *TINY], TINY)]
    for name, args in (("cw", TINY), ("c", words_off)):
        assert train.main([*args, "--members", "2", "--seed", "3", "--cache-dir", str(cache_dir),
                           "--out", str(root / name)]) == 0
    return root


def test_candidates_are_every_combination_of_first_seeds_with_two_runs_at_least():
    recipes = [[Path("a0"), Path("a1")], [Path("b0")]]
    assert member_subsets.candidates(recipes) == [(1, 1), (2, 0), (2, 1)]


def test_the_rule_takes_the_best_val_r90p_among_candidates_small_and_quick_enough_that_reach_the_baseline_recall():
    def row(counts, mb, r90, recall, minutes=10):
        return {"counts": counts, "megabytes": mb, "training_minutes": minutes,
                "val": {"recall_at_90_precision": r90, "operating_recall": recall}}

    baseline = {"val": {"recall_at_90_precision": 0.70, "operating_recall": 0.62}}
    rows = [row([1, 1], 10, 0.75, 0.61),  # best R@90P, but its operating recall falls short
            row([2, 1], 30, 0.74, 0.65),  # too large
            row([2, 0], 20, 0.71, 0.62), row([1, 2], 20, 0.72, 0.63, minutes=28)]
    assert member_subsets.chosen(rows, baseline, 25)["counts"] == [1, 2]
    assert member_subsets.chosen(rows, baseline, 25, max_minutes=27)["counts"] == [2, 0]  # [1, 2] trains too long
    assert member_subsets.chosen(rows, baseline, 35)["counts"] == [2, 1]
    assert member_subsets.chosen(rows[:1], baseline, 25) is None


def test_thresholds_come_from_val_and_score_test():
    import numpy as np

    n = 200  # val: 100 items confidently right; test: 100 items confidently wrong
    probs = {"t": np.tile([[0.98, 0.02]], (n, 1)).astype(np.float32)}
    targets = {"t": np.r_[np.zeros(100, int), np.ones(100, int)]}
    splits = {"val": np.arange(100), "test": np.arange(100, 200)}
    out = member_subsets.reports(probs, targets, splits, np.arange(n), test=True)
    assert out["thresholds"]["t"] == pytest.approx(0.98)
    assert out["val"]["operating_recall"] == 1.0 and out["test"]["operating_recall"] == 0.0
    assert member_subsets.reports(probs, targets, splits, np.arange(n), test=False).keys() == {"thresholds", "val"}


def test_every_candidate_is_sized_and_scored_as_a_joined_mean(two_recipes, cache_dir):
    recipes = [two_recipes / "cw-members", two_recipes / "c-members"]
    doc = member_subsets.run(recipes, two_recipes / "cw", test=True, cache_dir=str(cache_dir), log=lambda _: None)
    rows = {tuple(r["counts"]): r for r in doc["candidates"]}
    assert list(rows) == [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert rows[(0, 2)]["runs"] == [str(recipes[1] / "seed-3"), str(recipes[1] / "seed-4")]
    assert 0 < rows[(2, 0)]["megabytes"] < rows[(2, 1)]["megabytes"] < rows[(2, 2)]["megabytes"]
    # the two colour + words seeds: the figures of the checkpoint `train --members 2` wrote from them
    # (the baseline), as it stores its members' weights
    for split in ("val", "test"):
        for key in ("accuracy", "recall_at_90_precision", "operating_recall"):
            assert rows[(2, 0)][split][key] == pytest.approx(doc["baseline"][split][key], abs=1e-9), (split, key)
    seconds = [member_subsets.training_seconds(r) for r in rows[(2, 0)]["runs"]]
    assert rows[(2, 0)]["training_minutes"] == pytest.approx(sum(seconds) / 60) and min(seconds) > 0
    assert doc["baseline"]["val"].keys() == rows[(2, 0)]["val"].keys()
    assert doc["chosen"] is None or doc["chosen"] in [list(c) for c in rows]


def test_a_missing_baseline_is_named_without_a_traceback(tmp_path, capsys):
    (tmp_path / "r" / "seed-0").mkdir(parents=True)
    assert member_subsets.main(["--recipes", str(tmp_path / "r"), "--baseline", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_runs_on_tuned_backbone_layers_are_scored_on_their_own_features_and_sized_with_them(two_recipes, cache_dir,
                                                                                           backbone, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from cma_clip.checkpoint import as_stored_in_ensemble, load_checkpoint, read_config
    from cma_clip.evaluate import predict_probabilities
    from cma_clip.lab.late_ensembles import scoring_data

    weights = tmp_path / "tuned.safetensors"
    save_file({"cnn._conv_head.weight": (backbone.state_dict()["cnn._conv_head.weight"] * 1.5).half()}, str(weights))
    assert train.main([*TINY, "--members", "2", "--seed", "3", "--backbone-weights", str(weights),
                       "--cache-dir", str(cache_dir), "--out", str(tmp_path / "tuned")]) == 0
    run = tmp_path / "tuned-members" / "seed-3"
    frozen = scoring_data(two_recipes / "cw", read_config(two_recipes / "cw"), "cpu", cache_dir=str(cache_dir))
    own = scoring_data(run, read_config(run), "cpu", cache_dir=str(cache_dir))  # the tuned backbone's features
    rows = np.concatenate([frozen.splits["val"], frozen.splits["test"]])
    known = {member_subsets.backbone_of(two_recipes / "cw", read_config(two_recipes / "cw")): frozen.features}
    got = member_subsets.run_probabilities([run], read_config(run).classes, frozen.catalogue, rows, known, "cpu",
                                           str(cache_dir), log=lambda _: None)[run]
    model = as_stored_in_ensemble(load_checkpoint(run)[0])  # the weights an ensemble checkpoint would hold
    for task, expected in predict_probabilities(model, own.features, rows).items():
        np.testing.assert_allclose(got[task][rows], expected, atol=1e-6)
        assert not np.allclose(expected, predict_probabilities(model, frozen.features, rows)[task], atol=1e-4)
    assert len(known) == 2  # the tuned backbone's features joined the frozen one's
    doc = member_subsets.run([tmp_path / "tuned-members"], two_recipes / "cw", cache_dir=str(cache_dir),
                             log=lambda _: None)
    joined = (tmp_path / "tuned" / "model.safetensors").stat().st_size + weights.stat().st_size
    assert doc["candidates"][0]["megabytes"] == pytest.approx(joined / 1e6)
