"""The labelers' corrections as training data: `python -m cma_clip.train --extra-labels`.

`read_corrections` reads them from the app's label store (`studio_data/labels.db`) or from one
of its exports (the History tab's CSV or JSONL, downloaded anywhere); `merge` applies them to
a catalogue, by the split of each item, and says what it did (training prints it and keeps it
in the checkpoint):

- a correction of a **train** item replaces its catalogue labels;
- one of a **val** item too, and the run validates on it (best epoch, thresholds): it is never
  trained on;
- a **test** item keeps its catalogue labels, so test figures stay comparable between runs and
  never score a model against labels it suggested;
- an item the catalogue lacks (an upload) becomes a train row, unless its photo is, byte for
  byte, the photo of a catalogue item: it then counts as that item, so a test photo uploaded
  without its id never becomes a training row;
- an item of the catalogue this run leaves out (`--limit`) is left out;
- a label the model auto-accepted (a bulk accept) counts as the others do, unless `auto_labels`
  is off (`--no-auto-labels`): a model trained on its own guesses learns their errors back; it never
  replaces a catalogue item's own label, a label someone chose (the 90%-precision thresholds count
  such an auto-accept as the model's error), only fills a blank cell;
- a label of an open disagreement (annotators differ and no reviewer settled it, or a label since
  went against the ruling) is left out: it is not a label yet. The catalogue's label of that task is
  left out too (of a train or val item), as a label in dispute: the annotators may both have rejected it;
- exports joined into one file (an id on several rows): of each task the newest label (by `<task>__at`);
  annotators ending on different labels are a disagreement, left out as above.

A catalogue without a split column gets the seeded split training draws written into it first,
so the rows the corrections add do not reshuffle which items are test.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from .data import Catalogue, CatalogueError, PhotoIndex, is_missing, read_manifest, split_indices
from .labels import EXPORT_COLUMNS, LabelStore, LabelStoreError, class_spelled, tidy_label

EXPORT_SUFFIXES = (".csv", ".jsonl")
# what `merge` counts: the labelled items, then what became of them
OUTCOMES = ("corrections", "train", "val", "test", "added", "same_photo", "left_out", "no_image", "other_tasks",
            "auto_labels", "auto_left_out", "auto_under_catalogue", "disputed_left_out", "confirmed", "repeated_rows",
            "conflicting_labels")


@dataclass(frozen=True)
class Correction:
    """One item's current labels, its text and its photo (None: an export's photo not beside it)."""

    labels: dict[str, str]
    text: str
    image: Path | None
    auto: frozenset[str] = frozenset()  # the tasks whose label the model auto-accepted
    digest: str | None = None  # the photo's sha256 where its file is missing (an export's file is named by it)
    disputed: frozenset[str] = frozenset()  # the tasks of its open disagreements (their labels not in `labels`)


@dataclass(frozen=True)
class Corrections:
    """Every labelled item of a label store or an export, by item id."""

    source: Path
    items: dict[str, Correction]
    image_root: Path  # the folder the photos are in, which the merged catalogue may read images from
    newest: str | None  # the time of the newest label: which labels a run trained on
    disputed: int = 0  # labels left out: open disagreements
    repeated: int = 0  # an export's rows beyond the first of their id (exports joined): the newest label kept
    conflicts: int = 0  # labels those rows differ on

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Merged:
    """A catalogue with the corrections applied, and what became of them (`counts`)."""

    catalogue: Catalogue
    source: Path
    newest: str | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    new_classes: dict[str, list[str]] = field(default_factory=dict)  # task -> labels no catalogue label had
    respelled: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> label -> the class it spells
    not_tasks: dict[str, int] = field(default_factory=dict)  # a column none of the tasks -> its labels left out

    def report(self) -> dict:
        """What the checkpoint keeps (`training["extra_labels"]`)."""
        return {"source": str(self.source), "newest_label": self.newest, **self.counts,
                "new_classes": self.new_classes, "respelled": self.respelled, "not_tasks": self.not_tasks}

    def summary(self) -> str:
        """One line a person reads before the run starts."""
        c = self.counts
        confirmed = f" ({c['confirmed']} of them as the catalogue had them)" if c["confirmed"] else ""
        parts = [f"{c['train']} train items relabelled{confirmed}",
                 f"{c['val']} val items (validated on, not trained on)",
                 f"{c['test']} test items kept their catalogue labels", f"{c['added']} new items added as train rows"]
        if c["repeated_rows"]:
            parts.append(f"{c['repeated_rows']} row{'s repeat' if c['repeated_rows'] > 1 else ' repeats'} an item of "
                         f"an earlier row (exports joined): of each task the newest label kept "
                         f"({c['conflicting_labels']} label{'s' * (c['conflicting_labels'] != 1)} differed between "
                         "the rows; where annotators differ, it is left out as a disagreement)")
        if c["same_photo"]:
            parts.append(f"{c['same_photo']} items under an id the catalogue lacks have a catalogue item's photo "
                         "and count as that item")
        if c["left_out"]:
            parts.append(f"{c['left_out']} items outside this run (--limit)")
        if c["no_image"]:
            parts.append(f"{c['no_image']} new items not added: their photos are missing (an export's are in the "
                         "labels_images/ folder beside the label store; train with the store to add them)")
        if c["other_tasks"]:
            parts.append(f"{c['other_tasks']} with labels for other tasks only")
        if c["auto_labels"]:
            parts.append(f"{c['auto_labels']} of the labels used were auto-accepted by a model (--no-auto-labels "
                         "leaves them out)")
        if c["auto_left_out"]:
            parts.append(f"{c['auto_left_out']} auto-accepted labels left out (--no-auto-labels)")
        if c["auto_under_catalogue"]:
            parts.append(f"{c['auto_under_catalogue']} auto-accepted labels that differ from the catalogue's own "
                         "label of their item left out (the catalogue's kept: an auto-accept fills blanks only)")
        if c["disputed_left_out"]:
            parts.append(f"{c['disputed_left_out']} labels of open disagreements left out, the catalogue's of those "
                         "tasks too (a reviewer settles them in the Review tab's Disagreements queue)")
        if self.respelled:  # an export edited by hand: "grey" for "Grey" would train as a second class
            parts.append("labels spelling a class otherwise, read as that class: " + "; ".join(
                f"{task} " + ", ".join(f"{label!r} as {spelled!r}" for label, spelled in labels.items())
                for task, labels in self.respelled.items()))
        if self.not_tasks:  # a column renamed by hand, or another catalogue's task: its labels would vanish unsaid
            parts.append("labels of columns that are none of this catalogue's tasks (another catalogue's, or a column "
                         "renamed), left out: " + ", ".join(f"{column!r} ({n})" for column, n in self.not_tasks.items())
                         + " (tasks: " + ", ".join(self.catalogue.config.tasks) + ")")
        if self.new_classes:  # each one a class of the model: a typo or a formula pasted in shows here
            parts.append("new classes (labels no catalogue item of this run had): " + "; ".join(
                f"{task} {', '.join(map(repr, labels))}" for task, labels in self.new_classes.items()))
        return f"--extra-labels {self.source.name}: {c['corrections']} labelled items; " + "; ".join(parts)


def read_corrections(path: str | Path) -> Corrections:
    """The corrections in a label store or in one of its exports (by the suffix .csv or .jsonl).
    Raises CatalogueError for a missing file, a file that is neither, or a store without labels
    (never writing to it: an empty file stays empty)."""
    path = Path(path).resolve()
    if path.is_dir():
        raise CatalogueError(f"--extra-labels {path} is a folder: give the label store in it (labels.db) or an "
                             "export of it (CSV or JSONL)")
    if not path.is_file():
        raise CatalogueError(f"--extra-labels {path}: no such file (the app keeps its label store in "
                             "studio_data/labels.db; the History tab exports it as CSV or JSONL)")
    corrections = _from_export(path) if path.suffix.lower() in EXPORT_SUFFIXES else _from_store(path)
    if not any(correction.labels for correction in corrections.items.values()):
        disputed = (f" settled (its {corrections.disputed} labels are open disagreements, for a reviewer's "
                    "Disagreements queue)" if corrections.disputed else "")
        raise CatalogueError(f"--extra-labels {path}: it holds no labels{disputed}")
    return corrections


def _settled(corrections: dict[str, tuple[Correction, set[str]]], path: Path, image_root: Path,
             newest: str | None) -> Corrections:
    """Corrections without the labels of open disagreements (item -> (correction, its disputed tasks))."""
    items, disputed = {}, 0
    for item_id, (correction, tasks) in corrections.items():
        tasks = frozenset(tasks & correction.labels.keys())
        disputed += len(tasks)
        labels = {t: label for t, label in correction.labels.items() if t not in tasks}
        items[item_id] = replace(correction, labels=labels, auto=correction.auto & labels.keys(), disputed=tasks)
    return Corrections(path, items, image_root, newest, disputed)


def _from_store(path: Path) -> Corrections:
    try:  # read-only first: a wrong file must not become an empty label store
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "corrections" not in tables:
            raise CatalogueError(f"--extra-labels {path} is not a label store (no corrections table); give the "
                                 "app's studio_data/labels.db or an export (.csv, .jsonl)")
    except sqlite3.DatabaseError as exc:
        raise CatalogueError(f"--extra-labels {path} is not a label store ({exc}); give the app's "
                             "studio_data/labels.db or an export (.csv, .jsonl)") from exc
    try:
        store = LabelStore(path)
        current = store.current_labels()
    except LabelStoreError as exc:
        raise CatalogueError(f"--extra-labels {path}: {exc}") from exc
    items = {item_id: (Correction(item["labels"], item["text"], _found(item["image_path"]),
                                  frozenset(t for t, state in item["tasks"].items() if state.source == "auto")),
                       set(item["disputed"]))
             for item_id, item in current.items()}
    newest = max((item["updated_at"] for item in current.values()), default=None)
    return _settled(items, path, store.image_dir, newest)


def _from_export(path: Path) -> Corrections:
    rows = read_manifest(path)
    if rows and (absent := [c for c in EXPORT_COLUMNS if c not in rows[0]]):
        raise CatalogueError(f"--extra-labels {path.name} is not an export of the label store: it lacks the "
                             f"columns {absent} (a table of labels of your own is a catalogue: train on it with "
                             "--manifest)")
    folder = path.resolve().parent
    tasks = [c for c in (rows[0] if rows else ()) if c not in EXPORT_COLUMNS and "__" not in c]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    items, conflicts = {}, 0
    for item_id, group in groups.items():
        # several rows of one id: exports joined together (two labelers' machines); a tie: the later row
        newest = max(reversed(group), key=_labelled_at)
        labels, auto, disputed = {}, set(), set()
        for task in tasks:
            labelled = [row for row in group if not is_missing(row[task])]
            if not labelled:
                continue
            chosen = max(reversed(labelled), key=lambda row: _labelled_at(row, task))
            labels[task] = chosen[task].strip()
            conflicts += len({row[task].strip() for row in labelled}) > 1
            auto |= {task} if chosen.get(f"{task}__source") == "auto" else set()
            disputed |= {task} if not is_missing(chosen.get(f"{task}__disputed")) else set()  # older exports: none
            if _annotators_differ(labelled, task):  # as one store would hold it: a disagreement, not trained on
                disputed.add(task)
        image = _found(folder / newest["image"]) if newest["image"] else None
        items[item_id] = (Correction(labels, newest["text"], image, frozenset(auto),
                                     None if image else _digest_in_name(newest["image"])), disputed)
    corrections = _settled(items, path, folder, max((row["updated_at"] for row in rows), default=None))
    return replace(corrections, repeated=len(rows) - len(groups), conflicts=conflicts)


def _annotators_differ(rows: list[dict], task: str) -> bool:
    """Whether the annotators of an item's rows (exports joined) end on different labels of `task`,
    each annotator's newest label counting."""
    newest: dict[str, dict] = {}
    for row in rows:
        who = (row.get(f"{task}__annotator") or row.get("annotator") or "").strip()
        if who not in newest or _labelled_at(row, task) >= _labelled_at(newest[who], task):
            newest[who] = row
    return len({row[task].strip() for row in newest.values()}) > 1


def _labelled_at(row: dict, task: str | None = None) -> tuple:
    """When a row of an export was labelled (of `task`: its <task>__at, else the row's updated_at), as a
    sort key: a time a spreadsheet rewrote into another format ranks below the readable ones."""
    value = (row.get(f"{task}__at") or "").strip() if task else ""
    value = value or row["updated_at"] or ""
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return (0, datetime.min.replace(tzinfo=timezone.utc))
    return (1, at if at.tzinfo else at.replace(tzinfo=timezone.utc))


def _digest_in_name(image: str) -> str | None:
    """The sha256 a stored photo's file is named by (`labels_images/ab/<sha256>.jpg`), if `image` is one."""
    stem = Path(image).stem
    return stem if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None


def _found(image: Path) -> Path | None:
    image = image.resolve()
    return image if image.is_file() else None


def merge(catalogue: Catalogue, corrections: Corrections, split_seed: int = 0, auto_labels: bool = True) -> Merged:
    """A copy of `catalogue` with `corrections` applied, by the rules of the module's docstring;
    `split_seed` draws the split of a catalogue without a split column (as training does);
    `auto_labels` False leaves out the labels a model auto-accepted."""
    config = catalogue.config
    merged = Merged(catalogue, corrections.source, corrections.newest)
    counts = merged.counts
    counts["corrections"], counts["disputed_left_out"] = len(corrections), corrections.disputed
    counts["repeated_rows"], counts["conflicting_labels"] = corrections.repeated, corrections.conflicts
    rows = [dict(row) for row in catalogue.rows]
    known = {task: {row[task] for row in rows if isinstance(row.get(task), str) and not is_missing(row[task])}
             for task in config.tasks}  # the classes before the corrections
    if not catalogue.has_splits and rows:
        for split, index in split_indices(catalogue, split_seed).items():
            for i in index:
                rows[i]["split"] = split
    key = config.id_column if config.id_column and rows and config.id_column in rows[0] else config.image_column
    by_id = {row.get(key): i for i, row in enumerate(rows)}
    manifest = _Manifest(catalogue)
    relabel: list[tuple[int, Correction]] = []  # photo matches first, so an item's own correction wins
    added = []
    for item_id, correction in corrections.items.items():
        labels = {}
        for task, value in correction.labels.items():
            if task not in config.tasks:
                merged.not_tasks[task] = merged.not_tasks.get(task, 0) + 1
                continue
            # as stored today (`tidy_label`: a label saved with a zero-width space, say, before labels were tidied)
            label = tidy_label(value, known[task])
            if label not in known[task] and (spelled := class_spelled(label, sorted(known[task]))):
                merged.respelled.setdefault(task, {})[label] = spelled
                label = spelled
            labels[task] = label
        auto = correction.auto & labels.keys()
        if not auto_labels:
            counts["auto_left_out"] += len(auto)
            labels, auto = {t: v for t, v in labels.items() if t not in auto}, frozenset()
        if not labels and not correction.disputed & set(config.tasks):
            counts["other_tasks"] += not correction.auto
            continue
        correction = replace(correction, labels=labels, auto=auto, disputed=correction.disputed & set(config.tasks))
        if item_id in by_id:
            relabel.append((by_id[item_id], correction))
        elif item_id in manifest.ids:
            counts["left_out"] += 1
        elif same := manifest.items_with(correction):
            counts["same_photo"] += 1
            inside = [by_id[i] for i in same if i in by_id]
            counts["left_out"] += not inside
            relabel[:0] = [(i, correction) for i in inside]
        elif not labels:  # a new item with labels in dispute only: nothing to add
            continue
        elif correction.image is None:
            counts["no_image"] += 1
        else:
            added.append((item_id, correction))
            counts["auto_labels"] += len(auto)
    columns = list(rows[0]) if rows else [config.image_column, *config.text_columns, *config.tasks]
    relabelled, changed = set(), set()  # an item labelled by its id and through its photo counts once
    for i, correction in relabel:
        split = rows[i].get("split", "train")
        counts[split if split in ("val", "test") else "train"] += i not in relabelled
        relabelled.add(i)
        if split != "test":
            before = dict(rows[i])
            # a bulk accept stored the model's label over the catalogue's, and training took it (review s41)
            under = {t for t in correction.auto if not is_missing(before.get(t)) and before[t] != correction.labels[t]}
            rows[i].update({t: v for t, v in correction.labels.items() if t not in under})
            rows[i].update(dict.fromkeys(correction.disputed, ""))  # a label in dispute, the catalogue's too
            counts["auto_labels"] += len(correction.auto) - len(under)
            counts["auto_under_catalogue"] += len(under)
            if rows[i] != before:
                changed.add(i)
    if counts["corrections"] and counts["other_tasks"] == counts["corrections"]:
        raise CatalogueError(f"--extra-labels {corrections.source.name}: none of its {counts['corrections']} labelled "
                             f"items has a label for this catalogue's tasks ({', '.join(config.tasks)}): labels of "
                             "another catalogue?")
    counts["confirmed"] = sum(rows[i].get("split", "train") not in ("val", "test") for i in relabelled - changed)
    trained = [c.labels for i, c in relabel if rows[i].get("split", "train") not in ("val", "test")]
    trained += [c.labels for _, c in added]
    merged.new_classes = {task: sorted(new) for task in config.tasks
                          if (new := {labels[task] for labels in trained if task in labels} - known[task])}
    for item_id, correction in added:
        row = {**dict.fromkeys(columns, ""), **correction.labels, config.image_column: str(correction.image),
               "split": "train"}
        if config.text_columns:
            row[config.text_columns[0]] = correction.text
        if key != config.image_column:
            row[key] = item_id
        rows.append(row)
        counts["added"] += 1
    extra_roots = catalogue.extra_roots
    if corrections.image_root not in extra_roots:
        extra_roots = (*extra_roots, corrections.image_root)
    merged.catalogue = replace(catalogue, rows=rows, extra_roots=extra_roots)
    return merged


class _Manifest:
    """The whole manifest a (limited) catalogue came from: its item ids, and its items' photos."""

    def __init__(self, catalogue: Catalogue) -> None:
        whole = Catalogue.open(catalogue.config) if Path(catalogue.config.manifest).is_file() else catalogue
        self.ids = set(whole.item_ids())
        self._photos = PhotoIndex(whole)

    def items_with(self, correction: Correction) -> list[str]:
        """The items whose photo is the correction's (its file, else the sha256 its name gives)."""
        if correction.image is not None:
            return self._photos.with_file(correction.image)
        return self._photos.with_digest(correction.digest) if correction.digest else []
