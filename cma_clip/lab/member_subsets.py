"""Which finished runs to keep in one checkpoint: every candidate ensemble of several recipes'
seeds, scored on val as a ship decision needs it.

    python -m cma_clip.lab.member_subsets --recipes runs/hm-cw-members runs/hm-c-members \
        --baseline checkpoints/hm-articles --max-mb 25 [--max-minutes 27] [--test] [--out-json subsets.json]
    python -m cma_clip.lab.member_subsets --unjoin checkpoints/hm-articles runs/shipped   # its members as runs

Each recipe folder holds its runs as `seed-S` (what `train --members N` writes in OUT-members).
Candidates: the first k seeds of each recipe, every combination of k's with two runs at least.
Each is joined as `train --from-members` joins them (`checkpoint.save_ensemble`, in a temporary
folder, for its size: its weights and any tuned backbone layers) and read as the mean of its runs'
probabilities (each run on its own backbone's features, its weights as the checkpoint stores them);
its thresholds come from val by the checkpoints' rule (`evaluate.THRESHOLD_RULE`). Its training
time is its runs' recorded epoch and alignment seconds. The choice (docs/RESULTS.md, "More, cheaper
members"; the time budget since "Members stored smaller"): among the candidates within --max-mb
and --max-minutes whose val operating recall reaches the baseline's
(the shipped checkpoint, its thresholds chosen again the same way), the highest val mean R@90P; it
beats the baseline when its val R@90P and operating recall both do. `--test` adds the test figures,
for the report only: a choice made on them would no longer be held out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..checkpoint import (as_stored_in_ensemble, load_backbone, load_checkpoint, read_config, save_ensemble,
                          save_members, tuned_backbone_digest)
from ..errors import CMAClipError
from ..evaluate import THRESHOLD_RULE, predict_probabilities, score
from ..features import Features, extract_features
from ..runtime import resolve_device
from .late_ensembles import mixed, rows_of, scoring_data, val_thresholds


def recipe_runs(folder: Path) -> list[Path]:
    """A recipe's runs, `seed-S` in the order of S."""
    runs = sorted(folder.glob("seed-*"), key=lambda p: int(p.name.split("-", 1)[1]))
    if not runs:
        raise SystemExit(f"{folder}: no seed-S runs (train with --members N writes them in OUT-members)")
    return runs


def candidates(recipes: list[list[Path]]) -> list[tuple[int, ...]]:
    """How many of each recipe's first seeds a candidate keeps: every combination, two runs at least."""
    return [counts for counts in itertools.product(*(range(len(r) + 1) for r in recipes)) if sum(counts) >= 2]


def reports(probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], splits: dict[str, np.ndarray],
            groups: np.ndarray, test: bool) -> dict:
    """Thresholds from val by the checkpoints' rule; val (and test) scored with them."""
    thresholds = val_thresholds(probs, targets, splits, groups)
    out = {"thresholds": thresholds}
    for split in ("val", "test") if test else ("val",):
        rows = splits[split]
        out[split] = score(rows_of(probs, rows), rows_of(targets, rows), thresholds, groups[rows])["mean"]
    return out


def chosen(rows: list[dict], baseline: dict, max_mb: float, max_minutes: float | None = None) -> dict | None:
    """The rule's candidate: within the size and training time, val operating recall at least the
    baseline's, the highest val mean R@90P (None when no candidate qualifies)."""
    eligible = [r for r in rows if r["megabytes"] <= max_mb
                and (max_minutes is None or r["training_minutes"] <= max_minutes)
                and r["val"]["operating_recall"] >= baseline["val"]["operating_recall"]]
    return max(eligible, key=lambda r: r["val"]["recall_at_90_precision"], default=None)


def probabilities(model, features: Features, items: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's probabilities on `rows`, in arrays over all `items` (zero elsewhere)."""
    out = {t: np.zeros((items, n), np.float32) for t, n in model.cfg.tasks.items()}
    for task, p in predict_probabilities(model, features, rows).items():
        out[task][rows] = p
    return out


def backbone_of(folder: Path, config) -> tuple[str, str | None]:
    """Which features a checkpoint reads: its backbone's name and tuned weights' digest."""
    return config.backbone, tuned_backbone_digest(folder)


def run_probabilities(runs: list[Path], classes: dict, catalogue, rows: np.ndarray, by_backbone: dict[tuple, Features],
                      device, cache_dir: str | None = None, log=print) -> dict[Path, dict[str, np.ndarray]]:
    """Each run's probabilities on `rows`, read from its own backbone's features: `by_backbone` holds
    features by `backbone_of` and gains those of runs on other (tuned) backbone layers, each built once."""
    out = {}
    for folder in runs:
        model, run_config = load_checkpoint(folder, device)
        model = as_stored_in_ensemble(model)
        if run_config.classes != classes:
            raise SystemExit(f"{folder}: other tasks or classes than the baseline")
        key = backbone_of(folder, run_config)
        if key not in by_backbone:
            by_backbone[key] = extract_features(load_backbone(folder, run_config, device), catalogue, cache_dir,
                                                memory_map=True, colour=True, progress=False)
        out[folder] = probabilities(model, by_backbone[key], len(catalogue), rows)
        log(f"probabilities of {folder}")
    return out


def training_seconds(folder: str | Path) -> float:
    """A run's recorded training time: its epochs and its alignment (none when it took another run's)."""
    training = read_config(folder).training
    return sum(epoch["seconds"] for epoch in training["history"]) + training.get("align_seconds", 0.0)


def run(recipe_folders: list[Path], baseline: Path, max_mb: float = 25.0, max_minutes: float | None = None,
        test: bool = False, data_root: str | None = None, cache_dir: str | None = None, log=print) -> dict:
    device = resolve_device()
    recipes = [recipe_runs(Path(f)) for f in recipe_folders]
    base_model, config = load_checkpoint(baseline, device)
    catalogue, splits, features, targets, groups = scoring_data(baseline, config, device, data_root, cache_dir)
    rows = np.concatenate([splits["val"], splits["test"]])

    by_backbone = {backbone_of(baseline, config): features}
    base = reports(probabilities(base_model, features, len(catalogue), rows), targets, splits, groups, test)
    every_run = [r for recipe in recipes for r in recipe]
    minutes = {r: training_seconds(r) / 60 for r in every_run}  # each run's config read once, not per candidate
    per_run = run_probabilities(every_run, config.classes, catalogue, rows, by_backbone, device, cache_dir, log)
    out = []
    with tempfile.TemporaryDirectory() as scratch:
        for counts in candidates(recipes):
            runs = [r for recipe, k in zip(recipes, counts) for r in recipe[:k]]
            joined = save_ensemble(Path(scratch) / "-".join(map(str, counts)), runs)
            size = sum(f.stat().st_size for f in joined.glob("*.safetensors"))  # tuned backbone layers too
            row = {"runs": [str(r) for r in runs], "counts": list(counts), "megabytes": size / 1e6,
                   "training_minutes": sum(minutes[r] for r in runs),
                   **reports(mixed([per_run[r] for r in runs], [1.0] * len(runs)), targets, splits, groups, test)}
            out.append(row)
            log(format_row(row))
    pick = chosen(out, base, max_mb, max_minutes)
    beats = bool(pick and all(pick["val"][k] > base["val"][k] for k in ("recall_at_90_precision", "operating_recall")))
    return {"recipes": [str(f) for f in recipe_folders], "baseline": {"checkpoint": str(baseline), **base},
            "max_mb": max_mb, "max_minutes": max_minutes, "threshold_rule": THRESHOLD_RULE, "candidates": out,
            "chosen": pick["counts"] if pick else None, "chosen_beats_baseline": beats}


def format_row(row: dict) -> str:
    figures = " ".join(f"{split} {row[split]['recall_at_90_precision']:.4f} / {row[split]['operating_recall']:.4f}"
                       for split in ("val", "test") if split in row)
    return (f"{'+'.join(map(str, row['counts'])):>12s}  {row['megabytes']:6.1f} MB  "
            f"{row['training_minutes']:5.1f} min  {figures}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.member_subsets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", type=Path, help="OUT-members folders of seed-S runs")
    parser.add_argument("--baseline", type=Path, help="the checkpoint a candidate must beat")
    parser.add_argument("--unjoin", nargs=2, type=Path, metavar=("CHECKPOINT", "OUT"),
                        help="instead: write an ensemble's members back out as runs, OUT/recipe-R/seed-S")
    parser.add_argument("--max-mb", type=float, default=25.0)
    parser.add_argument("--max-minutes", type=float,
                        help="the most recorded training time (epochs and alignment) the members may sum to")
    parser.add_argument("--test", action="store_true", help="also the test figures (for the report only)")
    parser.add_argument("--data-root")
    parser.add_argument("--cache-dir")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    if args.unjoin:
        try:
            for folder in save_members(*args.unjoin):
                print(folder)
        except CMAClipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not (args.recipes and args.baseline):
        parser.error("--recipes and --baseline are required (or --unjoin CHECKPOINT OUT)")
    print(f"{'seeds kept':>12s}  {'size':>9s}  {'training':>9s}  R@90P / operating recall (mean over tasks)")
    try:
        doc = run(args.recipes, args.baseline, args.max_mb, args.max_minutes, args.test, args.data_root, args.cache_dir)
    except CMAClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'baseline':>12s}  {'':9s}  {'':9s}  " + " ".join(
        f"{s} {doc['baseline'][s]['recall_at_90_precision']:.4f} / {doc['baseline'][s]['operating_recall']:.4f}"
        for s in ("val", "test") if s in doc["baseline"]))
    verdict = "beats the baseline" if doc["chosen_beats_baseline"] else "does not beat the baseline"
    print(f"chosen: {doc['chosen']} ({verdict})" if doc["chosen"] else "chosen: none qualifies")
    if args.out_json:
        args.out_json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
