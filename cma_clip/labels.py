"""Label store: labelers' corrections in SQLite, their images in a content-addressed folder.

Every save appends one row to ``corrections`` (item id, image sha256, text, the model's
predictions, the corrected labels, annotator, UTC time, checkpoint), so edits keep their
history and an item's latest row is its current label set. Each image is stored once, as
``<sha[:2]>/<sha>.<ext>`` in the image folder (default ``<db stem>_images/`` beside the
database). The database runs in WAL mode with ``synchronous=FULL``: a save that returned
survives the writer being killed, or a power cut. Every thread (and every process) uses its
own connection, and a ``request_id`` makes a save idempotent, so retried saves store one row.

`export` writes the current labels as a manifest the trainer reads; `apply_to` merges them
into an open catalogue.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from .data import MAX_IMAGE_PIXELS, Catalogue, is_missing, read_manifest
from .errors import CMAClipError

SCHEMA_VERSION = 1
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, path TEXT, bytes INTEGER, created_at TEXT)",
    "CREATE TABLE IF NOT EXISTS corrections (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,"
    " image_sha256 TEXT, text TEXT, predictions TEXT, labels TEXT NOT NULL, annotator TEXT, checkpoint TEXT,"
    " created_at TEXT NOT NULL, request_id TEXT UNIQUE)",
    "CREATE INDEX IF NOT EXISTS corrections_item_id ON corrections (item_id)",
)
# the latest correction of every item, with its image file
CURRENT = ("SELECT c.*, i.path AS image_file FROM corrections c JOIN images i ON i.sha256 = c.image_sha256"
           " WHERE c.id IN (SELECT MAX(id) FROM corrections GROUP BY item_id) ORDER BY c.id")
BUSY_TIMEOUT_S = 30.0
MAX_TEXT_CHARS = 20_000
MAX_NAME_CHARS = 100  # annotator, checkpoint
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
EXPORT_COLUMNS = ("id", "image", "text", "annotator", "updated_at")


class LabelStoreError(CMAClipError, ValueError):
    """A correction or label store that cannot be used, with the reason."""


class LabelStore:
    """Corrections in a SQLite database at `path`, images in `image_dir`."""

    def __init__(self, path: str | Path, image_dir: str | Path | None = None) -> None:
        self.path = Path(path).resolve()
        self.image_dir = Path(image_dir).resolve() if image_dir else self.path.with_name(f"{self.path.stem}_images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local, self._pid = threading.local(), os.getpid()
        try:
            if self._connection().execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise LabelStoreError(f"{self.path}: SQLite cannot use WAL mode here (a network file system?)")
            with self._transaction("IMMEDIATE") as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise LabelStoreError(f"{self.path} has schema version {version}; this code reads "
                                          f"up to {SCHEMA_VERSION}")
                if version < SCHEMA_VERSION:
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LabelStoreError(f"{self.path} is not a usable label store: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection; a forked process opens its own instead of using its parent's."""
        if self._pid != os.getpid():
            self._local, self._pid = threading.local(), os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, mode: str = "") -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute(f"BEGIN {mode}")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:  # a failed COMMIT too: the connection must not stay inside the transaction
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def save_correction(self, *, image: Image.Image | bytes | str | Path, text: str, labels: dict[str, str],
                        predictions: dict[str, dict] | None = None, annotator: str = "", checkpoint: str = "",
                        item_id: str | None = None, request_id: str | None = None) -> int:
        """Store one correction (and its image, once) and return its row id.

        Missing labels ("", "NA", ...) are dropped; at least one must remain. `item_id`
        defaults to "img-" and the image's sha256 prefix. Saving a `request_id` that is
        already stored stores nothing and returns the first save's row id.
        """
        labels = _clean_labels(labels)
        data, extension = _image_bytes(image)
        if not isinstance(text, str):
            raise LabelStoreError(f"text must be a string, not {type(text).__name__}")
        try:
            predictions_json = json.dumps(predictions or {}, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise LabelStoreError(f"predictions must be JSON-serialisable: {exc}") from exc
        _check_encodable(text=text, labels=json.dumps(labels, ensure_ascii=False), predictions=predictions_json,
                         annotator=str(annotator), checkpoint=str(checkpoint), item_id=str(item_id or ""),
                         request_id=str(request_id or ""))
        sha = hashlib.sha256(data).hexdigest()
        relative = f"{sha[:2]}/{sha}.{extension}"
        if not (self.image_dir / relative).exists():
            _atomic_write(self.image_dir / relative, data)
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._transaction("IMMEDIATE") as conn:
            if request_id is not None:
                row = conn.execute("SELECT id FROM corrections WHERE request_id = ?", (str(request_id),)).fetchone()
                if row:
                    return row[0]
            conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", (sha, relative, len(data), now))
            cursor = conn.execute(
                "INSERT INTO corrections (item_id, image_sha256, text, predictions, labels, annotator, checkpoint,"
                " created_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((str(item_id or "").strip() or f"img-{sha[:16]}"), sha, text[:MAX_TEXT_CHARS], predictions_json,
                 json.dumps(labels, ensure_ascii=False), str(annotator).strip()[:MAX_NAME_CHARS],
                 str(checkpoint).strip()[:MAX_NAME_CHARS], now, None if request_id is None else str(request_id)))
            return cursor.lastrowid

    def history(self, limit: int = 50, item_id: str | None = None) -> list[dict]:
        """The latest `limit` corrections (of one item if given), newest first: who set which
        labels and when, with `changed` (tasks whose label differs from the item's previous
        entry; all of them for its first) and `corrected` (tasks labelled unlike the model)."""
        where, params = ("WHERE c.item_id = ?", (item_id,)) if item_id is not None else ("", ())
        rows = self._connection().execute(
            "SELECT c.*, i.path AS image_file, (SELECT p.labels FROM corrections p WHERE p.item_id = c.item_id"
            f" AND p.id < c.id ORDER BY p.id DESC LIMIT 1) AS previous FROM corrections c JOIN images i"
            f" ON i.sha256 = c.image_sha256 {where} ORDER BY c.id DESC LIMIT ?", (*params, limit)).fetchall()
        entries = []
        for row in rows:
            labels, predictions = json.loads(row["labels"]), json.loads(row["predictions"] or "{}")
            previous = json.loads(row["previous"]) if row["previous"] else None
            predicted = {t: p.get("label") if isinstance(p, dict) else p for t, p in predictions.items()}
            entries.append({
                "id": row["id"], "item_id": row["item_id"], "labels": labels, "previous_labels": previous,
                "changed": sorted(t for t in {*labels, *(previous or {})} if labels.get(t) != (previous or {}).get(t)),
                "corrected": sorted(t for t in labels if t in predicted and predicted[t] != labels[t]),
                "predictions": predictions, "text": row["text"], "image_sha256": row["image_sha256"],
                "image_path": self.image_dir / row["image_file"], "annotator": row["annotator"],
                "checkpoint": row["checkpoint"], "created_at": row["created_at"], "request_id": row["request_id"]})
        return entries

    def current_labels(self) -> dict[str, dict]:
        """Every item's latest correction, read as one snapshot: item_id -> labels, text,
        image_path, annotator, updated_at."""
        with self._transaction() as conn:
            rows = conn.execute(CURRENT).fetchall()
        return {r["item_id"]: {"labels": json.loads(r["labels"]), "text": r["text"],
                               "image_path": self.image_dir / r["image_file"], "annotator": r["annotator"],
                               "updated_at": r["created_at"]} for r in rows}

    def count(self) -> int:
        """The number of stored corrections (every edit counts)."""
        return self._connection().execute("SELECT COUNT(*) FROM corrections").fetchone()[0]

    def image_path(self, sha: str) -> Path:
        """The file of a stored image, by its sha256."""
        row = self._connection().execute("SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise LabelStoreError(f"no image {sha} in {self.path}")
        return self.image_dir / row[0]

    def export(self, path: str | Path) -> int:
        """Write the current labels as a CSV or JSONL manifest (by suffix), one row per item:
        id, image, text, one column per task (empty when unlabelled), annotator, updated_at.
        Image paths are relative to the file's folder, so export beside the store (or above
        it) for `Catalogue` to accept them. Written atomically; returns the number of rows."""
        path = Path(path)
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise LabelStoreError(f"export to a .csv or .jsonl file, not {path.name}")
        current = self.current_labels()
        tasks = sorted({t for item in current.values() for t in item["labels"]})
        if clash := set(tasks) & set(EXPORT_COLUMNS):
            raise LabelStoreError(f"tasks {sorted(clash)} clash with the export's own columns")
        folder = path.resolve().parent
        records = []
        for item_id, item in current.items():
            try:
                image = os.path.relpath(item["image_path"], folder)
            except ValueError:  # another drive: keep the absolute path
                image = str(item["image_path"])
            records.append({"id": item_id, "image": image, "text": item["text"],
                            **{t: item["labels"].get(t, "") for t in tasks},
                            "annotator": item["annotator"], "updated_at": item["updated_at"]})
        buffer = io.StringIO()
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(buffer, fieldnames=[*EXPORT_COLUMNS[:3], *tasks, *EXPORT_COLUMNS[3:]])
            writer.writeheader()
            writer.writerows(records)
        else:
            buffer.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        _atomic_write(path, buffer.getvalue().encode("utf-8"))
        return len(records)

    def apply_to(self, catalogue: Catalogue) -> Catalogue:
        """A copy of `catalogue` with the current corrections applied.

        A correction overrides the labels of the catalogue's tasks for its item (matched on
        the id column, else the image column), except on `test` rows: the test split keeps
        its catalogue labels, so test figures stay comparable between runs and never score a
        model against its own accepted predictions. Items absent from the manifest are appended
        (split "train", the stored image's absolute path, the text in the first text column);
        items of the manifest left out of this catalogue (by split or limit) are not, so a
        val or test item never comes back as a training row. Corrections without a label
        for any of the catalogue's tasks add nothing.
        """
        config = catalogue.config
        columns = list(catalogue.rows[0]) if catalogue.rows else [config.image_column, *config.text_columns,
                                                                   *config.tasks]
        key = config.id_column if config.id_column in columns else config.image_column
        current = {item_id: (item, {t: v for t, v in item["labels"].items() if t in config.tasks})
                   for item_id, item in self.current_labels().items()}
        rows = [dict(row) for row in catalogue.rows]
        for row in rows:
            if row.get(key) in current and row.get("split") != "test":
                row.update(current[row[key]][1])
        known = {row.get(key) for row in rows}
        if Path(config.manifest).is_file():
            known |= {row.get(key) for row in read_manifest(config.manifest)}
        for item_id, (item, labels) in current.items():
            if item_id in known or not labels:
                continue
            row = {**dict.fromkeys(columns, ""), **labels, config.image_column: str(item["image_path"])}
            if config.text_columns:
                row[config.text_columns[0]] = item["text"]
            if key != config.image_column:
                row[key] = item_id
            if "split" in columns:
                row["split"] = "train"
            rows.append(row)
        extra_roots = catalogue.extra_roots
        if self.image_dir not in extra_roots:
            extra_roots = (*extra_roots, self.image_dir)
        return replace(catalogue, rows=rows, extra_roots=extra_roots)


def _clean_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels with missing ones dropped; raises if none remain."""
    if not isinstance(labels, dict):
        raise LabelStoreError(f"labels must be a dict of task -> label, not {type(labels).__name__}")
    bad = [t for t, v in labels.items() if not isinstance(t, str) or not isinstance(v, (str, type(None)))]
    if bad:
        raise LabelStoreError(f"labels must be strings; tasks {bad} are not")
    clean = {t.strip(): v.strip() for t, v in labels.items() if t.strip() and not is_missing(v)}
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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a synced temporary file renamed into place: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
