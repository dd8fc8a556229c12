"""The noise-robustness probe on a real small checkpoint: clean vs noisy, item sweeps, catalogue sweeps."""
from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from cma_clip import viz
from cma_clip.backbones import to_rgb
from cma_clip.data import REPO_ROOT, Catalogue, CatalogueConfig, load_image, write_table
from cma_clip.noise import SEVERITIES, corrupt_image
from cma_clip.predict import Predictor
from cma_clip.robustness import (MODES, SWEEP_FIELDS, catalogue_sweep, corruptions, item_sweep, probability_of, probe,
                                 sweep_item)
from cma_clip.runtime import bf16_supported
from cma_clip.studio import views
from cma_clip.studio.views import percent, probe_rows
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT


@pytest.fixture(scope="module")
def predictor(small_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(small_checkpoint, "cpu")


@pytest.fixture(scope="module")
def image():
    return load_image(EXAMPLE_IMAGE)


@pytest.fixture(scope="module")
def sweep(predictor, image):
    return item_sweep(predictor, image, EXAMPLE_TEXT, "occlusion", "word_mask", seed=1)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.open(CatalogueConfig.load("hm-articles"), split="test", limit=6)


@pytest.fixture(scope="module")
def swept(predictor, catalogue):
    calls = []
    rows = catalogue_sweep(predictor, catalogue, "blur", "word_dropout", seed=0,
                           progress=lambda fraction, text: calls.append((fraction, text)), batch_size=4)
    return rows, calls


def assert_same_prediction(a, b):
    for task, p in a.tasks.items():
        q = b.tasks[task]
        assert (p.labels, p.probabilities, p.modality_weights) == (q.labels, q.probabilities, q.modality_weights)
    assert a.tokens == b.tokens
    assert np.array_equal(a.text_to_image, b.text_to_image)


def test_probe_at_severity_zero_is_the_clean_prediction(predictor, image):
    result = probe(predictor, image, EXAMPLE_TEXT, "occlusion", 0, "word_mask", 0, seed=3)
    assert result.noisy_text == EXAMPLE_TEXT
    assert np.array_equal(np.asarray(result.noisy_image), np.asarray(to_rgb(image)))
    assert_same_prediction(result.clean, result.noisy)
    assert_same_prediction(result.clean, predictor.predict(image, EXAMPLE_TEXT))
    assert all(row[3] == "+0 pts" and "(changed)" not in row[2] for row in probe_rows(result))
    switched_off = probe(predictor, image, EXAMPLE_TEXT, None, 5, "none", 5)
    assert switched_off.noisy_text == EXAMPLE_TEXT and switched_off.noisy_image is image


def test_strong_corruption_changes_the_inputs_and_compares_every_task(predictor, image):
    result = probe(predictor, image, EXAMPLE_TEXT, "occlusion", 5, "word_mask", 5, seed=0)
    assert result.noisy_text != EXAMPLE_TEXT and "[UNK]" in result.noisy_text
    assert result.noisy_image.size == image.size
    assert not np.array_equal(np.asarray(result.noisy_image), np.asarray(to_rgb(image)))
    assert result.clean.text_to_image is not None and result.noisy.text_to_image is not None
    rows = probe_rows(result)
    assert [row[0] for row in rows] == [predictor.names[t] for t in predictor.tasks]  # names a person reads
    every = predictor.predict(result.noisy_image, result.noisy_text, top_k=1000)  # every class of the noisy input
    for task, (_, clean_cell, noisy_cell, change, weights) in zip(predictor.tasks, rows):
        clean, noisy = result.clean.tasks[task], result.noisy.tasks[task]
        clean_label, noisy_label = clean.label, noisy.label
        assert clean_cell == f"{clean.label} · {percent(clean.confidence)}"
        assert noisy_cell == f"{noisy.label} · {percent(noisy.confidence)}" + (
            "" if clean_label == noisy_label else " (changed)")
        kept = probability_of(every.tasks[task], clean.label)  # the clean label's probability under the noise
        assert result.clean_label_kept[task] == pytest.approx(kept, abs=1e-6)
        points = round(100 * (kept - clean.confidence))
        assert change == f"{'+' if points >= 0 else '−'}{abs(points)} pts"
        if noisy_label != clean_label:  # a flipped label: its probability fell below the noisy top-1's
            assert kept < noisy.confidence and points < 0
        assert weights == f"{percent(clean.image_weight)} → {percent(noisy.image_weight)}"
    # the corruption moves the model: some task's confidence or image weight shifts
    assert any(c[3] != "+0 pts" or len(set(c[4].split(" → "))) == 2 for c in rows)


def test_the_probe_says_when_the_text_noise_cannot_reach_what_the_model_reads(predictor, image):
    assert probe(predictor, image, EXAMPLE_TEXT, "none", 0, "typos", 3).notes == []
    empty = probe(predictor, image, "  ", "none", 0, "typos", 3)
    assert empty.notes == ["There is no text to corrupt: the text noise changes nothing."]  # a probe has no curves
    # the item sweep says it too: its flat text curves read as a model robust to typos
    assert sweep_item(predictor, image, "", "none", "typos").notes == [
        "There is no text to corrupt: the text noise changes nothing (flat text curves)."]
    assert sweep_item(predictor, image, EXAMPLE_TEXT, "blur", "typos").notes == []
    long_text = " ".join([EXAMPLE_TEXT] * 20)
    long = probe(predictor, image, long_text, "none", 0, "truncation", 2)
    [note] = long.notes
    assert f"reads the first {predictor.max_tokens} tokens" in note
    assert f"{len(long.clean.words)} of these {len(long_text.split())} words" in note
    assert note in views.probe_maps(long, predictor.tasks[0])[2]  # under the maps, where the app shows it
    assert probe(predictor, image, long_text, "blur", 2, "none", 0).notes == []  # no text noise: nothing to say
    # a text too short for the noise: the flat curves read as robustness (QA researcher, session 37)
    short = probe(predictor, image, "Tee", "none", 0, "word_dropout", 5)
    assert short.noisy_text == "Tee" and short.notes == [
        "This text is too short for word_dropout to change it: the noisy text is the clean one."]
    assert sweep_item(predictor, image, "Tee", "none", "word_shuffle").notes == [
        "This text is too short for word_shuffle to change it at any severity: the noisy text is the clean one."]
    assert probe(predictor, image, "Tee", "none", 0, "typos", 5).notes == []  # typos reach one word


def test_a_flipped_label_shows_how_far_the_clean_labels_confidence_fell():
    """On the shipped H&M model, blur 5 flips the T-shirt's pattern and colour: the table's change is
    the clean label's fall, as the item sweep plots it (the noisy top-1 minus the clean top-1 once said
    -6 pts where Stripe fell from 89% to 1%)."""
    shipped = Predictor.from_checkpoint(REPO_ROOT / "checkpoints" / "hm-articles", "cpu")
    photo = load_image(EXAMPLE_IMAGE)
    result = probe(shipped, photo, EXAMPLE_TEXT, "blur", 5, "none", 0)
    curves = item_sweep(shipped, photo, EXAMPLE_TEXT, "blur", "none")["image"]
    rows = dict(zip(shipped.tasks, probe_rows(result)))
    flipped = [t for t in shipped.tasks if result.noisy.tasks[t].label != result.clean.tasks[t].label]
    assert flipped
    for task in flipped:
        fell = 100 * (curves[task][5] - result.clean.tasks[task].confidence)  # the sweep, in bf16 where it can
        shown = int(rows[task][3].replace("−", "-").split()[0])
        assert abs(shown - fell) <= 1 and shown < 0, (task, shown, fell)


def test_item_sweep_tracks_the_clean_prediction_over_severities(predictor, image, sweep):
    clean = predictor.predict(image, EXAMPLE_TEXT)
    batch_clean = predictor.predict_batch([image], [EXAMPLE_TEXT])[0]
    # the sweep's batch of 6 runs under bf16 autocast where the CPU has it, while one item (predict,
    # predict_batch of one) runs in float32 (runtime.autocast): they agree to bf16's rounding there
    tolerance = 2e-3 if bf16_supported(predictor.device) else 1e-5
    assert list(sweep) == list(MODES)
    for mode, curves in sweep.items():
        assert list(curves) == predictor.tasks
        for task, values in curves.items():
            assert len(values) == len(SEVERITIES)
            assert all(0.0 <= v <= 1.0 for v in values)
            assert values[0] == pytest.approx(clean.tasks[task].confidence, abs=tolerance)
            assert values[0] == pytest.approx(batch_clean.tasks[task].confidence, abs=tolerance)
    # "image" mode corrupts the image only, at the severity of the list index
    top_k = max(len(c) for c in predictor.classes.values())
    noisy = predictor.predict_batch([corrupt_image(image, "occlusion", 4, 1)], [EXAMPLE_TEXT], top_k=top_k)[0]
    for task, prediction in noisy.tasks.items():
        expected = dict(zip(prediction.labels, prediction.probabilities))[clean.tasks[task].label]
        assert sweep["image"][task][4] == pytest.approx(expected, abs=tolerance)
    assert any(abs(v[5] - v[0]) > 1e-4 for v in sweep["both"].values())


def test_item_sweep_is_deterministic_and_skips_switched_off_noise(predictor, image, sweep):
    assert item_sweep(predictor, image, EXAMPLE_TEXT, "occlusion", "word_mask", seed=1) == sweep
    other = item_sweep(predictor, image, EXAMPLE_TEXT, "occlusion", "word_mask", seed=2)
    assert other["image"] != sweep["image"]
    assert list(item_sweep(predictor, image, EXAMPLE_TEXT, "blur", "none")) == ["image"]
    assert list(item_sweep(predictor, image, EXAMPLE_TEXT, None, "typos")) == ["text"]
    assert item_sweep(predictor, image, EXAMPLE_TEXT, None, None) == {}


def test_catalogue_sweep_covers_every_mode_severity_and_task(predictor, catalogue, swept):
    rows, calls = swept
    tasks = [t for t in predictor.tasks if any(label is not None for label in catalogue.labels(t))]
    keys = [(r["mode"], r["severity"], r["task"]) for r in rows]
    assert sorted(keys) == sorted((m, s, t) for m in MODES for s in SEVERITIES for t in [*tasks, "mean"])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for mode in MODES:
        for severity in SEVERITIES:
            group = [r for r in rows if r["mode"] == mode and r["severity"] == severity]
            per_task = [r["accuracy"] for r in group if r["task"] != "mean"]
            assert [r["accuracy"] for r in group if r["task"] == "mean"] == [pytest.approx(np.mean(per_task))]
    # progress: one call per batch and run (2 batches x (1 clean + 3 modes x 5 severities)), ending at 1
    fractions = [f for f, _ in calls]
    assert len(fractions) == 2 * 16 and fractions == sorted(fractions) and fractions[-1] == 1.0
    # each line names its batch's items first: the corruption after them changes within a batch
    assert calls[16][1].startswith("items 5-") and calls[16][1].endswith(": clean inputs")


def test_catalogue_sweep_clean_accuracy_matches_direct_prediction(predictor, catalogue, swept):
    rows, _ = swept
    images = [load_image(p) for p in catalogue.image_paths()]
    predictions = predictor.predict_batch(images, catalogue.texts())
    for task in predictor.tasks:
        labels = catalogue.labels(task)
        hits = [p.tasks[task].label == label for p, label in zip(predictions, labels) if label is not None]
        clean = [r for r in rows if r["task"] == task and r["severity"] == 0]
        assert [r["mode"] for r in clean] == list(MODES)
        assert all(r["accuracy"] == pytest.approx(np.mean(hits)) and r["n"] == len(hits) for r in clean)


def test_catalogue_sweep_counts_labels_outside_the_vocabulary_as_wrong(predictor, catalogue):
    task = predictor.tasks[0]
    clean = predictor.predict_batch([load_image(catalogue.image_paths()[0])], catalogue.texts()[:1])[0]
    right = replace(catalogue, rows=[{**catalogue.rows[0], task: clean.tasks[task].label}])
    unknown = replace(catalogue, rows=[{**catalogue.rows[0], task: "A label no checkpoint knows"}])
    accuracy = {name: [r["accuracy"] for r in catalogue_sweep(predictor, c, None, "typos")
                       if r["task"] == task and r["severity"] == 0]
                for name, c in (("right", right), ("unknown", unknown))}
    assert accuracy == {"right": [1.0], "unknown": [0.0]}


def test_sweep_rows_round_trip_through_csv(swept, tmp_path):
    rows, _ = swept
    path = write_table(tmp_path / "out" / "sweep.csv", rows, SWEEP_FIELDS)
    with open(path, newline="") as handle:
        back = list(csv.DictReader(handle))
    assert [{**r, "severity": int(r["severity"]), "accuracy": float(r["accuracy"]), "n": int(r["n"]),
             "seed": int(r["seed"])} for r in back] == rows


def test_robustness_figures(predictor, image, sweep, swept):
    fig = viz.item_sweep_figure(sweep)
    assert len(fig.axes) == len(MODES)
    for ax, mode in zip(fig.axes, MODES):
        assert len(ax.lines) == len(predictor.tasks)
        assert list(ax.lines[0].get_ydata()) == sweep[mode][predictor.tasks[0]]
    assert len(viz.item_sweep_figure({}).axes) == 1

    names = {task: f"Task {i}" for i, task in enumerate(predictor.tasks)}
    weights = sweep_item(predictor, image, EXAMPLE_TEXT, "occlusion", "word_mask", seed=1)
    assert weights.confidence == sweep
    assert weights.corruptions == corruptions("occlusion", "word_mask")
    both = viz.item_sweep_figure(weights.confidence, weights.image_weight, names, weights.corruptions)
    assert both.axes[0].get_title() == "image noise: occlusion" and both.axes[2].get_title().endswith("+ word_mask")
    assert len(both.axes) == 2 * len(MODES)  # a row of confidences, a row of image weights
    for ax, mode in zip(both.axes[len(MODES):], MODES):
        assert list(ax.lines[0].get_ydata()) == weights.image_weight[mode][predictor.tasks[0]]
    assert [t.get_text() for t in both.legends[0].get_texts()] == list(names.values())

    rows, _ = swept
    figure = viz.catalogue_sweep_figure(rows, names=names)
    assert [ax.get_title() for ax in figure.axes] == [  # each panel names its corruption
        "image noise: blur", "text noise: word_dropout", "both noise: blur + word_dropout"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for ax, mode in zip(figure.axes, MODES):  # a curve per task and the mean
        assert [line.get_label() for line in ax.lines] == [names.get(t, "mean over tasks") for t in tasks]
        for line, task in zip(ax.lines, tasks):
            values = [r["accuracy"] for r in rows if r["mode"] == mode and r["task"] == task]
            assert list(line.get_ydata()) == values and list(line.get_xdata()) == list(SEVERITIES)

    result = probe(predictor, image, EXAMPLE_TEXT, "blur", 5, "truncation", 5)
    clean = {t: p.image_weight for t, p in result.clean.tasks.items()}
    noisy = {t: p.image_weight for t, p in result.noisy.tasks.items()}
    bars = viz.modality_shift_chart(clean, noisy).axes[0].patches
    assert len(bars) == 2 * len(clean)
    assert np.allclose([b.get_width() for b in bars], list(clean.values()) + list(noisy.values()))
    # the axis says what the image side holds: "image + colour" on fashion's chart, which reads no colour (QA, s37)
    for weights, axis in (({"text": 0.5, "image": 0.5}, "image weight"),
                          ({"text": 0.4, "image": 0.3, "colour": 0.3}, "image-side weight (image + colour)")):
        for prediction in (result.clean, result.noisy):
            prediction.tasks = {t: replace(p, modality_weights=weights) for t, p in prediction.tasks.items()}
        assert views.probe_shift_figure(result).axes[0].get_xlabel() == axis


def test_the_image_weight_a_probe_watches_is_the_image_sides():
    from cma_clip.predict import TaskPrediction

    weights = {"text": 0.1, "image": 0.2, "colour": 0.6, "words": 0.1}  # a model with colour and words
    task = TaskPrediction(["Red"], [0.9], weights, None, False)
    assert task.image_weight == pytest.approx(0.8)
    assert TaskPrediction(["Red"], [0.9], {"text": 0.3, "image": 0.7}, None, False).image_weight == pytest.approx(0.7)
