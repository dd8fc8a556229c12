"""What noise does to a deployed auto-accept: per corruption, the checkpoint's own (clean) thresholds.

    python -m cma_clip.lab.noise_curves --checkpoint checkpoints/hm-articles --out-json curves.json --plot curves.png

The study (`cma_clip.lab.experiments`) mixes the corruptions (item i gets kind i mod 5) and
re-picks the R@90P threshold on the noisy items themselves: a property of the ranking. A
deployed model keeps the thresholds it was calibrated with on clean `val`. Here each of the 5
image and 5 text corruptions (`cma_clip.noise`) is applied alone to every item of a seeded
`test` sample (seed: the item's index), at every severity, and the checkpoint is scored with
its stored thresholds: per task the auto-accept precision (exact 95% interval, one cluster per
text) and the operating recall, beside the re-picked R@90P. Only the corrupted side is encoded
again: an image corruption keeps the clean text features, a text corruption the clean image ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..backbones import DualEncoder, TextBatch
from ..checkpoint import CheckpointConfig, load_backbone, load_checkpoint
from ..data import Catalogue, CatalogueError
from ..errors import CMAClipError
from ..evaluate import evaluation_rows, item_groups, predict_probabilities, rows_features, score, task_targets
from ..features import Features, image_batches
from ..model import Classifier
from ..noise import IMAGE_CORRUPTIONS, SEVERITIES, TEXT_CORRUPTIONS, corrupt_image, corrupt_text
from ..runtime import autocast, resolve_device

FEATURE_DTYPE = np.float16  # as the feature cache keeps them


@torch.no_grad()
def noisy_images(backbone: DualEncoder, sample: Catalogue, clean: Features, kind: str, severity: int,
                 batch_size: int = 32) -> Features:
    """`clean` with the sample's images corrupted by `kind` at `severity` (item i seeded by i)."""
    parts: dict[str, list[np.ndarray]] = {}
    for pixels in image_batches(sample.image_paths(), backbone, batch_size,
                                transform=lambda image, i: corrupt_image(image, kind, severity, i)):
        fields = backbone.image_fields(pixels.to(backbone.device))  # every image tower's
        if clean.colour is not None:
            fields["colour"] = backbone.describe_colour(pixels)
        for name, value in fields.items():
            parts.setdefault(name, []).append(value.float().cpu().numpy().astype(FEATURE_DTYPE))
    return replace(clean, **{name: np.concatenate(arrays) for name, arrays in parts.items()})


@torch.no_grad()
def noisy_texts(backbone: DualEncoder, sample: Catalogue, clean: Features, kind: str, severity: int,
                batch_size: int = 128) -> Features:
    """`clean` with the sample's texts corrupted by `kind` at `severity` (item i seeded by i)."""
    texts = [corrupt_text(text, kind, severity, i) for i, text in enumerate(sample.texts())]
    batch = backbone.tokenize(texts, sample.config.max_text_tokens)
    tokens, pooled = [], []
    for start in range(0, len(texts), batch_size):
        part = TextBatch(batch.ids[start:start + batch_size], batch.mask[start:start + batch_size])
        with autocast(backbone.device):
            text_tokens, text_pooled = backbone.encode_text(part.to(backbone.device))
        tokens.append(text_tokens.float().cpu().numpy().astype(FEATURE_DTYPE))
        pooled.append(text_pooled.float().cpu().numpy().astype(FEATURE_DTYPE))
    return replace(clean, text_tokens=np.concatenate(tokens), text_pooled=np.concatenate(pooled),
                   text_mask=batch.mask.numpy(), text_ids=batch.ids.numpy().astype(np.int32))


def scored(model: Classifier, config: CheckpointConfig, features: Features, targets: dict[str, np.ndarray],
           groups: np.ndarray | None) -> dict:
    """`evaluate.score` with the checkpoint's clean thresholds; the mean adds the lowest task's precision."""
    report = score(predict_probabilities(model, features), targets, config.thresholds, groups)
    precisions = {t: m["auto_accept_precision"] for t, m in report["tasks"].items()
                  if m["auto_accept_precision"] is not None}
    if precisions:
        task = min(precisions, key=precisions.get)
        report["mean"].update(lowest_auto_accept_precision=precisions[task], lowest_precision_task=task)
    return report


def corruption_curves(checkpoint: str | Path, items: int = 1000, severities: list[int] | None = None,
                      cache_dir: str | Path | None = None, seed: int = 0, log=print) -> dict:
    """{"clean": report, "image"|"text": {kind: {severity: report}}} on a seeded `test` sample of at
    most `items` items; every report is `evaluate.score`'s with the checkpoint's own thresholds."""
    device = resolve_device()
    model, config = load_checkpoint(checkpoint, device)
    backbone = load_backbone(checkpoint, config, device)
    manifest = config.training_manifest()
    if manifest is None:
        raise CatalogueError(f"{checkpoint}: its training manifest is not here (set CMA_CLIP_DATA)")
    catalogue = Catalogue.open(config.catalogue_on(manifest))
    rows, _ = evaluation_rows(catalogue, "test", config)
    rows = np.sort(np.random.default_rng(seed).choice(rows, min(items, len(rows)), replace=False))
    sample = catalogue.take(rows)
    clean = rows_features(backbone, catalogue, rows, cache_dir, model.cfg.colour)
    targets = {task: target[rows] for task, target in task_targets(config, catalogue).items()}
    groups = item_groups(clean, np.arange(len(clean)))  # clusters by the clean text, whatever the noise
    out: dict = {"checkpoint": str(checkpoint), "items": len(rows), "seed": seed,
                 "clean": scored(model, config, clean, targets, groups)}
    for side, kinds, corrupt in (("image", IMAGE_CORRUPTIONS, noisy_images), ("text", TEXT_CORRUPTIONS, noisy_texts)):
        out[side] = {}
        for kind in kinds:
            out[side][kind] = {}
            for severity in severities or [s for s in SEVERITIES if s]:
                report = scored(model, config, corrupt(backbone, sample, clean, kind, severity), targets, groups)
                out[side][kind][severity] = report
                mean = report["mean"]
                log(f"{side} {kind} {severity}: R@90P {mean['recall_at_90_precision']:.3f}  operating recall "
                    f"{mean['operating_recall']:.3f}  lowest precision {mean.get('lowest_auto_accept_precision', 0):.3f}")
    return out


def markdown_table(curves: dict, severities: tuple[int, ...] = (1, 3, 5)) -> str:
    """Per corruption, at the given severities: re-picked R@90P, operating recall and the lowest
    task's auto-accept precision with the clean thresholds (its 95% interval and items accepted, then
    the task, in brackets)."""
    def cell(report: dict) -> str:
        mean = report["mean"]
        low, lowest = mean.get("lowest_auto_accept_precision"), "none accepted"
        if low is not None:
            task = report["tasks"][mean["lowest_precision_task"]]
            (lo, hi), accepted = task["auto_accept_precision_ci"], task["auto_accepted"]
            lowest = f"{low:.3f} [{lo:.3f}, {hi:.3f}] of {accepted} ({mean['lowest_precision_task']})"
        return f"{mean['recall_at_90_precision']:.3f} / {mean['operating_recall']:.3f} / {lowest}"

    head = " | ".join(f"severity {s}: R@90P / op. recall / lowest precision" for s in severities)
    lines = [f"| corruption | {head} |", "|---|" + "---|" * len(severities),
             f"| clean | {' | '.join(cell(curves['clean']) for _ in severities)} |"]
    for side in ("image", "text"):
        for kind, by_severity in curves[side].items():
            by_severity = {int(s): r for s, r in by_severity.items()}
            lines.append(f"| {side}: {kind} | " + " | ".join(cell(by_severity[s]) if s in by_severity else "-"
                                                              for s in severities) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cma_clip.lab.noise_curves", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--items", type=int, default=1000, help="test items sampled (default 1000)")
    p.add_argument("--severities", type=int, nargs="+", choices=[s for s in SEVERITIES if s], metavar="1-5",
                   help="default 1 to 5")
    p.add_argument("--cache-dir")
    p.add_argument("--out-json", required=True)
    p.add_argument("--plot", help="PNG of the curves")
    args = p.parse_args(argv)
    if args.items < 1:
        p.error(f"--items is how many test items to sample, at least 1, not {args.items}")
    try:
        curves = corruption_curves(args.checkpoint, args.items, args.severities, args.cache_dir,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    except CMAClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out_json).write_text(json.dumps(curves, indent=1))
    if args.plot:
        from ..viz import corruption_curves_figure

        name = Path(args.checkpoint).name
        corruption_curves_figure(curves, f"{name}: each corruption alone, the checkpoint's clean thresholds "
                                         f"({curves['items']} test items)").savefig(args.plot)
    print(markdown_table(curves, tuple(sorted(args.severities or (1, 3, 5)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
