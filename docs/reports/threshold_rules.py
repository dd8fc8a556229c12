"""Compare rules for choosing the auto-accept threshold on val (docs/THRESHOLDS.md).

    CMA_CLIP_DATA=... CMA_CLIP_CACHE=... python docs/reports/threshold_rules.py [--resplits 200]

For each shipped checkpoint, from the features its training cached (as `evaluate.rescore`
reads them; the val and test rows alone when the whole catalogue's cache is not built):
1. every rule picks each task's threshold on `val`, and the auto-accepted `test` items give
   precision (exact 95% interval) and operating recall;
2. val and test are pooled and re-split at random (by product_code on H&M, as the shipped
   split is) `--resplits` times: how often each rule's held-out precision falls below 0.90.
Writes docs/reports/threshold-rules.json and prints markdown tables. The weights are not touched.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cma_clip.checkpoint import load_backbone, load_checkpoint  # noqa: E402
from cma_clip.data import Catalogue, split_indices  # noqa: E402
from cma_clip.evaluate import predict_probabilities, task_targets  # noqa: E402
from cma_clip.features import extract_features, has_cached_features  # noqa: E402
from cma_clip.metrics import (_tail, _tie_aware_prefixes, binomial_tail, operating_point,  # noqa: E402
                              threshold_at_precision, threshold_with_confidence)

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ("hm-articles", "fashion-product-images")
TARGET = 0.9


def split_outputs(folder: Path) -> dict:
    """Per split (val, test): per task (correct, confidence, catalogue row) of the labelled
    items; and per catalogue row its text (what `evaluate.calibrate` groups items by) and
    product (H&M's split unit; the row itself elsewhere)."""
    model, config = load_checkpoint(folder, "cpu")
    catalogue = Catalogue.open(config.catalogue_on(config.training_manifest()))
    splits = split_indices(catalogue, config.train.splits_seed)
    backbone = load_backbone(folder, config, "cpu")
    targets = task_targets(config, catalogue)
    whole = has_cached_features(backbone, catalogue)
    if whole:
        features = extract_features(backbone, catalogue, progress=False, memory_map=True, colour=model.cfg.colour)
    out = {"text": catalogue.texts(),
           "product": [r.get("product_code") or str(i) for i, r in enumerate(catalogue.rows)]}
    for split in ("val", "test"):
        rows = splits[split]
        feats = features.take(rows) if whole else extract_features(backbone, catalogue.take(rows), progress=False,
                                                                   colour=model.cfg.colour)
        probs = predict_probabilities(model, feats)
        out[split] = {}
        for task, p in probs.items():
            target = targets[task][rows]
            labelled = target != -1
            out[split][task] = ((p[labelled].argmax(1) == target[labelled]).astype(float), p[labelled].max(1),
                                rows[labelled])
    return out


# ----------------------------------------------------------------------------- the rules

def point_rule(correct, confidence, groups=None):
    """The shipped rule until now: lowest threshold whose val precision (point estimate) is >= 0.90."""
    return threshold_at_precision(correct, confidence, TARGET)


def bound_rule(level, clustered=False):
    """Lowest threshold whose exact two-sided `level` interval of val precision lies above 0.90;
    `clustered`: the interval over the effective sample, items with the same text one group."""
    return lambda correct, confidence, groups=None: threshold_with_confidence(
        correct, confidence, TARGET, level, groups if clustered else None)


def predictive_rule(correct, confidence, groups=None, level=0.95):
    """As the clustered bound, for the precision a new batch as large as the accepted val items
    shows, not the long-run one: the difference of two equal samples' precisions has twice one's
    variance, so the bound is taken over half the effective sample."""
    thresholds, accepted, hits, effective = _tie_aware_prefixes(correct, confidence, groups)
    for i in range(len(thresholds) - 1, -1, -1):
        n = effective[i] / 2
        if hits[i] > TARGET * accepted[i] and _tail(n * hits[i] / accepted[i], n, TARGET) <= (1 - level) / 2:
            return float(thresholds[i])
    return None


GRID = np.round(np.arange(0.99, 0.0, -0.01), 2)


def fixed_sequence_rule(correct, confidence, groups=None, level=0.95):
    """Monotone by construction (Learn-then-Test's fixed-sequence test): walk a fixed grid of
    thresholds from 0.99 down; skip those accepting too few items to ever be certified (a
    label-free choice); stop at the first that fails the bound; keep the last that passed."""
    tail = (1 - level) / 2
    need = int(np.ceil(np.log(tail) / np.log(TARGET)))  # an error-free set certifies from this size on
    accepted = confidence[None, :] >= GRID[:, None]
    n, hits = accepted.sum(1), (accepted * correct[None, :]).sum(1)
    tested = n >= need
    passed = binomial_tail(np.maximum(hits[tested], 1), n[tested], TARGET) <= tail
    passed &= hits[tested] > 0
    failures = np.nonzero(~passed)[0]
    last = (failures[0] if len(failures) else len(passed)) - 1
    return float(GRID[tested][last]) if last >= 0 else None


def cross_fitted_rule(correct, confidence, groups=None, folds=5, seed=0):
    """Point rule at a raised target: the lowest target in 0.90, 0.905, ... whose thresholds,
    chosen on 4/5 of val, give >= 0.90 precision on the held-out fifth (pooled over folds)."""
    fold = np.random.default_rng(seed).permutation(len(correct)) % folds
    for target in np.arange(0.90, 1.0, 0.005):
        hits = accepted = 0
        for f in range(folds):
            fit, held = fold != f, fold == f
            t = threshold_at_precision(correct[fit], confidence[fit], target)
            if t is not None:
                mask = confidence[held] >= t
                hits, accepted = hits + correct[held][mask].sum(), accepted + mask.sum()
        if accepted and hits / accepted >= TARGET:
            return threshold_at_precision(correct, confidence, target)
    return None


RULES = {
    "point (shipped before)": point_rule,
    "cross-fitted point": cross_fitted_rule,
    "lower bound, one-sided 95%": bound_rule(0.90),
    "lower bound, two-sided 95%": bound_rule(0.95),
    "lower bound, two-sided 99%": bound_rule(0.99),
    "fixed-sequence, two-sided 95%": fixed_sequence_rule,
    "lower bound, two-sided 95%, clustered by text": bound_rule(0.95, clustered=True),
    "lower bound, two-sided 99%, clustered by text (chosen)": bound_rule(0.99, clustered=True),
    "predictive, two-sided 95%, clustered by text": predictive_rule,
}


def text_groups(outputs: dict, rows: np.ndarray) -> np.ndarray:
    return np.array([outputs["text"][i] for i in rows])


def test_figures(outputs: dict) -> dict:
    table = {}
    for rule, choose in RULES.items():
        table[rule] = {}
        for task, (correct, confidence, rows) in outputs["val"].items():
            threshold = choose(correct, confidence, text_groups(outputs, rows))
            test_correct, test_confidence, test_rows = outputs["test"][task]
            table[rule][task] = operating_point(test_correct, test_confidence, threshold,
                                                groups=text_groups(outputs, test_rows))
    return table


def resplit_figures(outputs: dict, resplits: int, seed: int = 0) -> dict:
    """Pool val and test, re-split by product into halves of val's size, choose on one, measure on the other."""
    rng = np.random.default_rng(seed)
    out = {rule: {} for rule in RULES}
    for task in outputs["val"]:
        correct = np.concatenate([outputs[s][task][0] for s in ("val", "test")])
        confidence = np.concatenate([outputs[s][task][1] for s in ("val", "test")])
        rows = np.concatenate([outputs[s][task][2] for s in ("val", "test")])
        texts = text_groups(outputs, rows)
        names, group_of = np.unique([outputs["product"][i] for i in rows], return_inverse=True)
        share = len(outputs["val"][task][0]) / len(correct)
        runs = {rule: [] for rule in RULES}
        for _ in range(resplits):
            on_val = (rng.random(len(names)) < share)[group_of]
            for rule, choose in RULES.items():
                threshold = choose(correct[on_val], confidence[on_val], texts[on_val])
                accepted = confidence[~on_val] >= (np.inf if threshold is None else threshold)
                runs[rule].append((int(accepted.sum()), correct[~on_val][accepted].sum(), (~on_val).sum()))
        for rule, points in runs.items():
            precisions = [hits / n for n, hits, _ in points if n]
            out[rule][task] = {
                "below_0.90": float(np.mean([p < TARGET for p in precisions])) if precisions else None,
                "no_threshold": float(np.mean([n == 0 for n, _, _ in points])),
                "precision_mean": float(np.mean(precisions)) if precisions else None,
                "precision_p05": float(np.quantile(precisions, 0.05)) if precisions else None,
                "operating_recall_mean": float(np.mean([hits / total for _, hits, total in points])),
            }
    return out


def markdown(name: str, test: dict, resplit: dict) -> str:
    tasks = list(next(iter(test.values())))
    lines = [f"\n### {name}: test precision [95% interval] / operating recall, thresholds from val\n",
             "| rule | " + " | ".join(tasks) + " | mean op. recall | tasks < 0.90 |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for rule, per_task in test.items():
        cells = []
        for p in per_task.values():
            if p["auto_accepted"]:
                lo, hi = p["auto_accept_precision_ci"]
                cells.append(f"{p['auto_accept_precision']:.3f} [{lo:.3f}, {hi:.3f}] / {p['operating_recall']:.3f}")
            else:
                cells.append("no threshold / 0")
        below = sum(p["auto_accepted"] > 0 and p["auto_accept_precision"] < TARGET for p in per_task.values())
        mean_recall = np.mean([p["operating_recall"] for p in per_task.values()])
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {mean_recall:.3f} | {below} |")
    lines += [f"\n### {name}: re-splits of val+test: share of splits with held-out precision < 0.90 "
              "(mean operating recall)\n",
              "| rule | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for rule, per_task in resplit.items():
        cells = [("-" if r["below_0.90"] is None else f"{r['below_0.90']:.2f}") + f" ({r['operating_recall_mean']:.3f})"
                 for r in per_task.values()]
        below = np.mean([r["below_0.90"] or 0.0 for r in per_task.values()])
        recall = np.mean([r["operating_recall_mean"] for r in per_task.values()])
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {below:.2f} ({recall:.3f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resplits", type=int, default=200)
    parser.add_argument("--checkpoints", nargs="*", default=list(CHECKPOINTS))
    parser.add_argument("--out-json", default=str(ROOT / "docs" / "reports" / "threshold-rules.json"))
    parser.add_argument("--keep-outputs", help="a folder to keep the model's val/test outputs in, for reruns")
    args = parser.parse_args()
    report = json.loads(Path(args.out_json).read_text()) if Path(args.out_json).exists() else {}
    for name in args.checkpoints:
        kept = Path(args.keep_outputs) / f"{name}.v2.pkl" if args.keep_outputs else None
        if kept and kept.exists():
            outputs = pickle.loads(kept.read_bytes())
        else:
            outputs = split_outputs(ROOT / "checkpoints" / name)
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_bytes(pickle.dumps(outputs))
        report[name] = {"val_items": {t: len(v[0]) for t, v in outputs["val"].items()},
                        "val_texts": {t: len(set(text_groups(outputs, v[2]))) for t, v in outputs["val"].items()},
                        "test": test_figures(outputs), "resplits": args.resplits,
                        "resplit": resplit_figures(outputs, args.resplits)}
        print(markdown(name, report[name]["test"], report[name]["resplit"]), flush=True)
    Path(args.out_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
