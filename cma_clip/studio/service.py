"""The app's actions, as plain classes and functions tested without a browser.

A `Studio` holds the models and the label store: predict, save labels (checked against
the versions the labeler saw, the task's vocabulary and a request id), history, audit,
agreement and export, a review queue (ranked by least confidence, margin or entropy,
filtered by task and confidence, its decided items left out, kept in the store so that a
reload or a restart resumes it) with save, skip, undo, previous and next and a bulk
accept by filter, and robustness probes and sweeps. The queue's records and the actions'
outcomes are `workflow`'s; what the app shows of them is `views`; `app.py` lays out
components and wires events.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from .. import mislabels, noise, review, robustness
from ..backbones import BackboneError
from ..catalogue_predictions import catalogue_predictions
from ..checkpoint import CheckpointConfig, CheckpointError, read_config, require_finished
from ..data import (MAX_MANIFEST_ROWS, REPO_ROOT, Catalogue, CatalogueConfig, CatalogueError, ImageError, PhotoIndex,
                    default_data_root, is_missing, join_text, limit_splits, load_image, read_manifest, write_table)
from ..errors import CMAClipError
from ..labels import (JOINERS, MAX_LABEL_CHARS, MAX_NAME_CHARS, BatchUndone, LabelConflict, LabelStore,
                      LabelStoreError, TaskState, UnknownLabel, agreement_file, class_spelled, content_item_id,
                      name_key, request_reused, same_class, tidy_label, without_invisibles)
from ..predict import Prediction, Predictor, Scores
from ..review import STRATEGIES
from ..runtime import resolve_device
from . import uploads
from .batching import MicroBatcher
from .workflow import (ALL_TASKS, CHOICES_KEPT, DISAGREEMENTS, MISLABELS, SOURCE_ORDER, THRESHOLDS, UPLOAD, BulkOutcome,
                       ItemView, ReviewItem, ReviewQueue, SaveOutcome, Shown, UndoOutcome, new_id, plural)

CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
MAX_TASKS = 8  # correction dropdowns the UI lays out; a checkpoint uses the first len(tasks)
MAX_TEXT_CHARS = 5000
MAX_SWEEP_ITEMS = 500  # a catalogue sweep costs about 0.4 s per item on 2 CPU cores
MAX_QUEUE_ITEMS = 2000  # a review sample: read from kept catalogue predictions, else predicted (~20 items/s on 2 cores)
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds take it
MAX_BATCH = 16  # concurrent /predict calls answered by one batch (`MicroBatcher`)
SPLITS = ("train", "val", "test")
BULK_CHUNK = 25  # items per bulk-accept transaction: each chunk is acknowledged once committed
AUDIT_PAGE = 50
REVIEW_UPLOADS = "review_uploads"  # the studio folder's folder of review uploads (their images are kept 72 h)
EXPORTS_KEPT = 20  # the newest exports kept in the studio folder (a download is Gradio's copy or the client's)
EXPORT_NAME = re.compile(r"labels_export-\d{8}T\d{12}Z-[0-9a-f]{6}\.(csv|jsonl)")  # UTC to the microsecond
RECENT_REQUESTS = 1000  # stored requests remembered, to answer a retry with the first answer
Progress = Callable[[float, str], None]


class StudioError(CMAClipError, ValueError):
    """A problem the user can fix, worded for the UI."""


class SweepStopped(StudioError):
    """A batch sweep stopped by its user (`Studio.stop_sweep`): nothing of it is kept."""


def default_data_dir() -> Path:
    """Where the app keeps its label store and stored images: $CMA_CLIP_STUDIO_DIR or ./studio_data."""
    return Path(os.environ.get("CMA_CLIP_STUDIO_DIR", REPO_ROOT / "studio_data"))


def default_reviewers() -> frozenset[str]:
    """Who may settle disagreements: $CMA_CLIP_REVIEWERS, names separated by commas (none: anyone)."""
    return frozenset(name.strip() for name in os.environ.get("CMA_CLIP_REVIEWERS", "").split(",") if name.strip())


def available_checkpoints(folder: str | Path = CHECKPOINT_DIR,
                          left_out: dict[str, str] | None = None) -> dict[str, Path]:
    """Checkpoint name -> folder, for every sub-folder whose config.json reads as a CMA-CLIP config
    of a finished run (weights that cannot be loaded are found on first use, which says why); the others go into
    `left_out` (name -> why), so the app can name them instead of dropping them unsaid."""
    found = {}
    for path in sorted(Path(folder).glob("*/config.json")):
        try:
            read_config(path.parent)
            require_finished(path.parent)
        except CheckpointError as exc:
            if left_out is not None:
                left_out[path.parent.name] = str(exc)
            continue
        found[path.parent.name] = path.parent
    return found


class Studio:
    """Models, the label store and the app's actions. Thread-safe: Gradio calls it from many threads."""

    def __init__(self, checkpoint_dir: str | Path = CHECKPOINT_DIR, data_dir: str | Path | None = None,
                 device: str | None = None, data_root: str | Path | None = None, cache_dir: str | Path | None = None,
                 catalogue_limit: int | None = None, reviewers: Iterable[str] | None = None) -> None:
        """`cache_dir`: the feature cache and the kept catalogue predictions ($CMA_CLIP_CACHE by default);
        `catalogue_limit`: review only the first N items of each split of a catalogue (quick runs, tests);
        `reviewers`: the annotators who may settle disagreements (default `default_reviewers`; none: anyone)."""
        self.unusable: dict[str, str] = {}  # checkpoint -> why it is left out (its config) or fails (its weights)
        self.checkpoints = available_checkpoints(checkpoint_dir, self.unusable)
        self.data_dir = Path(data_dir or default_data_dir())
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file by that name, a read-only disk (a Space without persistent storage)
            raise StudioError(f"cannot make the studio's folder {self.data_dir} (CMA_CLIP_STUDIO_DIR): "
                              f"{exc.strerror or exc}") from exc
        if not os.access(self.data_dir, os.W_OK):  # the store's message spoke of copying a labels.db it lacked
            raise StudioError(f"the studio's folder {self.data_dir} (CMA_CLIP_STUDIO_DIR) cannot be written "
                              "(read-only?): the label store and uploaded images are kept there; give a writable "
                              "folder (on a Space, its persistent storage: /data/studio)")
        self.store = LabelStore(self.data_dir / "labels.db")
        self.uploads_dir = self.data_dir / REVIEW_UPLOADS  # one folder per uploaded manifest's images
        self.device, self.data_root = resolve_device(device), data_root  # a device this machine lacks fails here
        self.cache_dir, self.catalogue_limit = cache_dir, catalogue_limit
        self._predictors: dict[str, Predictor] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._batchers: dict[str, MicroBatcher] = {}
        self._opened: dict[str, Catalogue] = {}  # catalogue name -> the whole catalogue, for review queues
        self._scores: dict[tuple[str, str], Scores | None] = {}  # (model, split) -> its kept catalogue predictions
        self.loading: threading.Thread | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        self._sweeps: dict[str, threading.Event] = {}  # a session -> the stop signal of the batch sweep it runs
        self._queue_locks: dict[str, threading.Lock] = {}
        self._requests: OrderedDict[str, SaveOutcome] = OrderedDict()
        # catalogue -> item id -> its labels, and its split
        self._catalogues: dict[str, dict[str, tuple[dict[str, str], str | None]]] = {}
        self._photo_indexes: dict[str, PhotoIndex | None] = {}
        self._photo_lock = threading.RLock()
        self.bulk_chunk = BULK_CHUNK
        self.reviewers = frozenset(default_reviewers() if reviewers is None else reviewers)

    def _catalogue_missing(self, name: str, exc: CatalogueError) -> StudioError:
        """The refusal of a view that reads a catalogue this server cannot open, naming where it looked."""
        where = (f"catalogues are read from {default_data_root()}: CMA_CLIP_DATA" if self.data_root is None else
                 f"catalogues are read from {self.data_root}")
        return StudioError(f"The {name} catalogue is not available here: {exc} ({where})")

    # ------------------------------------------------------------------ models
    @property
    def model_names(self) -> list[str]:
        return list(self.checkpoints)

    @property
    def default_model(self) -> str | None:
        """The model a new page starts at: the first whose weights load (as far as `load_models` knows)."""
        usable = [name for name in self.model_names if name not in self.unusable]
        return (usable or self.model_names or [None])[0]

    def add_checkpoint(self, name: str, folder: str | Path) -> None:
        read_config(folder)
        self.checkpoints[name] = Path(folder)

    def predictor(self, name: str | None) -> Predictor:
        """The model `name`, loaded on first use (a call while it loads waits for that load)."""
        if not isinstance(name, str) or name not in self.checkpoints:
            raise StudioError(f"Unknown model {name!r}. Choose one of: {', '.join(self.checkpoints) or 'none found'}.")
        if name in self._predictors:
            return self._predictors[name]
        with self._lock:
            lock = self._model_locks.setdefault(name, threading.Lock())
        with lock:  # one load per model; the other models stay usable meanwhile
            if name not in self._predictors:
                try:
                    self._predictors[name] = Predictor.from_checkpoint(self.checkpoints[name], self.device)
                except (CheckpointError, BackboneError) as exc:
                    raise StudioError(f"Model {name!r} cannot be loaded: {exc}") from exc
            return self._predictors[name]

    def load_models(self, names: list[str] | None = None) -> threading.Thread:
        """Load the models (all by default, the first one first) and run one prediction on each, in a
        background thread, so that the first user's prediction finds them loaded and warm. Returns the
        thread (`wait_loaded` joins it); a model that cannot load is left for its first use to report."""
        def load() -> None:
            started = time.perf_counter()
            for name in names if names is not None else self.model_names:
                try:
                    self.warm_up(name)
                except StudioError as exc:
                    self.unusable[name] = str(exc)
            self.load_seconds = time.perf_counter() - started
            # after the server starts: a stat per catalogue photo, so the first upload finds the index built
            threading.Thread(target=lambda: [self._photo_index(name) for name in list(self._predictors)],
                             name="index-photos", daemon=True).start()

        self.loading = threading.Thread(target=load, name="load-models", daemon=True)
        self.loading.start()
        return self.loading

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for `load_models` to finish; True when it has (or never started)."""
        if self.loading is not None:
            self.loading.join(timeout)
        return self.loading is None or not self.loading.is_alive()

    def warm_up(self, name: str) -> None:
        """Load a model and run one explained prediction of a blank item through it (kernels, buffers)."""
        predictor = self.predictor(name)
        blank = Image.new("RGB", (predictor.backbone.image_size,) * 2, "white")
        self._batcher(name).submit((blank, "warm up: a plain white cotton t-shirt"))

    def _batcher(self, name: str) -> MicroBatcher:
        predictor = self.predictor(name)
        with self._lock:
            if name not in self._batchers:
                def run(items: list[tuple[Image.Image, str]]) -> list[Prediction]:
                    return predictor.predict_many([image for image, _ in items], [text for _, text in items])
                self._batchers[name] = MicroBatcher(run, MAX_BATCH, name=f"predict-{name}")
            return self._batchers[name]

    def task_classes(self, model: str) -> dict[str, list[str]]:
        return self.predictor(model).classes

    def new_classes(self, model: str) -> dict[str, list[str]]:
        """Per task of `model`, the new classes labelers confirmed (labels items hold outside its classes):
        choices beside the model's classes, so the next item need not type and confirm one again."""
        return self.store.new_classes(self.task_classes(model))

    def tasks_of(self, model: str) -> list[str]:
        """A model's tasks read from its config, without loading it ([] when it cannot be read)."""
        try:
            return list(self._config(model).classes)
        except (KeyError, CheckpointError):
            return []

    def display_names(self, model: str | None = None) -> dict[str, str]:
        """Task -> the name the app shows: one model's tasks, or (None) every model's (the history spans
        them), where a name two models' tasks share gets its column beside it: "Colour (baseColour)"."""
        names: dict[str, str] = {}
        for name in ([model] if model else self.model_names):
            try:
                names.update(self._config(name).display_names)
            except (KeyError, CheckpointError):
                continue
        shared = {name for name, count in Counter(names.values()).items() if count > 1}
        return {task: f"{name} ({task})" if name in shared else name for task, name in names.items()}

    def held_out_metrics(self, model: str) -> dict:
        """The model's report on its held-out `test` split as its config records it ({} when none)."""
        try:
            return self._config(model).metrics.get("test", {})
        except (KeyError, CheckpointError):
            return {}

    def _config(self, model: str) -> CheckpointConfig:
        """A model's config: its predictor's when loaded, else read from its folder (KeyError: no such model)."""
        if model in self._predictors:
            return self._predictors[model].config
        return read_config(self.checkpoints[model])

    # ------------------------------------------------------------------ predict and explain
    def predict(self, image_path: str | None, text: str | None, model: str) -> Prediction:
        """One item with its explanations; concurrent calls on a model run together as one batch."""
        image = open_user_image(image_path)
        return self._batcher(model).submit((image, clean_text(text)))

    # ------------------------------------------------------------------ correct and save one item
    def save_correction(self, image_path: str | None, text: str | None, model: str, annotator: str | None,
                        item_id: str | None, labels: dict[str, str | None],
                        prediction: Prediction | None = None, request_id: str | None = None) -> int:
        """The unchecked save of the `/save_correction` API, kept for scripts written against
        it: no version check, no vocabulary check (a request id still makes a retry store
        one row). The app's own Save button goes through `save_item`. Returns the save's id."""
        image, chosen = self._checked_inputs(image_path, annotator, model, labels)
        predictions = self._light_predictions(model, image, text, prediction)
        try:
            return self.store.save_correction(image=Path(image_path), text=clean_text(text), labels=chosen,
                                              predictions=predictions, annotator=annotator.strip(),
                                              checkpoint=model, item_id=(item_id or "").strip() or None,
                                              request_id=(request_id or "").strip() or None,
                                              classes=self.task_classes(model))  # each kept as the model spells it
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc

    def resolve_item_id(self, image_path: str | None, text: str | None, item_id: str | None,
                        decoded: bool = False) -> str:
        """The id a save of this image and text goes under: the catalogue id given, else the
        content id (image bytes + text), so an upload without an id never takes another item's.
        `decoded`: the image was already opened (and checked) by the caller."""
        explicit = (item_id or "").strip()
        if explicit:
            return explicit
        if not decoded:
            open_user_image(image_path)  # a worded error for unreadable files
        try:
            return content_item_id(Path(image_path), clean_text(text))
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc

    def item_view(self, item_id: str, tasks: list[str], start: dict[str, str | None]) -> ItemView:
        """Where each task of an item stands in the store, and where its control starts:
        the latest saved label, else `start` (the model's prediction, or the catalogue's label)."""
        states = self.store.item_state(item_id)
        values = {t: states[t].label if t in states and states[t].label is not None else start.get(t)
                  for t in tasks}
        shown = Shown(item_id, {t: states[t].version if t in states else None for t in tasks})
        return ItemView(item_id, states, values, shown, self.store.item_history(item_id))

    def predict_item(self, image_path: str | None, text: str | None, model: str,
                     item_id: str | None) -> tuple[Prediction, ItemView]:
        """The Predict tab's item: the prediction, and the item's saved labels under its id
        (and the catalogue's own labels, when the id is one of the model's catalogue)."""
        prediction = self.predict(image_path, text, model)
        explicit = bool((item_id or "").strip())
        resolved = self.resolve_item_id(image_path, text, item_id, decoded=True)
        view = self.model_view(model, resolved, prediction, explicit)
        # whose photo it is, id given or not: an id typed over another item's photo took its labels unsaid (QA s42)
        view.photo_of = [(item, self._catalogue_item(model, item)[1])
                         for item in self.catalogue_items_with_photo(model, Path(image_path))]
        return prediction, view

    def catalogue_items_with_photo(self, model: str, photo: Path) -> list[str]:
        """The ids of the model's catalogue items whose photo is `photo`, byte for byte (an item
        uploaded without its id); [] when the catalogue cannot be read."""
        with self._photo_lock:
            index = self._photo_index(model)
            try:
                return index.with_file(photo) if index is not None else []
            except OSError:  # a catalogue photo gone since: the look-up only adds a note
                return []

    def _photo_index(self, model: str) -> PhotoIndex | None:
        """The model's catalogue's photo index, built once (`load_models` builds them in the background)."""
        name = self.predictor(model).config.catalogue.name
        with self._photo_lock:
            if name not in self._photo_indexes:
                try:
                    self._photo_indexes[name] = PhotoIndex(Catalogue.open(CatalogueConfig.load(name, self.data_root)))
                except (CatalogueError, OSError):
                    self._photo_indexes[name] = None
            return self._photo_indexes[name]

    def model_view(self, model: str, item_id: str, prediction: Prediction | None, catalogued: bool) -> ItemView:
        """`item_view` over the model's tasks, with the catalogue's labels when `catalogued` (an id was given).
        A control with no saved label starts at the catalogue's label, a label someone chose (`_start_labels`);
        empty when the catalogue's cell is blank; else (a task or an item the catalogue lacks) at the model's.
        (At the model's, a correction of one task stored the model's
        guesses for the others, "Section = Baby/Children" at 31%, as human labels over the catalogue's,
        and training took them: QA, session 40.)"""
        catalogue, split, columns = self._catalogue_item(model, item_id) if catalogued else ({}, None, set())
        guesses = {t: p.label for t, p in prediction.tasks.items()} if prediction else {}
        tasks, choices = self.predictor(model).tasks, self.label_choices(model, catalogue)
        view = self.item_view(item_id, tasks, _start_labels(tasks, catalogue, columns, guesses, choices))
        view.catalogue, view.split, view.choices = catalogue, split, choices
        view.catalogue_read = catalogued and bool(self._catalogue(model))
        return view

    def label_choices(self, model: str, catalogue: dict[str, str] | None = None) -> dict[str, list[str]]:
        """Per task of `model`, the labels its control offers and a save takes without a new class confirmed: its
        classes, the new classes labelers confirmed, and the item's own label in the model's `catalogue` where
        that spells none of them (a class the model lacks, "Long John": its control starts there, and Accept
        confirms it). A manifest's labels are no such class: a typo there is asked about like a typed one."""
        confirmed = self.new_classes(model)
        known = {t: [*classes, *confirmed.get(t, [])] for t, classes in self.task_classes(model).items()}
        own = {t: tidy for t, label in (catalogue or {}).items() if t in known and (tidy := _catalogue_label(label))}
        return {t: [*labels, own[t]] if t in own and class_spelled(own[t], labels) is None else labels
                for t, labels in known.items()}

    def catalogue_labels(self, model: str, item_id: str) -> dict[str, str]:
        """The labels the model's own catalogue gives an item id ({} when it has no such item)."""
        return self._catalogue_item(model, item_id)[0]

    def _catalogue_item(self, model: str, item_id: str) -> tuple[dict[str, str], str | None, set[str]]:
        """An item id's labels and split in the model's own catalogue, and the model's tasks it has a column
        of (a blank cell there: no label); ({}, None, set()) when it has no such item."""
        known, tasks = self._catalogue(model), self.predictor(model).tasks
        if item_id not in known:
            return {}, None, set()
        labels, split, columns = known[item_id]
        return {t: v for t, v in labels.items() if t in tasks}, split, columns & set(tasks)

    def _catalogue(self, model: str) -> dict[str, tuple[dict[str, str], str | None, frozenset[str]]]:
        """The model's own catalogue, read once: item id -> (labels, split, task columns); {} when it cannot
        be read (a Space or a clone without the catalogues)."""
        name, tasks = self.predictor(model).config.catalogue.name, self.predictor(model).tasks
        with self._lock:
            known = self._catalogues.get(name)
        if known is None:
            try:
                catalogue = Catalogue.open(CatalogueConfig.load(name, self.data_root))
                labels = {column: catalogue.labels(column) for column in catalogue.rows[0]
                          if column in catalogue.config.tasks or column in tasks}
                columns = frozenset(labels)  # one for every item
                known = {item: ({t: column[n] for t, column in labels.items() if column[n]}, row.get("split"), columns)
                         for n, (item, row) in enumerate(zip(catalogue.item_ids(), catalogue.rows))}
            except (CatalogueError, OSError):
                known = {}
            with self._lock:
                self._catalogues[name] = known
        return known

    def save_item(self, image_path: str | None, text: str | None, model: str, annotator: str | None,
                  item_id: str | None, labels: dict[str, str | None], shown: Shown | None, *,
                  request_id: str | None = None, new_classes: dict[str, str] | None = None, force: bool = False,
                  prediction: Prediction | None = None, labels_for: str | None = None) -> SaveOutcome:
        """The Predict tab's checked save. The item is the id given, else the content id. Its
        base versions are those `shown` for that item (none shown, or another item shown: the
        labeler saw none of its labels), so a label someone else saved comes back as a
        conflict; labels outside the vocabulary come back as unknown unless confirmed in
        `new_classes`; a `request_id` already stored stores nothing. `labels_for`: the item
        whose labels the controls show (its prediction's); a save for another item is refused."""
        rid = (request_id or "").strip() or None
        if (done := self._recent(rid)) is not None:
            return done
        image, chosen = self._checked_inputs(image_path, annotator, model, labels)
        resolved = self.resolve_item_id(image_path, text, item_id)
        controls = labels_for.strip() if isinstance(labels_for, str) else ""
        if controls and controls != resolved:
            raise StudioError(f"The labels on screen are item {controls}'s, and the photo, text and id are item "
                              f"{resolved}'s: nothing was saved. Predict it (its labels then show), then save.")
        seen = shown.versions if shown is not None and shown.item_id == resolved else {}
        predictions = self._light_predictions(model, image, text, prediction)
        # a second Save of the labeler's own labels stored a copy, which an undo then "undid" into itself
        standing, name = self.store.item_state(resolved), self._held(annotator)
        if not new_classes and all(_own_label(standing.get(t), v, name) for t, v in chosen.items()):
            return self._remember(rid, SaveOutcome("unchanged", resolved, chosen, request_id=rid))
        catalogue = self.catalogue_labels(model, resolved) if (item_id or "").strip() else {}
        outcome = self._save(resolved, Path(image_path), clean_text(text), chosen, annotator, model, predictions,
                             {t: seen.get(t) for t in chosen}, rid, new_classes, force,
                             {t: v for t, v in catalogue.items() if t in chosen}, standing)
        return self._remember(rid, outcome)

    def _checked_inputs(self, image_path: str | None, annotator: str | None, model: str,
                        labels: dict[str, str | None]) -> tuple[Image.Image, dict[str, str]]:
        if not image_path:
            raise StudioError("Upload the item's image before saving a correction.")
        image = open_user_image(image_path)  # refuse unreadable files before anything is written
        self._annotator(annotator, "correction")
        tasks = self.predictor(model).tasks
        chosen = given_labels(labels, tasks)
        if not chosen:  # Predict fills the controls (the item's labels, else the model's): not predicted
            raise StudioError("Choose at least one label to save: press Predict first (the controls start at "
                              "the item's labels, else the model's), or pick one.")
        return image, chosen

    def _light_predictions(self, model: str, image: Image.Image, text: str | None,
                           prediction: Prediction | None) -> dict[str, dict]:
        """The model's label and confidence per task, stored with the labels."""
        if prediction is None:  # compute it for these inputs
            prediction = self.predictor(model).predict_batch([image], [clean_text(text)])[0]
        return {t: {"label": p.label, "confidence": round(p.confidence, 4)} for t, p in prediction.tasks.items()}

    def _save(self, item_id: str, image: Path, text: str, labels: dict[str, str], annotator: str | None, model: str,
              predictions: dict[str, dict], base_versions: dict[str, int | None], request_id: str | None,
              new_classes: dict[str, str] | None, force: bool, catalogue: dict[str, str] | None,
              before: dict[str, TaskState], *, adjudicated: bool = False, uploaded: bool = False,
              blind: bool = False) -> SaveOutcome:
        """One checked save in the store, its refusals returned as outcomes. `catalogue`: the item's labels in
        the model's catalogue, or (`uploaded`) in an uploaded manifest; `before`: where the item stood, as the
        caller read it (`LabelStore.item_state`); `blind`: the other labelers' labels were hidden from the
        labeler (a second pass)."""
        # the confirmed class as the refusal named it (`tidy_label`: "Vert été" for a decomposed "Vert été")
        new_classes = {t: v for t, v in given_labels(new_classes or {}, labels).items()
                       if tidy_label(labels.get(t) or "") == tidy_label(v)}
        if missing := {t: v for t, v in labels.items() if is_missing(v)}:  # the store would drop them unsaid
            given = ", ".join(f"{self.display_names(model).get(t, t)} = {v}" for t, v in missing.items())
            raise StudioError(f"{given}: the catalogues and training read this as no label, so nothing was saved. "
                              "Choose a class, or clear the box to give the task no label.")
        if long := [t for t, v in labels.items() if len(v) > MAX_LABEL_CHARS]:  # the store's words name no task
            name = self.display_names(model).get(long[0], long[0])
            raise StudioError(f"The {name} label is {len(labels[long[0]]):,} characters long; a label has at most "
                              f"{MAX_LABEL_CHARS}: nothing was saved.")
        annotator = self._held(annotator)
        try:
            result = self.store.save(image=image, text=text, labels=labels, annotator=annotator,
                                     item_id=item_id, predictions=predictions, checkpoint=model,
                                     base_versions=base_versions, request_id=request_id, source="human",
                                     catalogue_labels=catalogue,
                                     vocabulary=self.label_choices(model, None if uploaded else catalogue),
                                     new_classes=new_classes, force=force, adjudicated=adjudicated, blind=blind)
        except UnknownLabel as exc:
            return SaveOutcome("unknown", item_id, labels, unknown=exc.unknown, request_id=request_id,
                               new_classes=new_classes)
        except LabelConflict as exc:
            return SaveOutcome("conflict", item_id, labels, conflicts=exc.conflicts, request_id=request_id,
                               new_classes=new_classes, annotator=annotator)
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc
        predicted = {t: p["label"] for t, p in predictions.items()}
        labels = result.labels  # as stored: "Black" for a "Black" typed with a zero-width space after it
        rulings = {} if adjudicated else self.store.rulings(result.item_id)  # a label against one reopens the item
        # another labeler's label replaced (in a blind pass, unseen): a disagreement opened, said (QA s42: one
        # Accept put it aside without a word)
        rivals = [t for t, v in labels.items() if (was := before.get(t)) and was.label is not None and was.label != v
                  and was.source == "human" and was.annotator != annotator and not was.adjudicated]
        disputed = (self.store.open_disagreements(rivals, result.item_id).get(result.item_id, {})
                    if rivals and not adjudicated else {})
        return SaveOutcome("duplicate" if result.duplicate else "saved", result.item_id, labels, result.save_id,
                           {t: "accepted" if v == predicted.get(t) else "corrected" for t, v in labels.items()},
                           request_id=request_id, new_classes=new_classes, annotator=annotator,
                           catalogue={t: v for t, v in (catalogue or {}).items() if t in labels and not is_missing(v)},
                           against={t: r for t, r in rulings.items() if t in labels and labels[t] != r.label},
                           ruling=adjudicated, disputed=disputed)

    def _recent(self, request_id: str | None, kind: str = "label") -> SaveOutcome | None:
        """The outcome of a request this server already answered with a move (stored, marked as a
        duplicate, or unchanged): a retried call (the first's answer lost) gets the first's answer,
        whatever the labeler's screen moved to since, never a save on the item it moved to. The
        store dedups stored requests too, across restarts. A request id another kind of decision
        used (`kind`: label or skip) is refused: that is no retry."""
        with self._lock:
            done = self._requests.get(request_id) if request_id else None
        if done is None:
            return None
        if done.kind != kind:
            raise StudioError(request_reused(kind, done.kind, request_id))
        return replace(done, result="duplicate") if done.stored else done

    def _remember(self, request_id: str | None, outcome: SaveOutcome) -> SaveOutcome:
        if request_id and (outcome.stored or outcome.result in ("unchanged", "settled")):
            with self._lock:
                self._requests[request_id] = outcome
                while len(self._requests) > RECENT_REQUESTS:
                    self._requests.popitem(last=False)
        return outcome

    # ------------------------------------------------------------------ history, audit, agreement, export
    def history(self, limit: int = 50) -> list[dict]:
        """The latest label-store entries, newest first (`views.history_rows` tabulates them)."""
        return self.store.history(limit=limit)

    def audit(self, task: str | None = None, annotator: str | None = None, status: str | None = None,
              source: str | None = None, search: str | None = None, page: int = 1,
              page_size: int = AUDIT_PAGE) -> tuple[list[dict], int, int]:
        """One page (from 1) of every decision, newest first, filtered; the rows, how many
        match and the page shown. Empty filters ("", "any") filter nothing."""
        def wanted(value: str | None) -> str | None:
            if value is not None and not isinstance(value, str):
                raise StudioError(f"The audit's filters take text, not {type(value).__name__}.")
            value = (value or "").strip()
            return None if value.lower() in ("", "any", "all", ALL_TASKS) else value

        page = whole_number(page, "page", 1, 10**9, default=1)
        page_size = max(1, min(int(page_size or AUDIT_PAGE), 500))
        try:
            rows, total = self.store.audit(wanted(task), wanted(annotator), wanted(status), wanted(source),
                                           (search or "").strip() or None, page_size, (page - 1) * page_size)
            if not rows and total and page > 1:  # past the end: the last page
                page = (total - 1) // page_size + 1
                rows, total = self.store.audit(wanted(task), wanted(annotator), wanted(status), wanted(source),
                                               (search or "").strip() or None, page_size, (page - 1) * page_size)
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc
        if not total and (task := wanted(task)) and task not in (decided := self.store.decided_tasks()):
            names = self.display_names()
            raise StudioError(f"No decision names the task {names.get(task, task)!r}; the tasks decided: "
                              f"{', '.join(names.get(t, t) for t in decided) or 'none yet'}.")
        return rows, total, page

    def item_history(self, item_id: str | None) -> list[dict]:
        """Every decision on one item, oldest first (labels, skips, undos, auto-accepts)."""
        item_id = (item_id or "").strip()
        if not item_id:
            raise StudioError("Enter an item id to see its history.")
        if not (rows := self.store.item_history(item_id)):  # an empty table said nothing of why
            raise StudioError(f"No decision on item {item_id!r} yet (ids match exactly; the audit's search "
                              "finds part of one).")
        return rows

    def agreement(self) -> dict[str, dict]:
        """Per task, raw agreement and Cohen's kappa where two annotators labelled the same item."""
        return self.store.agreement()

    def export(self, fmt: str) -> Path:
        """The labels now, in `fmt` (CSV or JSONL), in a file of this export's own, named by its time
        (two exports at once each get their own snapshot and agreement): beside the store, so image paths
        stay inside its folder; the agreement goes beside it (`labels.agreement_file`). The newest
        `EXPORTS_KEPT` exports are kept."""
        fmt = (fmt or "").lower().lstrip(".") if isinstance(fmt, str) else ""
        if fmt not in ("csv", "jsonl"):
            raise StudioError("Export format must be CSV or JSONL.")
        now = time.time_ns() // 1000
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000)) + f"{now % 1_000_000:06d}Z"
        path = self.data_dir / f"labels_export-{stamp}-{new_id()[:6]}.{fmt}"
        try:
            self.store.export(path)
        except LabelStoreError as exc:
            raise StudioError(f"Export failed: {exc}") from exc
        for old in sorted((f for f in self.data_dir.iterdir() if EXPORT_NAME.fullmatch(f.name)),
                          reverse=True)[EXPORTS_KEPT:]:  # the oldest first to go: the names begin with the time
            for done in (old, agreement_file(old)):
                done.unlink(missing_ok=True)
        return path

    def export_agreement(self, exported: str | Path) -> Path | None:
        """The agreement an export (`export`'s file, or a copy of it by the same name) wrote beside itself."""
        name = Path(exported).name
        found = agreement_file(self.data_dir / name) if EXPORT_NAME.fullmatch(name) else None
        return found if found is not None and found.is_file() else None

    # ------------------------------------------------------------------ review queue: building
    def review_catalogue(self, model: str, split: str, size: int, progress: Progress | None = None, *,
                         strategy: str = STRATEGIES[0], task: str | None = None, min_conf: float | None = None,
                         max_conf: float | None = None, show_decided: bool = False,
                         annotator: str | None = None) -> ReviewQueue:
        """A random sample of one split of the model's own catalogue, its decided items left
        out (unless `show_decided`), ranked by `strategy` and filtered by confidence."""
        predictor = self.predictor(model)
        name = predictor.config.catalogue.name
        if split not in SPLITS:
            raise StudioError(f"Choose a split among {', '.join(SPLITS)}, not {split!r}.")
        tasks = self._queue_tasks(model, task)
        try:
            whole = self.catalogue(name)
            catalogue = whole.split(split)
            if not len(catalogue):
                raise CatalogueError(f"its {split!r} split has no items")
            ids = catalogue.item_ids()
            decided = set() if show_decided else self.store.decided_items(tasks)
            pool = [i for i, item_id in enumerate(ids) if item_id not in decided]
            if not pool:
                raise StudioError(f"Every item of the {split} split is decided for {', '.join(tasks)}. Tick "
                                  "'show decided items' to review them again.")
            size = min(whole_number(size, "sample size", 1, MAX_QUEUE_ITEMS, default=50), len(pool))
            picked = np.sort(np.random.default_rng(0).choice(pool, size=size, replace=False))
            sample = catalogue.take(picked)
            labels = {t: sample.labels(t) for t in predictor.tasks}
            items = [(item_id, str(path), text, {t: labels[t][n] for t in labels if labels[t][n]})
                     for n, (item_id, path, text) in enumerate(zip(sample.item_ids(), sample.image_paths(),
                                                                   sample.texts()))]
            kept = self.catalogue_scores(model, split, progress)
        except CatalogueError as exc:
            raise self._catalogue_missing(name, exc) from exc
        left_out = len(ids) - len(pool)
        notes = [f"{plural(left_out, 'decided item')} of the split left out"] if left_out else []
        return self._queue(model, items, notes, progress, tasks=tasks, strategy=strategy, min_conf=min_conf,
                           max_conf=max_conf, show_decided=show_decided, split=split, annotator=annotator,
                           scores=kept.take(picked) if kept is not None else None,
                           source=f"{name}, {split} split: {size} sampled of {len(pool)} "
                                  f"{'items' if show_decided else 'pending items'}")

    def catalogue(self, name: str) -> Catalogue:
        """The whole catalogue `name` (its first `catalogue_limit` items per split), opened once."""
        with self._lock:
            opened = self._opened.get(name)
        if opened is None:
            opened = Catalogue.open(CatalogueConfig.load(name, self.data_root))
            if self.catalogue_limit:
                opened = limit_splits(opened, self.catalogue_limit)
            with self._lock:
                self._opened[name] = opened
        return opened

    def catalogue_scores(self, model: str, split: str, progress: Progress | None = None) -> Scores | None:
        """The model's predictions for every item of a split of its catalogue (`catalogue_predictions`:
        computed once from the feature cache, then kept on disk and here); None when the catalogue's
        features are not cached (a queue then predicts its sample)."""
        key = (model, split)
        with self._lock:
            if key in self._scores:
                return self._scores[key]
        predictor = self.predictor(model)
        if progress is not None:
            progress(0.0, "reading the catalogue's predictions (the first time: computed from its cached features)")
        scores = catalogue_predictions(predictor, self.catalogue(predictor.config.catalogue.name), split,
                                       self.cache_dir)
        if scores is not None:  # features cached later (a mislabel ranking builds them) are picked up then
            with self._lock:
                self._scores[key] = scores
        return scores

    def review_upload(self, model: str, manifest_path: str | None, image_paths: list[str] | None,
                      progress: Progress | None = None, *, strategy: str = STRATEGIES[0], task: str | None = None,
                      min_conf: float | None = None, max_conf: float | None = None, show_decided: bool = False,
                      annotator: str | None = None) -> ReviewQueue:
        """An uploaded manifest and its images (files, or a .zip keeping their folders), matched
        by relative path (`uploads.match`) and kept in a folder of this upload's own."""
        if not manifest_path:
            raise StudioError("Upload a CSV or JSONL manifest.")
        predictor = self.predictor(model)
        tasks = self._queue_tasks(model, task)
        config = predictor.config.catalogue_on(manifest_path)
        try:
            rows = read_manifest(manifest_path, max_rows=MAX_MANIFEST_ROWS)
        except CatalogueError as exc:  # read_manifest names the bad row or encoding
            raise StudioError(f"Cannot read the manifest: {exc}") from exc
        needed = [config.image_column, *config.text_columns]
        if not rows:
            raise StudioError(f"The manifest has no rows: it needs the columns {needed} and a row per item.")
        if lacking := [c for c in needed if c not in rows[0]]:
            raise StudioError(f"The manifest lacks the column{'s' if len(lacking) > 1 else ''} "
                              f"{', '.join(map(repr, lacking))}: it needs the columns {needed} "
                              f"(found {sorted(rows[0])}).")
        id_column = config.id_column if config.id_column in rows[0] else None
        item_ids = [(row[id_column].strip() if id_column else "") or uploads.relative_path(row[config.image_column])
                    for row in rows]
        _check_unique(item_ids, id_column)
        upload_id = new_id()
        uploads.prune(self.uploads_dir, keep_ids={upload_id})  # room before the upload is written
        try:
            images = uploads.receive(self.uploads_dir, upload_id, image_paths)
            found, missing = uploads.match(images, [row[config.image_column] for row in rows])
            kept = {i: uploads.keep(images, uploads.relative_path(rows[i][config.image_column]), path)
                    for i, path in found.items()}
            uploads.discard_unused(images, set(kept.values()))
            uploads.make_room(self.uploads_dir, upload_id)
        except (uploads.UploadError, OSError) as exc:
            shutil.rmtree(self.uploads_dir / upload_id, ignore_errors=True)
            raise StudioError(f"Cannot take the images: {exc}") from exc
        notes = [] if id_column or not config.id_column else [
            f"no {config.id_column!r} column: items are keyed by their image path"]
        decided = set() if show_decided else self.store.decided_items(tasks)
        items, left_out = [], 0
        for number, (row, item_id) in enumerate(zip(rows, item_ids)):
            if number not in kept:
                notes.append(f"row {number + 1}: {missing[number]}")
            elif item_id in decided:
                left_out += 1
            else:  # a manifest's text as the Predict tab takes a typed one: one printable line
                catalogue = {t: row[t].strip() for t in predictor.tasks if not is_missing(row.get(t))}
                items.append((item_id, str(kept[number]), clean_text(join_text(row, config.text_columns)), catalogue))
        if left_out:
            notes.append(f"{plural(left_out, 'decided item')} left out")
        try:  # an upload no queue holds (none of its items loaded) is removed at once, not left to take room
            if not items:
                raise StudioError("None of the manifest's images were uploaded. " + "; ".join(notes[:3])
                                  if not left_out else
                                  "Every uploaded item is decided. Tick 'show decided items' to review them again.")
            queue = self._queue(model, items, notes, progress, tasks=tasks, strategy=strategy, min_conf=min_conf,
                                max_conf=max_conf, show_decided=show_decided, split=UPLOAD, annotator=annotator,
                                source=f"upload {Path(manifest_path).name}: {plural(len(rows), 'manifest row')}")
            for path in set(kept.values()) - {Path(item.image_path) for item in queue.pool}:
                path.unlink(missing_ok=True)  # an unreadable image: the queue left its row out
            return queue
        except BaseException:
            shutil.rmtree(self.uploads_dir / upload_id, ignore_errors=True)
            raise

    def review_mislabels(self, model: str, task: str | None, size: int, progress: Progress | None = None, *,
                         show_decided: bool = False, annotator: str | None = None,
                         limit: int | None = None) -> ReviewQueue:
        """The catalogue labels of one task that out-of-fold heads on the cached features doubt
        most (`cma_clip.mislabels`: cleanlab's confident learning), most suspect first. The first
        call ranks the whole catalogue (its features are cached, then the ranking); `limit`
        ranks only the first `limit` items of each split."""
        predictor = self.predictor(model)
        if task in (None, "", ALL_TASKS):
            raise StudioError("Choose the task whose catalogue labels to check (Tasks under review).")
        tasks = self._queue_tasks(model, task)
        name = predictor.config.catalogue.name
        try:
            catalogue = Catalogue.open(CatalogueConfig.load(name, self.data_root))
            if limit:
                catalogue = limit_splits(catalogue, limit)
            if progress is not None:
                progress(0.0, "ranking the catalogue's labels (the first time: its features are computed)")
            ranked = mislabels.mislabel_queue(catalogue, task, predictor.backbone, self.cache_dir, progress=progress)
        except CatalogueError as exc:
            raise self._catalogue_missing(name, exc) from exc
        decided = set() if show_decided else self.store.decided_items(tasks)
        suspects = [s for s in ranked.suspects if s.item_id not in decided]
        shown_name = self.display_names(model).get(task, task)
        if not suspects:
            raise StudioError(f"No suspected mislabel of {shown_name} is left to review ({len(ranked.suspects)} "
                              "found, all decided). Tick 'show decided items' to see them again.")
        size = min(whole_number(size, "sample size", 1, MAX_QUEUE_ITEMS, default=50), len(suspects))
        items = [(s.item_id, s.image, s.text, self.catalogue_labels(model, s.item_id) or {task: s.label},
                  f"Suspect: heads that never saw its label give the catalogue's {s.label} "
                  f"{_share(s.quality)} and suggest {s.suggested} ({s.confidence:.0%}).", {task: s.suggested})
                 for s in suspects[:size]]
        source = (f"{name}: the {size} most suspect {shown_name} labels of {len(ranked.suspects)} suspects among "
                  f"{ranked.scored} labelled items (out-of-fold accuracy {ranked.accuracy:.2f})")
        return self._queue(model, items, [], progress, tasks=tasks, show_decided=show_decided, split=MISLABELS,
                           annotator=annotator, source=source, ranked=True)

    def review_disagreements(self, model: str, task: str | None, size: int, progress: Progress | None = None, *,
                             annotator: str | None = None) -> ReviewQueue:
        """The items whose annotators' labels differ on the tasks under review (`LabelStore.disagreements`),
        the oldest disagreement first. A save in this queue adjudicates: it settles the disagreement
        (until a later label differs from it) and stays out of the agreement figures. Only for the
        `reviewers`, when some are named."""
        self._reviewer(annotator)
        tasks = self._queue_tasks(model, task)
        names = self.display_names(model)
        found = self.store.disagreements(tasks)
        if not found:
            elsewhere = {other: len(open_ones) for other in self.model_names if other != model
                         and (their_tasks := self.tasks_of(other))
                         and (open_ones := self.store.open_disagreements(their_tasks))}
            where = "".join(f" {plural(count, 'item')} of {other}'s tasks {'is' if count == 1 else 'are'} in dispute: "
                            "choose that model to settle them." for other, count in elsewhere.items())
            raise StudioError(f"No disagreement to settle on {', '.join(names.get(t, t) for t in tasks)}: annotators' "
                              "labels differ when a second labeler reviews decided items ('Show decided items') or "
                              f"overwrites a label.{where}")
        size = min(whole_number(size, "sample size", 1, MAX_QUEUE_ITEMS, default=50), len(found))
        # each item's catalogue labels: what its saves recorded, else (a task no save recorded) the catalogue's
        items = [(d.item_id, str(d.image_path), d.text, {**self.catalogue_labels(model, d.item_id), **d.catalogue},
                  disagreement_note(d.labels, names)) for d in found[:size]]
        return self._queue(model, items, [], progress, tasks=tasks, split=DISAGREEMENTS, annotator=annotator,
                           ranked=True, source=f"the {size} oldest of {plural(len(found), 'item')} whose annotators "
                                               "disagree")

    def review_items(self, model: str, items: list[tuple[str, str, str, dict[str, str]]], source: str,
                     progress: Progress | None = None, **options) -> ReviewQueue:
        """A queue over any items (id, image path, text, catalogue labels): the entry point
        for other queue sources, such as the suspected mislabels of `cma_clip.mislabels`."""
        return self._queue(model, list(items), [], progress, tasks=self._queue_tasks(model, options.pop("task", None)),
                           source=source, **options)

    def _queue_tasks(self, model: str, task: str | None) -> list[str]:
        tasks = self.predictor(model).tasks
        if task in (None, "", ALL_TASKS):
            return tasks
        if task not in tasks:
            raise StudioError(f"Model {model!r} has no task {task!r}; its tasks: {', '.join(tasks)}.")
        return [task]

    def _queue(self, model: str, items: list[tuple], notes: list[str],
               progress: Progress | None, *, tasks: list[str], strategy: str = STRATEGIES[0],
               min_conf: float | None = None, max_conf: float | None = None, show_decided: bool = False,
               split: str | None = None, source: str = "", annotator: str | None = None,
               batch_size: int = 16, ranked: bool = False, scores: Scores | None = None) -> ReviewQueue:
        """Rank the items (id, image path, text, catalogue labels[, a note on why it is queued[, the labels
        it suggests]]) by
        `strategy` over `tasks` (or keep their own order when they come `ranked`), keep those the
        confidence range lets through, and keep the queue in the store.
        `scores` are the items' kept predictions (every class, for entropy), row by row; without
        them the items are predicted here. Every item stays in the queue's pool, so that
        `arrange_queue` re-sorts and re-filters it in memory."""
        predictor = self.predictor(model)
        queue = ReviewQueue(model, notes=list(notes), source=source, split=split,
                            filters={"show_decided": bool(show_decided)})
        if scores is None:
            items, scores = self._score_items(predictor, items, queue.notes, progress, batch_size)
        if not items:
            raise StudioError("No item could be loaded: " + "; ".join(queue.notes[:3]))
        uncertainty = {s: {t: review.uncertainty(scores.probabilities[t], s) for t in predictor.tasks}
                       for s in STRATEGIES}
        predictions = predictor.predictions(scores, top_k=CHOICES_KEPT, texts=[item[2] for item in items])
        queue.pool = [ReviewItem(*item[:3], prediction.tasks, catalogue=item[3], note=(item[4:] or [""])[0],
                                 withheld=prediction.withheld, suggested=(item[5:] or [{}])[0],
                                 uncertainty={s: {t: float(by_task[t][i]) for t in by_task}
                                              for s, by_task in uncertainty.items()})
                      for i, (item, prediction) in enumerate(zip(items, predictions))]
        queue.sampled = len(queue.pool)
        self._arrange(queue, SOURCE_ORDER if ranked else strategy, tasks, min_conf, max_conf, annotator)
        self.keep_queue(queue, annotator)
        return queue

    def arrange_queue(self, queue: ReviewQueue, annotator: str | None = None, *, strategy: str = STRATEGIES[0],
                      task: str | None = None, min_conf: float | None = None,
                      max_conf: float | None = None) -> ReviewQueue:
        """Re-sort and re-filter an open queue over the items it sampled, in memory (nothing is
        predicted again), from its first item to review; a range that keeps no item is refused
        and the queue stays as it was. Kept in the store like any move."""
        with self._queue_lock(queue):
            self._check_owner(queue, self._held(annotator))
            self._arrange(queue, strategy, self._queue_tasks(queue.model, task), min_conf, max_conf, annotator)
            self.keep_queue(queue, annotator)
        return queue

    def arranged_as(self, queue: ReviewQueue, *, strategy: str = STRATEGIES[0], task: str | None = None,
                    min_conf: float | None = None, max_conf: float | None = None) -> bool:
        """Whether the queue is arranged so already (a filter box left as it was: nothing to re-sort, and
        the controls keep what the labeler picked)."""
        bounds = _bounds(min_conf, max_conf)
        return (strategy, self._queue_tasks(queue.model, task), bounds) == (
            queue.strategy, queue.tasks, (queue.filters.get("min_conf"), queue.filters.get("max_conf")))

    def _arrange(self, queue: ReviewQueue, strategy: str, tasks: list[str], min_conf, max_conf,
                 annotator: str | None) -> None:
        """Set the queue's view: its pool by `strategy` over `tasks`, filtered by confidence, from
        its first item to review (not one someone else is on)."""
        if strategy not in (*STRATEGIES, SOURCE_ORDER):
            raise StudioError(f"Choose a strategy among {', '.join(STRATEGIES)}, not {strategy!r}.")
        min_conf, max_conf = _bounds(min_conf, max_conf)
        items = queue.arranged(strategy, tasks, min_conf, max_conf)
        if not items:
            raise StudioError(f"None of the {len(queue.pool)} items has a confidence in the range chosen"
                              f" ({_range(min_conf, max_conf)}) for {', '.join(tasks)}. Widen it, or sample more.")
        every = self.predictor(queue.model).tasks
        queue.items, queue.tasks, queue.strategy = items, list(tasks), strategy
        queue.go_to(0)
        queue.filters = {"task": tasks[0] if len(tasks) == 1 < len(every) else None, "min_conf": min_conf,
                         "max_conf": max_conf, "show_decided": queue.show_decided}
        self.refresh(queue, annotator)
        if queue.should_move_on():
            queue.advance()

    @staticmethod
    def _score_items(predictor: Predictor, items: list[tuple], notes: list[str], progress: Progress | None,
                     batch_size: int) -> tuple[list[tuple], Scores | None]:
        """Predict items (as `_queue` takes them; every class) batch by batch: the items whose image
        opened, and their scores; an image that cannot be opened is left out with a note."""
        loaded, parts = [], []
        for start in range(0, len(items), batch_size):
            chunk, images = [], []
            for item in items[start:start + batch_size]:
                try:
                    images.append(load_image(item[1]))
                    chunk.append((item[0], str(item[1]), *item[2:]))
                except ImageError as exc:
                    notes.append(f"{item[0]}: {exc}")
            if chunk:
                parts.append(predictor.score_batch(images, [item[2] for item in chunk]))
                loaded += chunk
            if progress is not None:
                progress(min(1.0, (start + batch_size) / len(items)), "predicting")
        return loaded, Scores.concatenate(parts) if parts else None

    # ------------------------------------------------------------------ review queue: state and persistence
    def refresh(self, queue: ReviewQueue, annotator: str | None = None) -> ReviewQueue:
        """Each item's status from the store (someone else may have decided it meanwhile; in a
        disagreements queue an item is pending while its disagreement is open), and who else than
        `annotator` is on it now (their claim; no claims without an annotator)."""
        annotator = self._held(annotator)
        if queue.split == DISAGREEMENTS:  # and each item's note as the disagreement stands now
            disputed, names = self.store.open_disagreements(queue.tasks), self.display_names(queue.model)
            decided = {item.item_id for item in queue.pool} - set(disputed)
            for item in queue.pool:
                item.disputed = disputed.get(item.item_id, {})
                item.note = disagreement_note(item.disputed, names)
        else:
            decided = self.store.decided_items(queue.tasks)
        claimed = self.store.claims(annotator) if annotator else {}
        for item in queue.pool:
            item.status = self._decided_status(queue, item.item_id) if item.item_id in decided else "pending"
            item.claimed_by = claimed.get(item.item_id, "")
        return queue

    def _own_labels(self, queue: ReviewQueue, item_id: str) -> dict[str, str]:
        """The queue owner's own labels of an item (task -> label), standing or replaced since."""
        return {t: by[queue.owner] for t, by in self.store.annotators_labels(item_id, queue.tasks).items()
                if queue.owner in by}

    def reread(self, queue: ReviewQueue, annotator: str | None = None) -> bool:
        """`refresh` under the queue's lock (a labeler back on the Review tab, while an event of theirs may still
        be moving the queue); whether the count of items reviewed changed."""
        with self._queue_lock(queue):
            reviewed = queue.reviewed
            self.refresh(queue, annotator)
            return queue.reviewed != reviewed

    def _decided_status(self, queue: ReviewQueue, item_id: str) -> str:
        """A decided item's status in the queue (a settled disagreement: over the tasks it holds labels on)."""
        states = self.store.item_state(item_id)
        tasks = [t for t in queue.tasks if t in states] if queue.split == DISAGREEMENTS else queue.tasks
        return _item_status(states, tasks)

    def _status_now(self, queue: ReviewQueue, item_id: str) -> str:
        """One item's status in the queue as the store has it now (`refresh` reads every item's)."""
        if queue.split == DISAGREEMENTS and item_id in self.store.open_disagreements(queue.tasks):
            return "pending"
        return self._decided_status(queue, item_id)

    def keep_queue(self, queue: ReviewQueue, annotator: str | None = None, *, steer: bool = True) -> None:
        """Keep the queue and the labeler's place in it in the store (a reload or a restart resumes it),
        and the labeler's claim on its current item (so other queues steer clear of it); an uploaded
        queue's images count as used now (`uploads.prune` removes unused ones). With `steer` (a move
        the queue chose, not Previous or an undo's item), a pending item another labeler claimed
        since the queue read the claims is passed for the next free one: labelers moving at the
        same moment were all given the one item that looked free to each."""
        first = Path(queue.items[0].image_path) if queue.items else None
        if first is not None and self.uploads_dir in first.parents:
            uploads.touch(self.uploads_dir / first.relative_to(self.uploads_dir).parts[0])
        annotator = self._held(annotator)
        if annotator:
            self._check_owner(queue, annotator)
            queue.owner = queue.owner or annotator
        try:
            if annotator and queue.current is None:
                self.store.release(annotator)
            elif annotator:
                self._claim_current(queue, annotator, steer and not queue.show_decided)
            position, view = max(0, queue.position), queue.view_payload()
            if not (queue.stored and self.store.move_queue(queue.queue_id, annotator, position, view)):
                self.store.save_queue(queue.queue_id, annotator, queue.model, queue.to_payload(), position, view)
                queue.stored = True
        except LabelStoreError as exc:
            raise StudioError(f"The queue could not be kept: {exc}") from exc

    def _claim_current(self, queue: ReviewQueue, annotator: str, steer: bool) -> None:
        """Claim the queue's current item for `annotator`; with `steer`, while the pending item moved
        to is another's, or was decided since the queue read the store, on to the next free pending
        item (none left: the queue stays on a taken one, or is done)."""
        while True:
            item = queue.current
            known_taken = bool(item.claimed_by)  # the queue moved to a taken item: no free one was left
            item.claimed_by = self.store.claim(item.item_id, annotator) or ""
            if not steer or known_taken or item.status != "pending":
                return
            if not item.claimed_by:  # this labeler's now: still to decide, unless decided since the queue read it
                item.status = self._status_now(queue, item.item_id)
                if item.status == "pending":
                    return
            left = queue.wrapped_from  # where the move began, if it wrapped round: Previous goes back there
            queue.advance()  # past the items known to be taken or decided, this one now among them
            queue.wrapped_from = queue.wrapped_from if queue.wrapped_from is not None else left
            if queue.current is None or queue.current.claimed_by:
                return

    def resume_queue(self, queue_id: str | None = None, annotator: str | None = None,
                     model: str | None = None) -> ReviewQueue | None:
        """A kept queue: by id (when it is `annotator`'s: a browser another labeler used keeps
        theirs), else the one `annotator` moved in last (on `model` if given),
        at its place (an item they decided themselves included), or the next item to review
        when someone else decided its item meanwhile or is on it; None when there is none,
        or its model is gone."""
        saved, annotator = None, self._held(annotator)
        if queue_id:
            saved = self.store.load_queue(queue_id)
            if saved is not None and annotator not in ("", saved.annotator):
                saved = None
        if saved is None and annotator:
            saved = self.store.latest_queue(annotator, model or None)
        if saved is None or saved.model not in self.checkpoints:
            return None
        queue = ReviewQueue.from_payload(saved.queue_id, saved.model, saved.payload, saved.position, saved.view)
        queue.owner = saved.annotator
        self.refresh(queue, annotator)
        item, owner = queue.current, annotator or saved.annotator
        states = self.store.item_state(item.item_id) if item is not None else {}
        mine = item is not None and item.status != "pending" and all(  # back on an item they decided
            states[t].decided_by == owner for t in queue.tasks if t in states)
        moved = queue.should_move_on() and not mine
        if moved:
            queue.advance()
        if moved or annotator:
            self.keep_queue(queue, owner)
        return queue

    def current_view(self, queue: ReviewQueue | None) -> ItemView | None:
        """The queue's current item as the labeler sees it (None when the queue is done)."""
        item = queue.current if queue else None
        if item is None:
            return None
        # an item with catalogue (or manifest) labels starts at them (`_start_labels`), so Accept confirms them:
        # at the model's labels, Accept stored a third opinion nobody had chosen in a suspected-mislabels queue,
        # and in an uncertainty queue the unsure model's guesses as a person's labels over the catalogue's
        choices = self.label_choices(queue.model, None if queue.split == UPLOAD else item.catalogue)
        start = item.predicted() if queue.split == DISAGREEMENTS else _start_labels(
            queue.tasks, item.catalogue, set(item.catalogue), item.predicted(), choices)
        view = self.item_view(item.item_id, queue.tasks, start)
        view.choices = choices
        if queue.split == DISAGREEMENTS:  # a task in dispute starts empty: a ruling is the reviewer's choice (at
            # the latest label, one reflex Accept sided with whoever saved last)
            view.values = {t: None if t in item.disputed else label for t, label in view.values.items()}
        if queue.blind:
            # a second annotator's pass (for the agreement) is blind: a control starts at their own label, else
            # where the first annotator's started, and another's label is hidden (table, hint, history) until they
            # decide; shown, it anchored the second opinion, and the agreement measured a review (QA s32, s42)
            view.hidden = {t for t in queue.tasks if (state := view.states.get(t)) and state.label is not None
                           and state.source == "human" and state.annotator != queue.owner}
            # their own label, though another's replaced it since (QA s42: hidden too, an Accept replaced it)
            view.own = self._own_labels(queue, item.item_id)
            view.values = {t: view.own.get(t, start.get(t)) for t in queue.tasks}
            view.history = [row for row in view.history if row["task"] not in view.hidden
                            or row["annotator"] == queue.owner]
        return view

    # ------------------------------------------------------------------ review queue: decisions
    def review_save(self, queue: ReviewQueue, annotator: str | None, labels: dict[str, str | None],
                    shown: Shown | None = None, *, request_id: str | None = None,
                    new_classes: dict[str, str] | None = None, force: bool = False) -> SaveOutcome:
        """Save the current item's labels (the queue's tasks) and move on. `shown` is what the
        labeler saw (default: the item as it stands now); a save for another item than the
        queue's current one is refused. Conflicts and unknown labels come back as outcomes,
        the queue staying on the item; a request already stored is answered, not stored again."""
        rid = (request_id or "").strip() or None
        with self._queue_lock(queue):
            if (done := self._recent(rid)) is not None:
                return done
            item, annotator = self._current(queue, shown), self._decider(queue, annotator)
            shown = shown or self.current_view(queue).shown
            chosen, adjudicating = given_labels(labels, queue.tasks), queue.split == DISAGREEMENTS
            # the item's open disagreement (task -> who said what), read once: a whole-store reading
            disputed = self.store.open_disagreements(queue.tasks).get(item.item_id, {}) if adjudicating else {}
            if unchosen := {t: said for t, said in disputed.items() if t not in chosen}:  # a ruling is a choice
                self.refresh(queue, annotator)  # the dispute as it stands: the keys offered labels changed since
                return SaveOutcome("unchosen", item.item_id, request_id=rid, unchosen=unchosen)
            standing = self.store.item_state(item.item_id)
            ended = self._ended_meanwhile(item, disputed, standing) if adjudicating else {}
            if ended and len(ended) == len(item.disputed) and not disputed:  # the whole dispute
                self._moved_on(queue, annotator)
                return self._remember(rid, SaveOutcome("settled", item.item_id, request_id=rid))
            if not chosen:
                raise StudioError("Choose at least one label to save.")
            if adjudicating:  # a ruling covers the tasks in dispute and those the reviewer changed, not the
                # model's guesses on the rest (an Accept stored them as rulings); settled meanwhile: as it stands
                start = _as_shown(item, shown, self.store.item_history(item.item_id))
                chosen = {t: v for t, v in chosen.items() if t in disputed or v != start.get(t)} or {
                    t: v for t, v in chosen.items() if t in standing}
                ended = {t: label for t, label in ended.items() if t in chosen}  # picked there: not stored
                chosen = {t: v for t, v in chosen.items() if t not in ended}  # as its annotators left it
            # in a blind pass, their own label again where another's stands since: nothing to store (stored, it read
            # as a review of the one since); against a reviewer's ruling it is stored, and reopens it (QA s32)
            mine = self._own_labels(queue, item.item_id) if queue.blind else {}
            again = {t for t, v in chosen.items() if mine.get(t) == v and (was := standing.get(t)) is not None
                     and was.annotator != annotator and not was.adjudicated}
            chosen = {t: v for t, v in chosen.items() if t not in again}
            own = all(_own_label(standing.get(t), label, annotator) for t, label in chosen.items())
            # a reviewer whose queue still showed a disagreement another settled, ruling as they did
            ruled = adjudicating and all(_ruling(standing.get(t), label) for t, label in chosen.items())
            # e.g. back with Previous, then accept; or a second tab of theirs, which saw the item before
            # (a disagreement still open is settled by accepting the label standing: that is a save)
            if (own or ruled) and not new_classes and not disputed:
                self._moved_on(queue, annotator)
                by = "" if own else ", ".join(sorted({standing[t].annotator for t in chosen}))
                return self._remember(rid, SaveOutcome("unchanged", item.item_id, chosen, request_id=rid, moved_on=True,
                                                       annotator=by, own_before=bool(again)))
            predictions = {t: {"label": p.label, "confidence": round(p.confidence, 4)}
                           for t, p in item.predictions.items()}
            # (blind: not an Overwrite, which answers a conflict that named the other label)
            outcome = self._save(item.item_id, Path(item.image_path), item.text, chosen, annotator, queue.model,
                                 predictions, _decided_over(item, disputed, standing, shown, chosen), rid,
                                 new_classes, force,
                                 {t: v for t, v in item.catalogue.items() if t in chosen}, standing,
                                 adjudicated=adjudicating, uploaded=queue.split == UPLOAD,
                                 blind=queue.blind and not force)
            outcome.ended = ended
            if outcome.result == "saved":
                outcome.unlabelled = [] if adjudicating else [t for t in queue.tasks if t not in chosen.keys() | again]
                self._moved_on(queue, annotator)
            elif outcome.result == "conflict":  # someone decided it meanwhile: the queue says so now
                self.refresh(queue, annotator)
            return self._remember(rid, outcome)

    def review_skip(self, queue: ReviewQueue, annotator: str | None, shown: Shown | None = None, *,
                    request_id: str | None = None, force: bool = False) -> SaveOutcome:
        """Mark the current item's tasks skipped (decided for the queue, labels kept) and move on.
        A task someone else decided since `shown` comes back as a conflict unless `force`."""
        rid = (request_id or "").strip() or None
        with self._queue_lock(queue):
            if (done := self._recent(rid, "skip")) is not None:
                return done
            item, annotator = self._current(queue, shown), self._decider(queue, annotator)
            shown = shown or self.current_view(queue).shown
            # a reviewer's skip passes over the dispute; it marked the tasks nobody labelled skipped too, which
            # took the item out of every labeler's queue for them
            tasks = [t for t in queue.tasks if t in item.disputed] if queue.split == DISAGREEMENTS else []
            disputed = self.store.open_disagreements(tasks).get(item.item_id, {}) if tasks else {}
            standing = self.store.item_state(item.item_id) if tasks else {}
            ended = self._ended_meanwhile(item, disputed, standing) if tasks else {}
            if ended and not (tasks := [t for t in tasks if t not in ended]):
                self._moved_on(queue, annotator)
                return self._remember(rid, SaveOutcome("settled", item.item_id, request_id=rid, kind="skip"))
            tasks = tasks or queue.tasks
            try:
                result = self.store.skip(item.item_id, tasks, annotator, checkpoint=queue.model, request_id=rid,
                                         base_versions=_decided_over(item, disputed, standing, shown, tasks),
                                         force=force)
            except LabelConflict as exc:
                self.refresh(queue, annotator)  # someone decided it meanwhile: the queue says so now
                return SaveOutcome("conflict", item.item_id, conflicts=exc.conflicts, kind="skip", request_id=rid,
                                   annotator=annotator, ended=ended)
            except LabelStoreError as exc:
                raise StudioError(str(exc)) from exc
            outcome = SaveOutcome("duplicate" if result.duplicate else "saved", result.item_id, {}, result.save_id,
                                  dict.fromkeys(tasks, "skipped"), kind="skip", request_id=rid,
                                  annotator=annotator, ended=ended)
            if not result.duplicate:
                self._moved_on(queue, annotator)
            return self._remember(rid, outcome)

    def review_undo(self, queue: ReviewQueue | None, annotator: str | None, *, force: bool = False,
                    keep_theirs: bool = False, request_id: str | None = None,
                    save_id: int | None = None) -> UndoOutcome:
        """Revert the annotator's newest decision not yet reverted (again and again, further
        back); the queue goes to that item. A task someone else decided since comes back as a
        conflict (the queue shows that item, for the choice) unless `force` (revert it anyway)
        or `keep_theirs` (leave it, revert the rest): those two answer a conflict and take its
        `save_id`, so they revert that save or nothing. A request id already stored answers
        with the first undo's result."""
        annotator, rid = self._annotator(annotator), (request_id or "").strip() or None
        if queue is not None:
            self._check_owner(queue, annotator)
        try:
            undone = self.store.undo(annotator, force=force, keep_theirs=keep_theirs, request_id=rid, save_id=save_id)
            outcome = (UndoOutcome(None, batch=undone.items, request_id=rid) if isinstance(undone, BatchUndone)
                       else UndoOutcome(**undone._asdict(), request_id=rid))
        except LabelConflict as exc:
            outcome = UndoOutcome(exc.conflicts[0].item_id, conflicts=exc.conflicts, save_id=exc.save_id,
                                  request_id=rid)
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc
        outcome.queue_open = queue is not None
        if outcome.tasks and outcome.ruling:  # in this queue or not: its dispute is open again
            outcome.reopened = {t: said for t, said in self.store.open_disagreements(list(outcome.tasks)).get(
                outcome.item_id, {}).items()}
        if queue is not None:
            with self._queue_lock(queue):
                self.refresh(queue, annotator)
                index = queue.index_of(outcome.item_id)
                if index is not None:
                    queue.go_to(index)
                    outcome.in_queue = True
                self.keep_queue(queue, annotator, steer=False)
        return outcome

    def review_previous(self, queue: ReviewQueue, annotator: str | None = None) -> bool:
        """Step back to the item before (decided or not); False at the first item."""
        with self._queue_lock(queue):
            self._check_owner(queue, self._held(annotator))
            moved = queue.back()
            self.refresh(queue, annotator)
            self.keep_queue(queue, annotator, steer=False)
            return moved

    def review_next(self, queue: ReviewQueue, annotator: str | None = None) -> None:
        """Move on without deciding (the item stays pending and comes round again)."""
        with self._queue_lock(queue):
            self._check_owner(queue, self._held(annotator))
            self.refresh(queue, annotator)
            queue.advance()
            self.keep_queue(queue, annotator)

    def bulk_accept(self, queue: ReviewQueue, annotator: str | None, *, task: str | None = None,
                    min_conf: float | str | None = THRESHOLDS, progress: Progress | None = None) -> BulkOutcome:
        """Auto-accept the model's labels of every queue item whose tasks (`task`, or every
        task of the queue) clear their confidence bar: each task's 90%-precision threshold
        (`THRESHOLDS`), or `min_conf`. An item without a text or with a blank photo is never
        taken (`ReviewItem.withheld`). Only the tasks still pending are accepted, each
        audited as an auto-accept; decided tasks and labels someone saved are never replaced,
        and items another labeler has open (a live claim) are left to them.
        The items go in chunks, each one transaction; the batch id is fixed by the queue and
        the filter, so running it again after an interruption stores only what is missing."""
        annotator = self._annotator(annotator)
        self._check_owner(queue, annotator)
        with self._queue_lock(queue):
            outcome, records = self._bulk_plan(queue, annotator, task, min_conf)
            done = 0  # of `records`, stored now or by an earlier run
            for start in range(0, len(records), self.bulk_chunk):
                try:
                    result = self.store.save_many(records[start:start + self.bulk_chunk], outcome.batch_id,
                                                  annotator=annotator, checkpoint=queue.model)
                except (LabelStoreError, sqlite3.Error, OSError) as exc:
                    self.refresh(queue, annotator)
                    raise StudioError(
                        f"The bulk accept stopped after {done} of {len(records)} "
                        f"items, each kept ({outcome.chunks} chunks committed): {exc}. Run it again to finish; "
                        "nothing is stored twice.") from exc
                outcome.stored += result.stored
                outcome.already_there += result.already_there
                done += result.stored + result.already_there
                outcome.conflicts += result.conflicts
                outcome.decided += result.decided
                outcome.chunks += 1
                if progress is not None:
                    progress(min(1.0, (start + self.bulk_chunk) / len(records)),
                             f"accepted {done} of {len(records)}")
            open_item = queue.current.item_id if queue.current is not None else None
            self.refresh(queue, annotator)
            if queue.current is not None and queue.current.status != "pending" and not queue.show_decided:
                queue.advance()
            if open_item in {record["item_id"] for record in records}:
                outcome.took_open = open_item
                outcome.moved_on = queue.current is None or queue.current.item_id != open_item
            self.keep_queue(queue, annotator)
        return outcome

    def bulk_preview(self, queue: ReviewQueue, annotator: str | None, *, task: str | None = None,
                     min_conf: float | str | None = THRESHOLDS) -> tuple[BulkOutcome, int]:
        """What `bulk_accept` would do now, nothing stored: its counts, and how many items it would accept.
        It reads the queue without its lock, which would hold the labeler's next decision back."""
        outcome, records = self._bulk_plan(queue, self._held(annotator), task, min_conf)
        return outcome, len(records)

    def _bulk_plan(self, queue: ReviewQueue, annotator: str, task: str | None,
                   min_conf: float | str | None) -> tuple[BulkOutcome, list[dict]]:
        """A bulk accept's counts before it stores anything, and the records it would store."""
        if queue.split == DISAGREEMENTS:
            raise StudioError("Bulk accept leaves labels people saved alone, and every item of a disagreements "
                              "queue holds theirs: settle each one in the queue.")
        names = self.display_names(queue.model)
        task = {names.get(t, t): t for t in queue.tasks}.get(task, task)  # "Colour" for colour_group_name (API)
        tasks = queue.tasks if task in (None, "", ALL_TASKS) else [task]
        if any(t not in queue.tasks for t in tasks):
            raise StudioError(f"Task {task!r} is not under review in this queue: "
                              f"{', '.join(f'{names.get(t, t)} ({t})' for t in queue.tasks)}.")
        if min_conf in (None, "", THRESHOLDS):
            bar: float | dict[str, float | None] = {t: _threshold(queue, t) for t in tasks}
            spec = THRESHOLDS
            if all(v is None for v in bar.values()):
                raise StudioError(f"The model has no 90%-precision threshold for "
                                  f"{', '.join(names.get(t, t) for t in tasks)}: give a minimum confidence instead.")
        else:
            bar = _confidence(min_conf, "minimum")
            spec = f"{bar:g}"
        outcome = BulkOutcome(self.store.fresh_batch(f"{queue.queue_id}:bulk:{'+'.join(tasks)}:{spec}"), tasks, 0,
                              "each task's 90%-precision threshold" if spec == THRESHOLDS else
                              f"a confidence of at least {bar:g}")
        picked = [queue.items[i] for i in review.select(
            [{t: item.predictions[t].confidence for t in tasks} for item in queue.items], min_conf=bar)]
        outcome.selected = len(picked)
        others = self.store.claims(annotator)  # items other labelers have open: theirs to decide
        ours = self.store.batch_items(outcome.batch_id)  # stored by an earlier run of this bulk accept
        records = []
        for item in picked:
            if item.withheld:
                outcome.withheld += 1
                continue
            states = self.store.item_state(item.item_id)
            pending = [t for t in tasks if t not in states or states[t].status == "pending"]
            if not pending:  # decided, whoever has it open now
                outcome.already_there += item.item_id in ours
                outcome.decided += item.item_id not in ours
                continue
            if item.item_id in others:
                outcome.claimed[item.item_id] = others[item.item_id]
                continue
            if queue.split != UPLOAD:  # (extra_labels.merge keeps the catalogue's label there; a manifest's, none)
                outcome.under_catalogue += sum((own := _catalogue_label(item.catalogue.get(t))) is not None
                                               and not same_class(own, item.predictions[t].label)
                                               for t in pending)
            records.append({"item_id": item.item_id, "image": Path(item.image_path), "text": item.text,
                            "labels": {t: item.predictions[t].label for t in pending},
                            "predictions": {t: {"label": p.label, "confidence": round(p.confidence, 4)}
                                            for t, p in item.predictions.items()},
                            "catalogue_labels": {t: v for t, v in item.catalogue.items() if t in pending},
                            "base_versions": {t: states[t].version if t in states else None for t in pending}})
        return outcome, records

    def _current(self, queue: ReviewQueue, shown: Shown | None) -> ReviewItem:
        item = queue.current
        if item is None:
            raise StudioError(queue.nothing_to_decide())
        if shown is not None and shown.item_id != item.item_id:
            raise StudioError(f"The item on screen ({shown.item_id}) is not the queue's current item "
                              f"({item.item_id}); nothing was saved. It is on its way to your screen (reload the page "
                              "if it does not come).")
        return item

    def _held(self, annotator: str | None) -> str:
        """The annotator's name as the store holds it (`LabelStore.held_annotator`: "Rita" from a phone's keyboard
        is the laptop's "rita"), stripped; "" for none. Every comparison of names goes through it."""
        if not isinstance(annotator, str) or not annotator.strip():
            return ""
        try:
            return self.store.held_annotator(annotator)
        except LabelStoreError as exc:
            raise StudioError(str(exc)) from exc

    def _annotator(self, annotator: str | None, what: str = "decision") -> str:
        """The annotator's name as the store holds it (`_held`): refused when empty, not text, or over
        `MAX_NAME_CHARS`."""
        if annotator is not None and not isinstance(annotator, str):
            raise StudioError(f"The annotator must be a name (text), not {type(annotator).__name__}.")
        name = (annotator or "").strip()
        if not name:
            raise StudioError(f"Enter your name in the annotator field, so the {what} can be attributed.")
        if len(name) > MAX_NAME_CHARS:
            raise StudioError(f"The annotator's name is {len(name):,} characters long; the limit is "
                              f"{MAX_NAME_CHARS}.")
        return self._held(name)

    def _reviewer(self, annotator: str | None) -> None:
        """Refuse an annotator who may not settle disagreements: one not among the `reviewers`, when some are named."""
        name = annotator.strip() if isinstance(annotator, str) else ""
        if self.reviewers and name_key(name) not in {name_key(reviewer) for reviewer in self.reviewers}:
            raise StudioError(f"Settling disagreements is for the reviewers ({', '.join(sorted(self.reviewers))}), "
                              f"and {name or 'an annotator without a name'} is not one of them: label in the other "
                              "queues, and a reviewer will settle what annotators disagree on.")

    def _decider(self, queue: ReviewQueue, annotator: str | None) -> str:
        """Who decides the queue's current item: anyone named, a reviewer in a disagreements queue."""
        name = self._annotator(annotator)
        self._check_owner(queue, name)
        if queue.split == DISAGREEMENTS:
            self._reviewer(name)
        return name

    @staticmethod
    def _check_owner(queue: ReviewQueue, annotator: str) -> None:
        """Refuse a decision or a move on another annotator's queue: a page left open while its
        browser signed in as someone else saved that person's labels on it and took the queue over."""
        if queue.owner and annotator and annotator != queue.owner:
            raise StudioError(f"This page shows {queue.owner}'s review queue, and you are now {annotator}: nothing "
                              f"was done. Reload the page to review as {annotator} (your last queue resumes), or "
                              f"go back to {queue.owner}.")

    @staticmethod
    def _ended_meanwhile(item: ReviewItem, disputed: dict, standing: dict[str, TaskState]) -> dict[str, str | None]:
        """The tasks in dispute on screen whose dispute ended since, their annotators' labels no longer differing
        (`disputed`: what is open now), each with the label it stands at: nothing to settle there. A pick then
        stored a "ruling" of what both said, or met a conflict offering to overwrite them. (Another reviewer's
        ruling meanwhile is a conflict, or "settled by" when alike.)"""
        return {t: standing[t].label if t in standing else None for t in item.disputed
                if t not in disputed and not (t in standing and standing[t].adjudicated)}

    def _moved_on(self, queue: ReviewQueue, annotator: str) -> None:
        self.refresh(queue, annotator)
        queue.advance()
        self.keep_queue(queue, annotator)

    def _queue_lock(self, queue: ReviewQueue) -> threading.Lock:
        """One lock per queue: two clicks on one queue (a double click, a retry) run one after the other."""
        with self._lock:
            return self._queue_locks.setdefault(queue.queue_id, threading.Lock())

    # ------------------------------------------------------------------ robustness
    def probe(self, image_path: str | None, text: str | None, model: str, image_noise: str | None,
              image_severity: int, text_noise: str | None, text_severity: int, seed: int = 0) -> robustness.Probe:
        """Clean and corrupted predictions of one item, side by side."""
        _check_noise(image_noise, text_noise)
        return robustness.probe(self.predictor(model), open_user_image(image_path), clean_text(text), image_noise,
                                _severity(image_severity), text_noise, _severity(text_severity), _seed(seed))

    def item_sweep(self, image_path: str | None, text: str | None, model: str, image_noise: str | None,
                   text_noise: str | None, seed: int = 0) -> robustness.ItemSweep:
        """Each task's confidence in its clean prediction and its image weight at severities 0..5."""
        _check_noise(image_noise, text_noise)
        if not robustness.corruptions(image_noise, text_noise):
            raise StudioError("Choose an image or a text corruption to sweep.")
        return robustness.sweep_item(self.predictor(model), open_user_image(image_path), clean_text(text),
                                     image_noise, text_noise, _seed(seed))

    def catalogue_sweep(self, model: str, size: int, image_noise: str | None, text_noise: str | None,
                        seed: int = 0, progress: Progress | None = None, *,
                        session: str | None = None) -> tuple[list[dict], Path]:
        """Mean accuracy against severity on a random sample of the model's catalogue's test split (the same
        items for every seed, which draws the corruptions only; more items keep the fewer's); rows and CSV.
        `stop_sweep(session)` stops it between two batches, with SweepStopped (minutes of both cores
        went on after a tab was closed or a client cancelled)."""
        _check_noise(image_noise, text_noise)
        if not robustness.corruptions(image_noise, text_noise):
            raise StudioError("Choose an image or a text corruption to sweep.")
        name = self.predictor(model).config.catalogue.name
        size = whole_number(size, "number of items", 1, MAX_SWEEP_ITEMS, default=50)
        try:  # not the first rows: a catalogue's order groups alike items (fashion's first test rows are sportswear)
            catalogue = Catalogue.open(CatalogueConfig.load(name, self.data_root), split="test").sample(size)
        except CatalogueError as exc:
            raise self._catalogue_missing(name, exc) from exc
        seed = _seed(seed)
        stop = threading.Event()

        def report(fraction: float, step: str) -> None:
            if stop.is_set() and fraction < 1:  # at 1 every batch ran: a Stop during the last one keeps them
                raise SweepStopped(f"Batch sweep stopped at {fraction:.0%}: no plot or CSV of it is kept.")
            if progress is not None:
                progress(fraction, step)

        if session is not None:
            with self._lock:
                if (running := self._sweeps.get(session)) is not None:  # one per page: its sweep before stops
                    running.set()
                self._sweeps[session] = stop
        try:
            rows = robustness.catalogue_sweep(self.predictor(model), catalogue, image_noise, text_noise, seed, report)
        finally:
            with self._lock:
                if self._sweeps.get(session) is stop:
                    del self._sweeps[session]
        file_name = f"{model}-{image_noise}-{text_noise}-{size}-items-seed-{seed}.csv"
        path = write_table(self.data_dir / "sweeps" / file_name,
                           [{**row, "accuracy": round(row["accuracy"], 4)} for row in rows], robustness.SWEEP_FIELDS)
        return rows, path

    def stop_sweep(self, session: str) -> bool:
        """Stop the batch sweep `session` runs, after its current batch; False when it runs none."""
        with self._lock:
            stop = self._sweeps.get(session)
        if stop is not None:
            stop.set()
        return stop is not None


def _check_unique(item_ids: list[str | None], id_column: str | None) -> None:
    """Refuse a manifest whose rows repeat an item id: the first row's item alone was reviewed, and
    the labels of the others would have gone to it."""
    first: dict[str, int] = {}
    repeats = [(number, key) for number, key in enumerate(item_ids)
               if key is not None and first.setdefault(key, number) != number]
    if repeats:
        said = "; ".join(f"row {number + 1} repeats {key!r} of row {first[key] + 1}" for number, key in repeats[:3])
        keyed = f"the {id_column!r} column" if id_column else "the image path (no id column)"
        raise StudioError(f"{plural(len(repeats), 'row')} repeat{'s' * (len(repeats) == 1)} an item id: {said}"
                          f"{' …' if len(repeats) > 3 else ''}. Items are keyed by {keyed}, one row per item: "
                          "nothing was loaded.")


def _bounds(min_conf, max_conf) -> tuple[float | None, float | None]:
    """A confidence range as a queue keeps it: None for no bound (0 and 1); refused when empty."""
    min_conf, max_conf = _confidence(min_conf, "minimum"), _confidence(max_conf, "maximum")
    min_conf, max_conf = (None if min_conf == 0 else min_conf), (None if max_conf == 1 else max_conf)
    if min_conf is not None and max_conf is not None and min_conf > max_conf:
        raise StudioError(f"The confidence range is empty: {min_conf} is above {max_conf}.")
    return min_conf, max_conf


def _item_status(states: dict[str, TaskState], tasks: list[str]) -> str:
    """One word for a decided item: corrected if a task was, else accepted if a task was, else skipped."""
    statuses = {states[t].status if t in states else "pending" for t in tasks}
    if "pending" in statuses:
        return "pending"
    return next(s for s in ("corrected", "accepted", "skipped") if s in statuses)


def disagreement_note(labels: dict[str, dict[str, str]], names: dict[str, str]) -> str:
    """What the annotators said, task by task ("Annotators disagree on Colour: ana Red, ben Blue."), from
    `LabelStore.open_disagreements`' entry of the item; an item with none is settled."""
    if not labels:
        return "Settled: no open disagreement on the tasks under review."
    said = "; ".join(f"{names.get(task, task)}: " + ", ".join(f"{a} {label}" for a, label in by_annotator.items())
                     for task, by_annotator in labels.items())
    return f"Annotators disagree on {said}. Choose the label (the choices list theirs first): your save settles it."


def _why_gone(path: Path) -> str:
    """Why an image is no longer on the server, by the folder it was in (a photo given to Predict was told the
    review uploads' 72 hours)."""
    if REVIEW_UPLOADS in path.parts[:-1]:
        return (f"uploads are removed {uploads.upload_hours():g} hours after their last use, or after an hour "
                "unused when the uploads outgrow their storage): upload it again")
    gradio_cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")  # as Gradio
    if path.resolve().is_relative_to(gradio_cache.resolve()):  # reads it; emptied as app.CACHE_RETENTION says
        return "the app keeps a photo it is given for a day, and none after a restart): upload it again"
    return "it is no longer in its folder: a catalogue's photo moved or deleted since, or a path mistyped)"


def _catalogue_label(label: str | None) -> str | None:
    """An item's catalogue (or manifest) label as a save would store it (`tidy_label`); None for a blank one
    (a cell of spaces or of a zero-width space only)."""
    tidy = tidy_label(label) if isinstance(label, str) else ""
    return None if not tidy or is_missing(tidy) else tidy


def _start_labels(tasks: list[str], catalogue: dict[str, str], columns: set[str], guesses: dict[str, str],
                  choices: dict[str, list[str]]) -> dict[str, str | None]:
    """Where each control of an item starts when no label is saved: at its catalogue's label (a label someone
    chose, so a save confirms it), as stored and spelled as the class of `choices` it spells ("grey" as "Grey"),
    on a task the catalogue has a column of, empty where its cell is blank; at the model's guess on the others."""
    own = {t: _catalogue_label(catalogue.get(t)) for t in columns}
    return {t: (class_spelled(own[t], choices.get(t, ())) or own[t] if own[t] else None) if t in own
            else guesses.get(t) for t in tasks}


def _as_shown(item: ReviewItem, shown: Shown, history: list[dict]) -> dict[str, str]:
    """The label each task's control started at on the labeler's screen: that of the version `shown`, else
    the model's. (Read now, a label someone saved since made the model's guess left on screen look like the
    reviewer's change, and a ruling over that label.)"""
    labels = {row["version"]: row["label"] for row in history if row["version"] is not None}
    return {t: labels.get(shown.versions.get(t)) or p.label for t, p in item.predictions.items()}


def _decided_over(item: ReviewItem, disputed: dict[str, dict[str, str]], standing: dict[str, TaskState],
                  shown: Shown, tasks: Iterable[str]) -> dict[str, int | None]:
    """The versions a decision on `tasks` of the item is made over: those `shown`, but for a task whose
    dispute (`disputed`: open now) stands as on the reviewer's screen, the version standing now (an annotator
    saved their item again, with the same label on it: the ruling met a conflict over nothing new)."""
    return {t: standing[t].version if t in disputed and disputed[t] == item.disputed.get(t) else shown.versions.get(t)
            for t in tasks}


def _own_label(state: TaskState | None, label: str, annotator: str) -> bool:
    """The task stands at the labeler's own human label `label`: saving it again adds nothing,
    whichever version their screen showed (a second tab stored a copy, which a first undo then
    "undid" into itself)."""
    return (state is not None and state.label == label and state.annotator == annotator
            and state.source == "human" and state.status in ("accepted", "corrected"))


def _share(probability: float) -> str:
    """A probability in a note, to a tenth of a percent ("under 0.1%", not "0.0%", for the most suspect labels)."""
    return f"{probability:.1%}" if probability >= 0.0005 else "under 0.1%"


def _ruling(state: TaskState | None, label: str) -> bool:
    """The task stands at a reviewer's ruling `label` on a disagreement."""
    return (state is not None and state.label == label and state.adjudicated
            and state.status in ("accepted", "corrected"))


def _confidence(value, which: str) -> float | None:
    """A confidence bound from the UI: None when empty, else a number in [0, 1]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"The {which} confidence must be a number from 0 to 1, not {value!r}.") from None
    if not 0 <= number <= 1:
        raise StudioError(f"The {which} confidence must be from 0 to 1, not {number:g}.")
    return number


def _range(low: float | None, high: float | None) -> str:
    return f"{0 if low is None else low:g} to {1 if high is None else high:g}"


def _threshold(queue: ReviewQueue, task: str) -> float | None:
    """The task's 90%-precision threshold, as the queue's predictions carry it."""
    return next((item.predictions[task].threshold for item in queue.items if task in item.predictions), None)


def whole_number(value, what: str, low: int, high: int, default: int | None = None) -> int:
    """A whole number from the UI or an API client, from `low` to `high` (`default` when empty);
    anything else (text, a fraction, NaN, out of range) is refused with a message naming `what`."""
    if default is not None and (value is None or (isinstance(value, str) and not value.strip())):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or not low <= number <= high:
        raise StudioError(f"The {what} must be a whole number from {low:,} to {high:,}, not {value!r}.")
    return int(number)


def _seed(value) -> int:
    return whole_number(value, "seed", 0, MAX_SEED, default=0)


def _severity(value) -> int:
    try:
        severity = int(round(float(0 if value is None else value)))
    except (TypeError, ValueError, OverflowError):
        severity = -1
    if isinstance(value, bool) or severity not in noise.SEVERITIES:
        raise StudioError(f"Severities go from 0 (clean) to 5, not {value!r}.")
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
    if not Path(path).exists():
        raise StudioError(f"The image {Path(path).name} was not found on the server ({_why_gone(Path(path))}.")
    try:
        return load_image(path)
    except ImageError as exc:
        raise StudioError(str(exc)) from exc


# a terminal's escape sequences: CSI (colours, "\x1b[31m"), OSC (a window title, ended by BEL or ESC \), others
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def clean_text(text: str | None, limit: int | None = MAX_TEXT_CHARS) -> str:
    """Printable text, bounded in length (`limit` characters; None: not): terminal escape sequences
    go whole (their ESC alone left "[31m" behind), invisible ones go (`without_invisibles`: the joiners
    of a Persian word or an emoji stay), other control characters become spaces."""
    text = without_invisibles(ANSI_ESCAPE.sub(" ", text or ""))
    text = "".join(ch if ch.isprintable() or ch in JOINERS else " " for ch in text)
    return " ".join(text.split())[:limit]


def text_is_cut(text: str | None) -> bool:
    """Whether `clean_text` cuts the text (to its first MAX_TEXT_CHARS characters)."""
    return len(clean_text(text, None)) > MAX_TEXT_CHARS


def given_labels(labels: dict[str, object], tasks: Iterable[str]) -> dict[str, str]:
    """The non-empty labels given for `tasks`, each run of spaces made one: a doubled space typed by
    hand is no new class, and the message that would ask shows both names alike (the store stores
    each label as `tidy_label` spells it)."""
    tasks = set(tasks)
    chosen = {t: " ".join(str(v).split()) for t, v in labels.items() if t in tasks and v is not None}
    return {t: v for t, v in chosen.items() if v}
