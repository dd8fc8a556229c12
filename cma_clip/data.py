"""Catalogues: manifests, splits, tasks and label vocabularies; images; tables written out.

A catalogue is a CSV or JSONL manifest: one row per item, an image column with
paths relative to the manifest, one or more text columns, and label columns used as
tasks. An optional ``split`` column (train/val/test) selects rows.

Labels: empty strings, "NA" and similar are missing and masked out of that task's
loss and metrics only. Vocabularies come from the training split (classes seen at
least ``min_count`` times) and live in the checkpoint. A label outside the vocabulary
(rare or unseen in training) is ignored by the loss, and counts as a wrong prediction
in evaluation: the model cannot predict it, and the metrics say so.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import struct
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CMAClipError

MISSING_LABELS = frozenset({"", "na", "n/a", "nan", "none", "null"})
IGNORE = -1  # label index of a missing label: excluded from loss and metrics
UNKNOWN = -2  # label index of a label outside the vocabulary: excluded from loss, wrong in metrics
CONFIG_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent


class CatalogueError(CMAClipError, ValueError):
    """A manifest or catalogue config that cannot be used, with the reason."""


def default_data_root() -> Path:
    """Where the shared catalogues live: $CMA_CLIP_DATA, else ../shared/data beside the repo."""
    return Path(os.environ.get("CMA_CLIP_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass
class CatalogueConfig:
    """Which columns of a manifest are the id, the image, the text and the tasks."""

    name: str
    manifest: str
    image_column: str = "image"
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    tasks: list[str] = field(default_factory=list)
    id_column: str | None = None
    max_text_tokens: int = 64
    task_names: dict[str, str] = field(default_factory=dict)  # task -> the name a person reads ("Pattern")

    @classmethod
    def load(cls, name_or_path: str, data_root: str | Path | None = None) -> "CatalogueConfig":
        """A bundled config by name (see cma_clip/configs) or a JSON file; the manifest
        path is resolved against `data_root`."""
        path = Path(name_or_path)
        if not path.exists():
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise CatalogueError(f"no catalogue config {name_or_path!r}; bundled ones: {known}")
        config = cls(**json.loads(path.read_text()))
        manifest = Path(config.manifest)
        if not manifest.is_absolute():
            manifest = Path(data_root or default_data_root()) / manifest
        return replace(config, manifest=str(manifest))


MAX_FIELD_CHARS = 20_000  # any manifest cell; the label store's longest field (its text) fits, so its export reads back
MAX_MANIFEST_ROWS = 10_000  # for uploads read with read_manifest(path, max_rows=MAX_MANIFEST_ROWS); catalogues have no cap


def read_manifest(path: str | Path, max_rows: int | None = None,
                  max_field_chars: int | None = MAX_FIELD_CHARS) -> list[dict[str, str]]:
    """Rows of a CSV, JSONL or Parquet manifest (Parquet needs pyarrow), every value as a
    string. A UTF-8 byte order mark (Excel's "CSV UTF-8") is skipped, and a CSV cell kept from
    running as a formula by a leading quote ('=x, as `write_table` and spreadsheets save it) reads
    as it was (=x). Refused with a
    `CatalogueError` naming the row (and column): a file that is not UTF-8 (or not Parquet);
    a broken CSV or JSON line; a CSV header with an empty or repeated column name, or a JSON
    line with a repeated key (else the last one would silently win); a CSV row with more or
    fewer fields than the header; a value longer than `max_field_chars`; more than
    `max_rows` rows (None: no limit, for training catalogues; an upload passes
    `MAX_MANIFEST_ROWS`), found without reading the rest of the file. A row with no value in any
    column (a spreadsheet's blank row, ";;;") is left out."""
    path = Path(path)
    if path.is_dir():
        raise CatalogueError(f"{path} is a folder: give the manifest file in it (CSV, JSONL or Parquet)")
    if not path.is_file():
        raise CatalogueError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    read = _read_jsonl if suffix in (".jsonl", ".ndjson") else _read_parquet if suffix == ".parquet" else _read_csv
    try:
        rows = read(path, max_rows, max_field_chars)
    except UnicodeDecodeError as exc:
        raise CatalogueError(_not_utf8(path, exc)) from exc
    return [row for row in rows if any(value is not None and str(value).strip() for value in row.values())]


def _not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, and what to do: `error`'s position is within the chunk a
    reader decoded last (it said "byte 0"), so it is found again in the whole file."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as whole:
        error = whole
    line = raw.count(b"\n", 0, error.start) + 1
    return (f"{path.name} is not UTF-8 text (line {line}: {error.reason} at byte {error.start}): save it as UTF-8 "
            "(a spreadsheet's \"CSV UTF-8\")")


def _check_row(path: Path, where: str, number: int, row: dict[str, str], max_rows: int | None,
               max_field_chars: int | None) -> None:
    if max_rows is not None and number > max_rows:
        raise CatalogueError(f"{path.name} has more than {max_rows:,} rows; the limit is {max_rows:,} "
                             "(split it into smaller manifests)")
    if max_field_chars is not None:
        for column, value in row.items():
            if len(value) > max_field_chars:
                raise CatalogueError(f"{path.name}, {where}: column {column[:80]!r} holds {len(value):,} characters; "
                                     f"the limit is {max_field_chars:,}")


def _read_jsonl(path: Path, max_rows: int | None, max_field_chars: int | None) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    record = json.loads(line, object_pairs_hook=_unique_keys)
                except json.JSONDecodeError as exc:
                    raise CatalogueError(f"{path.name}, line {number}: not valid JSON ({exc.msg})") from exc
                except RecursionError:
                    raise CatalogueError(f"{path.name}, line {number}: its values are nested too deeply; a "
                                         "manifest line is a flat JSON object") from None
                except _RepeatedKey as exc:
                    raise CatalogueError(f"{path.name}, line {number}: the key {exc.args[0][:80]!r} appears "
                                         "more than once") from None
                if not isinstance(record, dict):
                    raise CatalogueError(f"{path.name}, line {number}: each line must be a JSON object")
                row = {k: "" if v is None else str(v) for k, v in record.items()}
                _check_row(path, f"line {number}", len(rows) + 1, row, max_rows, max_field_chars)
                rows.append(row)
    return rows


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet), or a CatalogueError saying how to install them: Parquet is optional."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise CatalogueError("Parquet files need pyarrow: pip install -r requirements-ray.txt") from exc
    return pyarrow, pyarrow.parquet


def _read_parquet(path: Path, max_rows: int | None, max_field_chars: int | None) -> list[dict[str, str]]:
    pa, pq = pyarrow_modules()
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CatalogueError(f"{path.name} is not a readable Parquet file ({exc})") from exc
    _check_row(path, "", parquet.metadata.num_rows, {}, max_rows, None)  # before reading any row
    rows = []
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            row = {k: "" if v is None else str(v) for k, v in record.items()}
            _check_row(path, f"row {len(rows) + 1}", len(rows) + 1, row, max_rows, max_field_chars)
            rows.append(row)
    return rows


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen = set()
        raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def _read_csv(path: Path, max_rows: int | None, max_field_chars: int | None) -> list[dict[str, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=_delimiter(handle.readline(65_536)))
        handle.seek(0)
        try:
            _check_header(path, reader.fieldnames or [])
            for number, row in enumerate(reader, 2):  # the header is row 1
                if None in row or None in row.values():  # csv marks extra fields with key None, missing ones with None
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                    raise CatalogueError(f"{path.name}, row {number}: {fields} fields where the header has "
                                         f"{len(reader.fieldnames)} (an unquoted comma or line break?)")
                row = {k: _restore(v) for k, v in row.items()}  # checked as read: '= and 20,000 more fit
                _check_row(path, f"row {number}", number - 1, row, max_rows, max_field_chars)
                rows.append(row)
        except csv.Error as exc:  # the line the csv reader was in (the DictReader's own count lags one row)
            where = f"{path.name}, line {reader.reader.line_num}: not readable as CSV"
            if "field larger than field limit" in str(exc):
                raise CatalogueError(f"{where}: a field is longer than {csv.field_size_limit():,} characters; "
                                     f"the limit is {max_field_chars or csv.field_size_limit():,}") from exc
            raise CatalogueError(f"{where} ({exc})") from exc
    return rows


def _delimiter(header: str) -> str:
    """Commas; or semicolons (a spreadsheet's "CSV" where the decimal mark is a comma) or tabs, when
    the header has those and no comma."""
    return "," if "," in header else next((d for d in ";\t" if d in header), ",")


def _check_header(path: Path, columns: list[str]) -> None:
    """Refuse empty and repeated column names: csv.DictReader would key the row by the last
    of the repeated columns (the others' values lost) and by '' for an unnamed one."""
    if unnamed := [i for i, c in enumerate(columns, 1) if not c.strip()]:
        many = len(unnamed) > 1
        raise CatalogueError(f"{path.name}: column{'s' if many else ''} {', '.join(map(str, unnamed))} of the header "
                             f"{'have' if many else 'has'} no name (header: {[c[:80] for c in columns[:20]]})")
    counts = Counter(columns)
    if repeated := [c for c in counts if counts[c] > 1]:
        raise CatalogueError(f"{path.name}: the header repeats the column{'s' if len(repeated) > 1 else ''} "
                             f"{', '.join(repr(c[:80]) for c in repeated)}; each column needs its own name")


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in MISSING_LABELS


def safe_image_path(root: Path, relative: str, extra_roots: tuple[Path, ...] = (),
                    resolved_roots: tuple[Path, ...] | None = None) -> Path:
    """Resolve a manifest's image path, refusing paths outside the catalogue folder
    (and the `extra_roots` it may also use, such as a label store's image folder).
    `resolved_roots`: those folders already resolved (many paths of one catalogue)."""
    path = (root / relative).resolve()
    if not any(path.is_relative_to(r) for r in resolved_roots or [r.resolve() for r in (root, *extra_roots)]):
        raise CatalogueError(f"image path {relative!r} leaves the catalogue folder {root.resolve()}")
    return path


@dataclass
class Catalogue:
    """The rows of one manifest (optionally one split of it) and how to read them."""

    config: CatalogueConfig
    rows: list[dict[str, str]]
    root: Path
    extra_roots: tuple[Path, ...] = ()  # other folders rows may take images from

    @classmethod
    def open(cls, config: CatalogueConfig, split: str | None = None, limit: int | None = None, *,
             photos_required: bool = True) -> "Catalogue":
        """The manifest's rows (of one split, the first `limit`); a row without an image path is refused,
        unless not `photos_required` (a prediction that writes each unreadable image's row with its error)."""
        rows = read_manifest(config.manifest)
        if not rows:
            raise CatalogueError(f"manifest {config.manifest} has no rows")
        needed = [config.image_column, *config.text_columns, *config.tasks]
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise CatalogueError(f"manifest {config.manifest} lacks columns {missing}; it has {sorted(rows[0])}")
        empty = [n for n, row in enumerate(rows, 1) if not str(row[config.image_column] or "").strip()] \
            if photos_required else []
        if empty:
            ids = config.id_column if config.id_column in rows[0] else None
            named = ", ".join(f"{n}" + (f" (id {rows[n - 1][ids]!r})" if ids else "") for n in empty[:5])
            raise CatalogueError(f"manifest {config.manifest}: {len(empty)} row{'s' * (len(empty) > 1)} without an "
                                 f"image path (an empty {config.image_column!r} cell), e.g. item {named} (counted "
                                 "from 1, the header and blank rows not counted): give each item its photo, or "
                                 "delete the row")
        catalogue = cls(config, rows, Path(config.manifest).resolve().parent)
        return catalogue.split(split, limit) if split or limit else catalogue

    @property
    def has_splits(self) -> bool:
        """Whether the manifest has a split column."""
        return bool(self.rows) and "split" in self.rows[0]

    def split(self, name: str | None, limit: int | None = None) -> "Catalogue":
        """Rows of one split (all rows when the manifest has no split column or `name` is None)."""
        catalogue = self.take(split_indices(self).get(name, [])) if name and self.has_splits else self
        return catalogue.take(range(min(limit, len(catalogue)))) if limit else catalogue

    def sample(self, size: int, seed: int = 0) -> "Catalogue":
        """`size` rows drawn at random (seeded), kept in their catalogue order; a larger `size` keeps a
        smaller one's rows (the first rows of one seeded permutation)."""
        order = np.random.default_rng(seed).permutation(len(self))[:size]
        return self.take(np.sort(order))

    def take(self, index) -> "Catalogue":
        """The rows `index`, in that order."""
        return replace(self, rows=[self.rows[i] for i in index])

    def __len__(self) -> int:
        return len(self.rows)

    def item_ids(self) -> list[str]:
        column = self.config.id_column
        if column and column in self.rows[0]:
            return [r[column] for r in self.rows]
        return [r[self.config.image_column] for r in self.rows]

    def texts(self) -> list[str]:
        return [join_text(r, self.config.text_columns) for r in self.rows]

    def image_paths(self) -> list[Path]:
        roots = tuple(r.resolve() for r in (self.root, *self.extra_roots))
        return [safe_image_path(self.root, r[self.config.image_column], self.extra_roots, roots) for r in self.rows]

    def labels(self, task: str) -> list[str | None]:
        return [None if is_missing(r.get(task)) else r[task].strip() for r in self.rows]

    def fingerprint(self) -> str:
        """Hash of what the features depend on: image paths and texts, not labels."""
        digest = hashlib.sha256(str(self.root).encode())
        for row, text in zip(self.rows, self.texts()):
            digest.update(row[self.config.image_column].encode() + b"\0" + text.encode() + b"\n")
        return digest.hexdigest()[:16]


class PhotoIndex:
    """Which items of a catalogue have a given photo, byte for byte. Files of the photo's size
    are hashed, once each, so a look-up in 40,000 photos costs a `stat` each; a photo known by its
    sha256 alone hashes every file once (2.8 s for fashion's 40,000)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._items = list(zip(catalogue.item_ids(), catalogue.image_paths()))
        self._by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
        for item_id, path in self._items:
            if path.is_file():
                self._by_size[path.stat().st_size].append((item_id, path))
        self._by_digest: dict[str, list[str]] | None = None
        self._hashes: dict[Path, str] = {}

    def with_file(self, photo: Path) -> list[str]:
        candidates = self._by_size.get(photo.stat().st_size, [])
        digest = file_sha256(photo) if candidates else None
        return [item_id for item_id, path in candidates if self._hash(path) == digest]

    def with_digest(self, digest: str) -> list[str]:
        if self._by_digest is None:
            self._by_digest = defaultdict(list)
            for item_id, path in self._items:
                if path.is_file():
                    self._by_digest[self._hash(path)].append(item_id)
        return self._by_digest.get(digest, [])

    def _hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = file_sha256(path)
        return self._hashes[path]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def join_text(row: dict[str, str], columns: list[str]) -> str:
    """The model's text for an item: its non-empty text columns joined with '. '."""
    return ". ".join(row[c].strip() for c in columns if row.get(c) and row[c].strip())


@dataclass
class LabelVocab:
    """The classes of one task, in a fixed order."""

    classes: list[str]

    @classmethod
    def build(cls, labels: list[str | None], min_count: int = 1) -> "LabelVocab":
        counts = Counter(label for label in labels if label is not None)
        return cls(sorted(label for label, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: list[str | None]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([IGNORE if lab is None else index.get(lab, UNKNOWN) for lab in labels], dtype=np.int64)


class ImageError(CMAClipError, ValueError):
    """A file that is not a usable image, with the reason in words."""


# Limits on what load_image decodes, checked from the header before any pixel is decoded:
MAX_IMAGE_PIXELS = 40_000_000  # decompression bombs
MAX_IMAGE_SIDE = 10_000  # px, either side: beyond any product photo, and bounds what a strip costs
MAX_ASPECT_RATIO = 20  # long side / short side: at 20:1 the model's 224 px letterbox holds an 11 px band
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # the decoders Pillow may use (JPEG includes MPO)
FORMAT_NAMES = "JPEG, PNG, WebP, GIF and BMP"
# Pillow parses each PNG chunk, JPEG marker segment (and stray byte) and GIF block before the first
# frame in Python, about 2 us each (GIF comments: quadratically); libjpeg decodes every block of the
# image again in each progressive scan. A 20 MB upload holds millions of either: minutes of CPU.
MAX_IMAGE_SEGMENTS = 50_000  # a photo has tens (a PNG written one IDAT chunk per row: one per row)
MAX_JPEG_SCANS = 32  # libjpeg's progressive script writes 10, mozjpeg's searched ones about as many
# load_image returns images whose longer side is at most this (a reduced decode where the format
# allows it): 4.5x the model's 224 px letterbox, so the model sees the same image as from a full decode
MAX_DECODED_SIDE = 1024


def load_image(path: str | Path, max_side: int | None = MAX_DECODED_SIDE) -> Image.Image:
    """Decode an image file (the first frame of an animation) with its longer side reduced
    to at most `max_side` pixels (None: full size): a JPEG is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg, other formats are decoded and then reduced. The mode is kept, except
    that a reduced palette, 1-bit or 16-bit image becomes RGB(A) or 8-bit grey (as
    `cma_clip.backbones.to_rgb` would), and the metadata (EXIF orientation) is kept.

    Refused with an `ImageError`: unreadable and truncated files, formats other than
    JPEG, PNG, WebP, GIF and BMP, and, from the header before decoding, images over
    `MAX_IMAGE_PIXELS`, `MAX_IMAGE_SIDE` or `MAX_ASPECT_RATIO`, and run-length-compressed
    BMPs (decoded in pure Python: seconds for a few-KB file)."""
    name = Path(path).name
    try:
        check_image_structure(path, name)
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            check_image_size(image.width, image.height, name)
            if image.format == "BMP" and image.info.get("compression") in (1, 2):
                raise ImageError(f"{name} is a run-length-compressed BMP, which is not read; "
                                 "save it as PNG or JPEG")
            if max_side and image.format in ("JPEG", "MPO") and max(image.size) > max_side:
                scale = max_side / max(image.size)  # libjpeg picks the smallest scale keeping both sides >= these
                image.draft(None, (max(1, math.ceil(image.width * scale)), max(1, math.ceil(image.height * scale))))
            image.load()
            return shrink_image(image, max_side) if max_side else image
    except ImageError:
        raise
    except IsADirectoryError as exc:  # a manifest row's empty image cell is its folder (named, never its path)
        raise ImageError(f"{name} is not a readable image (a folder, not a file: an empty image cell?)") from exc
    except FileNotFoundError as exc:
        web = " (an address on the web? images are read from files: download them and give their paths)" \
            if re.search(r"\b(https?|ftp|s3|gs):/", str(path)) else ""
        raise ImageError(f"image not found: {path}{web}") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked as it opens the file
        raise ImageError(f"{name} has too many pixels to decode safely (a decompression bomb?); "
                         f"the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        unknown = isinstance(exc, UnidentifiedImageError)
        why = "its content is not a known image format" if unknown else str(exc).replace(str(path), name)
        formats = f"; only {FORMAT_NAMES} are read" if unknown else ""  # no exception names, no server folders
        raise ImageError(f"{name} is not a readable image ({why}){formats}") from exc


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Refuse an image over the pixel, side or aspect ratio limit (or without pixels) with an `ImageError`."""
    size = f"{name} is {width}x{height} pixels"
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{size}; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        shown = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.2f}".rstrip("0").rstrip(".")
        raise ImageError(f"{size}, an aspect ratio of {shown}:1; the limit is {MAX_ASPECT_RATIO}:1 "
                         "(crop it to the product)")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(f"{size}; the limit is {MAX_IMAGE_SIDE:,} pixels a side")


def check_image_structure(path: str | Path, name: str = "the image") -> None:
    """Refuse a PNG, JPEG or GIF over `MAX_IMAGE_SEGMENTS` or `MAX_JPEG_SCANS` with an
    `ImageError`, from a walk over its chunk, marker or block headers that stops at the
    limit (a fraction of what Pillow would spend on them); other files pass."""
    with open(path, "rb") as handle:
        magic = handle.read(8)
        if magic == b"\x89PNG\r\n\x1a\n":
            count, what = _png_chunks(handle), "PNG chunks"
        elif magic[:6] in (b"GIF87a", b"GIF89a"):
            count, what = _gif_blocks(handle), "blocks before its first frame"
        elif magic[:2] == b"\xff\xd8":
            count, what = _jpeg_segments(handle), "marker segments or stray bytes before its image data"
            if count <= MAX_IMAGE_SEGMENTS and _jpeg_scans(handle) > MAX_JPEG_SCANS:
                raise ImageError(f"{name} is a JPEG in more than {MAX_JPEG_SCANS} progressive scans; libjpeg "
                                 "decodes the whole image again in each (a scan bomb?)")
        else:
            return
    if count > MAX_IMAGE_SEGMENTS:
        raise ImageError(f"{name} holds more than {MAX_IMAGE_SEGMENTS:,} {what}; reading them would take "
                         "seconds (save the image again to fix it)")


def _png_chunks(handle: io.BufferedReader) -> int:
    count = 0
    while count <= MAX_IMAGE_SEGMENTS:
        header = handle.read(8)
        if len(header) < 8:
            break
        count += 1
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            break
        handle.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return count


def _gif_blocks(handle: io.BufferedReader) -> int:
    """Extension sub-blocks and stray bytes before the first image descriptor (what Pillow's GIF opener reads)."""
    screen = handle.read(5)  # width, height, flags, background, aspect (after the 6-byte signature)
    if len(screen) == 5 and screen[2] & 0x80:
        handle.seek(3 << ((screen[2] & 7) + 1), os.SEEK_CUR)  # the global palette
    count = 0
    while count <= MAX_IMAGE_SEGMENTS:
        byte = handle.read(1)
        if byte in (b"", b",", b";"):  # the end, an image, the trailer
            break
        count += 1
        if byte == b"!":  # an extension: a label, then sub-blocks until an empty one
            handle.read(1)
            while count <= MAX_IMAGE_SEGMENTS and (size := handle.read(1)) not in (b"", b"\0"):
                count += 1
                handle.seek(size[0], os.SEEK_CUR)
    return count


def _jpeg_segments(handle: io.BufferedReader) -> int:
    """Marker segments, fill bytes and stray bytes from the start to the first scan, leaving `handle` there."""
    handle.seek(2)
    count = 0
    while count <= MAX_IMAGE_SEGMENTS:
        byte = handle.read(1)
        if not byte:
            break
        count += 1
        if byte != b"\xff":
            continue  # a stray byte: Pillow steps over it alone
        code = handle.read(1)
        if not code or code == b"\xda":  # the end, the first scan
            break
        if code == b"\xff":
            handle.seek(-1, os.SEEK_CUR)  # a fill byte before a marker
        elif not (code == b"\x00" or code == b"\x01" or b"\xd0" <= code <= b"\xd9"):  # those have no length
            length = handle.read(2)
            if len(length) < 2:
                break
            handle.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)
    return count


_SCAN_OR_END = re.compile(rb"\xff[\xd9\xda]")  # start of a scan, end of the image: only markers hold 0xFF then these


def _jpeg_scans(handle: io.BufferedReader) -> int:
    """Scans from the first (`handle` just after its marker) to the end of the image, counted up to the limit."""
    scans, tail = 1, b""
    while scans <= MAX_JPEG_SCANS and (block := handle.read(1 << 20)):
        data = tail + block
        for match in _SCAN_OR_END.finditer(data):
            if match.group() == b"\xff\xd9":
                return scans
            scans += 1
        tail = data[-1:] if data.endswith(b"\xff") else b""
    return scans


def shrink_image(image: Image.Image, max_side: int) -> Image.Image:
    """`image` resized (bicubic, after an integer box reduction) to fit `max_side` x `max_side`,
    or `image` itself when it fits. Modes Pillow cannot resize smoothly become the mode
    `to_rgb` would give them: palette -> RGB or RGBA (transparency kept), 1-bit -> 8-bit
    grey, 16/32-bit grey -> 8-bit grey (`to_8_bits`). The metadata (EXIF) is kept."""
    if max(image.size) <= max_side:
        return image
    info = image.info
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode == "I" or image.mode.startswith("I;16"):
        image = to_8_bits(image)
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    image.info = dict(info)
    return image


def to_8_bits(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey image (mode I;16*, I) as 8-bit grey (L), scaled so that its
    brightest pixel is 255 (a 16-bit ramp stays a ramp instead of clipping to white).
    Costs about 5 bytes a pixel for 16 bits (a lookup table), not 18 (float64 copies)."""
    array = np.asarray(image)
    top = max(int(array.max()), 1) if array.size else 1
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        table = np.clip(np.arange(65536) * (255.0 / top), 0, 255).astype(np.uint8)
        out = table[array]
    else:  # 32-bit: a float64 copy of 256 rows at a time
        out = np.empty(array.shape, np.uint8)
        for row in range(0, array.shape[0], 256):
            out[row:row + 256] = np.clip(array[row:row + 256] * (255.0 / top), 0, 255)
    result = Image.fromarray(out)
    result.info = dict(image.info)
    return result


SPLITS = ("train", "val", "test")


def split_indices(catalogue: Catalogue, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices per split: by the split column (train, val, test and any other name it
    holds); without one, the seeded 80/10/10 split training makes."""
    if catalogue.has_splits:
        names = np.array([r["split"] for r in catalogue.rows])
        return {s: np.nonzero(names == s)[0] for s in dict.fromkeys([*SPLITS, *names])}
    order = np.random.default_rng(seed).permutation(len(catalogue))
    a, b = int(0.8 * len(order)), int(0.9 * len(order))
    return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:])}


def limit_splits(catalogue: Catalogue, limit: int) -> Catalogue:
    """The first `limit` rows of every split (quick runs, tests)."""
    seen: dict[str, int] = {}
    keep = []
    for i, row in enumerate(catalogue.rows):
        split = row.get("split", "")
        if seen.get(split, 0) < limit:
            seen[split] = seen.get(split, 0) + 1
            keep.append(i)
    return catalogue.take(keep)


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs as a formula (OWASP)
# a cell that could run as a formula, behind any quotes already there: writing adds one quote (a spreadsheet
# shows the rest as text), reading takes one off, so a CSV export reads back as it was stored
QUOTED_FORMULA = re.compile("'*[" + re.escape("".join(FORMULA_PREFIXES)) + "]")


def write_table(path: str | Path, records: list[dict], columns: list[str] | None = None,
                spreadsheet: bool = False) -> Path:
    """Records as a CSV, JSONL or Parquet file (by its suffix; CSV columns default to the first
    record's keys; Parquet needs pyarrow), written atomically. A CSV text cell starting with
    = + - @, a tab or a carriage return (after any quotes) gets a leading ' so a spreadsheet shows it
    as text instead of running it (OWASP's rule for CSV injection), and `read_manifest` takes it off
    again; JSONL and Parquet are written as they are. `spreadsheet`: a CSV starts with a UTF-8
    byte-order mark, without which Excel reads the text as another encoding (`read_manifest` skips it)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        pa, pq = pyarrow_modules()
        binary = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), binary)
        atomic_write(path, binary.getvalue())
        return path
    buffer = io.StringIO()
    if path.suffix.lower() == ".csv":
        writer = csv.DictWriter(buffer, fieldnames=columns or (list(records[0]) if records else ["id"]))
        writer.writeheader()
        writer.writerows({k: _neutralise(v) for k, v in r.items()} for r in records)
    else:
        buffer.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    bom = spreadsheet and path.suffix.lower() == ".csv"
    atomic_write(path, buffer.getvalue().encode("utf-8-sig" if bom else "utf-8"))
    return path


def _neutralise(value: object) -> object:
    return f"'{value}" if isinstance(value, str) and QUOTED_FORMULA.match(value) else value


def _restore(value: str | None) -> str | None:
    """A CSV cell as it was before `_neutralise` (a spreadsheet reads a cell saved as '=x as =x too)."""
    return value[1:] if value and value[0] == "'" and QUOTED_FORMULA.match(value, 1) else value


def write_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written by `atomic_write`: whole or not at all, readable by all (safetensors'
    own `save_file` writes it in place, and owner-only: an app run as another user could not load it)."""
    from safetensors.torch import save  # here: reading catalogues never needs torch

    atomic_write(path, save(tensors, metadata=metadata))


def atomic_write(path: str | Path, data: bytes, keep_existing: bool = False) -> None:
    """Write through a synced temporary file renamed into place: readers see all or nothing.
    `keep_existing`: a file already at `path` stays (of writers racing to create it, the first wins, whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if not keep_existing:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # unlike a rename, refuses to replace
        except FileExistsError:
            pass
        Path(tmp).unlink()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
