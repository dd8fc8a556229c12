"""Issue 14's fair linear baseline, and what averaging models' probabilities buys.

    python -m cma_clip.lab.late_ensembles --checkpoints RUN [RUN ...] --out-json late.json

On the checkpoints' catalogue (its split column), with the features their training cached:
- **linear late fusion**: one logistic regression per task on [TF-IDF of the text (word 1-2
  grams) ; the pooled image embedding ; the pooled text embedding ; the foreground colour
  descriptor], fitted on `train`, its regularisation chosen on `val`;
- each checkpoint alone, the **seed ensemble** (the mean of their probabilities) and the
  ensemble **+ linear** (a convex mix, its weight chosen on `val`).

Every method gets its auto-accept thresholds from `val` by the rule the checkpoints use
(`evaluate.THRESHOLD_RULE`: 90% precision with 99% confidence, one cluster per text) and is
scored on `test` with them: R@90P beside the operating figures, as `cma_clip.evaluate` reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..checkpoint import CheckpointConfig, load_backbone, load_checkpoint
from ..data import Catalogue, limit_splits, split_indices
from ..evaluate import THRESHOLD_RULE, item_groups, predict_probabilities, score, task_targets, thresholds_at_90
from ..features import Features, extract_features
from ..runtime import resolve_device

REGULARISATION = (0.1, 0.3, 1.0, 3.0)  # logistic regression's C, chosen per task on val
MIX_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # the linear model's share in a mix


def rows_of(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each task's array at `rows`."""
    return {task: array[rows] for task, array in arrays.items()}


def val_recall(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], val: np.ndarray) -> float:
    """Mean R@90P over the tasks on the val rows: what C and the mix weight are chosen by."""
    return score(rows_of(probs, val), rows_of(targets, val))["mean"]["recall_at_90_precision"]


def linear_design(texts: list[str], features: Features, train_rows: np.ndarray):
    """The linear model's inputs for every item: TF-IDF fitted on the train rows, beside the
    pooled embeddings and colour descriptor standardised on them (sparse, CSR)."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import StandardScaler

    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit([texts[i] for i in train_rows])
    dense = np.hstack([np.asarray(array, np.float32)
                       for array in (features.image_pooled, features.text_pooled, features.colour)])
    dense = StandardScaler().fit(dense[train_rows]).transform(dense) / np.sqrt(dense.shape[1] / 64)
    return sparse.hstack([words.transform(texts), sparse.csr_matrix(dense)]).tocsr()


def linear_probabilities(design, targets: dict[str, np.ndarray], classes: dict[str, list[str]],
                         splits: dict[str, np.ndarray], log=print) -> dict[str, np.ndarray]:
    """Per task, the probabilities over the checkpoint's classes of every item, from a logistic
    regression fitted on the train rows' known labels, its C the one with the best val R@90P."""
    from sklearn.linear_model import LogisticRegression

    out = {}
    for task, target in targets.items():
        fit_rows = splits["train"][target[splits["train"]] >= 0]
        best = None
        for c in REGULARISATION:
            model = LogisticRegression(C=c, max_iter=300).fit(design[fit_rows], target[fit_rows])
            probs = np.zeros((design.shape[0], len(classes[task])), np.float32)
            probs[:, model.classes_] = model.predict_proba(design)
            r90 = val_recall({task: probs}, {task: target}, splits["val"])
            log(f"  linear {task} C={c}: val R@90P {r90:.3f}")
            if best is None or r90 > best[0]:
                best = (r90, probs)
        out[task] = best[1]
    return out


def mixed(parts: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The weighted mean of several methods' probabilities, task by task."""
    return {task: sum(w * p[task] for w, p in zip(weights, parts)) / sum(weights) for task in parts[0]}


def val_thresholds(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], splits: dict[str, np.ndarray],
                   groups: np.ndarray) -> dict[str, float | None]:
    """Each task's auto-accept threshold from the val rows, by the checkpoints' rule."""
    val = splits["val"]
    return thresholds_at_90(rows_of(probs, val), rows_of(targets, val), THRESHOLD_RULE, groups[val])


def operating_report(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], splits: dict[str, np.ndarray],
                     groups: np.ndarray) -> dict:
    """Thresholds from val by the checkpoints' rule, then the test report with them."""
    test = splits["test"]
    return score(rows_of(probs, test), rows_of(targets, test), val_thresholds(probs, targets, splits, groups),
                 groups[test])


class ScoringData(NamedTuple):
    """What scoring a checkpoint's catalogue needs: its rows, splits, cached features, targets and text groups."""

    catalogue: Catalogue
    splits: dict[str, np.ndarray]
    features: Features
    targets: dict[str, np.ndarray]
    groups: np.ndarray


def scoring_data(checkpoint: Path, config: CheckpointConfig, device, data_root: str | None = None,
                 cache_dir: str | None = None) -> ScoringData:
    """The catalogue a checkpoint was trained on (its limit and split seed), with the features its
    training cached (the colour descriptor too: models without colour tokens ignore it)."""
    catalogue = Catalogue.open(config.catalogue_on(config.training_manifest(data_root)))
    if config.train.limit:  # the rows the runs were trained and calibrated on
        catalogue = limit_splits(catalogue, config.train.limit)
    features = extract_features(load_backbone(checkpoint, config, device), catalogue, cache_dir, memory_map=True,
                                colour=True, progress=False)
    return ScoringData(catalogue, split_indices(catalogue, config.train.splits_seed), features,
                       task_targets(config, catalogue), item_groups(features, np.arange(len(features))))


def run(checkpoints: list[Path], data_root: str | None = None, cache_dir: str | None = None,
        linear_file: Path | None = None, log=print) -> dict:
    """Every method's test report (and the val R@90P of each mix weight tried). `linear_file`
    (.npz): the linear model's probabilities, read from there when it exists (they depend on the
    catalogue only, not on the checkpoints: the features always carry the colour descriptor),
    else fitted and written there."""
    device = resolve_device()
    models = [load_checkpoint(c, device) for c in checkpoints]
    config: CheckpointConfig = models[0][1]
    if any(c.classes != config.classes for _, c in models):
        raise SystemExit("the checkpoints must share their tasks and classes (one catalogue)")
    catalogue, splits, features, targets, groups = scoring_data(checkpoints[0], config, device, data_root, cache_dir)
    every = np.arange(len(catalogue))
    model_probs = [predict_probabilities(m, features, every) for m, _ in models]
    if linear_file is not None and linear_file.exists():
        with np.load(linear_file) as kept:
            linear = {task: kept[task] for task in targets}
        if any(p.shape != (len(catalogue), len(config.classes[t])) for t, p in linear.items()):
            raise SystemExit(f"{linear_file} holds another catalogue's probabilities")
    else:
        log("linear late fusion: fitting")
        linear = linear_probabilities(linear_design(catalogue.texts(), features, splits["train"]), targets,
                                      config.classes, splits, log)
        if linear_file is not None:
            np.savez_compressed(linear_file, **linear)
    ensemble = mixed(model_probs, [1.0] * len(model_probs))
    val_r90 = {w: val_recall(mixed([ensemble, linear], [1 - w, w]), targets, splits["val"]) for w in MIX_WEIGHTS}
    weight = float(max(val_r90, key=val_r90.get))
    methods = {f"checkpoint {i + 1} ({c})": p for i, (c, p) in enumerate(zip(checkpoints, model_probs))}
    methods.update({"linear late fusion": linear, f"mean of {len(models)} checkpoints": ensemble,
                    f"mean of {len(models)} checkpoints + linear (weight {weight:.1f}, from val)":
                        mixed([ensemble, linear], [1 - weight, weight])})
    return {"catalogue": config.catalogue.name, "threshold_rule": THRESHOLD_RULE,
            "mix_weight_val_r90p": {str(w): r for w, r in val_r90.items()},
            "methods": {name: operating_report(p, targets, splits, groups) for name, p in methods.items()}}


def format_rows(doc: dict) -> str:
    tasks = list(next(iter(doc["methods"].values()))["tasks"])
    lines = [f"{'method':70s} " + " ".join(f"{t[:10]:>10s}" for t in tasks) + "   mean R@90P  op. recall"]
    for name, report in doc["methods"].items():
        cells = " ".join(f"{report['tasks'][t]['recall_at_90_precision']:10.3f}" for t in tasks)
        lines.append(f"{name[-70:]:70s} {cells}   {report['mean']['recall_at_90_precision']:10.3f}"
                     f"  {report['mean']['operating_recall']:10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.late_ensembles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", type=Path, required=True, help="runs of one catalogue")
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--linear-probabilities", type=Path,
                        help=".npz: the linear model's probabilities, kept there for the next run on this catalogue")
    args = parser.parse_args(argv)
    doc = run(args.checkpoints, linear_file=args.linear_probabilities,
              log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_rows(doc))
    if args.out_json:
        args.out_json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
