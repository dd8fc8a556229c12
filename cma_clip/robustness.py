"""Noise-robustness probes: how a checkpoint's predictions move when its inputs are corrupted.

    from cma_clip.robustness import probe, item_sweep, catalogue_sweep
    result = probe(predictor, image, text, "occlusion", 3, "word_mask", 3, seed=0)
    curves = item_sweep(predictor, image, text, "blur", "typos")  # mode -> task -> 6 probabilities
    both = sweep_item(predictor, image, text, "blur", "typos")  # the same, and the image weights
    rows = catalogue_sweep(predictor, Catalogue.open(config, split="test", limit=100), "blur", "typos")

A sweep corrupts the image ("image" mode), the text ("text") or both ("both") at every severity
0..5 of `cma_clip.noise`; severity 0 is the clean input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from PIL import Image

from .data import Catalogue, load_image
from .noise import SEVERITIES, corrupt_image, corrupt_text
from .predict import Prediction, Predictor, TaskPrediction
from .relevance import words_of

MODES = ("image", "text", "both")  # which input gets the noise in a sweep
SWEEP_FIELDS = ("mode", "corruption", "severity", "task", "accuracy", "n", "seed")


@dataclass
class Probe:
    """One item's prediction on clean and on corrupted inputs, and per task the probability the noisy
    prediction gives the clean top-1 label (what the item sweep plots: it falls when the label flips)."""

    clean: Prediction
    noisy: Prediction
    noisy_image: Image.Image
    noisy_text: str
    clean_label_kept: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the text noise could not reach


def probability_of(prediction: TaskPrediction, label: str) -> float:
    """The probability a task's prediction gives `label` (0 when it is not among its top-k)."""
    return dict(zip(prediction.labels, prediction.probabilities)).get(label, 0.0)


def _active(name: str | None) -> bool:
    return name is not None and name != "none"


def _corrupt(image: Image.Image, text: str, mode: str, image_noise: str | None, text_noise: str | None,
             severity: int, seed: int) -> tuple[Image.Image, str]:
    """The inputs of one sweep point: only the inputs `mode` names are corrupted."""
    if mode in ("image", "both"):
        image = corrupt_image(image, image_noise, severity, seed)
    if mode in ("text", "both"):
        text = corrupt_text(text, text_noise, severity, seed)
    return image, text


def corruptions(image_noise: str | None, text_noise: str | None) -> dict[str, str]:
    """Each mode a pair of noise names allows ("none"/None switches a noise off) -> the corruption
    it applies: "blur", "typos", "blur + typos"."""
    needs = {"image": (image_noise,), "text": (text_noise,), "both": (image_noise, text_noise)}
    return {mode: " + ".join(needs[mode]) for mode in MODES if all(_active(name) for name in needs[mode])}


def probe(predictor: Predictor, image: Image.Image, text: str, image_noise: str | None, image_severity: int,
          text_noise: str | None, text_severity: int, seed: int = 0, top_k: int = 3) -> Probe:
    """Predict (with attention maps, each task's `top_k` labels) on the clean item and on its corrupted
    copy (every class of it first, for the clean label's probability)."""
    noisy_image = corrupt_image(image, image_noise, image_severity, seed) if _active(image_noise) else image
    noisy_text = corrupt_text(text, text_noise, text_severity, seed) if _active(text_noise) else text
    clean = predictor.predict(image, text, top_k)
    noisy = predictor.predict(noisy_image, noisy_text, top_k=max(len(c) for c in predictor.classes.values()))
    kept = {task: probability_of(p, clean.tasks[task].label) for task, p in noisy.tasks.items()}
    noisy.tasks = {task: replace(p, labels=p.labels[:top_k], probabilities=p.probabilities[:top_k])
                   for task, p in noisy.tasks.items()}
    return Probe(clean, noisy, noisy_image, noisy_text, kept,
                 text_noise_notes(predictor, text, text_noise, [text_severity] if text_severity else [], seed))


def text_noise_notes(predictor: Predictor, text: str, text_noise: str | None, severities: list[int],
                     seed: int = 0) -> list[str]:
    """What a text corruption at `severities` cannot reach: a text that is empty, or too short for it
    (one word to drop, shuffle or cut), or words past what the model reads."""
    if not _active(text_noise):
        return []
    if not text.strip():
        curves = " (flat text curves)" if len(severities) > 1 else ""  # a sweep's; a probe draws none
        return [f"There is no text to corrupt: the text noise changes nothing{curves}."]
    if severities and all(corrupt_text(text, text_noise, s, seed) == " ".join(text.split()) for s in severities):
        return [f"This text is too short for {text_noise} to change it"  # a flat curve read as robustness
                f"{' at any severity' if len(severities) > 1 else ''}: the noisy text is the clean one."]
    seen, words = len(words_of(predictor.backbone, text, predictor.max_tokens)[0]), text.split()
    if seen < len(words):
        return [f"The model reads the first {predictor.max_tokens} tokens of a text: {seen} of these "
                f"{len(words)} words. The noise on the words after them changes nothing it sees."]
    return []


@dataclass
class ItemSweep:
    """One item over severities 0..5 (list index = severity), per mode and task: the probability of
    the clean top-1 label, and the image's modality weight; and each mode's corruption (`corruptions`)."""

    confidence: dict[str, dict[str, list[float]]]
    image_weight: dict[str, dict[str, list[float]]]
    corruptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the text noise could not reach (`text_noise_notes`)


def sweep_item(predictor: Predictor, image: Image.Image, text: str, image_noise: str | None,
               text_noise: str | None, seed: int = 0) -> ItemSweep:
    """The item's confidence in its clean predictions and its image weights at every severity, per mode."""
    top_k = max(len(classes) for classes in predictor.classes.values())
    sweep = ItemSweep({}, {}, corruptions(image_noise, text_noise),
                      text_noise_notes(predictor, text, text_noise, [s for s in SEVERITIES if s], seed))
    for mode in sweep.corruptions:
        inputs = [_corrupt(image, text, mode, image_noise, text_noise, s, seed) for s in SEVERITIES]
        predictions = predictor.predict_batch([i for i, _ in inputs], [t for _, t in inputs], top_k=top_k)
        sweep.confidence[mode], sweep.image_weight[mode] = {}, {}
        for task, clean in predictions[0].tasks.items():
            sweep.confidence[mode][task] = [probability_of(p.tasks[task], clean.label) for p in predictions]
            sweep.image_weight[mode][task] = [p.tasks[task].image_weight for p in predictions]
    return sweep


def item_sweep(predictor: Predictor, image: Image.Image, text: str, image_noise: str | None,
               text_noise: str | None, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """mode -> task -> probability of the clean top-1 label at severities 0..5 (list index = severity)."""
    return sweep_item(predictor, image, text, image_noise, text_noise, seed).confidence


def catalogue_sweep(predictor: Predictor, catalogue: Catalogue, image_noise: str | None, text_noise: str | None,
                    seed: int = 0, progress: Callable[[float, str], None] | None = None,
                    batch_size: int = 16) -> list[dict]:
    """Accuracy per (mode, severity, task) on `catalogue`, plus a task "mean" row per (mode, severity).

    Accuracy is over the items labelled for the task; a label outside the checkpoint's vocabulary
    counts as wrong. Item i is corrupted with seed `seed + i`; severity 0 is run once for all modes."""
    modes = corruptions(image_noise, text_noise)
    labels = {task: catalogue.labels(task) for task in predictor.tasks}
    tasks = [task for task in predictor.tasks if any(label is not None for label in labels[task])]
    runs = [(None, 0)] + [(mode, s) for mode in modes for s in SEVERITIES if s > 0]
    correct = {(run, task): 0 for run in runs for task in tasks}
    texts, paths = catalogue.texts(), catalogue.image_paths()
    starts = range(0, len(paths), batch_size)
    done, total = 0, len(starts) * len(runs)
    for start in starts:
        index = range(start, min(start + batch_size, len(paths)))
        images = [load_image(paths[i]) for i in index]
        for mode, severity in runs:
            inputs = [(images[k], texts[i]) if mode is None else
                      _corrupt(images[k], texts[i], mode, image_noise, text_noise, severity, seed + i)
                      for k, i in enumerate(index)]
            predictions = predictor.predict_batch([i for i, _ in inputs], [t for _, t in inputs], top_k=1)
            for i, prediction in zip(index, predictions):
                for task in tasks:
                    correct[(mode, severity), task] += labels[task][i] == prediction.tasks[task].label
            done += 1
            if progress is not None:
                step = "clean inputs" if mode is None else f"{mode} noise, severity {severity}"
                # every corruption runs on a batch before the next batch: the items lead, the step follows
                progress(done / total, f"items {index[0] + 1}-{index[-1] + 1} of {len(paths)}: {step}")
    counts = {task: sum(label is not None for label in labels[task]) for task in tasks}
    rows = []
    for mode in modes:
        for severity in SEVERITIES:
            run = (None, 0) if severity == 0 else (mode, severity)
            accuracies = [correct[run, task] / counts[task] for task in tasks]
            run = {"mode": mode, "corruption": modes[mode], "severity": severity}
            rows += [{**run, "task": task, "accuracy": acc, "n": counts[task], "seed": seed}
                     for task, acc in zip(tasks, accuracies)]
            mean = sum(accuracies) / len(accuracies) if accuracies else math.nan
            rows.append({**run, "task": "mean", "accuracy": mean, "n": len(catalogue), "seed": seed})
    return rows
