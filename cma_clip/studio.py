"""The logic behind the Gradio app, as plain functions and classes tested without a browser.

`app.py` lays out components and wires events to a `Studio`: predict and explain,
save corrections to the label store, history and export, and a review queue sorted
by uncertainty (least confident first: an item's confidence is the lowest top-1
probability over its tasks).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from .backbones import BackboneError
from .errors import CMAClipError
from .checkpoint import CheckpointError, read_config
from .data import (REPO_ROOT, Catalogue, CatalogueConfig, CatalogueError, ImageError, join_text, load_image,
                   read_manifest, write_table)
from . import noise, robustness
from .labels import LabelStore, LabelStoreError
from .predict import Prediction, Predictor, TaskPrediction
from .viz import SPECIAL_TOKENS, attention_overlay, modality_chart, token_highlights

CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
MAX_TASKS = 8  # correction dropdowns the UI lays out; a checkpoint uses the first len(tasks)
MAX_TEXT_CHARS = 5000
MAX_SWEEP_ITEMS = 500  # a catalogue sweep costs about 0.4 s per item on 2 CPU cores
Progress = Callable[[float, str], None]


class StudioError(CMAClipError, ValueError):
    """A problem the user can fix, worded for the UI."""


def default_data_dir() -> Path:
    """Where the app keeps its label store and stored images: $CMA_CLIP_STUDIO_DIR or ./studio_data."""
    return Path(os.environ.get("CMA_CLIP_STUDIO_DIR", REPO_ROOT / "studio_data"))


def available_checkpoints(folder: str | Path = CHECKPOINT_DIR) -> dict[str, Path]:
    """Checkpoint name -> folder, for every sub-folder holding a valid config.json."""
    found = {}
    for path in sorted(Path(folder).glob("*/config.json")):
        try:
            read_config(path.parent)
        except CheckpointError:
            continue
        found[path.parent.name] = path.parent
    return found


@dataclass
class ReviewItem:
    item_id: str
    image_path: str
    text: str
    predictions: dict[str, TaskPrediction]
    status: str = "pending"  # pending | accepted | corrected | skipped

    @property
    def confidence(self) -> float:
        """The lowest top-1 probability over the tasks: the queue's uncertainty measure."""
        return min(p.confidence for p in self.predictions.values())

    @property
    def all_auto_accept(self) -> bool:
        return all(p.auto_accept for p in self.predictions.values())


@dataclass
class ReviewQueue:
    model: str
    items: list[ReviewItem] = field(default_factory=list)
    position: int = 0
    notes: list[str] = field(default_factory=list)  # rows that could not be loaded, and why

    @property
    def reviewed(self) -> int:
        return sum(item.status != "pending" for item in self.items)

    @property
    def current(self) -> ReviewItem | None:
        return self.items[self.position] if 0 <= self.position < len(self.items) else None

    def progress_text(self) -> str:
        return f"**{self.reviewed} reviewed of {len(self.items)}**"

    def advance(self) -> None:
        """Move to the next pending item after the current one (wrapping), if any."""
        n = len(self.items)
        for step in range(1, n + 1):
            candidate = (self.position + step) % n
            if self.items[candidate].status == "pending":
                self.position = candidate
                return
        self.position = n  # everything reviewed


class Studio:
    """Models, the label store and the app's actions. Thread-safe: Gradio calls it from many threads."""

    def __init__(self, checkpoint_dir: str | Path = CHECKPOINT_DIR, data_dir: str | Path | None = None,
                 device: str | None = None, data_root: str | Path | None = None) -> None:
        self.checkpoints = available_checkpoints(checkpoint_dir)
        self.data_dir = Path(data_dir or default_data_dir())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LabelStore(self.data_dir / "labels.db")
        self.device, self.data_root = device, data_root
        self._predictors: dict[str, Predictor] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ models
    @property
    def model_names(self) -> list[str]:
        return list(self.checkpoints)

    def add_checkpoint(self, name: str, folder: str | Path) -> None:
        read_config(folder)
        self.checkpoints[name] = Path(folder)

    def predictor(self, name: str | None) -> Predictor:
        if not name or name not in self.checkpoints:
            raise StudioError(f"Unknown model {name!r}. Choose one of: {', '.join(self.checkpoints) or 'none found'}.")
        with self._lock:
            if name not in self._predictors:
                try:
                    self._predictors[name] = Predictor.from_checkpoint(self.checkpoints[name], self.device)
                except (CheckpointError, BackboneError) as exc:
                    raise StudioError(f"Model {name!r} cannot be loaded: {exc}") from exc
            return self._predictors[name]

    def task_classes(self, model: str) -> dict[str, list[str]]:
        return self.predictor(model).classes

    # ------------------------------------------------------------------ predict and explain
    def predict(self, image_path: str | None, text: str | None, model: str) -> Prediction:
        image = open_user_image(image_path)
        return self.predictor(model).predict(image, clean_text(text), top_k=3)

    # ------------------------------------------------------------------ correct and save
    def save_correction(self, image_path: str | None, text: str | None, model: str, annotator: str | None,
                        item_id: str | None, labels: dict[str, str | None],
                        prediction: Prediction | None = None) -> int:
        if not image_path:
            raise StudioError("Upload the item's image before saving a correction.")
        image = open_user_image(image_path)  # refuse unreadable files before anything is written
        if not (annotator or "").strip():
            raise StudioError("Enter your name in the annotator field, so the correction can be attributed.")
        tasks = self.predictor(model).tasks
        chosen = {t: str(v).strip() for t, v in labels.items() if t in tasks and v is not None and str(v).strip()}
        if not chosen:
            raise StudioError("Choose at least one label to save.")
        if prediction is None:  # the model's prediction is stored with the labels: compute it for these inputs
            prediction = self.predictor(model).predict_batch([image], [clean_text(text)])[0]
        predictions = {t: {"label": p.label, "confidence": round(p.confidence, 4)} for t, p in prediction.tasks.items()}
        try:
            return self.store.save_correction(image=Path(image_path), text=clean_text(text), labels=chosen,
                                              predictions=predictions, annotator=annotator.strip(),
                                              checkpoint=model, item_id=(item_id or "").strip() or None)
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc

    def history_rows(self, limit: int = 50) -> list[list[str]]:
        rows = []
        for entry in self.store.history(limit=limit):
            changes = ", ".join(f"{task}: {entry['labels'].get(task, '')}" for task in entry.get("changed", []))
            labels = ", ".join(f"{task}={value}" for task, value in entry["labels"].items())
            rows.append([entry["created_at"], entry["annotator"], entry["item_id"], labels, changes or "(same)",
                         entry.get("checkpoint", "")])
        return rows

    def export(self, fmt: str) -> Path:
        fmt = (fmt or "").lower().lstrip(".")
        if fmt not in ("csv", "jsonl"):
            raise StudioError("Export format must be CSV or JSONL.")
        path = self.data_dir / f"labels_export.{fmt}"  # beside the store: image paths stay inside the folder
        try:
            self.store.export(path)
        except LabelStoreError as exc:
            raise StudioError(f"Export failed: {exc}") from exc
        return path

    # ------------------------------------------------------------------ review queue
    def review_catalogue(self, model: str, split: str, size: int, progress: Progress | None = None) -> ReviewQueue:
        """A sample of one split of the model's own catalogue on disk."""
        predictor = self.predictor(model)
        name = predictor.config.catalogue.name
        try:
            config = CatalogueConfig.load(name, self.data_root)
            catalogue = Catalogue.open(config, split=split)
            if not len(catalogue):
                raise CatalogueError(f"its {split!r} split has no items")
            size = max(1, min(int(size or 50), len(catalogue)))
            picked = np.sort(np.random.default_rng(0).choice(len(catalogue), size=size, replace=False))
            sample = catalogue.take(picked)
            items = list(zip(sample.item_ids(), map(str, sample.image_paths()), sample.texts()))
        except CatalogueError as exc:
            raise StudioError(f"The {name} catalogue is not available here: {exc}") from exc
        return self._queue(model, items, [], progress)

    def review_upload(self, model: str, manifest_path: str | None, image_paths: list[str] | None,
                      progress: Progress | None = None) -> ReviewQueue:
        """An uploaded manifest and its images, matched by file name (uploads lose their folders)."""
        if not manifest_path:
            raise StudioError("Upload a CSV or JSONL manifest.")
        predictor = self.predictor(model)
        config = predictor.config.catalogue_on(manifest_path)
        try:
            rows = read_manifest(manifest_path)
        except CatalogueError as exc:  # read_manifest names the bad row or encoding
            raise StudioError(f"Cannot read the manifest: {exc}") from exc
        needed = [config.image_column, *config.text_columns]
        if not rows or any(c not in rows[0] for c in needed):
            raise StudioError(f"The manifest needs the columns {needed} (found {sorted(rows[0]) if rows else 'no rows'}).")
        by_name = {Path(p).name: p for p in image_paths or []}
        items, notes = [], []
        for number, row in enumerate(rows, 1):
            name = Path(row[config.image_column]).name
            if name not in by_name:
                notes.append(f"row {number}: image {name!r} was not uploaded")
                continue
            item_id = row.get(config.id_column or "", "") or name
            text = join_text(row, config.text_columns)
            items.append((item_id, by_name[name], text))
        if not items:
            raise StudioError("None of the manifest's images were uploaded. " + "; ".join(notes[:3]))
        return self._queue(model, items, notes, progress)

    def _queue(self, model: str, items: list[tuple[str, str, str]], notes: list[str],
               progress: Progress | None, batch_size: int = 16) -> ReviewQueue:
        predictor = self.predictor(model)
        queue = ReviewQueue(model, notes=notes)
        for start in range(0, len(items), batch_size):
            chunk, images = [], []
            for item_id, path, text in items[start:start + batch_size]:
                try:
                    images.append(load_image(path))
                    chunk.append((item_id, path, text))
                except ImageError as exc:
                    queue.notes.append(f"{item_id}: {exc}")
            if chunk:
                predictions = predictor.predict_batch(images, [text for _, _, text in chunk])
                queue.items += [ReviewItem(i, p, t, pred.tasks) for (i, p, t), pred in zip(chunk, predictions)]
            if progress:
                progress(min(1.0, (start + batch_size) / len(items)), "predicting")
        if not queue.items:
            raise StudioError("No item could be loaded: " + "; ".join(queue.notes[:3]))
        queue.items.sort(key=lambda item: item.confidence)
        return queue

    def review_save(self, queue: ReviewQueue, annotator: str | None, labels: dict[str, str | None]) -> ReviewQueue:
        """Save the current item with the given labels and move on."""
        item = queue.current
        if item is None:
            raise StudioError("The queue is finished: load another catalogue.")
        self.save_correction(item.image_path, item.text, queue.model, annotator, item.item_id, labels,
                             Prediction(item.predictions))
        predicted = {t: p.label for t, p in item.predictions.items()}
        item.status = "accepted" if all(labels.get(t) == v for t, v in predicted.items()) else "corrected"
        queue.advance()
        return queue

    def review_skip(self, queue: ReviewQueue) -> ReviewQueue:
        if queue.current is not None:
            queue.current.status = "skipped"
            queue.advance()
        return queue

    def bulk_accept(self, queue: ReviewQueue, annotator: str | None, progress: Progress | None = None) -> int:
        """Accept every pending item whose every task clears its 90%-precision threshold."""
        confident = [item for item in queue.items if item.status == "pending" and item.all_auto_accept]
        for n, item in enumerate(confident, 1):
            self.save_correction(item.image_path, item.text, queue.model, annotator, item.item_id,
                                 {t: p.label for t, p in item.predictions.items()}, Prediction(item.predictions))
            item.status = "accepted"
            if progress:
                progress(n / len(confident), "accepting")
        if queue.current is not None and queue.current.status != "pending":
            queue.advance()
        return len(confident)

    # ------------------------------------------------------------------ robustness
    def probe(self, image_path: str | None, text: str | None, model: str, image_noise: str | None,
              image_severity: int, text_noise: str | None, text_severity: int, seed: int = 0) -> robustness.Probe:
        """Clean and corrupted predictions of one item, side by side."""
        _check_noise(image_noise, text_noise)
        return robustness.probe(self.predictor(model), open_user_image(image_path), clean_text(text), image_noise,
                                _severity(image_severity), text_noise, _severity(text_severity), int(seed or 0))

    def item_sweep(self, image_path: str | None, text: str | None, model: str, image_noise: str | None,
                   text_noise: str | None, seed: int = 0) -> dict[str, dict[str, list[float]]]:
        """Each task's confidence in its clean prediction at severities 0..5."""
        _check_noise(image_noise, text_noise)
        if not robustness.sweep_modes(image_noise, text_noise):
            raise StudioError("Choose an image or a text corruption to sweep.")
        return robustness.item_sweep(self.predictor(model), open_user_image(image_path), clean_text(text),
                                     image_noise, text_noise, int(seed or 0))

    def catalogue_sweep(self, model: str, size: int, image_noise: str | None, text_noise: str | None,
                        seed: int = 0, progress: Progress | None = None) -> tuple[list[dict], Path]:
        """Mean accuracy against severity on a sample of the model's catalogue's test split; rows and CSV."""
        _check_noise(image_noise, text_noise)
        if not robustness.sweep_modes(image_noise, text_noise):
            raise StudioError("Choose an image or a text corruption to sweep.")
        name = self.predictor(model).config.catalogue.name
        try:
            catalogue = Catalogue.open(CatalogueConfig.load(name, self.data_root), split="test",
                                       limit=max(1, min(int(size or 50), MAX_SWEEP_ITEMS)))
        except CatalogueError as exc:
            raise StudioError(f"The {name} catalogue is not available here: {exc}") from exc
        rows = robustness.catalogue_sweep(self.predictor(model), catalogue, image_noise, text_noise,
                                          int(seed or 0), progress)
        path = write_table(self.data_dir / "sweeps" / f"{model}-{image_noise}-{text_noise}.csv", rows,
                           robustness.SWEEP_FIELDS)
        return rows, path


def _severity(value) -> int:
    severity = int(round(float(value or 0)))
    if severity not in noise.SEVERITIES:
        raise StudioError("Severities go from 0 (clean) to 5.")
    return severity


def _check_noise(image_noise: str | None, text_noise: str | None) -> None:
    if image_noise not in (None, "none", *noise.IMAGE_CORRUPTIONS):
        raise StudioError(f"Unknown image corruption {image_noise!r}.")
    if text_noise not in (None, "none", *noise.TEXT_CORRUPTIONS):
        raise StudioError(f"Unknown text corruption {text_noise!r}.")


# ---------------------------------------------------------------------- display helpers
def open_user_image(path: str | None) -> Image.Image:
    if not path:
        raise StudioError("Upload a product image (JPEG, PNG, WebP, GIF or BMP).")
    try:
        return load_image(path)
    except ImageError as exc:
        raise StudioError(str(exc)) from exc


def clean_text(text: str | None) -> str:
    """Printable text, bounded in length: control characters become spaces."""
    text = "".join(ch if ch.isprintable() else " " for ch in (text or ""))
    return " ".join(text.split())[:MAX_TEXT_CHARS]


def prediction_rows(prediction: Prediction) -> list[list]:
    """Rows for the predictions table: task, top-1, confidence, auto-accept, runners-up."""
    rows = []
    for task, p in prediction.tasks.items():
        mark = "✓ auto-accept" if p.auto_accept else (
            "below threshold" if p.threshold is not None else "no 90% threshold")
        others = ", ".join(f"{label} ({prob:.0%})" for label, prob in zip(p.labels[1:], p.probabilities[1:]))
        rows.append([task, p.label, round(p.confidence, 3), mark, others])
    return rows


def token_choices(prediction: Prediction, task: str) -> tuple[list[tuple[str, int]], int | None]:
    """(label, index) choices over the readable tokens, and the most relevant one for `task`."""
    relevance = prediction.token_relevance.get(task)
    choices, best, best_score = [], None, -1.0
    for i, token in enumerate(prediction.tokens):
        if token in SPECIAL_TOKENS:
            continue
        score = float(relevance[i]) if relevance is not None else 0.0
        choices.append((f"{token}  (relevance {score:.2f})", i))
        if score > best_score and any(ch.isalnum() for ch in token):  # punctuation is never the default
            best, best_score = i, score
    return choices, best


def heatmap(prediction: Prediction, token_index: int | None) -> Image.Image | None:
    """The selected token's attention over the image patches (the image [CLS]'s when none)."""
    if prediction.model_image is None or prediction.text_to_image is None:
        return None
    if token_index is None or not 0 <= int(token_index) < len(prediction.text_to_image):
        weights = prediction.image_cls_to_patches
    else:
        weights = prediction.text_to_image[int(token_index)]
    return attention_overlay(prediction.model_image, weights, prediction.grid_size)


def text_shading(prediction: Prediction, task: str | None = None) -> list[tuple[str, float]]:
    """Tokens shaded by the image [CLS]'s attention, or by the task's relevance when given."""
    weights = prediction.token_relevance.get(task) if task else prediction.image_cls_to_text
    if weights is None:
        return []
    return token_highlights(prediction.tokens, weights)


def modality_figure(prediction: Prediction) -> Figure:
    return modality_chart({t: p.modality_weights for t, p in prediction.tasks.items()})
