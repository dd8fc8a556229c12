"""Label store: labelers' decisions in SQLite, their images in a content-addressed folder.

Every save appends one row to ``corrections`` (item id, image sha256, text, the model's
predictions, annotator, checkpoint, UTC time, request id, source ``human`` or ``auto``, kind
``label``, ``skip`` or ``undo``) and one row per task to ``decisions`` (label, status
``accepted`` = the model's prediction, ``corrected`` = another label, ``skipped``, or
``pending`` after an undo; the catalogue's label; the version the labeler saw; for an undo,
the decision it reverts; whether the save *adjudicates*: a reviewer's decision on what annotators
disagree on). Nothing is ever updated or deleted, so the store is its own audit.

The *version* of an (item, task) is the id of its latest decision. Its state replays its
decisions in order: a label or an undo sets label and status, a skip keeps the label and
marks the task skipped. A save that names the versions its labeler saw is refused with a
`LabelConflict` when someone saved another label since (a skip: when someone else decided
it since; an undo: when someone else decided one of its tasks since, even the same label);
a label outside a task's vocabulary (or a label some item holds now) is refused with an
`UnknownLabel` naming close classes, unless confirmed as a new class. ``claims`` holds the
item each labeler is on, for ten minutes after their last step, so queues steer apart.
`disagreements` lists the items whose annotators' labels differ on a task and that no
adjudication settled (a later label that differs from the adjudicated one opens it again).

Each image is stored once, as ``<sha[:2]>/<sha>.<ext>`` in the image folder (default
``<db stem>_images/`` beside the database). The database runs in WAL mode with
``synchronous=FULL``: a save that returned survives the writer being killed, or a power cut.
Every thread (and every process) uses its own connection, and a ``request_id`` makes a save
idempotent, so retried saves store one row; a bulk accept is one transaction whose records
are keyed by batch and item, so running it again stores only what is missing.

`export` writes the current labels, with each label's provenance and the annotators'
agreement, as a manifest the trainer reads (`extra_labels` merges a store or an export into a
catalogue for training).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from sklearn.metrics import cohen_kappa_score

from .data import MAX_IMAGE_PIXELS, atomic_write, is_missing, write_table
from .errors import CMAClipError

STATUSES = ("pending", "accepted", "corrected", "skipped")
SOURCES = ("human", "auto")
# what the audit's source filter tells apart: a labeler's label, an auto-accept, a reviewer's adjudication
AUDIT_SOURCES = {"human": "c.source = 'human' AND c.adjudicated = 0", "auto": "c.source = 'auto'",
                 "adjudication": "c.adjudicated = 1"}

# ---------------------------------------------------------------------------- SQL
V1_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, path TEXT, bytes INTEGER, created_at TEXT)",
    "CREATE TABLE IF NOT EXISTS corrections (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,"
    " image_sha256 TEXT, text TEXT, predictions TEXT, labels TEXT NOT NULL, annotator TEXT, checkpoint TEXT,"
    " created_at TEXT NOT NULL, request_id TEXT UNIQUE)",
    "CREATE INDEX IF NOT EXISTS corrections_item_id ON corrections (item_id)",
)
V2_SCHEMA = (
    "ALTER TABLE corrections ADD COLUMN kind TEXT NOT NULL DEFAULT 'label' CHECK (kind IN ('label', 'skip', 'undo'))",
    "ALTER TABLE corrections ADD COLUMN source TEXT NOT NULL DEFAULT 'human' CHECK (source IN ('human', 'auto'))",
    "ALTER TABLE corrections ADD COLUMN batch_id TEXT",
    "CREATE INDEX corrections_annotator ON corrections (annotator, id)",
    "CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, save_id INTEGER NOT NULL REFERENCES corrections,"
    " item_id TEXT NOT NULL, task TEXT NOT NULL, label TEXT,"
    f" status TEXT NOT NULL CHECK (status IN {STATUSES}), catalogue_label TEXT, base_version INTEGER,"
    " reverts INTEGER UNIQUE REFERENCES decisions)",  # a decision is reverted at most once
    "CREATE INDEX decisions_item_task ON decisions (item_id, task, id)",
    "CREATE INDEX decisions_task_label ON decisions (task, label)",
    "CREATE INDEX decisions_save ON decisions (save_id)",
    "CREATE TABLE queues (queue_id TEXT PRIMARY KEY, annotator TEXT NOT NULL, model TEXT NOT NULL,"
    " payload TEXT NOT NULL, position INTEGER NOT NULL, updated_at TEXT NOT NULL)",
    "CREATE INDEX queues_annotator ON queues (annotator, model)",
)
# a queue's order, filters and place change on every move: kept apart from its items, written once
V3_SCHEMA = ("ALTER TABLE queues ADD COLUMN view TEXT",)
# an undo names the save it undoes (it may leave tasks someone else decided since as they stand, so
# no decision of it need revert one of the save's); claims: the item each labeler is on
V4_SCHEMA = (
    "ALTER TABLE corrections ADD COLUMN undoes INTEGER REFERENCES corrections",
    "UPDATE corrections SET undoes = (SELECT r.save_id FROM decisions u JOIN decisions r ON r.id = u.reverts"
    " WHERE u.save_id = corrections.id LIMIT 1) WHERE kind = 'undo'",
    "CREATE UNIQUE INDEX corrections_undoes ON corrections (undoes)",  # a save is undone at most once
    "CREATE TABLE claims (annotator TEXT PRIMARY KEY, item_id TEXT NOT NULL, expires_at TEXT NOT NULL)",
    "CREATE INDEX claims_item ON claims (item_id)",
)
# a save that adjudicates: a reviewer's decision on a disagreement (not one more annotator's vote)
V5_SCHEMA = ("ALTER TABLE corrections ADD COLUMN adjudicated INTEGER NOT NULL DEFAULT 0 CHECK (adjudicated IN (0, 1))",)
# a save made blind: the other labelers' labels of the item were hidden from its labeler (a second pass)
V6_SCHEMA = ("ALTER TABLE corrections ADD COLUMN blind INTEGER NOT NULL DEFAULT 0 CHECK (blind IN (0, 1))",)
INSERT_IMAGE = "INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)"
IMAGE_FILE = "SELECT path FROM images WHERE sha256 = ?"
COUNT_LABEL_SAVES = "SELECT COUNT(*) FROM corrections WHERE kind = 'label'"
INSERT_SAVE = ("INSERT INTO corrections (item_id, image_sha256, text, predictions, labels, annotator, checkpoint,"
               " created_at, request_id, kind, source, batch_id, undoes, adjudicated, blind)"
               " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_DECISION = ("INSERT INTO decisions (save_id, item_id, task, label, status, catalogue_label, base_version,"
                   " reverts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
V1_SAVES = "SELECT id, item_id, labels, predictions FROM corrections ORDER BY id"
SAVE_BY_REQUEST = "SELECT id, kind FROM corrections WHERE request_id = ?"
SAVE_BATCH = "SELECT batch_id FROM corrections WHERE id = ?"
SAVE_ITEM = "SELECT item_id FROM corrections WHERE id = ?"
SAVE_DECISIONS = "SELECT task, id, label FROM decisions WHERE save_id = ? ORDER BY id"
# the labels items hold now: an (item, task)'s latest decision that sets its label (a skip keeps the label
# before it; an undo's row holds the label it restores), so an undone or replaced label is gone
_HOLDING = ("FROM decisions d WHERE d.task = ? AND d.label {} AND d.id ="
            " (SELECT MAX(e.id) FROM decisions e WHERE e.item_id = d.item_id AND e.task = d.task"
            " AND (e.label IS NOT NULL OR e.status = 'pending' OR e.reverts IS NOT NULL))")
LABEL_HELD = "SELECT 1 " + _HOLDING.format("= ?") + " LIMIT 1"  # does some item hold this label now
HELD_LABELS = "SELECT DISTINCT d.label " + _HOLDING.format("IS NOT NULL")
TASK_LABELS = "SELECT DISTINCT label FROM decisions WHERE task = ? AND label IS NOT NULL"  # ever saved (an index scan)
DECISIONS_FROM = " FROM decisions d JOIN corrections c ON c.id = d.save_id"
# withdrawn_at: the undo that took the decision back though it kept someone's later one on its task
# ("keep theirs": it wrote no decision for that task), which a later undo's restore passes over
DECISIONS = ("SELECT d.id AS version, d.save_id, d.item_id, d.task, d.label, d.status, d.catalogue_label,"
             " d.base_version, d.reverts, c.kind, c.source, c.annotator, c.checkpoint, c.created_at, c.text,"
             " c.predictions, c.adjudicated, c.blind, (SELECT w.id FROM corrections w WHERE w.undoes = d.save_id"
             " AND NOT EXISTS (SELECT 1 FROM decisions k WHERE k.save_id = w.id AND k.task = d.task)) AS withdrawn_at"
             + DECISIONS_FROM)
COUNT_DECISIONS = "SELECT COUNT(*)" + DECISIONS_FROM
AUDIT_PAGE = DECISIONS + "{where} ORDER BY d.id DESC LIMIT ? OFFSET ?"
ITEM_DECISIONS = DECISIONS + " WHERE d.item_id = ? AND d.save_id < ? ORDER BY d.id"
ALL_DECISIONS = DECISIONS + " ORDER BY d.id"
SEARCHED = ("d.item_id", "d.label", "c.annotator", "c.text")  # what audit's search looks in
NOT_UNDONE = " AND NOT EXISTS (SELECT 1 FROM corrections u WHERE u.undoes = {save})"
NOT_REVERTED = " AND NOT EXISTS (SELECT 1 FROM decisions u WHERE u.reverts = d.id)"
# not dropped by someone's forced undo: made on its task after the decision that undo reverted, up to the one
# standing then (`_dropped_by_undo`)
NOT_DROPPED = (" AND NOT EXISTS (SELECT 1 FROM decisions x WHERE x.item_id = d.item_id AND x.task = d.task"
               " AND x.reverts < d.id AND d.id <= x.base_version)")
# each annotator's human labels: not auto-accepted, not an adjudication, not of a save its annotator undid
# (an undo that kept someone's later decision withdraws the label all the same: its annotator took it back;
# one that someone's forced undo dropped still says what its annotator judged)
HUMAN = (" WHERE c.kind = 'label' AND c.source = 'human' AND c.annotator != '' AND c.adjudicated = 0"
         + NOT_UNDONE.format(save="c.id"))
HUMAN_LABELS = DECISIONS + HUMAN + " ORDER BY d.id"
ITEM_HUMAN_LABELS = DECISIONS + HUMAN + " AND d.item_id = ? ORDER BY d.id"
# the rulings that stand: not undone (reverted or withdrawn) by the reviewer, not dropped by a forced undo
STANDING_RULING = " c.kind = 'label' AND c.adjudicated = 1" + NOT_UNDONE.format(save="c.id") + NOT_DROPPED
ADJUDICATIONS = DECISIONS + " WHERE" + STANDING_RULING + " ORDER BY d.id"
ITEM_RULINGS = DECISIONS + " WHERE d.item_id = ? AND" + STANDING_RULING + " ORDER BY d.id"
CATALOGUE_LABELS = ("SELECT task, catalogue_label FROM decisions WHERE item_id = ? AND catalogue_label IS NOT NULL"
                    " ORDER BY id")
# a save not undone with a decision standing (a save someone's forced undo dropped is gone)
STANDING = (NOT_UNDONE.format(save="c.id") + " AND EXISTS (SELECT 1 FROM decisions d WHERE d.save_id = c.id"
            + NOT_DROPPED + ")")
# the newest save of `annotator` that undo can still revert (an undo that kept every task as someone
# else decided since still passes over it)
LAST_UNDOABLE = ("SELECT * FROM corrections c WHERE c.annotator = ? AND c.kind != 'undo' AND c.source = 'human'"
                 + STANDING + " ORDER BY c.id DESC LIMIT 1")
# a bulk accept's saves still standing, and the newest bulk accept of `annotator` undo can still revert
BATCH_SAVES = "SELECT * FROM corrections c WHERE c.batch_id = ? AND c.annotator = ? AND c.kind = 'label'" + STANDING
LAST_BATCH = ("SELECT * FROM corrections c WHERE c.annotator = ? AND c.kind = 'label' AND c.batch_id IS NOT NULL"
              + STANDING + " ORDER BY c.id DESC LIMIT 1")
BATCH_ITEMS = "SELECT DISTINCT item_id FROM corrections c WHERE c.batch_id = ? AND c.kind = 'label'" + STANDING
BATCH_UNDONE = ("SELECT 1 FROM corrections c WHERE c.batch_id = ? AND EXISTS (SELECT 1 FROM corrections u"
                " WHERE u.undoes = c.id) LIMIT 1")
# the undos one request made: a bulk accept's undo is an undo per save, "<request id>:<save id>" after the first
BATCH_UNDOS = ("SELECT id FROM corrections WHERE kind = 'undo' AND (request_id = ? OR substr(request_id, 1, ?) = ?)"
               " ORDER BY id")
UNDO_SAVE = ("SELECT u.item_id, u.undoes, s.kind = 'label' AND s.adjudicated AS ruling FROM corrections u"
             " JOIN corrections s ON s.id = u.undoes WHERE u.id = ?")
UNDO_RESULT = ("SELECT u.id AS version, u.save_id, u.task, r.label AS undone, u.label AS restored, u.base_version,"
               " u.reverts FROM decisions u"
               " JOIN decisions r ON r.id = u.reverts WHERE u.save_id = ? ORDER BY u.id")
SAVE_TASKS = "SELECT task FROM decisions WHERE save_id = ? ORDER BY id"
LABEL_SAVES = ("SELECT c.*, i.path AS image_file FROM corrections c JOIN images i ON i.sha256 = c.image_sha256"
               " WHERE c.kind = 'label' {where} ORDER BY c.id DESC LIMIT ?")
# what undos did to one save's decisions: its own undo reverted them (reverted = 1), or someone's forced
# undo of an earlier save dropped them (made after the decision it reverted, standing then or under a later
# one, not reverted before: `_dropped_by_undo`)
TAKEN_BACK = ("SELECT d.task, c.annotator, u.reverts = d.id AS reverted FROM decisions d JOIN decisions u"
              " ON u.reverts = d.id OR (u.item_id = d.item_id AND u.task = d.task AND d.reverts IS NULL"
              " AND d.id > u.reverts AND d.id <= u.base_version AND NOT EXISTS (SELECT 1 FROM decisions x"
              " WHERE x.reverts = d.id AND x.id < u.id)) JOIN corrections c ON c.id = u.save_id"
              " WHERE d.save_id = ? ORDER BY d.id")
# each undo's tasks of the save it undid that it left as someone else decided since ("keep theirs")
# the tasks of one save that its undo left as someone else decided since, and who undid it
KEPT_OF_SAVE = ("SELECT t.task, u.annotator FROM corrections u JOIN decisions t ON t.save_id = u.undoes"
                " WHERE u.undoes = ? AND u.kind = 'undo' AND NOT EXISTS"
                " (SELECT 1 FROM decisions d WHERE d.save_id = u.id AND d.task = t.task) ORDER BY t.id")
KEPT_AT_UNDO = ("SELECT u.id AS save_id, u.item_id, u.annotator, u.source, u.created_at, t.task FROM corrections u"
                " JOIN decisions t ON t.save_id = u.undoes WHERE u.item_id = ? AND u.kind = 'undo' AND NOT EXISTS"
                " (SELECT 1 FROM decisions d WHERE d.save_id = u.id AND d.task = t.task) ORDER BY t.id")
# the text and image of every item's newest labelled save
ITEM_CONTENT = ("SELECT c.item_id, c.text, i.path AS image_file FROM corrections c JOIN images i"
                " ON i.sha256 = c.image_sha256 WHERE c.id IN (SELECT MAX(id) FROM corrections WHERE kind = 'label'"
                " GROUP BY item_id) ORDER BY c.id")
UPSERT_QUEUE = ("INSERT OR REPLACE INTO queues (queue_id, annotator, model, payload, position, updated_at, view)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)")
MOVE_QUEUE = ("UPDATE queues SET annotator = ?, position = ?, updated_at = ?, view = COALESCE(?, view)"
              " WHERE queue_id = ?")
QUEUE_BY_ID = "SELECT * FROM queues WHERE queue_id = ?"
LATEST_QUEUE = "SELECT * FROM queues WHERE annotator = ? {where} ORDER BY updated_at DESC, rowid DESC LIMIT 1"
CLAIM_HOLDER = "SELECT annotator FROM claims WHERE item_id = ? AND annotator != ? AND expires_at > ?"
UPSERT_CLAIM = "INSERT OR REPLACE INTO claims (annotator, item_id, expires_at) VALUES (?, ?, ?)"
OTHERS_CLAIMS = "SELECT item_id, annotator FROM claims WHERE annotator != ? AND expires_at > ?"
RELEASE_CLAIM = "DELETE FROM claims WHERE annotator = ?"

BUSY_TIMEOUT_S = 30.0
MAX_TEXT_CHARS = 20_000
MAX_NAME_CHARS = 100  # annotator, checkpoint, model: cut to this
MAX_ID_CHARS = 200  # item, request, batch and queue ids: longer ones are refused (cutting would merge items)
MAX_LABEL_CHARS = 200  # task names and labels: longer ones are refused
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
EXPORT_COLUMNS = ("id", "image", "text", "annotator", "updated_at")
# export columns <task>__<field>; "disputed": the labels of an open disagreement on the task ("ana: Red; ben: Blue")
PROVENANCE = ("source", "annotator", "checkpoint", "at", "disputed")
LAST_ROW = 2**63 - 1
CLAIM_MINUTES = 10.0  # a labeler's claim on the item on screen lapses this long after their last step


# ---------------------------------------------------------------------------- errors and records
class LabelStoreError(CMAClipError, ValueError):
    """A correction or label store that cannot be used, with the reason."""


class Conflict(NamedTuple):
    """One task of one item where a save would replace a label it did not see."""
    item_id: str
    task: str
    yours: str | None  # what this save or undo would write
    theirs: str | None  # the label standing now
    annotator: str  # who set theirs (for an undo or a skip: who made the decision standing now)
    version: int  # the version standing now: pass it as the base version to save over it
    created_at: str
    status: str = ""  # the status standing now (accepted, corrected, skipped or pending)
    source: str = "human"  # of the decision standing now: human, or auto (a bulk accept)


class LabelConflict(LabelStoreError):
    """Someone else saved these tasks since the versions the labeler saw; nothing was stored.
    Show both labels, and save again with `force=True` (or the new base versions) to keep yours."""

    def __init__(self, conflicts: list[Conflict], save_id: int | None = None) -> None:
        self.conflicts, self.save_id = conflicts, save_id  # save_id: the save an undo would revert
        super().__init__("; ".join(f"{c.task} of {c.item_id}: {c.annotator or 'someone'} saved {c.theirs!r} at "
                                   f"{c.created_at} (version {c.version}), yours is {c.yours!r}" for c in conflicts))


class UnknownClass(NamedTuple):
    task: str
    value: str
    suggestions: list[str]  # existing classes it may be a typo of, closest first
    same_as: str | None = None  # the class it only spells otherwise (case, spaces, '-', '_'): never a class of its own


class UnknownLabel(LabelStoreError):
    """Labels outside their task's vocabulary; nothing was stored. Pick a suggestion, or
    confirm the value as a new class (`new_classes={task: value}`)."""

    def __init__(self, unknown: list[UnknownClass]) -> None:
        self.unknown = unknown
        super().__init__("; ".join(
            f"{u.task}: {u.value!r} is the class {u.same_as!r} written otherwise; save it as {u.same_as!r}"
            if u.same_as else f"{u.task}: {u.value!r} is not a known class"
            + (f" (did you mean {' or '.join(map(repr, u.suggestions))}?)" if u.suggestions else "")
            + "; confirm it as a new class to save it" for u in unknown))


@dataclass(frozen=True)
class TaskState:
    """Where one task of one item stands. `status` and `version` come from its latest
    decision; `label` is the current label (a skip keeps it) and annotator, source,
    checkpoint and created_at say who set it (who made the latest decision when there is none);
    `decided_by` made the latest decision (a label, a skip or an undo), and `skipped_by` the skip standing
    (an undo that brings a skip back is not one: its table read "skipped by" the undoer, QA s42)."""
    label: str | None
    status: str
    version: int
    annotator: str
    source: str
    checkpoint: str
    created_at: str
    decided_by: str = ""
    adjudicated: bool = False  # the label was a reviewer's decision on a disagreement
    skipped_by: str = ""


class SaveResult(NamedTuple):
    save_id: int
    versions: dict[str, int]  # task -> the version this save created
    duplicate: bool  # the request id was already stored: nothing new was
    item_id: str  # the save's item (a duplicate's: the item its request saved first, whatever the retry names)
    labels: dict[str, str]  # task -> the label as stored (`tidy_label`), which the save's message names


class BulkResult(NamedTuple):
    stored: int
    already_there: int  # stored by an earlier run of the same batch
    conflicts: list[Conflict]  # left out: someone saved another label since the queue was built
    decided: int = 0  # left out: every task decided since, with the same label (another bulk accept at once)


class Undone(NamedTuple):
    save_id: int  # the save that was reverted
    item_id: str
    tasks: dict[str, tuple[str | None, str | None]]  # task -> (label undone, label restored)
    kept: list[str] = []  # the save's tasks someone else decided since, left as they stand
    dropped: list[Conflict] = []  # someone else's decisions since that a forced undo reverted
    ruling: bool = False  # the save reverted was a reviewer's ruling on a disagreement


class BatchUndone(NamedTuple):
    """A bulk accept undone: each of its saves reverted, but the tasks someone decided since."""
    batch_id: str
    items: list[Undone]


class Disagreement(NamedTuple):
    """An item whose annotators' labels differ on some tasks, not settled by an adjudication since."""
    item_id: str
    text: str
    image_path: Path  # of its newest labelled save
    labels: dict[str, dict[str, str]]  # task -> annotator -> their latest label (not undone); one a later
    # label reopened also names the ruling it overturned, as "<adjudicator>'s ruling" -> label
    since: str  # when the newest of those labels was saved
    catalogue: dict[str, str] = {}  # task -> the catalogue label its saves recorded (an upload's manifest too)


@dataclass(frozen=True)
class SavedQueue:
    """A review queue as the studio left it: its payload (items, predictions), its view (order
    and filters; None for a queue kept before views were kept apart) and position."""
    queue_id: str
    annotator: str
    model: str
    payload: dict
    position: int
    updated_at: str
    view: dict | None = None


class _Step(NamedTuple):
    task: str
    save_id: int
    before: TaskState | None
    after: TaskState


@dataclass(frozen=True)
class _Prepared:
    """A validated save whose image file is written, ready to insert."""
    item_id: str
    sha: str
    image_file: str
    image_bytes: int
    text: str
    labels: dict[str, str]
    predictions: dict
    catalogue: dict[str, str]
    base_versions: dict[str, int | None] | None  # None: unchecked (callers that never saw a version)


# ---------------------------------------------------------------------------- the store
class LabelStore:
    """Corrections in a SQLite database at `path`, images in `image_dir`."""

    def __init__(self, path: str | Path, image_dir: str | Path | None = None) -> None:
        self.path = Path(path).resolve()
        self.image_dir = Path(image_dir).resolve() if image_dir else self.path.with_name(f"{self.path.stem}_images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):  # SQLite would say only "unable to open database file"
            raise LabelStoreError(f"{self.path} is in a folder this process cannot write (read-only?), and SQLite "
                                  f"writes its journal beside the store: copy {self.path.name} and its "
                                  f"{self.image_dir.name} folder somewhere writable, or give an export")
        self._local, self._pid = threading.local(), os.getpid()
        self._held_annotators: dict[str, str] = {}  # a name as typed -> as the store holds it (`held_annotator`)
        try:
            if self._connection().execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise LabelStoreError(f"{self.path}: SQLite cannot use WAL mode here (a network file system?)")
            with self._transaction("IMMEDIATE") as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise LabelStoreError(f"{self.path} has schema version {version}; this code reads "
                                          f"up to {len(MIGRATIONS)}")
                for migrate in MIGRATIONS[version:]:
                    migrate(conn)
                conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        except sqlite3.DatabaseError as exc:
            raise LabelStoreError(f"{self.path} is not a usable label store: {exc}") from exc

    def held_annotator(self, value: object) -> str:
        """An annotator's name (`_name`) as the store already holds it where it differs only in the case
        of its letters (`name_key`): "Rita" typed on a phone (whose keyboard capitalises) is the "rita" of the
        laptop, one annotator for queues, undo, claims and agreement, not two. A name held as typed
        stays itself (a store with both spellings from before keeps both). A write reads it under its
        write lock (inside the transaction): the first saves of "Rita" and of "rita" at one instant each
        found the other not held yet, and stored both."""
        name = _name(value, "annotator")
        if not name or name in self._held_annotators:
            return self._held_annotators.get(name, name)
        conn = self._connection()
        if conn.execute("SELECT 1 FROM corrections WHERE annotator = ? LIMIT 1", (name,)).fetchone():
            held = name
        else:  # its first save, or another spelling: once per spelling (kept below)
            held = next(iter(_spellings(conn, name, "corrections") or _spellings(conn, name, "queues")), None)
            if held is None:
                return name
        self._held_annotators[name] = held
        return held

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection; a forked process opens its own instead of using its parent's."""
        if self._pid != os.getpid():
            self._local, self._pid = threading.local(), os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.create_function("FOLD", 1, lambda text: name_key(str(text)), deterministic=True)
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, mode: str = "") -> Iterator[sqlite3.Connection]:
        """One transaction: IMMEDIATE for writes, deferred for a consistent snapshot of several reads."""
        conn = self._connection()
        try:
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:  # a failed COMMIT too: the connection must not stay inside the transaction
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:  # locked past BUSY_TIMEOUT_S, a full disk, an I/O error
            raise LabelStoreError(_unusable(exc, bool(mode))) from exc

    # ------------------------------------------------------------------ decisions
    def save(self, *, image: Image.Image | bytes | str | Path, text: str, labels: Mapping[str, str | None],
             annotator: str = "", item_id: str | None = None, predictions: Mapping[str, Any] | None = None,
             checkpoint: str = "", base_versions: Mapping[str, int | None] | None = None,
             request_id: str | None = None, source: str = "human", catalogue_labels: Mapping[str, str] | None = None,
             vocabulary: Mapping[str, Iterable[str]] | None = None, new_classes: Mapping[str, str] | None = None,
             force: bool = False, adjudicated: bool = False, blind: bool = False,
             classes: Mapping[str, Iterable[str]] | None = None) -> SaveResult:
        """Store one decision per labelled task of one item (and its image, once).

        Missing labels ("", "NA", ...) are dropped; at least one must remain. `item_id`
        defaults to `content_item_id(image, text)`. `base_versions` maps each task to the
        version the labeler saw (None or absent: none yet); a task someone saved another
        label on since raises `LabelConflict`, unless `force`. Leaving `base_versions` out
        skips that check, for callers that never showed a version. A task in `vocabulary`
        takes its classes, the labels already saved for it, or the value confirmed in
        `new_classes[task]`; any other value raises `UnknownLabel`. A `request_id` already
        stored stores nothing and returns the first save's result (`duplicate=True`). `adjudicated`:
        a reviewer's decision on a disagreement, which settles it and is left out of the agreement. `blind`: the
        labeler was not shown the other labelers' labels of the item (else a label saved from another's version
        is a review of it, which the agreement counts apart).
        A human label is stored as `tidy_label` spells it, a class of `vocabulary` (else `classes`, when
        the vocabulary is not checked) and a label items hold as they spell it.
        """
        prepared = _prepare(self.image_dir, image, text, labels, predictions, item_id, catalogue_labels,
                            base_versions, source, vocabulary if vocabulary is not None else classes)
        annotator, checkpoint = _name(annotator, "annotator"), _name(checkpoint, "checkpoint")
        with self._transaction("IMMEDIATE") as conn:
            return _store(conn, prepared, annotator=self.held_annotator(annotator), checkpoint=checkpoint,
                          request_id=_key(request_id, "request_id"), source=source, vocabulary=vocabulary,
                          new_classes=new_classes, force=force, adjudicated=bool(adjudicated), blind=bool(blind))

    def save_correction(self, *, image: Image.Image | bytes | str | Path, text: str, labels: dict[str, str],
                        predictions: dict[str, dict] | None = None, annotator: str = "", checkpoint: str = "",
                        item_id: str | None = None, request_id: str | None = None,
                        classes: Mapping[str, Iterable[str]] | None = None) -> int:
        """`save` without the version and vocabulary checks; returns the save's row id. `classes`: each
        task's classes, which a label keeps as spelled there (`tidy_label`)."""
        return self.save(image=image, text=text, labels=labels, predictions=predictions, annotator=annotator,
                         checkpoint=checkpoint, item_id=item_id, request_id=request_id, classes=classes).save_id

    def save_many(self, records: Iterable[Mapping[str, Any]], batch_id: str, *, annotator: str,
                  checkpoint: str = "") -> BulkResult:
        """Auto-accept the model's labels for many items in one transaction: all or nothing.

        Each record has `image`, `text`, `labels` (each the model's prediction) and
        `predictions`, and optionally `item_id`, `catalogue_labels` and `base_versions` (the
        versions the queue saw; absent: none). Each record is saved with the request id
        "<batch_id>:<item_id>", so running the same batch again (after a crash, or in chunks,
        each its own call) stores only what is missing. An auto-accept takes only tasks still
        pending: a task someone decided since is left out, returned as a conflict when its label
        differs (an auto-accept never replaces a label), else counted as decided (two bulk
        accepts at the same moment stored every label twice).
        """
        batch_id, annotator, checkpoint = (_key(batch_id, "batch_id"), _name(annotator, "annotator"),
                                           _name(checkpoint, "checkpoint"))
        if not batch_id:
            raise LabelStoreError("a bulk accept needs a batch id, so that running it again stores no duplicate")
        prepared = []
        for number, record in enumerate(records, 1):
            try:
                prepared.append(_prepare(self.image_dir, record.get("image"), record.get("text"),
                                         record.get("labels"), record.get("predictions"), record.get("item_id"),
                                         record.get("catalogue_labels"), record.get("base_versions") or {}, "auto"))
            except LabelStoreError as exc:
                raise LabelStoreError(f"record {number} ({record.get('item_id') or 'no id'}): {exc}") from exc
        ids = [p.item_id for p in prepared]
        if twice := sorted({i for i in ids if ids.count(i) > 1}):
            raise LabelStoreError(f"items appear twice in the batch: {twice}")
        stored, already, conflicts, decided = 0, 0, [], 0
        with self._transaction("IMMEDIATE") as conn:
            annotator = self.held_annotator(annotator)
            for record in prepared:
                request_id = f"{batch_id}:{record.item_id}"
                if _stored_request(conn, request_id, "label") is not None:
                    already += 1
                    continue
                states, _ = _replay(conn.execute(ITEM_DECISIONS, (record.item_id, LAST_ROW)))
                since = {t: now for t, now in states.get(record.item_id, {}).items() if t in record.labels
                         and now.version != (record.base_versions or {}).get(t) and now.status != "pending"}
                conflicts += [_conflict(record.item_id, t, record.labels[t], now) for t, now in since.items()
                              if now.label is not None and now.label != record.labels[t]]
                if not (pending := {t: label for t, label in record.labels.items() if t not in since}):
                    decided += all(now.label == record.labels[t] for t, now in since.items())
                    continue
                _store(conn, replace(record, labels=pending), annotator=annotator, checkpoint=checkpoint,
                       source="auto", request_id=request_id, batch_id=batch_id)
                stored += 1
        return BulkResult(stored, already, conflicts, decided)

    def skip(self, item_id: str, tasks: Iterable[str], annotator: str, *, checkpoint: str = "",
             request_id: str | None = None, base_versions: Mapping[str, int | None] | None = None,
             force: bool = False) -> SaveResult:
        """Mark tasks of an item skipped: decided as far as the queue goes, their labels kept.
        With the `base_versions` the labeler saw, raises `LabelConflict` when someone else
        decided one of those tasks since (`force` skips anyway)."""
        item_id, tasks = _key(item_id, "item_id"), [t for t in dict.fromkeys(str(t).strip() for t in tasks) if t]
        if not item_id or not tasks:
            raise LabelStoreError("a skip needs an item id and at least one task")
        for task in tasks:
            _check_length(task, "a task name", MAX_LABEL_CHARS)
        annotator, checkpoint = _name(annotator, "annotator"), _name(checkpoint, "checkpoint")
        request_id = _key(request_id, "request_id")
        with self._transaction("IMMEDIATE") as conn:
            annotator = self.held_annotator(annotator)
            if (save_id := _stored_request(conn, request_id, "skip")) is not None:
                return _save_result(conn, save_id, duplicate=True)
            if base_versions is not None:
                states, _ = _replay(conn.execute(ITEM_DECISIONS, (item_id, LAST_ROW)))
                current = states.get(item_id, {})
                conflicts = [_conflict(item_id, task, None, now) for task in tasks
                             if (now := current.get(task)) is not None and now.version != base_versions.get(task)
                             and now.status != "pending" and now.decided_by != annotator]
                if conflicts and not force:
                    raise LabelConflict(conflicts)
            save_id = _insert_save(conn, item_id, None, None, {}, {}, annotator, checkpoint, request_id, "skip")
            _decide(conn, save_id, item_id, [(t, None, "skipped", None, None, None) for t in tasks])
            return _save_result(conn, save_id, duplicate=False)

    def undo(self, annotator: str, *, force: bool = False, keep_theirs: bool = False,
             request_id: str | None = None, save_id: int | None = None) -> Undone | BatchUndone:
        """Revert `annotator`'s newest save (a label or a skip) that is not undone yet: each of
        its tasks goes back to its state before that save, and again further back on the next
        call. A bulk accept is one decision: its saves are reverted together (a `BatchUndone`),
        leaving the tasks someone decided since as they stand (an undo reached past it to the
        labels saved by hand before it). Raises `LabelConflict` when someone else
        decided one of those tasks since (even the same label: undo must not erase their
        decision); `force` reverts them anyway, `keep_theirs` leaves them as they stand and
        reverts the rest (both answer a conflict: pass its `save_id`, so that they revert
        that save or nothing). `LabelStoreError` when nothing is left to undo, or when
        `save_id` is no longer the newest. A `request_id` already stored returns the first
        undo's result."""
        annotator, request_id = _name(annotator, "annotator"), _key(request_id, "request_id")
        if not annotator:
            raise LabelStoreError("undo needs the annotator whose decisions to revert")
        with self._transaction("IMMEDIATE") as conn:
            annotator = self.held_annotator(annotator)
            if (undo_id := _stored_request(conn, request_id, "undo")) is None:
                target = conn.execute(LAST_UNDOABLE, (annotator,)).fetchone()
                batch = conn.execute(LAST_BATCH, (annotator,)).fetchone()
                if batch is not None and (target is None or batch["id"] > target["id"]):
                    target = batch
                if target is None:
                    raise LabelStoreError(f"nothing to undo: {annotator} has no decision left to revert")
                if save_id is not None and target["id"] != save_id:
                    raise LabelStoreError(f"nothing was undone: save #{save_id} is not {annotator}'s newest decision "
                                          "any more (it was undone, or a newer one came since); undo again")
                if target["batch_id"]:
                    saves = conn.execute(BATCH_SAVES, (target["batch_id"], annotator)).fetchall()
                    return BatchUndone(target["batch_id"], [
                        _undone(conn, _revert(conn, save, annotator, request_id if n == 0 else
                                              request_id and f"{request_id}:{save['id']}", False, True))
                        for n, save in enumerate(saves)])
                undo_id = _revert(conn, target, annotator, request_id, force, keep_theirs)
            undone = _undone(conn, undo_id)
            if batch_id := conn.execute(SAVE_BATCH, (undone.save_id,)).fetchone()[0]:  # a retried bulk undo
                prefix = f"{request_id}:"
                return BatchUndone(batch_id, [_undone(conn, row["id"]) for row in conn.execute(
                    BATCH_UNDOS, (request_id, len(prefix), prefix))])
        return undone

    def batch_items(self, batch_id: str) -> set[str]:
        """The items a bulk accept's saves still stand on (not undone)."""
        return {row["item_id"] for row in self._connection().execute(BATCH_ITEMS, (batch_id,))}

    def fresh_batch(self, batch_id: str) -> str:
        """`batch_id`, or, once an undo reverted it, the next of "<batch_id>#2", "#3"...: running a bulk
        accept again after its undo stores its labels again (a batch's saves are keyed by its id)."""
        conn, candidate, run = self._connection(), batch_id, 1
        while conn.execute(BATCH_UNDONE, (candidate,)).fetchone() is not None:
            run += 1
            candidate = f"{batch_id}#{run}"
        return candidate

    # ------------------------------------------------------------------ claims
    def claim(self, item_id: str, annotator: str, minutes: float = CLAIM_MINUTES) -> str | None:
        """Mark `item_id` as the item `annotator` is on, for `minutes` from now; their claim on
        any other item ends. Returns who else holds a live claim on it (then it stays theirs:
        two labelers may still open one item, but each queue steers clear of the other's), or None."""
        item_id, annotator = _key(item_id, "item_id"), _name(annotator, "annotator")
        if not item_id or not annotator:
            raise LabelStoreError("a claim needs an item id and an annotator")
        now = datetime.now(timezone.utc)
        with self._transaction("IMMEDIATE") as conn:
            annotator = self.held_annotator(annotator)
            holder = conn.execute(CLAIM_HOLDER, (item_id, annotator, now.isoformat(timespec="milliseconds")))
            if (row := holder.fetchone()) is not None:
                conn.execute(RELEASE_CLAIM, (annotator,))
                return row["annotator"]
            expires = (now + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")
            conn.execute(UPSERT_CLAIM, (annotator, item_id, expires))
        return None

    def claims(self, annotator: str = "") -> dict[str, str]:
        """Item id -> annotator, for every live claim of an annotator other than `annotator`."""
        rows = self._connection().execute(OTHERS_CLAIMS, (self.held_annotator(annotator), _now()))
        return {row["item_id"]: row["annotator"] for row in rows}

    def release(self, annotator: str) -> None:
        """End `annotator`'s claim, if any (they left the queue)."""
        with self._transaction("IMMEDIATE") as conn:
            conn.execute(RELEASE_CLAIM, (self.held_annotator(annotator),))

    # ------------------------------------------------------------------ reading
    def annotators_labels(self, item_id: str, tasks: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
        """One item's labels by annotator: task -> annotator -> their latest human label (not undone), which
        someone else's label may have replaced since."""
        with self._transaction() as conn:
            labels = _annotators_labels(conn, tasks, item_id)
        return {task: {annotator: row["label"] for annotator, row in by.items()} for (task, _), by in labels.items()}

    def item_state(self, item_id: str) -> dict[str, TaskState]:
        """Where each task of one item stands; a task never decided is absent (pending, no version)."""
        states, _ = _replay(self._connection().execute(ITEM_DECISIONS, (str(item_id), LAST_ROW)))
        return states.get(str(item_id), {})

    def decided_items(self, tasks: Iterable[str] | None = None) -> set[str]:
        """Items whose every task in `tasks` (default: every task they have a decision on) is
        accepted, corrected or skipped: what a review queue leaves out."""
        wanted = None if tasks is None else list(tasks)
        states, _ = _replay(self._connection().execute(ALL_DECISIONS))
        return {item for item, by_task in states.items()
                if (relevant := by_task.keys() if wanted is None else wanted)
                and all(t in by_task and by_task[t].status != "pending" for t in relevant)}

    def item_history(self, item_id: str) -> list[dict]:
        """Every decision on one item, oldest first, undos included, as `audit` rows. An undo's row
        adds `dropped`: the decisions it took away though it reverted another (someone else's, made
        since: a forced undo drops the one standing and those under it), else []; a label's row `replaced`: someone
        else's label standing then that its author had not seen (an "overwrite with mine", an
        unchecked API save), else None. Each task an undo left as someone
        else decided since ("keep theirs") gets a row of its own, with status "kept theirs" and no
        version."""
        with self._transaction() as conn:
            rows = conn.execute(ITEM_DECISIONS, (str(item_id), LAST_ROW)).fetchall()
            kept = conn.execute(KEPT_AT_UNDO, (str(item_id),)).fetchall()
        _, steps = _replay(rows)
        history = [{**_audit_row(row), "dropped": _dropped(rows, steps, row), "replaced": _replaced(steps, row)}
                   for row in rows]
        history += [{**dict.fromkeys(history[0]), **dict(row), "kind": "undo", "status": "kept theirs"}
                    for row in kept]  # an undo keeps only tasks of a save on this item: history has rows
        return sorted(history, key=lambda r: (r["save_id"], r["version"] is None, r["version"] or 0))

    def audit(self, task: str | None = None, annotator: str | None = None, status: str | None = None,
              source: str | None = None, search: str | None = None, limit: int = 100,
              offset: int = 0) -> tuple[list[dict], int]:
        """One page of decisions, newest first, and how many match: each with its label and
        status, who (`source`: human, auto or adjudication), when, the checkpoint, the model's prediction and
        the catalogue's label, and whether the label differs from them (None: nothing to
        compare). `search` matches a part of the item id, label, annotator or text in any case
        (`name_key`)."""
        if status is not None and status not in STATUSES:
            raise LabelStoreError(f"status must be one of {STATUSES}, not {status!r}")
        if source is not None and source not in AUDIT_SOURCES:
            raise LabelStoreError(f"source must be one of {tuple(AUDIT_SOURCES)}, not {source!r}")
        clauses, params = [] if source is None else [AUDIT_SOURCES[source]], []
        for column, value in (("d.task", task), ("d.status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if annotator is not None:  # in any case of its letters (`held_annotator`), each spelling the store holds
            spellings = _spellings(self._connection(), annotator, "corrections") or [annotator]
            clauses.append(f"c.annotator IN ({', '.join('?' * len(spellings))})")
            params += spellings
        if search:  # SQLite's lower() folds ASCII letters only: the fast path for an ASCII search, FOLD (4 x slower)
            fold = "lower" if search.isascii() else "FOLD"  # for "ÜNÏ" to find "ünï"
            clauses.append("(" + " OR ".join(f"instr({fold}(coalesce({c}, '')), {fold}(?))" for c in SEARCHED) + ")")
            params += [search] * len(SEARCHED)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._transaction() as conn:
            total = conn.execute(COUNT_DECISIONS + where, params).fetchone()[0]
            rows = conn.execute(AUDIT_PAGE.format(where=where),
                                (*params, int(limit), int(offset))).fetchall()
        return [_audit_row(row) for row in rows], total

    def decided_tasks(self) -> list[str]:
        """Every task some decision names, sorted."""
        with self._transaction() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT task FROM decisions ORDER BY task")]

    def history(self, limit: int = 50, item_id: str | None = None) -> list[dict]:
        """The latest `limit` label saves (of one item if given), newest first: who set which
        labels and when, with `previous_labels` (the item's labels before the save; None for
        its first), `changed` (tasks whose label differs from where the labeler's control
        started: the previous label, else the model's prediction) and `corrected` (tasks
        labelled unlike the model), `undone` (task -> who reverted its label with an undo), `dropped`
        (task -> whose forced undo of an earlier save took its label away), `withdrawn` (task -> who
        undid the save but kept someone's later decision on it: the label no longer counts as their
        judgement) and `undone_by` (who undid
        the save, when its undo reverted any of it; None otherwise). Skips and undos themselves are in
        `item_history` and `audit`."""
        where, params = ("AND c.item_id = ?", (item_id,)) if item_id is not None else ("", ())
        entries = []
        with self._transaction() as conn:
            for row in conn.execute(LABEL_SAVES.format(where=where), (*params, limit)).fetchall():
                states, _ = _replay(conn.execute(ITEM_DECISIONS, (row["item_id"], row["id"])))
                previous = {t: s.label for t, s in states.get(row["item_id"], {}).items() if s.label is not None}
                labels, predictions = json.loads(row["labels"]), json.loads(row["predictions"] or "{}")
                predicted = _predicted(predictions)
                taken = conn.execute(TAKEN_BACK, (row["id"],)).fetchall()
                undone = {t["task"]: t["annotator"] for t in taken if t["reverted"]}
                entries.append({
                    "id": row["id"], "item_id": row["item_id"], "labels": labels, "previous_labels": previous or None,
                    "changed": sorted(t for t, v in labels.items() if v != previous.get(t, predicted.get(t))),
                    "corrected": sorted(t for t in labels if t in predicted and predicted[t] != labels[t]),
                    "predictions": predictions, "text": row["text"], "image_sha256": row["image_sha256"],
                    "image_path": self.image_dir / row["image_file"], "annotator": row["annotator"],
                    "checkpoint": row["checkpoint"], "created_at": row["created_at"], "request_id": row["request_id"],
                    "source": row["source"], "undone": undone,
                    "dropped": {t["task"]: t["annotator"] for t in taken if not t["reverted"]},
                    "withdrawn": dict(conn.execute(KEPT_OF_SAVE, (row["id"],)).fetchall()),
                    "undone_by": next(iter(undone.values()), None)})
        return entries

    def current_labels(self) -> dict[str, dict]:
        """Every labelled item's current labels, read as one snapshot: item_id -> labels,
        text, image_path (of its newest labelled save), annotator and updated_at (of its
        newest label), `tasks`: task -> `TaskState` of each label, and `disputed`: task -> annotator ->
        label of each open disagreement (`open_disagreements`: not a settled label yet)."""
        with self._transaction() as conn:
            return self._current(conn)

    def _current(self, conn: sqlite3.Connection) -> dict[str, dict]:
        states, _ = _replay(conn.execute(ALL_DECISIONS))
        disputed = _open_disagreements(conn, _annotators_labels(conn, None))[0]
        current = {}
        for row in conn.execute(ITEM_CONTENT):
            tasks = {t: s for t, s in states.get(row["item_id"], {}).items() if s.label is not None}
            if tasks:
                newest = max(tasks.values(), key=lambda s: (s.created_at, s.version))
                current[row["item_id"]] = {"labels": {t: s.label for t, s in tasks.items()}, "text": row["text"],
                                           "image_path": self.image_dir / row["image_file"],
                                           "annotator": newest.annotator, "updated_at": newest.created_at,
                                           "tasks": tasks, "disputed": disputed.get(row["item_id"], {})}
        return current

    def count(self) -> int:
        """The number of label saves (every edit and auto-accept counts; skips and undos do not)."""
        return self._connection().execute(COUNT_LABEL_SAVES).fetchone()[0]

    def image_path(self, sha: str) -> Path:
        """The file of a stored image, by its sha256."""
        row = self._connection().execute(IMAGE_FILE, (sha,)).fetchone()
        if row is None:
            raise LabelStoreError(f"no image {sha} in {self.path}")
        return self.image_dir / row[0]

    def agreement(self, tasks: Iterable[str] | None = None) -> dict[str, dict]:
        """Inter-annotator agreement per task over the items that two or more annotators
        labelled (each annotator's latest human label; auto-accepts and labels their own undo
        took back, reverted or kept as someone decided since, do not count; a label someone else
        replaced since does): task -> items, raw
        (the share of annotator pairs that agree), kappa (Cohen's kappa, the mean over annotator
        pairs sharing two items or more; None when no pair does, or when every label is one class),
        annotators, pairs (annotator pairs sharing an item) and kappa_pairs (those the kappa is over),
        reviews (labels saved where their labeler was shown another's label of the item's task, not blind: a
        review of it, left out of the figures above) and open_disagreements (items whose annotators
        disagree, reviews included, not settled since: `disagreements`; a lone label against a ruling is one,
        so a task may list it with no items)."""
        with self._transaction() as conn:
            return _agreement(conn, tasks)

    def rulings(self, item_id: str) -> dict[str, TaskState]:
        """One item's reviewer rulings that stand (not undone), the newest per task."""
        rows = self._connection().execute(ITEM_RULINGS, (str(item_id),))
        return {row["task"]: _state(row) for row in rows}

    def disagreements(self, tasks: Iterable[str] | None = None) -> list[Disagreement]:
        """The items whose annotators disagree on a task of `tasks` (each annotator's latest label,
        as `agreement` counts them) that are open: no adjudication (a save with `adjudicated`, not
        undone) settled them, or a label saved after it differs from it. The oldest disagreement
        first, each with its text, image and the catalogue labels its saves recorded."""
        latest = LABEL_SAVES.format(where="AND c.item_id = ?")  # an item's newest labelled save: its content
        listed = []
        with self._transaction() as conn:
            found, since = _open_disagreements(conn, _annotators_labels(conn, tasks))
            for item, by_task in found.items():
                save = conn.execute(latest, (item, 1)).fetchone()
                recorded = {row["task"]: row["catalogue_label"] for row in conn.execute(CATALOGUE_LABELS, (item,))}
                listed.append(Disagreement(item, save["text"], self.image_dir / save["image_file"], by_task,
                                               since[item], recorded))
        return sorted(listed, key=lambda d: (d.since, d.item_id))

    def new_classes(self, vocabulary: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
        """Per task of `vocabulary`, the labels some item holds now outside its classes (new classes a
        labeler confirmed, not undone or replaced since), sorted."""
        with self._transaction() as conn:
            found = {}
            for task, classes in vocabulary.items():
                known = set(map(str, classes))
                found[task] = sorted(label for (label,) in conn.execute(TASK_LABELS, (task,))
                                     if label not in known and conn.execute(LABEL_HELD, (task, label)).fetchone())
            return found

    def open_disagreements(self, tasks: Iterable[str] | None = None,
                           item_id: str | None = None) -> dict[str, dict[str, dict[str, str]]]:
        """`disagreements(tasks)` as item -> task -> annotator -> label, without reading their content (of
        one item: `item_id`, read alone)."""
        with self._transaction() as conn:
            return _open_disagreements(conn, _annotators_labels(conn, tasks, item_id))[0]

    # ------------------------------------------------------------------ review queues
    def save_queue(self, queue_id: str, annotator: str, model: str, payload: Mapping[str, Any],
                   position: int, view: Mapping[str, Any] | None = None) -> SavedQueue:
        """Keep a review queue (its JSON `payload` and `view` are the studio's) and the labeler's
        place in it, so a page reload or a server restart resumes it; saving again replaces it."""
        queue_id, annotator, model = _key(queue_id, "queue_id"), _name(annotator, "annotator"), _name(model, "model")
        if not queue_id:
            raise LabelStoreError("a review queue needs an id")
        _queue_position(position)
        for name, value in (("payload", payload), ("view", view if view is not None else {})):
            if not isinstance(value, Mapping):
                raise LabelStoreError(f"the queue {name} must be a dict, not {type(value).__name__}")
        with self._transaction("IMMEDIATE") as conn:
            queue = SavedQueue(queue_id, self.held_annotator(annotator), model, dict(payload), position, _now(),
                               dict(view) if view is not None else None)
            conn.execute(UPSERT_QUEUE, (queue_id, queue.annotator, model, _json(payload, "the queue payload"), position,
                                        queue.updated_at, None if view is None else _json(view, "the queue view")))
        return queue

    def move_queue(self, queue_id: str, annotator: str, position: int, view: Mapping[str, Any] | None = None) -> bool:
        """Keep a kept queue's new place (and `view`, when given) without writing its items
        again: what a labeler's every step and re-sort costs. False when no queue has that id."""
        _queue_position(position)
        if view is not None and not isinstance(view, Mapping):
            raise LabelStoreError(f"the queue view must be a dict, not {type(view).__name__}")
        with self._transaction("IMMEDIATE") as conn:
            moved = conn.execute(MOVE_QUEUE, (self.held_annotator(annotator), position, _now(),
                                              None if view is None else _json(view, "the queue view"),
                                              _key(queue_id, "queue_id"))).rowcount
        return moved > 0

    def load_queue(self, queue_id: str) -> SavedQueue | None:
        """The saved queue `queue_id`, or None."""
        row = self._connection().execute(QUEUE_BY_ID, (str(queue_id),)).fetchone()
        return _saved_queue(row) if row else None

    def latest_queue(self, annotator: str, model: str | None = None) -> SavedQueue | None:
        """The queue `annotator` saved last (on `model` if given), or None."""
        where, params = ("AND model = ?", (_name(model, "model"),)) if model is not None else ("", ())
        row = self._connection().execute(LATEST_QUEUE.format(where=where),
                                         (self.held_annotator(annotator), *params)).fetchone()
        return _saved_queue(row) if row else None

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path) -> int:
        """Write the current labels as a CSV or JSONL manifest (by suffix), one row per item:
        id, image, text, one column per task (empty when unlabelled), annotator, updated_at,
        then each task's provenance as <task>__source (human, auto or adjudication), <task>__annotator,
        <task>__checkpoint and <task>__at, and <task>__disputed: the labels of an open disagreement on
        it ("ana: Red; ben: Blue"; `read_corrections` leaves such a label out of training), in both
        formats. Image paths are relative to the file's folder, so export beside the store (or above it) for `Catalogue` and
        `train --extra-labels` to find them. CSV cells starting with = + - @, a tab or a carriage
        return get a leading ', so a spreadsheet shows them as text instead of running them
        (OWASP); `read_manifest` (the trainer's reader) takes the quote off again. `agreement()`
        is written beside, as <stem>.agreement.json. Both files are written atomically, from one
        snapshot; returns the number of rows."""
        path = Path(path)
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise LabelStoreError(f"export to a .csv or .jsonl file, not {path.name}")
        with self._transaction() as conn:
            current, agreement = self._current(conn), _agreement(conn, None)
        tasks = sorted({t for item in current.values() for t in item["labels"]})
        provenance = [f"{t}__{field}" for t in tasks for field in PROVENANCE]
        if clash := set(tasks) & {*EXPORT_COLUMNS, *provenance}:
            raise LabelStoreError(f"tasks {sorted(clash)} clash with the export's own columns")
        columns = [*EXPORT_COLUMNS[:3], *tasks, *EXPORT_COLUMNS[3:], *provenance]
        folder = path.resolve().parent
        records = []
        for item_id, item in current.items():
            try:
                image = os.path.relpath(item["image_path"], folder)
            except ValueError:  # another drive: keep the absolute path
                image = str(item["image_path"])
            record = dict.fromkeys(columns, "")
            record.update(id=item_id, image=image, text=item["text"], annotator=item["annotator"],
                          updated_at=item["updated_at"])
            for task, state in item["tasks"].items():
                source = "adjudication" if state.adjudicated else state.source
                record.update({task: state.label, f"{task}__source": source,
                               f"{task}__annotator": state.annotator, f"{task}__checkpoint": state.checkpoint,
                               f"{task}__at": state.created_at,
                               f"{task}__disputed": "; ".join(f"{who}: {label}" for who, label in
                                                              item["disputed"].get(task, {}).items())})
            records.append(record)
        write_table(path, records, columns, spreadsheet=True)  # a lead opens it in a spreadsheet
        atomic_write(agreement_file(path),
                     (json.dumps(agreement, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return len(records)



# ---------------------------------------------------------------------------- identity and vocabulary
def content_item_id(image: Image.Image | bytes | str | Path, text: str) -> str:
    """A stable id for an item uploaded without one: the same image bytes and text (up to
    whitespace) always give the same id, another text of the same image another id."""
    data, _ = _image_bytes(image)
    if not isinstance(text, str):
        raise LabelStoreError(f"text must be a string, not {type(text).__name__}")
    _check_encodable(text=text)
    return _content_id(hashlib.sha256(data).hexdigest(), text)


def snapshot(db_path: str | Path, target: str | Path) -> Path:
    """A copy of the label store at `db_path` in one consistent file, by SQLite's backup API, while
    the app may go on writing. Copying labels.db alone misses what its write-ahead log (labels.db-wal)
    holds: after the app was stopped by SIGTERM, labels.db was a bare 4 KB and the log held every save."""
    if not Path(db_path).is_file():
        raise LabelStoreError(f"no label store at {db_path}")
    with closing(sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S)) as source, \
            closing(sqlite3.connect(target)) as copy:
        source.backup(copy)
    return Path(target)


def agreement_file(export: str | Path) -> Path:
    """Where `LabelStore.export` writes the agreement beside an export: <stem>.agreement.json."""
    export = Path(export)
    return export.with_name(f"{export.stem}.agreement.json")


def close_classes(value: str, classes: Iterable[str], most: int = 5) -> list[str]:
    """Classes `value` may be a typo or a start of, closest first (at most `most`): equal to it but for
    case, spaces, '-' and '_', or within 2 edits of it (a swap of neighbours is one edit; 1 edit for
    names of 3 to 5 characters and none below, where everything is a couple of edits apart); then, for
    3 characters or more, the classes it begins ("Wint": Winter, "Navy": Navy Blue) or begins a later
    word of ("Melange": Grey Melange), shortest first: a labeler who typed the start of a class and
    saved before the dropdown completed it meant that class, not a new one."""
    key, classes = _class_key(value), set(classes)
    if value in classes:
        return []
    limit = min(2, len(key) // 3)
    scored = sorted((_edit_distance(key, _class_key(c), limit), c) for c in classes)
    typos = [c for distance, c in scored if distance <= limit]
    starts = []
    if len(key) >= 3 and not (scored and scored[0][0] == 0):  # none when a class is this one, spelled otherwise
        starts = sorted((c for c in classes if c not in typos and _begins(key, c)), key=lambda c: (len(c), c))
    return (typos + starts)[:most]


def _begins(key: str, name: str) -> bool:
    """Whether `key` (a `_class_key`) begins the class `name` or one of its later words."""
    words = re.split(r"[\s_-]+", unicodedata.normalize("NFKC", name).casefold())
    return _class_key(name).startswith(key) or any(word.startswith(key) for word in words[1:])


def _content_id(sha: str, text: str) -> str:
    return "img-" + hashlib.sha256(f"{sha}\0{' '.join(text.split())}".encode("utf-8")).hexdigest()[:16]


def class_spelled(value: str, classes: Iterable[str]) -> str | None:
    """The class of `classes` that `value` spells otherwise ("grey" for "Grey", "Dark-Blue" for "Dark Blue"),
    the first in their order; None when it spells none: two spellings would train as two classes."""
    key = _class_key(value)
    return next((c for c in classes if _class_key(c) == key), None)


def same_class(label: str, other: str) -> bool:
    """Whether two labels spell one class ("dark-blue" and "Dark Blue"): `class_spelled`'s reading of two labels."""
    return _class_key(label) == _class_key(other)


def _class_key(value: str) -> str:
    """What two spellings of one class share: compatibility forms (full-width letters) folded too, and
    invisible characters dropped; the dotted capital I ("İndigo") is a case of i, as "ß" is of "SS"."""
    folded = unicodedata.normalize("NFKC", value).casefold().replace("i\u0307", "i")
    return "".join(ch for ch in folded if not ch.isspace() and ch not in "-_" and unicodedata.category(ch) != "Cf")


JOINERS = "\u200c\u200d"  # zero-width non-joiner and joiner: they shape a Persian or Indic word, an emoji sequence
WORD_BREAK = "\u200b"  # zero-width space: a break between words (Thai, Khmer) that shows none


def without_invisibles(text: str) -> str:
    """`text` without its invisible format characters (Unicode Cf: soft hyphens, direction marks,
    byte-order marks, word joiners), which make one word look like another; a zero-width space
    becomes a space, and the joiners stay."""
    return "".join(" " if ch == WORD_BREAK else ch for ch in text
                   if ch in JOINERS or ch == WORD_BREAK or unicodedata.category(ch) != "Cf")


def tidy_label(value: str, classes: Collection[str] = ()) -> str:
    """A label as it is stored: composed (NFC: a decomposed "é", as some keyboards type it, is the
    same label as "é"), without invisible characters, one space between words and no joiner at a
    word's edge ("Black" with a zero-width space after it was a second class that looked the same);
    a label spelled like one of the model's `classes` is that class, as the model spells it, whatever its form."""
    if value in classes:
        return value
    tidy = _tidied(value)
    return next((c for c in classes if _tidied(c) == tidy), tidy)  # "Dark Blue" typed, "Dark  Blue" the class


def _tidied(value: str) -> str:
    words = without_invisibles(unicodedata.normalize("NFC", value)).split()
    return " ".join(word for word in (w.strip(JOINERS) for w in words) if word)


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance counting a swap of neighbours as one edit (optimal string
    alignment); anything over `limit` may be reported as limit + 1."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before, previous = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            distance = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb))
            if before is not None and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                distance = min(distance, before[j - 2] + 1)
            row.append(distance)
        before, previous = previous, row
    return previous[-1]


def _check_vocabulary(conn: sqlite3.Connection, labels: dict[str, str], vocabulary: Mapping[str, Iterable[str]],
                      new_classes: Mapping[str, str], as_held: bool) -> dict[str, str]:
    """Refuse labels outside their task's classes and the labels items hold now, unless confirmed new; a
    class written otherwise ("black" for "Black", "off-white" for "Off White") even when confirmed: two
    spellings of one class would train as two classes. Returns the labels, each (with `as_held`: a
    human's) that items hold spelled otherwise (stored before labels were tidied: a decomposed "été", a
    zero-width space) as they hold it, so picking it again is no new class "written otherwise" of itself."""
    checked, unknown = dict(labels), []
    for task, value in labels.items():
        if task not in vocabulary:
            continue
        classes = set(map(str, vocabulary[task]))
        if value in classes or conn.execute(LABEL_HELD, (task, value)).fetchone():
            continue
        held = {label for (label,) in conn.execute(HELD_LABELS, (task,))}
        if as_held and (spelled := next((label for label in held if _tidied(label) == value), None)) is not None:
            checked[task] = spelled
            continue
        if _disputed(conn, task, value):
            continue
        same_as = class_spelled(value, [*sorted(classes), *sorted(held - classes)])
        if tidy_label(str(new_classes.get(task) or ""), classes) != value or same_as is not None:
            unknown.append(UnknownClass(task, value, close_classes(value, classes | held), same_as))
    if unknown:
        raise UnknownLabel(unknown)
    return checked


def _disputed(conn: sqlite3.Connection, task: str, value: str) -> bool:
    """Whether `value` is one side of an open disagreement on `task`: a class while it stands there (a
    ruling may pick it, though another label replaced it on its item), read only for a label otherwise unknown."""
    found, _ = _open_disagreements(conn, _annotators_labels(conn, [task]))
    return any(value in by_task.get(task, {}).values() for by_task in found.values())


# ---------------------------------------------------------------------------- schema migrations
def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in V1_SCHEMA:
        conn.execute(statement)


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Add decisions, save kinds and sources, and review queues. Each v1 save becomes one
    decision per label it set (base version unknown, no catalogue label). In v1 an item's
    latest save was its whole label set, so a save that left out a task the item had
    un-labelled it: that becomes a pending decision, and the current labels stay v1's."""
    for statement in V2_SCHEMA:
        conn.execute(statement)
    previous: dict[str, dict[str, str]] = {}
    for row in conn.execute(V1_SAVES).fetchall():
        labels, predicted = json.loads(row["labels"]), _predicted(json.loads(row["predictions"] or "{}"))
        dropped = [task for task in previous.get(row["item_id"], {}) if task not in labels]
        _decide(conn, row["id"], row["item_id"],
                [*((task, label, _status(label, predicted.get(task)), None, None, None)
                   for task, label in labels.items()), *((task, None, "pending", None, None, None) for task in dropped)])
        previous[row["item_id"]] = labels


def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """Keep a queue's view (order, filters) apart from its items; a v2 queue's view stays in its payload."""
    for statement in V3_SCHEMA:
        conn.execute(statement)


def _v3_to_v4(conn: sqlite3.Connection) -> None:
    """Each undo names the save it undoes (found from its decisions for v3's undos); add claims."""
    for statement in V4_SCHEMA:
        conn.execute(statement)


def _v4_to_v5(conn: sqlite3.Connection) -> None:
    """Mark the saves that adjudicate a disagreement (none before v5)."""
    for statement in V5_SCHEMA:
        conn.execute(statement)


def _v5_to_v6(conn: sqlite3.Connection) -> None:
    """Mark the saves made blind (none before v6: every labeler was shown the labels saved before theirs)."""
    for statement in V6_SCHEMA:
        conn.execute(statement)


# step n takes a store from version n to n + 1; a new store runs them all, as an old one did
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1, _v1_to_v2, _v2_to_v3, _v3_to_v4,
                                                                _v4_to_v5, _v5_to_v6)


# ---------------------------------------------------------------------------- writing
def _prepare(image_dir: Path, image: Any, text: Any, labels: Any, predictions: Any, item_id: Any,
             catalogue_labels: Any, base_versions: Any, source: str,
             classes: Mapping[str, Iterable[str]] | None = None) -> _Prepared:
    """Validate one save and write its image file (content-addressed: writing it twice is harmless);
    `classes`: each task's classes, which a human label keeps as spelled there (`tidy_label`)."""
    if source not in SOURCES:
        raise LabelStoreError(f"source must be one of {SOURCES}, not {source!r}")
    labels = _clean_labels(labels, None if source == "auto" else classes or {})
    catalogue = _strings(catalogue_labels or {}, "catalogue labels")
    data, extension = _image_bytes(image)
    if not isinstance(text, str):
        raise LabelStoreError(f"text must be a string, not {type(text).__name__}")
    if not isinstance(predictions or {}, Mapping):
        raise LabelStoreError(f"predictions must be a dict of task -> prediction, not {type(predictions).__name__}")
    predictions = dict(predictions or {})
    if source == "auto" and (differ := sorted(t for t, v in labels.items() if _predicted(predictions).get(t) != v)):
        raise LabelStoreError(f"an auto-accept takes the model's labels; {differ} differ from its predictions")
    if base_versions is not None:
        if not isinstance(base_versions, Mapping) or any(
                v is not None and (not isinstance(v, int) or isinstance(v, bool)) for v in base_versions.values()):
            raise LabelStoreError(f"base versions must be a dict of task -> version number or None, not "
                                  f"{base_versions!r}")
        base_versions = dict(base_versions)
    _check_encodable(text=text)
    for value, field in ((labels, "labels"), (catalogue, "catalogue labels"), (predictions, "predictions")):
        _json(value, field)
    sha = hashlib.sha256(data).hexdigest()
    relative = f"{sha[:2]}/{sha}.{extension}"
    if not (image_dir / relative).exists():
        atomic_write(image_dir / relative, data)
    return _Prepared(_key(item_id, "item_id") or _content_id(sha, text), sha, relative, len(data),
                     text[:MAX_TEXT_CHARS], labels, predictions, catalogue, base_versions)


def _store(conn: sqlite3.Connection, save: _Prepared, *, annotator: str, checkpoint: str, request_id: str | None,
           source: str, batch_id: str | None = None, vocabulary: Mapping[str, Iterable[str]] | None = None,
           new_classes: Mapping[str, str] | None = None, force: bool = False, adjudicated: bool = False,
           blind: bool = False) -> SaveResult:
    """Check and insert one prepared save, inside the caller's IMMEDIATE transaction."""
    if (save_id := _stored_request(conn, request_id, "label")) is not None:
        return _save_result(conn, save_id, duplicate=True)
    if vocabulary:
        save = replace(save, labels=_check_vocabulary(conn, save.labels, vocabulary, new_classes or {},
                                                      as_held=source == "human"))
    if save.base_versions is not None:
        states, steps = _replay(conn.execute(ITEM_DECISIONS, (save.item_id, LAST_ROW)))
        conflicts = _conflicts(save, states.get(save.item_id, {}), steps)
        if conflicts and not force:
            raise LabelConflict(conflicts)
    conn.execute(INSERT_IMAGE, (save.sha, save.image_file, save.image_bytes, _now()))
    save_id = _insert_save(conn, save.item_id, save.sha, save.text, save.predictions, save.labels, annotator,
                           checkpoint, request_id, "label", source, batch_id, adjudicated=adjudicated, blind=blind)
    predicted, base = _predicted(save.predictions), save.base_versions or {}
    _decide(conn, save_id, save.item_id, [(task, label, _status(label, predicted.get(task)), save.catalogue.get(task),
                                           base.get(task), None) for task, label in save.labels.items()])
    return _save_result(conn, save_id, duplicate=False)


def _conflicts(save: _Prepared, current: dict[str, TaskState], steps: dict[int, _Step]) -> list[Conflict]:
    """The tasks of `save` whose label someone changed to another since the base version."""
    conflicts = []
    for task, yours in save.labels.items():
        base = save.base_versions.get(task)
        if base is not None and (base not in steps or steps[base].task != task):
            raise LabelStoreError(f"version {base} is not a version of {task} of item {save.item_id}: the item "
                                  "shown is not the item being saved; reload it")
        now = current.get(task)
        if now is not None and now.version != base and now.label is not None and now.label != yours:
            conflicts.append(_conflict(save.item_id, task, yours, now))
    return conflicts


def _conflict(item_id: str, task: str, yours: str | None, now: TaskState) -> Conflict:
    """A conflict with the decision standing now on a task, named by whoever made it."""
    return Conflict(item_id, task, yours, now.label, now.decided_by or now.annotator, now.version, now.created_at,
                    now.status, now.source)


def _revert(conn: sqlite3.Connection, target: sqlite3.Row, annotator: str, request_id: str | None,
            force: bool, keep_theirs: bool) -> int:
    """Append an undo of the save `target`: each of its tasks back to its state before it,
    except, with `keep_theirs`, the tasks someone decided since. Returns the undo's row id."""
    item_id = target["item_id"]
    decisions = conn.execute(ITEM_DECISIONS, (item_id, LAST_ROW)).fetchall()
    states, steps = _replay(decisions)
    current = states[item_id]
    rows = {task: [d for d in decisions if d["task"] == task] for task in current}
    standing = {task: [r["version"] for r in _standing(task_rows, LAST_ROW)] for task, task_rows in rows.items()}
    # the save's decisions still standing (one a forced undo dropped is gone already: nothing to revert)
    reverted = {version: step for version, step in steps.items() if step.save_id == target["id"]
                and version in standing[step.task]}
    back = {version: _restored(rows[step.task], steps, version, LAST_ROW) for version, step in reverted.items()}
    restored = {version: (state.label, state.status) if state else (None, "pending") for version, state in back.items()}
    # someone decided since: a decision made after it that still stands (a skip over the same label included)
    since = {version: [steps[later].after for later in standing[step.task] if later > version]
             for version, step in reverted.items()}
    changed = {version for version, later in since.items() if later}
    if changed and not (force or keep_theirs):
        raise LabelConflict([_conflict(item_id, reverted[v].task, restored[v][0], state) for v in sorted(changed)
                             for state in since[v]], save_id=target["id"])
    if keep_theirs:
        reverted = {version: step for version, step in reverted.items() if version not in changed}
    undo_id = _insert_save(conn, item_id, target["image_sha256"], target["text"],
                           json.loads(target["predictions"] or "{}"),
                           {step.task: restored[v][0] for v, step in reverted.items() if restored[v][0] is not None},
                           annotator, "", request_id, "undo", undoes=target["id"])
    _decide(conn, undo_id, item_id, [(step.task, *restored[version], None, current[step.task].version, version)
                                     for version, step in reverted.items()])
    return undo_id


def _insert_save(conn: sqlite3.Connection, item_id: str, sha: str | None, text: str | None, predictions: dict,
                 labels: dict, annotator: str, checkpoint: str, request_id: str | None, kind: str,
                 source: str = "human", batch_id: str | None = None, undoes: int | None = None,
                 adjudicated: bool = False, blind: bool = False) -> int:
    return conn.execute(INSERT_SAVE, (item_id, sha, text, json.dumps(predictions, ensure_ascii=False),
                                      json.dumps(labels, ensure_ascii=False), annotator, checkpoint, _now(),
                                      request_id, kind, source, batch_id, undoes, int(adjudicated),
                                      int(blind))).lastrowid


def _decide(conn: sqlite3.Connection, save_id: int, item_id: str,
            decisions: Iterable[tuple[str, str | None, str, str | None, int | None, int | None]]) -> None:
    """Insert a save's decisions: (task, label, status, catalogue label, base version, reverts) each."""
    conn.executemany(INSERT_DECISION, [(save_id, item_id, *decision) for decision in decisions])


def request_reused(kind: str, used_by: str, request_id: str) -> str:
    """Why a `kind` of decision (label, skip, undo) is refused under a request id another kind used: in a
    browser, a key pressed before the answer to the last one came back (which brings the next id)."""
    action = {"label": "save"}
    return (f"This {action.get(kind, kind)} came before the answer to your last {action.get(used_by, used_by)} "
            f"reached the screen, so it was not run: press it again (its request id {request_id!r} was already "
            f"used for that {action.get(used_by, used_by)}).")


def _undone(conn: sqlite3.Connection, undo_id: int) -> Undone:
    """What the undo `undo_id` did: the save it reverted, each task's label undone and restored, the tasks
    it left as someone else decided since, the decisions since that it dropped (a forced undo), and
    whether the save was a ruling."""
    undo = conn.execute(UNDO_SAVE, (undo_id,)).fetchone()
    rows = conn.execute(UNDO_RESULT, (undo_id,)).fetchall()
    tasks = {r["task"]: (r["undone"], r["restored"]) for r in rows}
    kept = [r["task"] for r in conn.execute(SAVE_TASKS, (undo["undoes"],)) if r["task"] not in tasks]
    decisions = conn.execute(ITEM_DECISIONS, (undo["item_id"], LAST_ROW)).fetchall()
    _, steps = _replay(decisions)
    dropped = [_conflict(undo["item_id"], r["task"], r["restored"], state)
               for r in rows for state in _dropped_by_undo(decisions, steps, r)]
    return Undone(undo["undoes"], undo["item_id"], tasks, kept, dropped, bool(undo["ruling"]))


def _stored_request(conn: sqlite3.Connection, request_id: str | None, kind: str) -> int | None:
    """The row id of the save already stored under `request_id`, if any."""
    row = conn.execute(SAVE_BY_REQUEST, (request_id,)).fetchone() if request_id is not None else None
    if row is not None and row["kind"] != kind:
        raise LabelStoreError(request_reused(kind, row["kind"], request_id))
    return row["id"] if row else None


def _save_result(conn: sqlite3.Connection, save_id: int, duplicate: bool) -> SaveResult:
    decisions = conn.execute(SAVE_DECISIONS, (save_id,)).fetchall()
    return SaveResult(save_id, {task: version for task, version, _ in decisions}, duplicate,
                      conn.execute(SAVE_ITEM, (save_id,)).fetchone()[0], {task: label for task, _, label in decisions})


# ---------------------------------------------------------------------------- reading
def _replay(rows: Iterable[sqlite3.Row]) -> tuple[dict[str, dict[str, TaskState]], dict[int, _Step]]:
    """Replay decisions, oldest first: each item's task states, and what each decision changed."""
    states: dict[str, dict[str, TaskState]] = defaultdict(dict)
    steps: dict[int, _Step] = {}
    seen: dict[tuple[str, str], list[sqlite3.Row]] = defaultdict(list)  # each item's task's rows so far
    for row in rows:
        tasks, version = states[row["item_id"]], row["version"]
        before = tasks.get(row["task"])
        decided_by = row["annotator"] or ""
        if row["reverts"] is not None:  # an undo: the state it brings back, who set it included
            restored = _restored(seen[row["item_id"], row["task"]], steps, row["reverts"], row["save_id"])
            after = replace(restored, version=version, decided_by=decided_by) if restored else _state(row)
        elif row["status"] == "skipped" and before is not None and before.label is not None:
            after = replace(before, status="skipped", version=version, decided_by=decided_by, skipped_by=decided_by)
        else:
            after = _state(row)
        tasks[row["task"]] = after
        steps[version] = _Step(row["task"], row["save_id"], before, after)
        seen[row["item_id"], row["task"]].append(row)
    for (item_id, task), task_rows in seen.items():
        if (state := states[item_id][task]).status == "skipped" and state.label is not None:
            states[item_id][task] = _under_skip(task_rows, steps, state)
    return dict(states), steps


def _under_skip(rows: list[sqlite3.Row], steps: dict[int, _Step], skip: TaskState) -> TaskState:
    """A skip standing now, with the label under it that still stands: a skip keeps the label it was made
    over, and that label's author may have withdrawn it since ("keep theirs": it stayed under the skip, and
    was exported and trained on); the newest label still standing before the skip takes its place, else none."""
    labels = [r for r in _standing(rows, LAST_ROW) if r["version"] < skip.version and r["status"] != "skipped"]
    under = steps[labels[-1]["version"]].after if labels else None
    if under is not None and (under.label, under.annotator, under.created_at) == (skip.label, skip.annotator,
                                                                                   skip.created_at):
        return skip
    if under is None:
        return replace(skip, label=None, annotator=skip.skipped_by, source="human", adjudicated=False)
    return replace(under, status="skipped", version=skip.version, decided_by=skip.decided_by,
                   skipped_by=skip.skipped_by)


def _taken_back(rows: list[sqlite3.Row], before: int) -> set[int]:
    """The decisions of `rows` (one item's task, oldest first) taken back by a save before the save `before`:
    reverted by an undo, dropped by a forced undo (made after the decision it reverted, up to the one
    standing then), or withdrawn (an undo that kept someone's later decision: "keep theirs")."""
    gone = set()
    for row in rows:
        if row["reverts"] is not None and row["save_id"] < before:
            gone.add(row["reverts"])
            gone.update(r["version"] for r in rows if r["reverts"] is None
                        and row["reverts"] < r["version"] <= row["base_version"])
    return gone | {r["version"] for r in rows if r["withdrawn_at"] is not None and r["withdrawn_at"] < before}


def _standing(rows: list[sqlite3.Row], before: int) -> list[sqlite3.Row]:
    """The decisions of `rows` (one item's task) that still stand as of the save `before`: not undo rows,
    not taken back (`_taken_back`)."""
    gone = _taken_back(rows, before)
    return [r for r in rows if r["reverts"] is None and r["version"] not in gone]


def _restored(rows: list[sqlite3.Row], steps: dict[int, _Step], reverts: int, save_id: int) -> TaskState | None:
    """What an undo (its save `save_id`) of the decision `reverts` brings back: the newest decision made
    before it on its task (`rows`: that task's, oldest first) that still stands; one undone, dropped by a
    forced undo or withdrawn ("keep theirs") is passed over, never brought back (None: back to pending)."""
    standing = [r for r in _standing(rows, save_id) if r["version"] < reverts]
    return steps[standing[-1]["version"]].after if standing else None


def _dropped_by_undo(decisions: list[sqlite3.Row], steps: dict[int, _Step], undo: Mapping) -> list[TaskState]:
    """The decisions an undo's row (task, reverts, base_version, save_id) took away though it reverted
    another, oldest first: each made on its task after the decision it reverts, up to the one standing
    then, and still standing before it (someone else's, taken by a forced undo; not only the one standing)."""
    if undo["reverts"] is None:
        return []
    rows = [d for d in decisions if d["task"] == undo["task"]]
    return [steps[d["version"]].after for d in _standing(rows, undo["save_id"])
            if undo["reverts"] < d["version"] <= undo["base_version"]]


def _dropped(decisions: list[sqlite3.Row], steps: dict[int, _Step], row: sqlite3.Row) -> list[dict]:
    """For an undo's row, the decisions it took away (`_dropped_by_undo`): label, status, who made it, version."""
    return [{"label": state.label, "status": state.status, "by": state.decided_by or state.annotator,
             "version": state.version} for state in _dropped_by_undo(decisions, steps, row)]


def _replaced(steps: dict[int, _Step], row: sqlite3.Row) -> dict | None:
    """For a label's row, someone else's label standing then that the save replaced unseen (its base
    version is not that label's), else None."""
    if row["reverts"] is not None or row["kind"] != "label" or row["label"] is None:
        return None
    standing = steps[row["version"]].before
    if standing is None or standing.label in (None, row["label"]) or row["base_version"] == standing.version:
        return None
    by = standing.decided_by or standing.annotator
    return None if by == (row["annotator"] or "") else {"label": standing.label, "by": by, "version": standing.version}


def _state(row: sqlite3.Row) -> TaskState:
    return TaskState(row["label"], row["status"], row["version"], row["annotator"] or "", row["source"],
                     row["checkpoint"] or "", row["created_at"], row["annotator"] or "", bool(row["adjudicated"]),
                     row["annotator"] or "" if row["status"] == "skipped" else "")


def _predicted(predictions: Mapping[str, Any]) -> dict[str, Any]:
    """task -> the model's label, from predictions stored as {"label": ...} or as the label itself."""
    return {t: p.get("label") if isinstance(p, dict) else p for t, p in predictions.items()}


def _status(label: str, predicted: str | None) -> str:
    return "accepted" if label == predicted else "corrected"


def _differs(label: str | None, other: str | None) -> bool | None:
    """Whether two labels are two classes ("Dark Blue" is a manifest's "dark-blue" confirmed, no change)."""
    return None if label is None or other is None else not same_class(label, other)


def _audit_row(row: sqlite3.Row) -> dict:
    prediction = json.loads(row["predictions"] or "{}").get(row["task"])
    predicted, confidence = ((prediction.get("label"), prediction.get("confidence")) if isinstance(prediction, dict)
                             else (prediction, None))
    return {"version": row["version"], "save_id": row["save_id"], "item_id": row["item_id"], "task": row["task"],
            "label": row["label"], "status": row["status"], "kind": row["kind"], "source": row["source"],
            "annotator": row["annotator"], "created_at": row["created_at"], "checkpoint": row["checkpoint"],
            "predicted_label": predicted, "predicted_confidence": confidence,
            "catalogue_label": row["catalogue_label"], "changed_vs_model": _differs(row["label"], predicted),
            "changed_vs_catalogue": _differs(row["label"], row["catalogue_label"]),
            "base_version": row["base_version"], "reverts": row["reverts"], "text": row["text"],
            "adjudicated": bool(row["adjudicated"])}


def _annotators_labels(conn: sqlite3.Connection, tasks: Iterable[str] | None,
                       item_id: str | None = None) -> dict[tuple[str, str], dict]:
    """(task, item) -> annotator -> the row of their latest human label (`HUMAN_LABELS`), on `tasks` (None: all),
    of every item or of `item_id`."""
    wanted = None if tasks is None else set(tasks)
    labels: dict[tuple[str, str], dict[str, sqlite3.Row]] = defaultdict(dict)
    rows = conn.execute(HUMAN_LABELS) if item_id is None else conn.execute(ITEM_HUMAN_LABELS, (str(item_id),))
    for row in rows:
        if wanted is None or row["task"] in wanted:
            labels[row["task"], row["item_id"]][row["annotator"]] = row
    return labels


def _agreement(conn: sqlite3.Connection, tasks: Iterable[str] | None) -> dict[str, dict]:
    tasks = None if tasks is None else list(tasks)
    labels, reviewers = _annotators_labels(conn, tasks), _reviewers(conn)
    shared: dict[str, list[dict[str, str]]] = {task: [] for task in tasks or ()}
    reviews: Counter[str] = Counter()
    for (task, item), by_annotator in labels.items():
        opinions = {a: row["label"] for a, row in by_annotator.items() if (item, task, name_key(a)) not in reviewers}
        if reviewed := len(by_annotator) - len(opinions):
            reviews[task] += reviewed
        if len(opinions) >= 2:
            shared.setdefault(task, []).append(opinions)
    unsettled = Counter(task for by_task in _open_disagreements(conn, labels)[0].values() for task in by_task)
    return {task: {**_agreement_of(shared.get(task, [])), "reviews": reviews[task],
                   "open_disagreements": unsettled[task]}  # a lone label against a ruling is open too
            for task in sorted(shared.keys() | unsettled.keys() | reviews.keys())}


def _reviewers(conn: sqlite3.Connection) -> set[tuple[str, str, str]]:
    """(item, task, annotator's `name_key`) where the annotator saved a label, not blind, from a version showing
    another labeler's human label (as that version left the task: a label under a skip, a label an undo
    brought back, each by its own author): a review of it, and every label of theirs there since is one too.
    A blind save counts as blind until the annotator was told another's label there: by the message of a save
    of theirs over it, blind or not, or by an undo of theirs that brought it back."""
    rows = conn.execute(ALL_DECISIONS).fetchall()
    _, steps = _replay(rows)

    def another(state: TaskState | None, key: tuple[str, str, str]) -> bool:
        return (state is not None and state.label is not None and state.source == "human"
                and name_key(state.annotator) != key[2])

    reviewers: set[tuple[str, str, str]] = set()
    told: set[tuple[str, str, str]] = set()
    for row in rows:
        key = (row["item_id"], row["task"], name_key(row["annotator"] or ""))
        if row["kind"] == "undo":
            told |= {key} if another(steps[row["version"]].after, key) else set()
            continue
        if not another(steps[row["base_version"]].after if row["base_version"] in steps else None, key):
            continue
        if row["kind"] == "label" and row["source"] == "human" and (not row["blind"] or key in told):
            reviewers.add(key)
        if row["kind"] == "label" or not row["blind"]:
            told.add(key)
    return reviewers


def _open_disagreements(conn: sqlite3.Connection, labels: dict[tuple[str, str], dict],
                        ) -> tuple[dict[str, dict[str, dict[str, str]]], dict[str, str]]:
    """Of the annotators' labels (`_annotators_labels`), the disagreements open: none adjudicated, or a
    label saved after the newest adjudication differs from it. item -> task -> annotator -> label, and
    item -> when the newest of those labels was saved."""
    settled = {(row["task"], row["item_id"]): row for row in conn.execute(ADJUDICATIONS)}  # the newest
    found: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    since: dict[str, str] = {}
    for (task, item), by_annotator in labels.items():
        rows = by_annotator.values()
        if (ruling := settled.get((task, item))) is None:
            if len({row["label"] for row in rows}) < 2:
                continue
        elif all(row["label"] == ruling["label"] for row in rows if row["version"] > ruling["version"]):
            continue  # settled: no label since the ruling goes against it (the annotators may now agree on another)
        found[item][task] = {annotator: row["label"] for annotator, row in sorted(by_annotator.items())}
        if ruling is not None:  # reopened: the ruling a later label went against
            found[item][task][f"{ruling['annotator']}'s ruling"] = ruling["label"]
        since[item] = max(since.get(item, ""), *(row["created_at"] for row in rows))
    return dict(found), since


def _agreement_of(items: list[dict[str, str]]) -> dict:
    """Raw agreement and mean pairwise Cohen's kappa over items labelled by two annotators or more, with
    how many annotator pairs share an item (`pairs`) and how many of them the kappa is over (`kappa_pairs`):
    a kappa of 1 over one pair read as full agreement beside a third annotator's open dissent (QA s42)."""
    pairs = [(labels[a], labels[b]) for labels in items for a, b in combinations(sorted(labels), 2)]
    annotators = sorted({a for labels in items for a in labels})
    kappas, sharing = [], 0
    for a, b in combinations(annotators, 2):
        both = [(labels[a], labels[b]) for labels in items if a in labels and b in labels]
        sharing += bool(both)
        if len(both) >= 2 and len({label for pair in both for label in pair}) > 1:  # one class: kappa is 0 / 0
            kappas.append(float(cohen_kappa_score([x for x, _ in both], [y for _, y in both])))
    return {"items": len(items), "raw": sum(x == y for x, y in pairs) / len(pairs) if pairs else None,
            "kappa": sum(kappas) / len(kappas) if kappas else None, "annotators": annotators,
            "pairs": sharing, "kappa_pairs": len(kappas)}


def _saved_queue(row: sqlite3.Row) -> SavedQueue:
    return SavedQueue(row["queue_id"], row["annotator"], row["model"], json.loads(row["payload"]), row["position"],
                      row["updated_at"], json.loads(row["view"]) if row["view"] is not None else None)


def _queue_position(position: Any) -> None:
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise LabelStoreError(f"the queue position must be a whole number from 0, not {position!r}")


# ---------------------------------------------------------------------------- validation
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def name_key(name: str) -> str:
    """What two spellings of one annotator share: "Émile" from a phone's keyboard and "émile" from a
    laptop's (SQLite's NOCASE folds ASCII letters only), composed or not."""
    return unicodedata.normalize("NFC", name).casefold()


def _spellings(conn: sqlite3.Connection, name: str, table: str) -> list[str]:
    """The spellings of `name` (`name_key`) the annotator column of `table` ("corrections", "queues")
    holds, the first held first: its few names read off the column's index, compared here (a collation
    in Python called per row was 6 x slower over 200,000 saves)."""
    key = name_key(name)
    held = [spelled for (spelled,) in conn.execute(f"SELECT DISTINCT annotator FROM {table}")
            if spelled is not None and name_key(spelled) == key]
    first = f"SELECT MIN(rowid) FROM {table} WHERE annotator = ?"
    return sorted(held, key=lambda spelled: conn.execute(first, (spelled,)).fetchone()[0])


def _name(value: object, field: str) -> str:
    """An annotator, checkpoint or model name: stripped, cut to MAX_NAME_CHARS."""
    name = str(value or "").strip()[:MAX_NAME_CHARS]
    _check_encodable(**{field: name})
    return name


def _key(value: object, field: str) -> str | None:
    """An item, request, batch or queue id, kept whole (stripped); None when not given."""
    if value is None:
        return None
    key = str(value).strip()
    _check_length(key, field, MAX_ID_CHARS)
    _check_encodable(**{field: key})
    return key or None


def _check_length(value: str, field: str, limit: int) -> None:
    if len(value) > limit:
        raise LabelStoreError(f"{field} is {len(value):,} characters long; the limit is {limit}")


def _json(value: object, field: str) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise LabelStoreError(f"{field} must be JSON-serialisable: {exc}") from exc
    _check_encodable(**{field: text})
    return text


def _unusable(exc: sqlite3.OperationalError, writing: bool) -> str:
    """What a failed transaction tells the user: nothing of it was kept."""
    outcome = "nothing was saved" if writing else "nothing could be read"
    if "locked" in str(exc) or "busy" in str(exc):
        return (f"the label store is busy: another process has held it for over {BUSY_TIMEOUT_S:g} s; {outcome}, "
                "try again")
    return f"the label store could not be used ({exc}); {outcome}"


def _strings(labels: object, field: str) -> dict[str, str]:
    """task -> label with the missing labels ("", "NA", ...) dropped."""
    if not isinstance(labels, Mapping):
        raise LabelStoreError(f"{field} must be a dict of task -> label, not {type(labels).__name__}")
    bad = [t for t, v in labels.items() if not isinstance(t, str) or not isinstance(v, (str, type(None)))]
    if bad:
        raise LabelStoreError(f"{field} must be strings; tasks {bad} are not")
    clean = {t.strip(): v.strip() for t, v in labels.items() if t.strip() and not is_missing(v)}
    for task, label in clean.items():
        _check_length(task, f"a task name in {field}", MAX_LABEL_CHARS)
        _check_length(label, f"the {task[:40]!r} label in {field}", MAX_LABEL_CHARS)
    return clean


def _clean_labels(labels: object, classes: Mapping[str, Iterable[str]] | None) -> dict[str, str]:
    """The labels with missing ones dropped, each a `tidy_label` of its task's `classes` (None: the
    model's own labels, an auto-accept's, kept as they are); raises if none remain."""
    clean = _strings(labels, "labels")
    if classes is not None:
        tidied = ((t, tidy_label(v, set(map(str, classes.get(t, ()))))) for t, v in clean.items())
        clean = {t: v for t, v in tidied if v and not is_missing(v)}  # "NA" and a zero-width space: "NA"
    if not clean:
        raise LabelStoreError("no labels: give at least one task's corrected label")
    return clean


def _check_encodable(**fields: str) -> None:
    """Refuse strings SQLite cannot store as UTF-8 (lone surrogates, which JSON can carry)."""
    for name, value in fields.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LabelStoreError(f"{name} is not valid Unicode text ({exc.reason} at character {exc.start})") from exc


def _image_bytes(image: Image.Image | bytes | str | Path) -> tuple[bytes, str]:
    """The bytes to store and their file extension: PNG for a PIL image, else the original
    bytes, which must decode as an image no larger than the trainer's `MAX_IMAGE_PIXELS`."""
    if isinstance(image, Image.Image):
        _check_pixels(*image.size)
        buffer = io.BytesIO()
        try:
            (image if image.mode in PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
        except (OSError, ValueError) as exc:
            raise LabelStoreError(f"cannot encode the image as PNG: {exc}") from exc
        return buffer.getvalue(), "png"
    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise LabelStoreError(f"cannot read image {image}: {exc}") from exc
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        raise LabelStoreError(f"image must be a PIL image, bytes or a path, not {type(image).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            size, extension = decoded.size, EXTENSIONS.get(decoded.format, "bin")
            if size[0] * size[1] <= MAX_IMAGE_PIXELS:
                decoded.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise LabelStoreError(f"not a readable image ({len(data)} bytes): {exc}") from exc
    _check_pixels(*size)
    return data, extension


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise LabelStoreError(f"the image is {width}x{height} pixels; the limit is "
                              f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")


