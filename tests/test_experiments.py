"""The study command (cma_clip.experiments) on a small slice of hm-articles: every method and
seed is trained and reported, the spread is over seeds, noise reaches only the inputs it names,
and a second call reuses the runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from cma_clip.lab import experiments
from cma_clip.lab.experiments import METHODS

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("study")
    argv = ["--catalogues", "hm-articles", "--seeds", *map(str, SEEDS), "--epochs", "1", "--noise-items", "12",
            "--runs", str(root / "runs"), "--report", str(root / "report"), "--cache-dir", str(cache_dir),
            "--", "--limit", "32", "--align-epochs", "1", "--batch-size", "16", "--width", "32"]
    assert experiments.main(argv) == 0
    return root, argv, json.loads((root / "report" / "results.json").read_text())


def test_every_method_and_seed_is_reported_with_its_spread(study):
    root, _, results = study
    result = results["catalogues"]["hm-articles"]
    assert set(result["test"]) == set(METHODS)
    for method, name in METHODS.items():
        assert len(result["test"][method]) == len(SEEDS)
        per_seed = [result["test"][method][str(s)]["mean"]["accuracy"] for s in SEEDS]
        summary = result["summary"]["test"][method]["mean"]["accuracy"]
        assert summary["mean"] == pytest.approx(np.mean(per_seed))
        assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1))
        if name is not None:  # the table reads the runs' own test reports
            run = root / "runs" / "hm-articles" / "seed-1" / name
            assert result["test"][method]["1"] == json.loads((run / "eval_test.json").read_text())
            model = json.loads((run / "config.json").read_text())["model"]
            assert model["fusion"] == ("cma" if name == "cma_no_lexical" else name)
            assert (model["lexical_buckets"] == 0) == (name == "cma_no_lexical")
            training = json.loads((run / "config.json").read_text())["training"]  # time: epochs + alignment
            epochs = sum(e["seconds"] for e in training["history"]) + training.get("align_seconds", 0.0)
            assert result["seconds"][method][1] == pytest.approx(epochs, abs=0.01) and epochs > 0
    tables = (root / "report" / "TABLES.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in tables
    assert "| image [CLS] on the text |" in tables
    for name in ("noise-hm-articles.png", "modality-hm-articles.png"):
        with Image.open(root / "report" / name) as image:
            assert image.width > 600 and image.height > 250


def test_methods_of_a_seed_share_the_alignment_and_seeds_differ(study):
    root = study[0] / "runs" / "hm-articles"

    def align(seed, fusion):
        tensors = load_file(str(root / f"seed-{seed}" / fusion / "model.safetensors"))
        return {k: v for k, v in tensors.items() if k.startswith("align.")}

    reference = align(0, "cma")
    for fusion in ("late_fusion", "image_only", "no_attention"):
        assert all((align(0, fusion)[k] == v).all() for k, v in reference.items())
    assert any((align(1, "cma")[k] != v).any() for k, v in reference.items())


def test_noise_reaches_only_the_inputs_it_names(study):
    noise = study[2]["catalogues"]["hm-articles"]["noise"]

    def curve(method, mode, seed="0", metric="accuracy"):
        return [noise[method][seed][mode][str(s)]["mean"][metric] for s in range(6)]

    flat = [("text only", "image"), ("image only", "text"), ("zero-shot (raw CLIP)", "text")]
    for method, mode in flat:
        assert curve(method, mode) == [curve(method, mode)[0]] * 6
    # the corrupted inputs themselves differ from the clean ones
    features = np.load(study[0] / "runs" / "hm-articles" / "noise-12" / "severity-0.npz")
    noisy = np.load(study[0] / "runs" / "hm-articles" / "noise-12" / "severity-5.npz")
    assert not np.array_equal(features["image_pooled"], noisy["image_pooled"])
    assert not np.array_equal(features["text_ids"], noisy["text_ids"])
    # every mode starts from the same clean inputs
    for method in METHODS:
        assert len({curve(method, mode)[0] for mode in ("image", "text", "both")}) == 1
    weights = noise["CMA-CLIP"]["0"]["image"]["0"]["image_weight"]
    assert weights and all(0.0 < w < 1.0 for w in weights.values())
    cross = noise["CMA-CLIP"]["0"]["image"]["5"]["cross_attention"]
    assert set(cross) == {"image_cls_on_text", "text_cls_on_image"} and all(0.0 < v < 1.0 for v in cross.values())
    assert noise["late fusion (heads on frozen embeddings)"]["0"]["image"]["5"]["cross_attention"] == {}  # no sequence attention


def test_a_second_call_reuses_the_runs(study):
    root, argv, results = study
    model = root / "runs" / "hm-articles" / "seed-0" / "cma" / "model.safetensors"
    before = model.stat().st_mtime_ns
    assert experiments.main(argv) == 0
    assert model.stat().st_mtime_ns == before
    again = json.loads((root / "report" / "results.json").read_text())
    assert again["catalogues"]["hm-articles"]["test"] == results["catalogues"]["hm-articles"]["test"]


def test_rescoring_recomputes_every_report_without_training(study):
    root, argv, results = study
    runs = root / "runs" / "hm-articles"
    model, noise_scores = runs / "seed-1" / "late_fusion" / "model.safetensors", runs / "seed-1" / "cma" / "noise-12.json"
    weights_before, scores_before = model.stat().st_mtime_ns, noise_scores.stat().st_mtime_ns
    assert experiments.main([*argv[:argv.index("--")], "--rescore", *argv[argv.index("--"):]]) == 0
    assert model.stat().st_mtime_ns == weights_before and noise_scores.stat().st_mtime_ns != scores_before
    again = json.loads((root / "report" / "results.json").read_text())["catalogues"]["hm-articles"]
    before = results["catalogues"]["hm-articles"]
    assert again["test"] == before["test"]  # same checkpoints, same features, same metrics
    assert again["noise"] == before["noise"]  # the noise sample re-encoded identically
