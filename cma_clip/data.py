"""Catalogues (manifests, tasks, label vocabularies) and the feature cache.

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
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backbones import BackboneError, DualEncoder, EncoderOutput
from .errors import CMAClipError
from .runtime import bf16_supported, loader_workers

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


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMA_CLIP_CACHE", Path.home() / ".cache" / "cma_clip"))


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


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL manifest, every value as a string. A file that is not UTF-8,
    a broken CSV or JSON line, or a CSV row with more or fewer fields than the header is
    refused with a `CatalogueError` naming the row."""
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"manifest not found: {path}")
    try:
        return _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _read_csv(path)
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CatalogueError(f"{path.name}, line {number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise CatalogueError(f"{path.name}, line {number}: each line must be a JSON object")
                rows.append({k: "" if v is None else str(v) for k, v in record.items()})
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise CatalogueError(f"{path.name}, line {reader.line_num}: not readable as CSV ({exc})") from exc
    for number, row in enumerate(rows, 2):  # the header is row 1
        if None in row or None in row.values():  # csv marks extra fields with key None, missing ones with None
            fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
            raise CatalogueError(f"{path.name}, row {number}: {fields} fields where the header has "
                                 f"{len(reader.fieldnames)} (an unquoted comma or line break?)")
    return rows


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in MISSING_LABELS


def safe_image_path(root: Path, relative: str, extra_roots: tuple[Path, ...] = ()) -> Path:
    """Resolve a manifest's image path, refusing paths outside the catalogue folder
    (and the `extra_roots` it may also use, such as a label store's image folder)."""
    path = (root / relative).resolve()
    if not any(path.is_relative_to(r.resolve()) for r in (root, *extra_roots)):
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
    def open(cls, config: CatalogueConfig, split: str | None = None, limit: int | None = None) -> "Catalogue":
        rows = read_manifest(config.manifest)
        if not rows:
            raise CatalogueError(f"manifest {config.manifest} has no rows")
        needed = [config.image_column, *config.text_columns, *config.tasks]
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise CatalogueError(f"manifest {config.manifest} lacks columns {missing}; it has {sorted(rows[0])}")
        catalogue = cls(config, rows, Path(config.manifest).resolve().parent)
        return catalogue.split(split, limit) if split or limit else catalogue

    def split(self, name: str | None, limit: int | None = None) -> "Catalogue":
        """Rows of one split (all rows when the manifest has no split column or `name` is None)."""
        rows = self.rows
        if name and "split" in rows[0]:
            rows = [r for r in rows if r["split"] == name]
        return replace(self, rows=rows[:limit] if limit else rows)

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
        return [safe_image_path(self.root, r[self.config.image_column], self.extra_roots) for r in self.rows]

    def labels(self, task: str) -> list[str | None]:
        return [None if is_missing(r.get(task)) else r[task].strip() for r in self.rows]

    def fingerprint(self) -> str:
        """Hash of what the features depend on: image paths and texts, not labels."""
        digest = hashlib.sha256(str(self.root).encode())
        for row, text in zip(self.rows, self.texts()):
            digest.update(row[self.config.image_column].encode() + b"\0" + text.encode() + b"\n")
        return digest.hexdigest()[:16]


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


MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file (the first frame of an animation), refusing unreadable,
    truncated and oversized files with an `ImageError`."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{name} is {image.width}x{image.height} pixels; "
                                 f"the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
            if image.width < 1 or image.height < 1:
                raise ImageError(f"{name} has no pixels")
            image.load()
            return image
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"image not found: {path}") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked as it opens the file
        raise ImageError(f"{name} has too many pixels to decode safely (a decompression bomb?); "
                         f"the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).replace(str(path), name)  # the reason, without the server's folders
        raise ImageError(f"{name} is not a readable image ({exc.__class__.__name__}: {reason})") from exc


# ----------------------------------------------------------------------------- feature cache

FEATURE_FIELDS = ("image_tokens", "image_pooled", "text_tokens", "text_mask", "text_pooled")


@dataclass
class Features:
    """Frozen-backbone outputs for every item of a catalogue, as float16 arrays in memory."""

    image_tokens: np.ndarray  # [N, P, Ci]
    image_pooled: np.ndarray  # [N, Di]
    text_tokens: np.ndarray  # [N, L, Ct]
    text_mask: np.ndarray  # [N, L] bool
    text_pooled: np.ndarray  # [N, Dt]
    text_ids: np.ndarray  # [N, L] int32 token ids

    def __len__(self) -> int:
        return len(self.image_pooled)

    def take(self, index: np.ndarray) -> "Features":
        """The items `index`, in that order."""
        return Features(**{name: getattr(self, name)[index] for name in (*FEATURE_FIELDS, "text_ids")})

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> EncoderOutput:
        """A float32 batch, text trimmed to the longest sequence in it."""
        mask = self.text_mask[index]
        length = max(1, int(mask.sum(1).max()))

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device).float()

        return EncoderOutput(
            image_tokens=tensor(self.image_tokens[index]),
            image_pooled=tensor(self.image_pooled[index]),
            text_tokens=tensor(self.text_tokens[index, :length]),
            text_mask=torch.from_numpy(np.ascontiguousarray(mask[:, :length])).to(device),
            text_pooled=tensor(self.text_pooled[index]),
            text_ids=torch.from_numpy(self.text_ids[index, :length].astype(np.int64)).to(device),
        )


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers, so the backbone never waits."""

    def __init__(self, paths: list[Path], backbone: DualEncoder,
                 transform: Callable[[Image.Image, int], Image.Image] | None = None):
        self.paths, self.backbone, self.transform = paths, backbone, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """The pixels and "", or blank pixels and why the image cannot be used: the reason is
        raised in the main process, as an ImageError without the worker's traceback."""
        try:
            image = load_image(self.paths[i])
        except ImageError as exc:
            size = self.backbone.image_size
            return torch.zeros(3, size, size), str(exc)
        if self.transform is not None:
            image = self.transform(image, i)
        return self.backbone.preprocess([image])[0], ""


def image_batches(paths: list[Path], backbone: DualEncoder, batch_size: int = 64, num_workers: int | None = None,
                  transform: Callable[[Image.Image, int], Image.Image] | None = None) -> Iterator[torch.Tensor]:
    """Preprocessed pixels of `paths` in order, `batch_size` at a time, decoded (and changed by
    `transform(image, index)`, if given) in `num_workers` DataLoader workers (default:
    `runtime.loader_workers`). An unusable image raises `ImageError`."""
    workers = loader_workers(backbone.device) if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(_ImageDataset(paths, backbone, transform), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    for pixels, errors in loader:
        if any(errors):
            raise ImageError(next(e for e in errors if e))
        yield pixels


def split_indices(catalogue: Catalogue, seed: int) -> dict[str, np.ndarray]:
    """Row indices per split; without a split column, a seeded 80/10/10 split."""
    if "split" in catalogue.rows[0]:
        names = np.array([r["split"] for r in catalogue.rows])
        return {s: np.nonzero(names == s)[0] for s in ("train", "val", "test")}
    order = np.random.default_rng(seed).permutation(len(catalogue))
    a, b = int(0.8 * len(order)), int(0.9 * len(order))
    return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:])}


def feature_key(backbone: DualEncoder, catalogue: Catalogue) -> str:
    precision = "bf16" if bf16_supported(backbone.device) else "fp32"
    raw = f"{backbone.cache_key()}|{precision}|{catalogue.config.max_text_tokens}|{catalogue.fingerprint()}"
    return f"{catalogue.config.name}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def _cache_folder(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "features" / feature_key(backbone, catalogue)


def has_cached_features(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None = None) -> bool:
    """Whether `extract_features` would read the catalogue's features from the cache."""
    return (_cache_folder(backbone, catalogue, cache_dir) / "meta.json").exists()


def extract_features(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None = None,
                     batch_size: int = 64, num_workers: int | None = None, progress: bool = True,
                     memory_map: bool = False) -> Features:
    """Backbone features of every item, computed once and cached on disk as float16 .npy files.

    The cache entry is keyed by the backbone's weights and preprocessing, the precision,
    the text length and the manifest's images and texts; any change builds a new entry.
    Entries are written to a temporary folder and renamed when complete, so an
    interrupted build never leaves a half-written cache behind. Images are decoded in
    `num_workers` DataLoader workers (default: `runtime.loader_workers`). With `memory_map`,
    the arrays stay on disk and only the rows read are loaded (for taking a few rows).
    """
    folder = _cache_folder(backbone, catalogue, cache_dir)
    if not (folder / "meta.json").exists():
        _build_cache(backbone, catalogue, folder, batch_size, num_workers, progress)
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if memory_map else None) for name in FEATURE_FIELDS}
    return Features(**arrays, text_ids=_token_ids(backbone, catalogue, folder))


def _token_ids(backbone: DualEncoder, catalogue: Catalogue, folder: Path) -> np.ndarray:
    """Token ids of the texts: tokenizer output only (seconds), so computed on first use and kept."""
    path = folder / "text_ids.npy"
    if not path.exists():
        ids = backbone.tokenize(catalogue.texts(), catalogue.config.max_text_tokens).ids.numpy().astype(np.int32)
        tmp = path.with_name(f"text_ids.tmp{os.getpid()}.npy")
        np.save(tmp, ids)
        tmp.rename(path)
    return np.load(path)


def _build_cache(backbone: DualEncoder, catalogue: Catalogue, folder: Path, batch_size: int,
                 num_workers: int | None, progress: bool) -> None:
    n, tokens = len(catalogue), catalogue.config.max_text_tokens
    texts = catalogue.texts()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = {
        "image_tokens": (n, backbone.num_patches, backbone.image_token_dim),
        "image_pooled": (n, backbone.image_pooled_dim),
        "text_tokens": (n, tokens, backbone.text_token_dim),
        "text_mask": (n, tokens),
        "text_pooled": (n, backbone.text_pooled_dim),
    }
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", shape=shape,
                                              dtype=np.bool_ if name == "text_mask" else np.float16)
              for name, shape in shapes.items()}
    batches = image_batches(catalogue.image_paths(), backbone, batch_size, num_workers)
    device = backbone.device
    start = 0
    try:
        with torch.no_grad():
            for pixels in tqdm(batches, total=math.ceil(n / batch_size), desc=f"features {catalogue.config.name}",
                               disable=not progress):
                stop = start + len(pixels)
                text = backbone.tokenize(texts[start:stop], tokens)
                out = backbone(pixels.to(device), text.to(device))
                for name in FEATURE_FIELDS:
                    with np.errstate(over="ignore"):  # checked below, with a clearer message
                        arrays[name][start:stop] = getattr(out, name).cpu().numpy()
                    if name != "text_mask" and not np.isfinite(arrays[name][start:stop]).all():
                        raise BackboneError(f"the backbone's {name} exceed float16's range (65504) or are not "
                                            "finite, so its features cannot be cached")
                start = stop
    except BaseException:  # an unusable image, Ctrl-C, out of memory: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for array in arrays.values():
        array.flush()
    (tmp / "meta.json").write_text(json.dumps({"items": n, "backbone": backbone.cache_key(),
                                               "catalogue": catalogue.config.name}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
