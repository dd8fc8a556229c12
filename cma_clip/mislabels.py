"""Suspected mislabels: catalogue labels that a confident out-of-fold prediction disagrees with.

Every labelled item of a task is predicted by a linear head (logistic regression on the top
256 whitened principal components of the cached backbone's pooled image and text embeddings)
trained on the other k-1 folds, so no item is judged by a head that saw its own label.
cleanlab's `find_label_issues` then picks the items whose label the out-of-fold probabilities
contradict (confident learning), ranked by self-confidence: the out-of-fold probability of the
catalogue's own label, lowest first.

Missing labels ("", "NA", ...) are skipped. A class with fewer labelled items than folds is
left out (its items are neither fitted nor ranked, and the queue names the class): some fold's
head would never have seen it, so its items would be flagged for being rare, not for being wrong.
The ranked queue is cached as JSON under the cache dir, keyed by the catalogue's features
(backbone and catalogue fingerprint), the task, its labels and the settings.

    python -m cma_clip.mislabels --catalogue hm-articles --task colour_group_name --top 50
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from PIL import Image, ImageDraw, ImageFont
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from .backbones import DualEncoder, letterbox
from .data import Catalogue, CatalogueConfig, CatalogueError
from .features import Features, default_cache_dir, extract_features, feature_key
from .runtime import exit_on_stop_signals

METHOD = "pca256-logreg-v1"  # part of the queue's cache key: change it when the method changes
COMPONENTS = 256  # whitened principal components the heads see, at most one per ITEMS_PER_COMPONENT items
ITEMS_PER_COMPONENT = 10  # fewer items per component overfit: on 300 items, 256 components lose 66 accuracy points
C = 0.02  # inverse L2 strength of the heads


@dataclass
class Suspect:
    """One catalogue label that the out-of-fold prediction disagrees with."""

    item_id: str
    image: str  # path of the item's image
    text: str
    label: str  # the catalogue's label
    suggested: str  # the out-of-fold prediction
    confidence: float  # out-of-fold probability of `suggested`
    quality: float  # label quality score: out-of-fold probability of `label` (low = suspect)


@dataclass
class MislabelQueue:
    """The ranked suspects of one task, and what the ranking covered."""

    catalogue: str
    task: str
    suspects: list[Suspect]
    scored: int  # labelled items that were ranked
    missing: int  # items without a label, skipped
    rare_classes: dict[str, int] = field(default_factory=dict)  # classes left out: items per class
    accuracy: float = 0.0  # out-of-fold accuracy of the heads on the scored items
    seconds: float = 0.0  # time to fit the heads and rank (features cached)


def feature_matrix(features: Features) -> np.ndarray:
    """[pooled image ; pooled text], each embedding L2-normalised, as float32 [N, Di + Dt]."""
    parts = []
    for pooled in (features.image_pooled, features.text_pooled):
        array = np.asarray(pooled, dtype=np.float32)
        parts.append(array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-6))
    return np.hstack(parts)


def out_of_fold_probabilities(features_matrix: np.ndarray, labels: np.ndarray, folds: int = 5,
                              seed: int = 0) -> np.ndarray:
    """Class probabilities [N, K] of each item from a logistic regression fitted on the other
    folds (stratified). `labels` are 0..K-1, each class with at least `folds` items."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes)
    if counts.min() < folds:
        raise ValueError(f"class {int(counts.argmin())} has {counts.min()} items, fewer than {folds} folds")
    x = np.asarray(features_matrix, dtype=np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)  # unsupervised: fitted on all items, no label leaks
    components = max(1, min(COMPONENTS, x.shape[1], len(x) // ITEMS_PER_COMPONENT))
    x = PCA(components, whiten=True, random_state=seed).fit_transform(x).astype(np.float32)
    probabilities = np.zeros((len(labels), classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(x, labels):
        head = LogisticRegression(C=C, max_iter=200, tol=1e-3)
        head.fit(x[train], labels[train])
        probabilities[np.ix_(held_out, head.classes_)] = head.predict_proba(x[held_out])
    return probabilities


def _queue_path(catalogue: Catalogue, task: str, backbone: DualEncoder, cache_dir: Path, folds: int,
                seed: int) -> Path:
    labels = "\n".join(label or "" for label in catalogue.labels(task))
    raw = f"{METHOD}|{feature_key(backbone, catalogue)}|{task}|{folds}|{seed}|{labels}"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return cache_dir / "mislabels" / f"{catalogue.config.name}-{task}-{digest}.json"


def mislabel_queue(catalogue: Catalogue, task: str, backbone: DualEncoder, cache_dir: str | Path | None = None,
                   folds: int = 5, seed: int = 0,
                   progress: Callable[[float, str], None] | None = None) -> MislabelQueue:
    """The ranked suspects of `task` over all of `catalogue`'s items, read from the cache
    when this catalogue, backbone, task, labels and settings were ranked before; `progress`
    hears how far the features a first ranking computes are (`features.extract_features`)."""
    if task not in catalogue.config.tasks:
        raise CatalogueError(f"{catalogue.config.name} has no task {task!r}; its tasks: {catalogue.config.tasks}")
    cache_dir = Path(cache_dir or default_cache_dir())
    path = _queue_path(catalogue, task, backbone, cache_dir, folds, seed)
    if path.exists():
        stored = json.loads(path.read_text())
        return MislabelQueue(**{**stored, "suspects": [Suspect(**s) for s in stored["suspects"]]})
    features = extract_features(backbone, catalogue, cache_dir, progress=progress if progress is not None else False,
                                memory_map=True)
    if progress is not None:
        progress(1.0, "ranking the labels (heads trained on the other folds)")
    queue = _rank(catalogue, task, feature_matrix(features), folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(queue)))
    tmp.rename(path)
    return queue


def suspected_mislabels(catalogue: Catalogue, task: str, backbone: DualEncoder, cache_dir: str | Path | None = None,
                        folds: int = 5, seed: int = 0, top: int | None = None) -> list[Suspect]:
    """The `top` most suspect labels of `task` (all suspects when None), most suspect first."""
    return mislabel_queue(catalogue, task, backbone, cache_dir, folds, seed).suspects[:top]


def _rank(catalogue: Catalogue, task: str, x: np.ndarray, folds: int, seed: int) -> MislabelQueue:
    start = time.perf_counter()
    labels = catalogue.labels(task)
    counts = Counter(label for label in labels if label is not None)
    rare = {c: n for c, n in sorted(counts.items()) if n < folds}
    classes = sorted(c for c in counts if c not in rare)
    if len(classes) < 2:
        raise CatalogueError(f"{task} has {len(classes)} class(es) with at least {folds} labelled items; "
                             "ranking needs two")
    index = {c: i for i, c in enumerate(classes)}
    rows = np.array([i for i, label in enumerate(labels) if label in index])
    y = np.array([index[labels[i]] for i in rows])
    probabilities = out_of_fold_probabilities(x[rows], y, folds, seed)
    issues = find_label_issues(y, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(y, probabilities, method="self_confidence")
    ids, texts, images = catalogue.item_ids(), catalogue.texts(), catalogue.image_paths()
    suspects = []
    for i in issues:
        row, best = rows[i], int(probabilities[i].argmax())
        suspects.append(Suspect(item_id=ids[row], image=str(images[row]), text=texts[row], label=labels[row],
                                suggested=classes[best], confidence=round(float(probabilities[i, best]), 4),
                                quality=float(f"{quality[i]:.4g}")))
    return MislabelQueue(catalogue=catalogue.config.name, task=task, suspects=suspects, scored=len(rows),
                         missing=labels.count(None), rare_classes=rare,
                         accuracy=round(float((probabilities.argmax(1) == y).mean()), 4),
                         seconds=round(time.perf_counter() - start, 1))


SHEET_COLUMNS, SHEET_ROWS, CELL = 5, 2, 200  # contact sheets: 10 suspects each, 200 px images


def contact_sheets(suspects: list[Suspect], folder: str | Path, name: str) -> list[Path]:
    """Draw the suspects, SHEET_COLUMNS x SHEET_ROWS per JPEG, each with its enlarged image, rank,
    id, catalogue label (red), suggestion (green) and text, for checking the queue by eye."""
    font = ImageFont.load_default(12)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_sheet, height = SHEET_COLUMNS * SHEET_ROWS, CELL + 100
    paths = []
    for first in range(0, len(suspects), per_sheet):
        sheet = Image.new("RGB", (SHEET_COLUMNS * CELL, SHEET_ROWS * height), "white")
        draw = ImageDraw.Draw(sheet)
        for k, s in enumerate(suspects[first:first + per_sheet]):
            x, y = k % SHEET_COLUMNS * CELL, k // SHEET_COLUMNS * height
            with Image.open(s.image) as image:
                sheet.paste(letterbox(image, CELL - 8), (x + 4, y + 4))
            lines = [(f"#{first + k + 1}  {s.item_id}", "black"), (f"label: {s.label}", "firebrick"),
                     (f"suggested: {s.suggested} ({s.confidence:.2f})", "darkgreen"),
                     *((line, "dimgray") for line in textwrap.wrap(s.text, 31)[:4])]
            for j, (line, colour) in enumerate(lines):
                draw.text((x + 4, y + CELL + 2 + 14 * j), line, fill=colour, font=font)
            draw.rectangle((x, y, x + CELL - 1, y + height - 1), outline="lightgray")
        paths.append(folder / f"{name}-{first + 1:02d}-{first + per_sheet:02d}.jpg")
        sheet.save(paths[-1], quality=55)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.mislabels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", required=True, help="bundled catalogue name or config JSON")
    parser.add_argument("--task", required=True)
    parser.add_argument("--top", type=int, default=50, help="how many suspects to show (0: all)")
    parser.add_argument("--out", help="write the suspects to this CSV")
    parser.add_argument("--sheets", help="draw the shown suspects as contact-sheet JPEGs in this folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="feature and queue cache (default: $CMA_CLIP_CACHE)")
    parser.add_argument("--data-root", help="where the catalogues live (default: $CMA_CLIP_DATA)")
    args = parser.parse_args(argv)
    for flag, value, low in (("--top", args.top, 0), ("--folds", args.folds, 2), ("--seed", args.seed, 0)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, not {value}")
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder: give the CSV file to write")
    if args.sheets and Path(args.sheets).exists() and not Path(args.sheets).is_dir():
        parser.error(f"--sheets {args.sheets} is a file: give the folder to draw the sheets in")
    from .backbones import shared_backbone

    try:
        catalogue = Catalogue.open(CatalogueConfig.load(args.catalogue, args.data_root))
        queue = mislabel_queue(catalogue, args.task, shared_backbone("bundled", "cpu"), args.cache_dir,
                               args.folds, args.seed)
    except CatalogueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suspects = queue.suspects[:args.top or None]
    print(f"{queue.catalogue} / {queue.task}: {len(queue.suspects)} suspects among {queue.scored} labelled items "
          f"(out-of-fold accuracy {queue.accuracy:.3f}, {queue.seconds:.1f} s); {queue.missing} without a label; "
          f"rare classes left out: {queue.rare_classes or 'none'}")
    for rank, s in enumerate(suspects, 1):
        print(f"{rank:4d}  {s.item_id}  {s.label!r} -> {s.suggested!r} ({s.confidence:.2f}, "
              f"quality {s.quality:.2g})  {s.text[:60]}")
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["rank", *Suspect.__dataclass_fields__])
            writer.writeheader()
            writer.writerows({"rank": rank, **asdict(s)} for rank, s in enumerate(suspects, 1))
    if args.sheets:
        contact_sheets(suspects, args.sheets, f"{queue.catalogue}-{queue.task}")
    return 0


if __name__ == "__main__":
    exit_on_stop_signals()
    sys.exit(main())
