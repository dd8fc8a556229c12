"""Evaluate a checkpoint on a manifest.

    python -m cma_clip.evaluate --checkpoint checkpoints/hm-articles \\
        --manifest "${CMA_CLIP_DATA:-../shared/data}/hm-articles/articles.csv" --split test --out-json report.json

Prints a table and writes JSON: {"tasks": {task: {accuracy, macro_f1,
recall_at_90_precision, n, threshold, auto_accepted, auto_accept_precision,
auto_accept_precision_ci, operating_recall}}, "mean": {..., operating_recall}}: the
auto-accept figures use the checkpoint's own thresholds (chosen on val), R@90P picks its
threshold on the evaluated items themselves (docs/THRESHOLDS.md). A manifest without a split column is
evaluated whole, except the one the checkpoint was trained on: there --split takes the
seeded split training made. Features come from the training's cache when the manifest
has one. This command line is a public contract: keep it stable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .align import label_embeddings, zero_shot_probabilities
from .backbones import DualEncoder
from .checkpoint import CheckpointConfig, CheckpointError, load_backbone, load_checkpoint, require_finished
from .data import Catalogue, CatalogueError, LabelVocab, atomic_write, limit_splits, split_indices
from .errors import CMAClipError
from .features import Features, extract_features, has_cached_features
from .metrics import (METRIC_NAMES, mean_metrics, operating_point, task_metrics, threshold_at_precision,
                      threshold_with_confidence)
from .model import Classifier, CMAOutput
from .runtime import autocast, exit_on_stop_signals, output_file_problem, resolve_device

@torch.no_grad()
def iter_outputs(model: Classifier, features: Features, index: np.ndarray | None = None,
                 batch_size: int = 512, return_attention: bool = False) -> Iterator[CMAOutput]:
    """The model's outputs on the items `index` of `features` (all items when None), batch by batch.

    `features` is anything with `__len__` and `batch(index, device) -> EncoderOutput`."""
    index = np.arange(len(features)) if index is None else np.asarray(index)
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(index), batch_size):
        with autocast(device):
            yield model(features.batch(index[start:start + batch_size], device), return_attention=return_attention)


def predict_probabilities(model: Classifier, features: Features, index: np.ndarray | None = None,
                          batch_size: int = 512, return_attention: bool = False,
                          on_output: Callable[[CMAOutput], None] | None = None) -> dict[str, np.ndarray]:
    """Class probabilities per task for the items `index` of `features` (all items when None).
    `on_output` sees each batch's outputs too (modality weights, attention maps on request)."""
    chunks: dict[str, list[np.ndarray]] = {task: [] for task in model.tasks}
    for out in iter_outputs(model, features, index, batch_size, return_attention):
        if on_output is not None:
            on_output(out)
        for task, logits in out.logits.items():
            chunks[task].append(logits.float().softmax(-1).cpu().numpy())
    return {task: np.concatenate(parts) if parts else np.zeros((0, model.cfg.tasks[task]))
            for task, parts in chunks.items()}


@torch.no_grad()
def zero_shot_probabilities_for(model: Classifier, backbone: DualEncoder, classes: dict[str, list[str]],
                                features: Features, batch_size: int = 512) -> dict[str, np.ndarray]:
    """The paper's "raw CLIP": image-to-prompt similarity in the aligned space, per task."""
    device = next(model.parameters()).device
    prompts = {task: label_embeddings(model.align, backbone, labels) for task, labels in classes.items()}
    out: dict[str, list[np.ndarray]] = {task: [] for task in classes}
    for start in range(0, len(features), batch_size):
        pooled = torch.from_numpy(features.pooled_image(model.align_tower)[start:start + batch_size]).float().to(device)
        for task, embeddings in prompts.items():
            out[task].append(zero_shot_probabilities(model.align, pooled, embeddings).cpu().numpy())
    return {task: np.concatenate(parts) for task, parts in out.items()}


def score(probabilities: dict[str, np.ndarray], targets: dict[str, np.ndarray],
          thresholds: dict[str, float | None] | None = None, groups: np.ndarray | None = None) -> dict:
    """Metrics per task on labelled items (target != -1); out-of-vocabulary labels (-2) count as wrong.

    With `thresholds` (task -> auto-accept threshold, chosen elsewhere), each task also gets
    what auto-accepting does on these items (`metrics.operating_point`: threshold,
    auto_accepted, auto_accept_precision with its exact 95% interval auto_accept_precision_ci,
    over the effective sample when `groups` (`item_groups`) are given, operating_recall), and
    the mean gets the mean operating recall."""
    tasks = {}
    for task, probs in probabilities.items():
        target = targets[task]
        labelled = target != -1
        predicted, confidence = probs[labelled].argmax(1), probs[labelled].max(1)
        tasks[task] = task_metrics(target[labelled], predicted, confidence)
        if thresholds is not None:
            correct = (predicted == target[labelled]).astype(float)
            tasks[task].update(operating_point(correct, confidence, thresholds.get(task),
                                               groups=None if groups is None else groups[labelled]))
    mean = mean_metrics(tasks)
    if thresholds is not None:
        scored = [t["operating_recall"] for t in tasks.values() if t["n"] > 0]
        mean["operating_recall"] = float(np.mean(scored)) if scored else float("nan")
    return {"tasks": tasks, "mean": mean}


def format_table(report: dict) -> str:
    """The report as text; with auto-accept figures, also the threshold, the auto-accepted
    items' precision with its 95% interval, and the operating recall."""
    operating = all("operating_recall" in m for m in report["tasks"].values()) and report["tasks"]
    header = f"{'task':32s} " + " ".join(f"{m:>22s}" for m in METRIC_NAMES) + f" {'n':>6s}"
    if operating:
        header += f" {'threshold':>9s} {'accepted':>8s} {'auto-accept precision [95%]':>28s} {'operating_recall':>16s}"
    lines = [header, "-" * len(header)]
    for task, metrics in report["tasks"].items():
        line = f"{task:32s} " + " ".join(f"{metrics[m]:22.4f}" for m in METRIC_NAMES) + f" {metrics['n']:6d}"
        if operating:
            threshold = "none" if metrics["threshold"] is None else f"{metrics['threshold']:.4f}"
            precision = "-" if metrics["auto_accept_precision"] is None else (
                f"{metrics['auto_accept_precision']:.3f} [{metrics['auto_accept_precision_ci'][0]:.3f}, "
                f"{metrics['auto_accept_precision_ci'][1]:.3f}]")
            line += (f" {threshold:>9s} {metrics['auto_accepted']:8d} {precision:>28s}"
                     f" {metrics['operating_recall']:16.4f}")
        lines.append(line)
    mean = f"{'mean':32s} " + " ".join(f"{report['mean'][m]:22.4f}" for m in METRIC_NAMES)
    if operating:
        mean += " " * (7 + 10 + 9 + 29) + f" {report['mean']['operating_recall']:16.4f}"
    lines.append(mean)
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, split: str | None = "test",
                        cache_dir: str | Path | None = None, device: torch.device | None = None,
                        zero_shot: bool = False) -> dict:
    """Metrics of a checkpoint on one split of a manifest (see `evaluation_rows`); with
    `zero_shot`, of its CLIP-style alignment alone, classifying by label prompts."""
    device = resolve_device(device)
    require_finished(checkpoint)
    model, config = load_checkpoint(checkpoint, device)
    catalogue = Catalogue.open(config.catalogue_on(manifest))
    rows, split = evaluation_rows(catalogue, split, config)
    backbone = load_backbone(checkpoint, config, device)
    features = rows_features(backbone, catalogue, rows, cache_dir, model.cfg.colour)
    targets = {task: target[rows] for task, target in task_targets(config, catalogue).items()}
    if zero_shot:  # the checkpoint's thresholds belong to its own classifier's confidences
        report = score(zero_shot_probabilities_for(model, backbone, config.classes, features), targets)
    else:
        report = score(predict_probabilities(model, features), targets, config.thresholds,
                       item_groups(features, np.arange(len(features))))
    report.update(checkpoint=str(checkpoint), manifest=str(manifest), split=split, items=len(rows),
                  method="zero-shot" if zero_shot else "cma-clip")
    return report


def rows_features(backbone: DualEncoder, catalogue: Catalogue, rows: np.ndarray, cache_dir: str | Path | None,
                  colour: bool) -> Features:
    """The features of `rows`: taken from the whole catalogue's cache when training built it, else
    encoded for these rows alone (and cached as such)."""
    if has_cached_features(backbone, catalogue, cache_dir):
        return extract_features(backbone, catalogue, cache_dir, memory_map=True, colour=colour).take(rows)
    return extract_features(backbone, catalogue.take(rows), cache_dir, progress=sys.stderr.isatty(), colour=colour)


def task_targets(config: CheckpointConfig, catalogue: Catalogue) -> dict[str, np.ndarray]:
    """Each of the checkpoint's tasks: the catalogue's labels as class indices of its vocabulary."""
    return {task: LabelVocab(classes).encode(catalogue.labels(task)) for task, classes in config.classes.items()}


def evaluation_rows(catalogue: Catalogue, split: str | None, config: CheckpointConfig) -> tuple[np.ndarray, str | None]:
    """The rows to score and the split they form. With a split column: that split's rows.
    Without one, on the manifest the checkpoint was trained on: the seeded split training
    made (its train rows must not be scored as test); on any other manifest: every row."""
    everything = np.arange(len(catalogue))
    if split is None:
        return everything, None
    if catalogue.has_splits:
        splits = split_indices(catalogue)
        rows = splits.get(split, np.zeros(0, dtype=int))
        if not len(rows):
            held = ", ".join(sorted(name for name, found in splits.items() if len(found))) or "none"
            raise CatalogueError(f"no rows in split {split!r} of {catalogue.config.manifest}: its splits are {held}")
        return rows, split
    trained = config.train
    manifest = config.training_manifest()
    if manifest is None or Path(manifest).resolve() != Path(catalogue.config.manifest).resolve():
        return everything, None
    if trained.limit or trained.extra_labels:
        raise CatalogueError("this checkpoint was trained on a seeded split of this manifest changed by --limit or "
                             "--extra-labels, which cannot be rebuilt here; evaluate on a manifest with a split column")
    splits = split_indices(catalogue, trained.splits_seed)
    if split not in splits:
        raise CatalogueError(f"the manifest has no split column: choose --split train, val or test, not {split!r}")
    return splits[split], split


# ----------------------------------------------------------------------------- thresholds and reports

THRESHOLD_RULE = "clustered-cp-99"  # how `calibrate` chooses thresholds (checkpoint.THRESHOLD_RULES)
THRESHOLD_LEVEL = 0.99  # its interval: the promise must hold for a test-sized batch, not only in the long run


def thresholds_at_90(probabilities: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                     rule: str = "point", groups: np.ndarray | None = None) -> dict[str, float | None]:
    """Per task, the lowest confidence whose top-1 predictions reach 90% precision (None: none
    does): by the point estimate (rule "point": on unseen items it falls short of 90% about
    half of the time), or with the exact 99% interval of the precision wholly above 90%, items
    of one of `groups` (`item_groups`) counted as one cluster (rule "clustered-cp-99", what
    `calibrate` uses; docs/THRESHOLDS.md)."""
    if rule not in ("point", "clustered-cp-99"):
        raise ValueError(f"unknown threshold rule {rule!r}")
    out = {}
    for task, probs in probabilities.items():
        labelled = targets[task] != -1
        correct = (probs[labelled].argmax(1) == targets[task][labelled]).astype(float)
        confidence = probs[labelled].max(1)
        if rule == "point":
            out[task] = threshold_at_precision(correct, confidence, 0.9)
        else:
            out[task] = threshold_with_confidence(correct, confidence, 0.9, THRESHOLD_LEVEL,
                                                  None if groups is None else groups[labelled])
    return out


def item_groups(features, index: np.ndarray) -> np.ndarray | None:
    """One label per item of `index`: items the model reads the same text for share it (colour
    variants of one product mostly do, and are right or wrong together). From the token ids
    of `Features`, or the texts of live batches; None when `features` has neither."""
    ids = getattr(features, "text_ids", None)
    if ids is not None:
        return np.unique(np.asarray(ids[np.asarray(index)]), axis=0, return_inverse=True)[1].ravel()
    texts = getattr(features, "texts", None)
    return None if texts is None else np.array([texts[i] for i in index])


def calibrate(folder: str | Path, model: Classifier, config: CheckpointConfig, features: Features,
              targets: dict[str, np.ndarray], splits: dict[str, np.ndarray]) -> dict:
    """Set each task's auto-accept threshold in `config` from val (`THRESHOLD_RULE`: 90%
    precision with 99% confidence, items sharing a text one cluster), score val and test with
    them (the test report also to FOLDER/eval_test.json); returns the metrics, also set in
    `config`.

    `features` is anything with `__len__` and `batch(index, device) -> EncoderOutput`."""
    val_probs = predict_probabilities(model, features, splits["val"])
    val_targets = {t: v[splits["val"]] for t, v in targets.items()}
    val_groups = item_groups(features, splits["val"])
    for task, threshold in thresholds_at_90(val_probs, val_targets, THRESHOLD_RULE, val_groups).items():
        config.tasks[task].threshold_90 = threshold
        config.tasks[task].threshold_rule = THRESHOLD_RULE
    metrics = {"val": score(val_probs, val_targets, config.thresholds, val_groups)}
    if len(splits["test"]):
        metrics["test"] = score(predict_probabilities(model, features, splits["test"]),
                                {t: v[splits["test"]] for t, v in targets.items()}, config.thresholds,
                                item_groups(features, splits["test"]))
        (Path(folder) / "eval_test.json").write_text(json.dumps(metrics["test"], indent=2))
    config.metrics = metrics
    return metrics


def rescore(folder: str | Path, data_root: str | None = None, cache_dir: str | None = None) -> dict:
    """Recompute a finished checkpoint's thresholds and val/test reports with the current
    metrics, on the features its training cached; the weights stay as they are. For after a
    change to the metrics: `python -m cma_clip.experiments --rescore` runs it on a study."""
    device = resolve_device()
    model, config = load_checkpoint(folder, device)
    if config.train.extra_labels or config.train.finetune_backbone:
        raise CheckpointError(f"{folder}: rescoring runs with --extra-labels or --finetune-backbone is not supported")
    manifest = config.training_manifest(data_root)
    if manifest is None:
        raise CheckpointError(f"{folder}: the catalogue it was trained on is not available here")
    catalogue = Catalogue.open(config.catalogue_on(manifest))
    if config.train.limit:
        catalogue = limit_splits(catalogue, config.train.limit)
    splits = split_indices(catalogue, config.train.splits_seed)
    # the runs of a study share one backbone and read only the val and test rows of its cache
    features = extract_features(load_backbone(folder, config, device), catalogue, cache_dir, progress=False,
                                memory_map=True, colour=model.cfg.colour)
    metrics = calibrate(folder, model, config, features, task_targets(config, catalogue), splits)
    config.save(folder)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + config.json)")
    parser.add_argument("--manifest", required=True, help="CSV or JSONL manifest with the checkpoint's columns")
    parser.add_argument("--split", default="test", help="split to evaluate when the manifest has a split column")
    parser.add_argument("--out-json", help="write the report here")
    parser.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/cma_clip or $CMA_CLIP_CACHE)")
    parser.add_argument("--zero-shot", action="store_true",
                        help="evaluate the CLIP-style alignment alone with label prompts (the 'raw CLIP' baseline)")
    args = parser.parse_args(argv)
    if args.out_json and (problem := output_file_problem("--out-json", args.out_json, "report.json")):
        parser.error(problem)
    try:
        report = evaluate_checkpoint(args.checkpoint, args.manifest, args.split, args.cache_dir,
                                     zero_shot=args.zero_shot)
    except CMAClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if report["split"] is None:  # the figures are of every row: said, since --split (given or not) did not apply
        print(f"note: {args.manifest} has no split column: all its {report['items']} rows were evaluated "
              f"(--split {args.split} applies to a manifest with one)", file=sys.stderr)
    if args.out_json:
        try:
            atomic_write(args.out_json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        except OSError as exc:  # a parent that is a file, a folder not writable: the table above stands
            print(f"error: cannot write --out-json {args.out_json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    exit_on_stop_signals()
    sys.exit(main())
