"""An item without text: feed the empty string as it is, or tell the model the text is absent?
And an item whose photo carries nothing (a 1 x 1 pixel upload): does auto-accept still hold?

    python -m cma_clip.lab.empty_text --catalogue hm-articles --split val

The shipped checkpoint scores the split's items four ways, from the cached features: with their
own text (the reference), with the empty string's text features (what the app fed before), with
the empty string plus `text_absent` (the modality-wise attention puts all of its weight on the
image), and with their own text but a 1 x 1 grey pixel for every photo. Prints, per way, the mean
accuracy, mean recall at 90% precision, mean operating recall and auto-accept precision at the
checkpoint's thresholds, and the mean text weight.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..checkpoint import load_backbone, load_checkpoint
from ..data import REPO_ROOT, Catalogue, split_indices
from ..evaluate import rows_features, score, task_targets
from ..features import Features
from ..runtime import autocast


TEXT_FIELDS = {"text_tokens": np.float16, "text_pooled": np.float16, "text_mask": bool, "text_ids": np.int32}
IMAGE_FIELDS = {"image_tokens": np.float16, "image_pooled": np.float16, "colour": np.float16,
                "mobilenet_tokens": np.float16, "mobilenet_pooled": np.float16}


def constant_features(features: Features, backbone, max_tokens: int, fields: dict[str, type],
                      image: Image.Image, text: str) -> Features:
    """`features` with `fields` of every item replaced by those of one encoded (image, text): the
    empty string's text (`TEXT_FIELDS`), or a photo that carries nothing (`IMAGE_FIELDS`)."""
    encoded = backbone.encode([image], [text], max_tokens)
    constant = {name: np.repeat(value.detach().float().cpu().numpy().astype(kind), len(features), axis=0)
                for name, kind in fields.items()
                if getattr(features, name) is not None and (value := getattr(encoded, name)) is not None}
    return replace(features, **constant)


def empty_text_features(features: Features, backbone, max_tokens: int) -> Features:
    """`features` with every item's text replaced by the empty string's encoding."""
    return constant_features(features, backbone, max_tokens, TEXT_FIELDS, Image.new("RGB", (32, 32), "white"), "")


@torch.no_grad()
def probabilities(model, features: Features, absent: bool, batch_size: int = 512
                  ) -> tuple[dict[str, np.ndarray], float]:
    """Class probabilities per task and the mean text weight over items and tasks."""
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {task: [] for task in model.tasks}
    text_weights = []
    for start in range(0, len(features), batch_size):
        index = np.arange(start, min(start + batch_size, len(features)))
        with autocast(device):
            out = model(features.batch(index, device),
                        text_absent=torch.ones(len(index), dtype=torch.bool) if absent else None)
        for task, logits in out.logits.items():
            chunks[task].append(logits.float().softmax(-1).cpu().numpy())
            text_weights.append(out.modality_weights[task][:, 0].float().cpu().numpy())
    return {t: np.concatenate(c) for t, c in chunks.items()}, float(np.concatenate(text_weights).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.empty_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="hm-articles")
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", default=None, help="default: checkpoints/CATALOGUE")
    args = parser.parse_args(argv)
    folder = args.checkpoint or REPO_ROOT / "checkpoints" / args.catalogue
    torch.manual_seed(0)
    model, config = load_checkpoint(folder, "cpu")
    catalogue = Catalogue.open(config.catalogue_on(config.training_manifest()))
    rows = split_indices(catalogue, config.train.splits_seed)[args.split]
    backbone = load_backbone(folder, config, "cpu")
    features = rows_features(backbone, catalogue, rows, None, model.cfg.colour)
    targets = {t: v[rows] for t, v in task_targets(config, catalogue).items()}
    empty = empty_text_features(features, backbone, config.catalogue.max_text_tokens)
    pixel = constant_features(features, backbone, config.catalogue.max_text_tokens, IMAGE_FIELDS,
                              Image.new("RGB", (1, 1), (128, 128, 128)), "")
    report = {}
    ways = (("own text", features, False), ("empty string", empty, False), ("empty string, text absent", empty, True),
            ("1 x 1 grey image, own text", pixel, False))
    for name, feats, absent in ways:
        start = time.perf_counter()
        probs, text_weight = probabilities(model, feats, absent)
        scored = score(probs, targets, config.thresholds)
        tasks = scored["tasks"].values()
        accepted = sum(t["auto_accepted"] for t in tasks)
        right = sum(t["auto_accept_precision"] * t["auto_accepted"] for t in tasks if t["auto_accepted"])
        report[name] = {"accuracy": scored["mean"]["accuracy"],
                        "recall_at_90_precision": scored["mean"]["recall_at_90_precision"],
                        "operating_recall": scored["mean"]["operating_recall"],
                        "auto_accepted": accepted, "auto_accept_precision": right / accepted if accepted else None,
                        "text_weight": text_weight,
                        "per_task": {t: {k: v[k] for k in ("accuracy", "auto_accepted", "auto_accept_precision")}
                                     for t, v in scored["tasks"].items()},
                        "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({"catalogue": args.catalogue, "split": args.split, "items": len(rows), "ways": report},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
