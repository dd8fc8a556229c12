"""The app's actions, as plain classes and functions tested without a browser.

A `Studio` holds the models and the label store: predict, save corrections, history and
export, a review queue sorted by uncertainty (least confident first: an item's confidence
is the lowest top-1 probability over its tasks), and robustness probes and sweeps. What
the app shows of their results is `views`; `app.py` lays out components and wires events.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .. import noise, robustness
from ..backbones import BackboneError
from ..checkpoint import CheckpointError, is_checkpoint, read_config
from ..data import (REPO_ROOT, Catalogue, CatalogueConfig, CatalogueError, ImageError, join_text, load_image,
                    read_manifest, write_table)
from ..errors import CMAClipError
from ..labels import LabelStore, LabelStoreError
from ..predict import Prediction, Predictor, TaskPrediction

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
    """Checkpoint name -> folder, for every sub-folder holding a CMA-CLIP config.json (one that
    cannot be loaded is still listed, and says why when chosen)."""
    return {path.parent.name: path.parent for path in sorted(Path(folder).glob("*/config.json"))
            if is_checkpoint(path.parent)}


@dataclass
class ReviewItem:
    """One item of a review queue, with the model's predictions and what the reviewer did."""

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
    """A model's predictions on a batch of items, least confident first, and the item under review."""

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

    def history(self, limit: int = 50) -> list[dict]:
        """The latest label-store entries, newest first (`views.history_rows` tabulates them)."""
        return self.store.history(limit=limit)

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


# ---------------------------------------------------------------------- input cleaning
def open_user_image(path: str | None) -> Image.Image:
    """The uploaded image, decoded by `load_image` (size limit, EXIF, modes); unreadable files are a StudioError."""
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
