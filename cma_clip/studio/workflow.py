"""The review workflow's records: a queue and its items, what the labeler was shown, and
the outcomes of the actions on them (save, skip, undo, bulk accept).

Plain data, no store and no Gradio: `service.Studio` fills and acts on them, `views`
formats them. A `ReviewQueue` turns into a JSON payload (`to_payload`) that the label
store keeps (`LabelStore.save_queue`), so a page reload or a server restart resumes it
(`ReviewQueue.from_payload`).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import review
from ..labels import Conflict, TaskState, Undone, UnknownClass
from ..predict import TaskPrediction
from ..review import STRATEGIES

CHOICES_KEPT = 9  # each task's top choices a queue keeps: keys 1-9 pick them
ALL_TASKS = "every task"  # the task filter's "no filter"
THRESHOLDS = "thresholds"  # bulk accept: each task's own 90%-precision threshold
SOURCE_ORDER = "source_order"  # the order a queue's source gives (most suspect label, oldest disagreement first)
MISLABELS, DISAGREEMENTS = "mislabels", "disagreements"  # the queue sources that rank their own items
UPLOAD = "upload"  # the split of a queue over an uploaded manifest (its labels are the uploader's, typos and all)
SOURCE_ORDER_NAMES = {MISLABELS: "most suspect label", DISAGREEMENTS: "oldest disagreement first"}

# What `train --extra-labels` (cma_clip/extra_labels.py) does with a correction, by the item's split.
SPLIT_NOTES = {
    "train": "Corrections of **train** items feed the next training run (`python -m cma_clip.train "
             "--extra-labels`).",
    "val": "Corrections of **val** items are **not trained on**: the next run with `--extra-labels` validates "
           "on them (its best epoch and its 90%-precision auto-accept thresholds). They are kept and exported.",
    "test": "Corrections of **test** items **never reach training**: `--extra-labels` keeps the catalogue's own "
            "test labels, so test scores stay comparable between runs. They are kept in the store and the export "
            "(audit, agreement) only.",
    "upload": "Uploaded items the model's catalogue does not have are added to the next training run as **train** "
              "items (`--extra-labels`); items it has keep their split (see the split notes), and so does an upload "
              "of a catalogue item's own photo.",
}


def plural(count: int, noun: str) -> str:
    """How many of `noun`, in words people write: "1 item", "3 items"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def kept_probability(value: float) -> float:
    """A probability as a saved queue keeps it: 6 decimals, never rounded to exactly 0 or 1 when it
    was not (the app then writes "<0.01%" and ">99.99%" after a reload as before, not "0%", "100%")."""
    kept = round(float(value), 6)
    return 1e-6 if kept == 0 < value else 0.999999 if kept == 1 > value else kept


def new_id() -> str:
    """A fresh random id (queues, request ids)."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- the queue
@dataclass
class ReviewItem:
    """One item of a review queue: its content, the model's predictions and the catalogue's
    labels. `status` mirrors the label store (refreshed by `Studio.refresh`): pending until
    every task of the queue is accepted, corrected or skipped."""

    item_id: str
    image_path: str
    text: str
    predictions: dict[str, TaskPrediction]
    status: str = "pending"  # pending | accepted | corrected | skipped
    catalogue: dict[str, str] = field(default_factory=dict)  # task -> the catalogue's own label
    uncertainty: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy -> task -> [0, 1]
    claimed_by: str = ""  # another labeler on it now (the store's claims, refreshed like `status`; not kept)
    note: str = ""  # why the item is in the queue, when its source says (a suspected mislabel: the evidence)
    withheld: str = ""  # why no bulk accept takes it: "no text", "blank photo" (`Prediction.withheld`), or ""
    # a disagreements queue's open disagreement: task -> annotator -> label (refreshed like `status`; not kept)
    disputed: dict[str, dict[str, str]] = field(default_factory=dict)
    suggested: dict[str, str] = field(default_factory=dict)  # task -> the label its queue's source suggests

    @property
    def confidence(self) -> float:
        """The lowest top-1 probability over the tasks."""
        return min(p.confidence for p in self.predictions.values())

    def predicted(self, tasks: list[str] | None = None) -> dict[str, str]:
        return {t: p.label for t, p in self.predictions.items() if tasks is None or t in tasks}

    def choices(self, task: str) -> list[tuple[str, float | None, list[str]]]:
        """A task's top choices, as the number keys pick them: (label, the model's probability where it is
        among its top choices, who said it). In dispute, the annotators' labels come first; a suspected
        mislabel's suggestion comes first, said by "suggested"."""
        p = self.predictions[task]
        probability = dict(zip(p.labels, p.probabilities))
        said: dict[str, list[str]] = {}
        if task in self.suggested:  # it was no key where the model's own top choices left it out (QA lead, s37)
            said[self.suggested[task]] = ["suggested"]
        for annotator, label in self.disputed.get(task, {}).items():
            said.setdefault(label, []).append(annotator)
        labels = [*said, *(label for label in p.labels if label not in said)][:CHOICES_KEPT]
        return [(label, probability.get(label), said.get(label, [])) for label in labels]

    def to_payload(self) -> dict:
        return {"item_id": self.item_id, "image_path": self.image_path, "text": self.text,
                "catalogue": self.catalogue, "note": self.note, "withheld": self.withheld, "suggested": self.suggested,
                "uncertainty": {s: {t: round(v, 6) for t, v in by_task.items()} for s, by_task in self.uncertainty.items()},
                "predictions": {t: {"labels": p.labels, "probabilities": [kept_probability(x) for x in p.probabilities],
                                    "modality_weights": {k: round(v, 4) for k, v in p.modality_weights.items()},
                                    "threshold": p.threshold, "auto_accept": p.auto_accept, "name": p.name}
                                for t, p in self.predictions.items()}}

    @classmethod
    def from_payload(cls, data: dict) -> "ReviewItem":
        return cls(data["item_id"], data["image_path"], data["text"],
                   {t: TaskPrediction(p["labels"], p["probabilities"], p["modality_weights"], p["threshold"],
                                      p["auto_accept"], p.get("name", "")) for t, p in data["predictions"].items()},
                   catalogue=dict(data.get("catalogue") or {}), uncertainty=dict(data.get("uncertainty") or {}),
                   note=data.get("note") or "", withheld=data.get("withheld") or "",
                   suggested=dict(data.get("suggested") or {}))


@dataclass
class ReviewQueue:
    """A model's predictions on a sample of items, the most uncertain first, and the item under review.

    `pool` holds every sampled item with its predictions and uncertainties; `items` is the view
    the labeler walks: the pool ordered by `strategy` and filtered by confidence (`arrange`, in
    memory: re-sorting never predicts again). `tasks` are the tasks under review (all the
    model's, or the one of the task filter): an item is decided when each of them is. Moving
    on skips decided items unless `show_decided`; `previous` steps back to any item."""

    model: str
    items: list[ReviewItem] = field(default_factory=list)
    position: int = 0
    notes: list[str] = field(default_factory=list)  # rows that could not be loaded, and why
    queue_id: str = field(default_factory=new_id)
    tasks: list[str] = field(default_factory=list)
    strategy: str = STRATEGIES[0]
    source: str = ""  # where the items came from, in words
    split: str | None = None  # the catalogue split, UPLOAD, MISLABELS or DISAGREEMENTS
    filters: dict[str, Any] = field(default_factory=dict)  # task, min_conf, max_conf, show_decided
    sampled: int = 0  # items sampled before the confidence filter
    pool: list[ReviewItem] = field(default_factory=list)  # every sampled item (default: `items`)
    stored: bool = field(default=False, compare=False)  # its pool is in the label store: a move writes the view only
    wrapped_from: int | None = field(default=None, compare=False)  # where an `advance` that wrapped round left
    # the annotator it is kept for (its first keep, or the kept queue's); decisions and moves by
    # another name on it are refused (a page left open while its browser signed in as someone else)
    owner: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.pool = self.pool or list(self.items)
        self.sampled = self.sampled or len(self.pool)

    def arranged(self, strategy: str, tasks: list[str], min_conf: float | None = None,
                 max_conf: float | None = None) -> list[ReviewItem]:
        """The pool ordered by `strategy` over `tasks` (`SOURCE_ORDER`: as sampled), the most
        uncertain first, keeping the items whose confidence `review.select` lets through."""
        if strategy == SOURCE_ORDER:
            ranking = np.arange(len(self.pool))
        else:
            ranking = review.order([np.array([item.uncertainty[strategy][t] for item in self.pool]) for t in tasks])
        ranked = [self.pool[i] for i in ranking.tolist()]
        keep = review.select([{t: item.predictions[t].confidence for t in tasks} for item in ranked],
                             min_conf=min_conf, max_conf=max_conf)
        return [ranked[i] for i in keep]

    def view_payload(self) -> dict:
        """What re-sorting and moving change: the view's items (indices into the pool), order and filters."""
        where = {id(item): i for i, item in enumerate(self.pool)}
        return {"order": [where[id(item)] for item in self.items], "tasks": self.tasks, "strategy": self.strategy,
                "filters": self.filters}

    @property
    def source_order_name(self) -> str | None:
        """What the order of a source that ranks its own items is called ("most suspect label"); None for others."""
        return SOURCE_ORDER_NAMES.get(self.split or "")

    @property
    def show_decided(self) -> bool:
        return bool(self.filters.get("show_decided"))

    @property
    def blind(self) -> bool:
        """A labeler's own pass over items others decided ('Show decided items'), for the agreement: the others'
        labels are hidden until the labeler decides."""
        return bool(self.show_decided and self.split != DISAGREEMENTS and self.owner)

    @property
    def reviewed(self) -> int:
        return sum(item.status != "pending" for item in self.items)

    @property
    def current(self) -> ReviewItem | None:
        return self.items[self.position] if 0 <= self.position < len(self.items) else None

    def index_of(self, item_id: str) -> int | None:
        return next((i for i, item in enumerate(self.items) if item.item_id == item_id), None)

    def go_to(self, index: int) -> None:
        """Put the item at `index` on screen (Previous then steps back from it)."""
        self.position, self.wrapped_from = index, None

    def advance(self) -> None:
        """Move to the next item to review after the current one: the next pending one no
        other labeler is on (wrapping round to those passed over), or simply the next one when
        decided items are shown. Past the last, or when others are on every pending item (a
        second label on one of theirs, unasked: 8 labelers at a queue's end once gave one item 8):
        `current` is None (`waiting_on` names them)."""
        n, left = len(self.items), self.position
        self.wrapped_from = None
        if self.show_decided:
            self.position = min(self.position + 1, n)
            return
        following = [(self.position + step) % n for step in range(1, n + 1)]
        pending = [i for i in following if self.items[i].status == "pending"]
        free = (i for i in pending if not self.items[i].claimed_by)
        self.position = next(free, n)  # n: everything reviewed, or the rest is with others
        if self.position < left:  # round to an item passed over: Previous goes back to the one left
            self.wrapped_from = left

    @property
    def waiting_on(self) -> list[ReviewItem]:
        """Past the last item: the pending items left, which other labelers are on (empty when all is done)."""
        return [item for item in self.items if item.status == "pending"] if self.current is None else []

    def nothing_to_decide(self) -> str | None:
        """Why a decision has no item now (past the last, or the rest open with others), else None."""
        if self.current is not None:
            return None
        if self.waiting_on:
            return ("Nothing is left for you in this queue now: the items left are open with other labelers. "
                    "Next looks again; Previous goes back.")
        return "The queue is finished: load another sample, or go back with Previous."

    def should_move_on(self) -> bool:
        """The current item is decided or another labeler is on it, and decided items are not shown (a
        queue that shows them walks every item, for a second label on each)."""
        item = self.current
        return item is not None and not self.show_decided and (item.claimed_by != "" or item.status != "pending")

    def back(self) -> bool:
        """Step back to the item before the current one (decided or not); after an `advance` that
        wrapped round to an earlier item (the last one decided), to the item it left. False at the first."""
        if self.wrapped_from is not None and self.items:
            self.position, self.wrapped_from = min(self.wrapped_from, len(self.items) - 1), None
            return True
        if self.position <= 0 or not self.items:
            return False
        self.position = min(self.position, len(self.items)) - 1
        return True

    def to_payload(self) -> dict:
        """The pool and where it came from: written once (`view_payload` is what changes)."""
        return {"version": 2, "items": [item.to_payload() for item in self.pool], "notes": self.notes,
                "source": self.source, "split": self.split, "sampled": self.sampled}

    @classmethod
    def from_payload(cls, queue_id: str, model: str, payload: dict, position: int,
                     view: dict | None = None) -> "ReviewQueue":
        """A kept queue. A version 1 payload (before the pool) is its own view: its items are the pool."""
        pool = [ReviewItem.from_payload(item) for item in payload.get("items", [])]
        view = view if view is not None else payload
        items = [pool[i] for i in view["order"]] if "order" in view else list(pool)
        strategy = view.get("strategy", STRATEGIES[0])
        return cls(model, items, min(position, len(items)), list(payload.get("notes", [])), queue_id,
                   list(view.get("tasks") or []), SOURCE_ORDER if strategy == "most_suspect_label" else strategy,
                   payload.get("source", ""), payload.get("split"), dict(view.get("filters") or {}),
                   int(payload.get("sampled", len(pool))), pool, stored=True)


# ---------------------------------------------------------------------------- what the labeler saw
@dataclass(frozen=True)
class Shown:
    """The item on screen and the version of each task's label it showed (None: none yet).
    A save sends it back, so the store refuses a save over a label the labeler never saw,
    and refuses to save for another item than the one shown."""

    item_id: str
    versions: dict[str, int | None]

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "versions": self.versions}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Shown | None":
        if not data or not data.get("item_id"):
            return None
        return cls(str(data["item_id"]), {str(t): (None if v is None else int(v))
                                          for t, v in (data.get("versions") or {}).items()})


@dataclass
class ItemView:
    """An item as the labeler sees it: each task's saved state, where its control starts
    (the latest saved label, else the catalogue's or the model's) and the versions shown."""

    item_id: str
    states: dict[str, TaskState]
    values: dict[str, str | None]
    shown: Shown
    history: list[dict]
    catalogue: dict[str, str] = field(default_factory=dict)  # the catalogue's own labels, when known
    split: str | None = None  # the catalogue item's split, when known (where its corrections go: SPLIT_NOTES)
    catalogue_read: bool = False  # the model's catalogue could be read (a Space or a clone may lack it)
    photo_of: list[tuple[str, str | None]] = field(default_factory=list)  # no id given: the catalogue items
    # (id, split) whose photo this is, byte for byte
    choices: dict[str, list[str]] = field(default_factory=dict)  # per task, what its control offers (label_choices)
    hidden: set[str] = field(default_factory=set)  # tasks whose saved label, another labeler's, is hidden (blind)
    own: dict[str, str] = field(default_factory=dict)  # in a blind pass, the labeler's own labels (replaced or not)


# ---------------------------------------------------------------------------- outcomes
@dataclass
class SaveOutcome:
    """What became of a save: `saved`, `duplicate` (the request id was stored already:
    nothing new), `unchanged` (the item stands at the labeler's own labels, or at a reviewer's
    ruling of the same labels: nothing stored, moved on), `conflict` (someone saved another
    label since the version shown: nothing stored, both labels in `conflicts`) or `unknown`
    (labels outside the vocabulary: nothing stored, suggestions in `unknown`), `unchosen` (a
    ruling that left a task in dispute without a label: nothing stored, who said what in
    `unchosen`) or `settled` (that dispute ended meanwhile: nothing stored, moved on). Skips
    are saves of kind "skip"."""

    result: str
    item_id: str
    labels: dict[str, str] = field(default_factory=dict)
    save_id: int | None = None
    statuses: dict[str, str] = field(default_factory=dict)  # task -> accepted | corrected | skipped
    conflicts: list[Conflict] = field(default_factory=list)
    unknown: list[UnknownClass] = field(default_factory=list)
    kind: str = "label"  # label | skip
    request_id: str | None = None
    new_classes: dict[str, str] = field(default_factory=dict)
    # whose decision was stored (with a login on: the signed-in user, whatever was typed); for `unchanged`,
    # the reviewers whose ruling already stood at these labels (empty: the labeler's own labels)
    annotator: str = ""
    catalogue: dict[str, str] = field(default_factory=dict)  # the item's catalogue labels, of the tasks saved
    unlabelled: list[str] = field(default_factory=list)  # a queue's tasks given no label: they stay pending
    against: dict[str, TaskState] = field(default_factory=dict)  # task -> the reviewer's ruling the save went against
    disputed: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> who said what: another labeler's
    # label the save went against, a disagreement now open
    kept_theirs: list[str] = field(default_factory=list)  # tasks a Keep theirs left as decided since (not saved)
    own_before: bool = False  # unchanged: a blind pass's labels were the labeler's own, saved before
    ruling: bool = False  # a reviewer's save in a disagreements queue: it settles the disagreement
    unchosen: dict[str, dict[str, str]] = field(default_factory=dict)  # task in dispute -> annotator -> label
    ended: dict[str, str | None] = field(default_factory=dict)  # a task whose dispute ended meanwhile -> its label
    moved_on: bool = False  # a review queue's answer: it moved past the item (the Predict tab's stays)

    @property
    def stored(self) -> bool:
        return self.result in ("saved", "duplicate")


@dataclass
class UndoOutcome:
    """An undo: the save reverted (its item and each task's label undone -> restored, the
    tasks kept as someone else decided them since, their decisions a forced undo dropped),
    or the conflicts that stopped it (`save_id` then names the save the choice applies to)."""

    item_id: str | None
    tasks: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    in_queue: bool = False  # the item is in the open queue, which now shows it
    kept: list[str] = field(default_factory=list)
    dropped: list[Conflict] = field(default_factory=list)
    save_id: int | None = None
    request_id: str | None = None
    queue_open: bool = False
    ruling: bool = False  # the save reverted was a ruling (not a skip) on a disagreement
    reopened: dict[str, dict[str, str]] = field(default_factory=dict)  # an undone ruling: the dispute open again
    batch: list[Undone] = field(default_factory=list)  # an undone bulk accept: each of its saves' undo


@dataclass
class BulkOutcome:
    """A bulk accept: how many items the filter picked among the queue's pending ones, how
    many were stored now, how many an earlier run of the same bulk accept had stored, the
    decided items left alone, the items left to the labelers who have them open (item id ->
    annotator), and the conflicts left out (someone labelled them otherwise)."""

    batch_id: str
    tasks: list[str]
    selected: int
    bar: str = ""  # the bar in words: "each task's 90%-precision threshold", "a confidence of at least 0.7"
    under_catalogue: int = 0  # labels it takes that are not their item's catalogue label: training keeps that
    stored: int = 0
    already_there: int = 0
    decided: int = 0
    withheld: int = 0  # items without a text or with a blank photo: never auto-accepted (`ReviewItem.withheld`)
    claimed: dict[str, str] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    chunks: int = 0
    took_open: str | None = None  # the item the labeler had open, which it accepted (some of its tasks, or all)
    moved_on: bool = False  # and the queue moved past it (every task under review decided)
