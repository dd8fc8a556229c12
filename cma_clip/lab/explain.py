"""Do the app's maps show why the model predicts what it does? A pointing ratio and a deletion check.

    python -m cma_clip.lab.explain --catalogue hm-articles --items 1002
    python -m cma_clip.lab.explain --catalogue fashion-product-images --items 500   # a seeded sample of test

Per map kind, over the `test` items and every task of the shipped checkpoint:

* **Pointing ratio**: the share of the map's mass on the product's patches divided by the share
  of the patches that are product (1.0 = a uniform map). The product: the pixels of the photo
  that differ from its background (`product_pixels`), so never the letterbox padding; a patch is
  product if at least half of its pixels are. Items with no product patch are left out (noted).
* **Deletion check** (on the first `--deletion-items` of the sample): paint the k most relevant
  patches of the letterboxed image white (the letterbox fill), or remove the k most relevant
  words from the text, and read the task's probability of its clean top-1 label; the same for k
  random patches (among those the photo covers) or words. A map that shows why must lower the
  confidence faster than random. Every map ranks only the patches the photo covers, so that
  painting padding white (which changes nothing) does not count against a map: its padding
  mass shows in the pointing ratio and the padding column.

Writes docs/results/explain-<catalogue>.json and .png (deletion curves) unless --out is empty.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones import EncoderOutput, TextBatch, letterbox
from ..data import REPO_ROOT, Catalogue, CatalogueConfig, load_image
from ..predict import Predictor
from ..relevance import Explanation, explain, is_word, word_relevance, words_of
from ..runtime import autocast

IMAGE_KINDS = {  # name -> what it is
    "relevance": "LayerCAM on the image encoder's 14x14 stage, pooled to patches (the app's default)",
    "rollout": "gradient-weighted attention rollout (Chefer et al. 2021) over the patch tokens",
    "gradcam": "Grad-CAM on the patch tokens",
    "attention-word": "last-layer attention of the task's most relevant token over the patches (the old default)",
    "attention-cls": "last-layer attention of the image [CLS] over the patches",
}
TEXT_KINDS = {
    "relevance": "rollout over the text tokens, summed into words (the app's default)",
    "gradient-input": "|gradient x input| of the text token states, summed into words (the old relevance)",
    "attention-cls": "last-layer attention of the image [CLS] over the text tokens, summed into words",
}
PATCH_STEPS = (1, 3, 6)
WORD_STEPS = (1, 2, 4)
BACKGROUND_TOLERANCE = 24  # max channel difference (0-255) from the background colour still counted as background


# ---------------------------------------------------------------------- the product mask
def product_pixels(image: Image.Image, tolerance: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """[h, w] bool: the photo's product pixels. The background colour is the median of the light
    pixels (every channel >= 160) on the photo's 2-pixel border, white when under a tenth of the
    border is light; background is every pixel within `tolerance` of it that connects to the
    border through such pixels (so a white logo inside a dark shirt stays product)."""
    a = np.asarray(image.convert("RGB")).astype(np.int16)
    ring = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3),
                           a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    light = ring[ring.min(-1) >= 160]
    colour = np.median(light, 0) if len(light) >= 0.1 * len(ring) else np.full(3, 255)
    near = np.abs(a - colour).max(-1) <= tolerance
    back = np.zeros_like(near)
    back[0, :], back[-1, :], back[:, 0], back[:, -1] = near[0, :], near[-1, :], near[:, 0], near[:, -1]
    while True:  # grow the border's background through background-coloured pixels
        grown = back.copy()
        grown[1:] |= back[:-1]
        grown[:-1] |= back[1:]
        grown[:, 1:] |= back[:, :-1]
        grown[:, :-1] |= back[:, 1:]
        grown &= near
        if np.array_equal(grown, back):
            return ~back
        back = grown


def product_patches(image: Image.Image, size: int = 224, grid: int = 7) -> np.ndarray:
    """[grid*grid] bool: patches of the letterboxed image at least half covered by product pixels."""
    mask = Image.fromarray(product_pixels(image).astype(np.uint8) * 255).convert("RGB")
    boxed = np.asarray(letterbox(mask, size, fill=(0, 0, 0)))[..., 0] > 127
    cell = size // grid
    return (boxed[:grid * cell, :grid * cell].reshape(grid, cell, grid, cell).mean((1, 3)) >= 0.5).reshape(-1)


def pointing_ratio(weights: np.ndarray, product: np.ndarray) -> float:
    """Share of the map's (non-negative) mass on product patches / share of product patches; NaN
    when the map is empty or there is no product patch."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    if w.sum() <= 0 or not product.any():
        return float("nan")
    return float(w[product].sum() / w.sum() / product.mean())


# ---------------------------------------------------------------------- per item
@dataclass
class Item:
    image: Image.Image
    text: str
    product: np.ndarray  # [P] bool


def image_maps(ex: Explanation, b: int, tokens: list[str], predictor: Predictor) -> dict[str, np.ndarray]:
    """[T, P] maps of every image kind for item b of an explanation."""
    attention = ex.output.attention
    length = attention.text_length
    patches = slice(length + 2, length + 2 + attention.num_patches)  # not the colour or words tokens after them
    text_to_image = attention.text_to_image[b].float().cpu().numpy()  # [L, P]
    readable = [i for i, t in enumerate(tokens) if t not in _special() and is_word(t)]
    old = []
    for t in range(len(ex.tasks)):  # the old default: the token with the highest gradient x input
        best = max(readable, key=lambda i: ex.token_gradient_input[b, t, i]) if readable else None
        old.append(text_to_image[best] if best is not None
                   else attention.image_cls[b, patches].float().cpu().numpy())
    cls = attention.image_cls[b, patches].float().cpu().numpy()
    return {"relevance": ex.image[b], "rollout": ex.rollout_patches[b], "gradcam": ex.gradcam_patches[b],
            "attention-word": np.stack(old), "attention-cls": np.repeat(cls[None], len(ex.tasks), 0)}


def unmasked_maps(ex: Explanation, b: int, maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image maps as computed, before the padding is removed (the attention maps never are)."""
    return {**maps, **{k: v[b] for k, v in (ex.unmasked or {}).items()}}


def text_maps(ex: Explanation, b: int, token_words: list[int], count: int) -> dict[str, np.ndarray]:
    """[T, words] maps of every text kind for item b."""
    attention = ex.output.attention
    n = len(token_words)
    cls = attention.image_cls[b, 1:1 + n].float().cpu().numpy()
    return {"relevance": np.stack([word_relevance(ex.text[b, t, :n], token_words, count)
                                   for t in range(len(ex.tasks))]),
            "gradient-input": np.stack([word_relevance(ex.token_gradient_input[b, t, :n], token_words, count)
                                        for t in range(len(ex.tasks))]),
            "attention-cls": np.repeat(word_relevance(cls, token_words, count)[None], len(ex.tasks), 0)}


def _special() -> frozenset[str]:
    from ..viz import SPECIAL_TOKENS

    return SPECIAL_TOKENS


def ranked(weights: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of `allowed` positions, highest weight first (ties in random order)."""
    index = np.flatnonzero(allowed)
    jitter = rng.random(len(index)) * 1e-12
    return index[np.argsort(-(np.asarray(weights, dtype=np.float64)[index] + jitter), kind="stable")]


def paint_white(boxed: Image.Image, patches: np.ndarray, grid: int) -> Image.Image:
    a = np.asarray(boxed).copy()
    cell = a.shape[0] // grid
    for p in patches:
        r, c = divmod(int(p), grid)
        a[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 255
    return Image.fromarray(a)


def colour_of(predictor: Predictor, pixels: torch.Tensor) -> torch.Tensor | None:
    """The foreground colour descriptors of preprocessed pixels when the model reads them."""
    return predictor.backbone.describe_colour(pixels) if predictor.model.cfg.colour else None


@torch.no_grad()
def text_probabilities(predictor: Predictor, image: Image.Image, texts: list[str]) -> dict[str, np.ndarray]:
    """task -> [N, classes] probabilities for one image with N texts, the image encoded once."""
    backbone, device = predictor.backbone, predictor.device
    pixels = backbone.preprocess([image]).to(device)
    image_fields = backbone.image_fields(pixels)
    colour = colour_of(predictor, pixels)
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(texts), 64):
        chunk = texts[start:start + 64]
        batch = backbone.tokenize(chunk, predictor.max_tokens)
        n = max(1, int(batch.mask.sum(1).max()))
        batch = TextBatch(batch.ids[:, :n], batch.mask[:, :n]).to(device)
        with autocast(device):
            text_tokens, text_pooled = backbone.encode_text(batch)
        m = len(chunk)
        feats = EncoderOutput(**{name: x.expand(m, *x.shape[1:]) for name, x in image_fields.items()},
                              text_tokens=text_tokens.float(), text_mask=batch.mask, text_pooled=text_pooled.float(),
                              text_ids=batch.ids, colour=None if colour is None else colour.expand(m, -1))
        with autocast(device, batch_size=m):
            logits = predictor.model(feats).logits
        for task, value in logits.items():
            out.setdefault(task, []).append(value.float().softmax(-1).cpu().numpy())
    return {task: np.concatenate(v) for task, v in out.items()}


@torch.no_grad()
def image_probabilities(predictor: Predictor, images: list[Image.Image], text: str) -> dict[str, np.ndarray]:
    """Like `probabilities` for many images of one text, encoding the text once."""
    backbone = predictor.backbone
    text_batch = backbone.tokenize([text], predictor.max_tokens)
    n = max(1, int(text_batch.mask.sum()))
    text_batch.ids, text_batch.mask = text_batch.ids[:, :n], text_batch.mask[:, :n]
    with autocast(predictor.device):
        text_tokens, text_pooled = backbone.encode_text(text_batch.to(predictor.device))
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), 64):
        chunk = images[start:start + 64]
        pixels = backbone.preprocess(chunk).to(predictor.device)
        m = len(chunk)
        feats = EncoderOutput(**backbone.image_fields(pixels), text_tokens=text_tokens.float().expand(m, -1, -1),
                              text_mask=text_batch.mask.to(predictor.device).expand(m, -1),
                              text_pooled=text_pooled.float().expand(m, -1),
                              text_ids=text_batch.ids.to(predictor.device).expand(m, -1),
                              colour=colour_of(predictor, pixels))
        with autocast(predictor.device, batch_size=m):
            logits = predictor.model(feats).logits
        for task, value in logits.items():
            out.setdefault(task, []).append(value.float().softmax(-1).cpu().numpy())
    return {task: np.concatenate(v) for task, v in out.items()}


def deletion(predictor: Predictor, item: Item, ex: Explanation, b: int, maps: dict[str, np.ndarray],
             words: list[str], word_maps: dict[str, np.ndarray], seed: int) -> dict:
    """{"image": {kind: [T, steps]}, "text": {...}}: each task's probability of its clean top-1
    label after deleting the k most relevant patches / words (k = PATCH_STEPS / WORD_STEPS)."""
    rng = np.random.default_rng(seed)
    tasks, grid = ex.tasks, predictor.backbone.grid_size
    clean = {t: int(ex.output.logits[t][b].argmax()) for t in tasks}
    boxed = letterbox(item.image, predictor.backbone.image_size)
    photo = ex.photo_fraction[b] > 0
    kinds = {**maps, "random": None}
    variants, keys = [], []
    for kind, m in kinds.items():
        for t, task in enumerate(tasks):
            order = rng.permutation(np.flatnonzero(photo)) if m is None else ranked(m[t], photo, rng)
            for k in PATCH_STEPS:
                variants.append(paint_white(boxed, order[:k], grid))
                keys.append((kind, t))
    probs = image_probabilities(predictor, variants, item.text)
    result: dict = {"image": {}, "text": {}}
    for i, (kind, t) in enumerate(keys):
        result["image"].setdefault(kind, [[] for _ in tasks])[t].append(float(probs[tasks[t]][i, clean[tasks[t]]]))
    if words:
        texts, keys = [], []
        wkinds = {**word_maps, "random": None}
        allowed = np.ones(len(words), dtype=bool)
        for kind, m in wkinds.items():
            for t in range(len(tasks)):
                order = rng.permutation(len(words)) if m is None else ranked(m[t], allowed, rng)
                for k in WORD_STEPS:
                    drop = set(order[:k].tolist())
                    texts.append(" ".join(w for j, w in enumerate(words) if j not in drop))
                    keys.append((kind, t))
        probs = text_probabilities(predictor, item.image, texts)
        for i, (kind, t) in enumerate(keys):
            result["text"].setdefault(kind, [[] for _ in tasks])[t].append(float(probs[tasks[t]][i, clean[tasks[t]]]))
    result["clean"] = [float(ex.output.logits[t][b].float().softmax(-1).max()) for t in tasks]
    return result


# ---------------------------------------------------------------------- the study
def sample(catalogue: Catalogue, items: int, seed: int = 0) -> Catalogue:
    """All of `catalogue` when `items` covers it, else a seeded random sample in catalogue order."""
    if items >= len(catalogue):
        return catalogue
    return catalogue.take(np.sort(np.random.default_rng(seed).choice(len(catalogue), items, replace=False)))


def measure(predictor: Predictor, catalogue: Catalogue, deletion_items: int = 100, batch_size: int = 16,
            log=print) -> dict:
    """Pointing ratios of every image kind and deletion curves (image and text) over `catalogue`."""
    tasks, backbone = predictor.tasks, predictor.backbone
    texts, paths = catalogue.texts(), catalogue.image_paths()
    pointing = {k: [] for k in IMAGE_KINDS}  # per item: [T] ratios
    pointing_unmasked = {k: [] for k in IMAGE_KINDS}
    padding_mass = {k: [] for k in IMAGE_KINDS}  # per item: [T] share on pure-padding patches, as computed
    pure_padding_share, product_share, skipped = [], [], 0
    curves: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        batch_texts = texts[start:start + batch_size]
        ex = explain(predictor.model, backbone, images, batch_texts, predictor.max_tokens, keep_unmasked=True)
        for b, (image, text) in enumerate(zip(images, batch_texts)):
            product = product_patches(image, backbone.image_size, backbone.grid_size)
            pure = ex.photo_fraction[b] == 0
            tokens = backbone.token_strings(text, predictor.max_tokens)
            maps = image_maps(ex, b, tokens, predictor)
            raw = unmasked_maps(ex, b, maps)
            pure_padding_share.append(pure.mean())
            product_share.append(product.mean())
            for kind in maps:
                positive = np.clip(raw[kind], 0, None)
                padding_mass[kind].append((positive[:, pure].sum(1) / np.maximum(positive.sum(1), 1e-12)).tolist())
            if not product.any():
                skipped += 1
            else:
                for kind, m in maps.items():
                    pointing[kind].append([pointing_ratio(row, product) for row in m])
                    pointing_unmasked[kind].append([pointing_ratio(row, product) for row in raw[kind]])
            if start + b < deletion_items:
                words, token_words = words_of(backbone, text, predictor.max_tokens)
                wm = text_maps(ex, b, token_words, len(words))
                curves.append(deletion(predictor, Item(image, text, product), ex, b, maps, words, wm, seed=start + b))
        log(f"  {min(start + batch_size, len(paths))}/{len(paths)} items, {time.perf_counter() - started:.0f} s")
    return summarise(tasks, pointing, pointing_unmasked, padding_mass, curves, len(paths), skipped,
                     float(np.mean(product_share)), float(np.mean(pure_padding_share)))


def summarise(tasks, pointing, pointing_unmasked, padding_mass, curves, items, skipped, product_share,
              pure_padding_share) -> dict:
    def stats(values) -> dict:
        v = np.asarray(values, dtype=np.float64)
        per_pair = v[~np.isnan(v)]
        per_item = np.nanmean(v, axis=1) if v.size else v
        return {"mean": float(per_pair.mean()), "median": float(np.median(per_pair)),
                "above_1": float((per_pair > 1).mean()), "items_above_1": float((per_item > 1).mean()),
                "per_task": {t: float(np.nanmean(v[:, i])) for i, t in enumerate(tasks)}}

    image = {k: {**stats(pointing[k]), "unmasked_mean": stats(pointing_unmasked[k])["mean"],
                 "unmasked_above_1": stats(pointing_unmasked[k])["above_1"],
                 "padding_mass": float(np.mean(padding_mass[k])), "what": IMAGE_KINDS[k]} for k in IMAGE_KINDS}
    deletion_summary = {}
    for side, steps in (("image", PATCH_STEPS), ("text", WORD_STEPS)):
        kinds = {}
        for c in curves:
            for kind, per_task in c[side].items():
                for t, values in enumerate(per_task):
                    kinds.setdefault(kind, []).append([c["clean"][t], *values])
        deletion_summary[side] = {
            "steps": [0, *steps],
            "mean_confidence": {k: np.mean(v, 0).round(4).tolist() for k, v in kinds.items()},
            "mean_drop": {k: (np.mean(v, 0)[0] - np.mean(v, 0)[1:]).round(4).tolist() for k, v in kinds.items()},
            "pairs": len(next(iter(kinds.values()), [])), "items": len(curves)}
    return {"items": items, "items_without_product_patch": skipped, "tasks": tasks,
            "product_patch_share": product_share, "pure_padding_patch_share": pure_padding_share,
            "pointing": image, "deletion": deletion_summary}


def report(result: dict, name: str) -> str:
    lines = [f"## {name}: {result['items']} test items x {len(result['tasks'])} tasks "
             f"({result['items_without_product_patch']} items without a product patch left out of pointing); "
             f"product patches {result['product_patch_share']:.1%}, pure letterbox padding "
             f"{result['pure_padding_patch_share']:.1%} of the patches", "",
             "| image map | pointing ratio, mean (median) | (item, task) pairs > 1 | items > 1 (mean over tasks) | "
             "before padding removal: mean, > 1 | mass on pure padding |", "|---|---|---|---|---|---|"]
    for kind, s in result["pointing"].items():
        lines.append(f"| {kind} | {s['mean']:.2f} ({s['median']:.2f}) | {s['above_1']:.0%} | "
                     f"{s['items_above_1']:.0%} | "
                     f"{s['unmasked_mean']:.2f}, {s['unmasked_above_1']:.0%} | {s['padding_mass']:.1%} |")
    lines += ["", "Pointing ratio per task (mean):", "",
              "| image map | " + " | ".join(result["tasks"]) + " |", "|---|" + "---|" * len(result["tasks"])]
    for kind, s in result["pointing"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{s['per_task'][t]:.2f}" for t in result["tasks"]) + " |")
    for side in ("image", "text"):
        d = result["deletion"][side]
        unit = "patches" if side == "image" else "words"
        lines += ["", f"Deletion, {side} ({d['items']} items, {d['pairs']} item-task pairs): mean probability of the "
                  f"clean top-1 label after removing k {unit}", "",
                  "| map | " + " | ".join(f"k={k}" for k in d["steps"]) + " | drop at the last k vs random |",
                  "|---|" + "---|" * (len(d["steps"]) + 1)]
        random_drop = d["mean_drop"].get("random", [0.0])[-1]
        for kind, values in d["mean_confidence"].items():
            drop = d["mean_drop"][kind][-1]
            ratio = f"{drop / random_drop:.2f}x" if random_drop > 0 else "n/a"
            lines.append(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {ratio} |")
    return "\n".join(lines)


def plot(result: dict, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"relevance": "#1f77b4", "rollout": "#ff7f0e", "gradcam": "#2ca02c", "gradient-input": "#ff7f0e",
               "attention-word": "#d62728", "attention-cls": "#9467bd", "random": "#7f7f7f"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, side in zip(axes, ("image", "text")):
        d = result["deletion"][side]
        for kind, values in d["mean_confidence"].items():
            ax.plot(d["steps"], values, marker="o", linewidth=2.4 if kind == "relevance" else 1.2,
                    linestyle="--" if kind == "random" else "-", color=colours.get(kind), label=kind)
        ax.set_xticks(d["steps"])
        ax.set_xlabel(f"{'patches' if side == 'image' else 'words'} removed (most relevant first)")
        ax.set_ylabel("probability of the clean top-1 label")
        ax.set_title(f"{name}: deleting {side} evidence", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.explain",
                                     description="Pointing ratio and deletion check of the relevance maps.")
    parser.add_argument("--catalogue", default="hm-articles")
    parser.add_argument("--checkpoint", help="default: checkpoints/<catalogue>")
    parser.add_argument("--items", type=int, default=1002, help="test items (a seeded sample when fewer than all)")
    parser.add_argument("--deletion-items", type=int, default=100, help="the first N of them get the deletion check")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "results"), help="folder for JSON + PNG; '' for none")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    predictor = Predictor.from_checkpoint(args.checkpoint or REPO_ROOT / "checkpoints" / args.catalogue)
    catalogue = sample(Catalogue.open(CatalogueConfig.load(args.catalogue), split="test"), args.items)
    deleted = min(args.deletion_items, len(catalogue))
    print(f"{args.catalogue}: {len(catalogue)} test items, deletion on the first {deleted}")
    result = measure(predictor, catalogue, args.deletion_items, args.batch_size)
    print(report(result, args.catalogue))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"explain-{args.catalogue}.json").write_text(json.dumps(result, indent=1))
        plot(result, args.catalogue, out / f"explain-{args.catalogue}.png")
        print(f"wrote {out}/explain-{args.catalogue}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
