"""How many real product photos does the blank-photo rule flag? Only truly blank ones should be.

    python -m cma_clip.lab.blank_photos --catalogue hm-articles

Decodes and letterboxes every photo of the catalogue as the model sees it
(`features.image_batches`) and measures `DualEncoder.photo_span`, the widest channel's span
of the photo's pixels: a photo at or under `BLANK_SPAN` levels counts as carrying nothing and
is never auto-accepted. Prints and writes (docs/results/blank-photos-<catalogue>.json) how
many photos are flagged, the smallest spans seen, and the spans of a few made-up blank photos.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from ..backbones import BLANK_SPAN
from ..checkpoint import load_backbone, load_checkpoint
from ..data import REPO_ROOT, Catalogue
from ..features import image_batches

MADE_UP = {"1 x 1 grey": Image.new("RGB", (1, 1), (128, 128, 128)),
           "white 512 x 512": Image.new("RGB", (512, 512), "white"),
           "black 60 x 80": Image.new("RGB", (60, 80), "black")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.blank_photos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="hm-articles")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    folder = REPO_ROOT / "checkpoints" / args.catalogue
    _, config = load_checkpoint(folder, "cpu")
    catalogue = Catalogue.open(config.catalogue_on(config.training_manifest()))
    backbone = load_backbone(folder, config, "cpu")  # its letterbox and normalisation, as the app's
    ids, paths = catalogue.item_ids(), catalogue.image_paths()
    started, spans = time.time(), []
    with torch.no_grad():
        for pixels in image_batches(paths, backbone, args.batch_size):
            spans.append(backbone.photo_span(pixels).numpy())
    span = np.concatenate(spans)
    lowest = np.argsort(span, kind="stable")[:5]
    made_up = {name: float(backbone.photo_span(backbone.preprocess([image]))[0]) for name, image in MADE_UP.items()}
    result = {"catalogue": args.catalogue, "photos": len(span), "blank_span": BLANK_SPAN,
              "flagged": int((span <= BLANK_SPAN).sum()),
              "lowest_spans": {ids[i]: round(float(span[i]), 1) for i in lowest},
              "spans_under_64": int((span < 64).sum()), "made_up": made_up, "seconds": round(time.time() - started, 1)}
    print(json.dumps(result, indent=1))
    out = REPO_ROOT / "docs" / "results" / f"blank-photos-{args.catalogue}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
