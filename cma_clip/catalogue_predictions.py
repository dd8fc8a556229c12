"""A checkpoint's predictions for a whole split of its catalogue, computed once and kept on disk.

A review queue over thousands of catalogue items then opens without decoding or encoding a
single image: the class probabilities (every class) and modality weights of the split's items
come from the feature cache (`features.extract_features`, the backbone run once per
catalogue) through the model in large batches (`evaluate.predict_probabilities`), and are
kept under `$CMA_CLIP_CACHE/predictions/`, keyed by the checkpoint's weights and classes
(`Predictor.fingerprint`), the catalogue's feature key (backbone, precision, text length,
images and texts) and the split: any change computes a new entry. Written to a temporary
file and renamed, so an interrupted run leaves nothing half-written. Beside them, which photos
are one flat colour (`DualEncoder.blank_photos`: never auto-accepted), from the photos decoded
once more when the entry is made (15 s for H&M's 9,999 photos on 2 cores).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .data import Catalogue, split_indices
from .evaluate import predict_probabilities
from .features import default_cache_dir, extract_features, feature_key, has_cached_features, image_batches
from .predict import Predictor, Scores


def predictions_path(predictor: Predictor, catalogue: Catalogue, split: str | None,
                     cache_dir: str | Path | None = None) -> Path:
    """Where the split's predictions by this checkpoint are kept."""
    raw = f"{predictor.fingerprint}|{feature_key(predictor.backbone, catalogue)}|{split or 'all'}"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "predictions" / f"{catalogue.config.name}-{split or 'all'}-{digest}.npz"


def catalogue_predictions(predictor: Predictor, catalogue: Catalogue, split: str | None,
                          cache_dir: str | Path | None = None, build_features: bool = False) -> Scores | None:
    """The predictions for the rows of `catalogue.split(split)` (every row when `split` is None), in
    that order. `catalogue` is the whole catalogue the features were cached for. Read from disk
    when kept; else computed from the cached features and kept. None when the catalogue's features
    are not cached (unless `build_features`: then they are built first, minutes per 10,000 items)."""
    path = predictions_path(predictor, catalogue, split, cache_dir)
    items = catalogue.split(split)
    ids = items.item_ids()
    if path.exists():
        with np.load(path) as stored:
            if stored["item_ids"].tolist() == ids:
                scores = _scores(stored, predictor.tasks)
                if scores.blank_photo is not None:
                    return scores
                scores.blank_photo = blank_photos(predictor, items)  # kept before they were
                _keep(path, scores, ids)
                return scores
    if not build_features and not has_cached_features(predictor.backbone, catalogue, cache_dir):
        return None
    features = extract_features(predictor.backbone, catalogue, cache_dir, progress=False, memory_map=True,
                                colour=predictor.model.cfg.colour)
    index = split_indices(catalogue)[split] if split and catalogue.has_splits else None  # as Catalogue.split
    weights: dict[str, list[np.ndarray]] = {t: [] for t in predictor.tasks}

    def keep_weights(out) -> None:
        for task, w in out.modality_weights.items():
            weights[task].append(w.float().cpu().numpy())

    probabilities = predict_probabilities(predictor.model, features, index, on_output=keep_weights)
    scores = Scores({t: p.astype(np.float32) for t, p in probabilities.items()},
                    {t: np.concatenate(w) if w else np.zeros((0, 2), np.float32) for t, w in weights.items()},
                    blank_photos(predictor, items))
    _keep(path, scores, ids)
    return scores


def _keep(path: Path, scores: Scores, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"p:{t}": p for t, p in scores.probabilities.items()}
    arrays.update({f"w:{t}": w for t, w in scores.modality_weights.items()}, blank_photo=scores.blank_photo)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, item_ids=np.array(ids, dtype=str), **arrays)
    tmp.rename(path)


def blank_photos(predictor: Predictor, items: Catalogue) -> np.ndarray:
    """[items] bool: which photos are one flat colour, decoded as the model sees them."""
    backbone = predictor.backbone
    batches = image_batches(items.image_paths(), backbone, 128)
    parts = [backbone.blank_photos(pixels).cpu().numpy() for pixels in batches]
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def _scores(stored, tasks: list[str]) -> Scores:
    return Scores({t: stored[f"p:{t}"] for t in tasks}, {t: stored[f"w:{t}"] for t in tasks},
                  stored["blank_photo"] if "blank_photo" in stored else None)
