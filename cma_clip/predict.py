"""A predictor: (image, text) -> every task's top-k labels, modality weights and attention maps.

    from cma_clip import Predictor
    predictor = Predictor.from_checkpoint("checkpoints/hm-articles")
    result = predictor.predict(Image.open("shirt.jpg"), "Striped cotton shirt")

    python -m cma_clip.predict --checkpoint checkpoints/hm-articles --image assets/x.jpg --text "..."
    python -m cma_clip.predict --checkpoint checkpoints/hm-articles --manifest items.csv --out preds.jsonl

Sharded over several processes (resumable: rerun the same command after a crash), or on Ray Data
(local, or a cluster with --ray-address; cma_clip.ray_predict, docs/SCALE.md):

    torchrun --standalone --nproc_per_node 4 -m cma_clip.predict --checkpoint C --manifest items.csv --out preds.jsonl
    python -m cma_clip.predict --checkpoint C --manifest items.parquet --out preds.parquet --engine ray
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from . import distributed
from .backbones import DualEncoder, TextBatch, letterbox
from .checkpoint import CheckpointConfig, load_backbone, load_checkpoint, require_finished
from .data import Catalogue, CatalogueError, ImageError, load_image, read_manifest, write_table
from .errors import CMAClipError
from .features import image_batches, row_keys
from .model import IMAGE_SIDE, Classifier, absent_texts
from .relevance import WORD, explain, word_relevance, words_of
from .runtime import autocast, exit_on_stop_signals, output_file_problem, resolve_device

@dataclass
class TaskPrediction:
    labels: list[str]  # top-k, most likely first
    probabilities: list[float]
    modality_weights: dict[str, float]  # modality -> weight, summing to 1 (`CMAClip.modalities`)
    threshold: float | None  # confidence giving 90% precision on val; None if none did
    auto_accept: bool  # top-1 confidence clears the threshold (never without a text: see `Prediction.text_absent`)
    name: str = ""  # the task's display name (`CheckpointConfig.display_names`)

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def confidence(self) -> float:
        return self.probabilities[0]

    @property
    def image_weight(self) -> float:
        """The image side's share of the modality weights: the image's, plus the colour
        descriptor's when the model reads it (what a robustness probe watches)."""
        return sum(w for m, w in self.modality_weights.items() if m in IMAGE_SIDE)


@dataclass
class TaskRelevance:
    """What one task's prediction rests on (`cma_clip.relevance`): first-order estimates, not proofs."""

    image: np.ndarray  # [patches] LayerCAM on the image encoder's 14x14 stage, pooled to the patch grid; sums to 1
    image_fine: np.ndarray  # [h, w] the same at that stage's resolution (14x14 for the bundled backbone)
    words: np.ndarray  # [len(Prediction.words)] attention rollout over the text, summed into whole words; sums to 1
    tokens: np.ndarray  # [len(Prediction.tokens)] the same per model token, [CLS] and [SEP] included
    rollout_patches: np.ndarray  # [patches] the rollout's relevance of the patch tokens (a second image view)
    image_share: float  # share of the rollout on the image side ([CLS] and patches): how much the task reads the image
    padding_share: float  # share of the image map that fell on the letterbox padding, removed from `image`

    def top_word(self, words: list[str]) -> int | None:
        """The most relevant word with a letter or digit (punctuation is never the default)."""
        from .relevance import is_word

        ranked = [i for i in np.argsort(-self.words, kind="stable") if is_word(words[i])]
        return int(ranked[0]) if ranked else None


@dataclass
class Prediction:
    tasks: dict[str, TaskPrediction]
    tokens: list[str] = field(default_factory=list)  # the model's text tokens
    text_to_image: np.ndarray | None = None  # [len(tokens), patches]: each token's attention on the patches
    image_cls_to_text: np.ndarray | None = None  # [len(tokens)]: the image [CLS]'s attention on the tokens
    image_cls_to_patches: np.ndarray | None = None  # [patches]
    token_relevance: dict[str, np.ndarray] = field(default_factory=dict)  # task -> [len(tokens)], sums to 1
    grid_size: int = 0
    model_image: Image.Image | None = None  # the letterboxed image the model saw
    relevance: dict[str, TaskRelevance] = field(default_factory=dict)  # task -> what its prediction rests on
    words: list[str] = field(default_factory=list)  # the text's whole words the model saw (punctuation attached)
    token_words: list[int] = field(default_factory=list)  # per token: its index in `words`, -1 for special tokens
    words_unread: int = 0  # the text's words past the encoder's token limit: not read (`explain` sets it)
    photo_fraction: np.ndarray | None = None  # [patches] share of each patch the photo covers (the rest is padding)
    # No text: the prediction rests on the image alone (its modality weights all on the image), and nothing
    # is auto-accepted: the thresholds were set on items with a text, and without one the auto-accepted val
    # items reach only 0.88 (H&M) and 0.70 (fashion) precision (`cma_clip.lab.empty_text`, 2026-12-06).
    text_absent: bool = False
    # A photo of one flat colour (`DualEncoder.blank_photos`): nothing is auto-accepted either; with a 1 x 1
    # photo the auto-accepted H&M pattern on test reached only 0.78 precision, fashion season 0.87.
    photo_blank: bool = False

    @property
    def withheld(self) -> str:
        """Why nothing of this item is auto-accepted whatever its confidence: "no text", "blank photo",
        both ("no text, blank photo"), or "" when nothing stops it."""
        return ", ".join(why for why, present in (("no text", self.text_absent), ("blank photo", self.photo_blank))
                         if present)

    def to_dict(self) -> dict:
        return {task: {"label": p.label, "confidence": round(p.confidence, 4), "auto_accept": p.auto_accept,
                       "withheld": self.withheld,
                       "top_k": dict(zip(p.labels, [round(x, 4) for x in p.probabilities])),
                       "modality_weights": {k: round(v, 4) for k, v in p.modality_weights.items()}}
                for task, p in self.tasks.items()}


@dataclass
class Scores:
    """Many items' class probabilities and modality weights, as arrays: what a review queue ranks and
    filters (`Predictor.predictions` makes `Prediction`s of the rows it keeps)."""

    probabilities: dict[str, np.ndarray]  # task -> [items, classes] float32, every class
    modality_weights: dict[str, np.ndarray]  # task -> [items, modalities] in `CMAClip.modalities` order
    blank_photo: np.ndarray | None = None  # [items] bool (`DualEncoder.blank_photos`); None: not looked at

    def __len__(self) -> int:
        return len(next(iter(self.probabilities.values()), ()))

    def take(self, index) -> "Scores":
        """The rows `index`, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return Scores({t: p[index] for t, p in self.probabilities.items()},
                      {t: w[index] for t, w in self.modality_weights.items()},
                      None if self.blank_photo is None else self.blank_photo[index])

    @classmethod
    def of(cls, out, blank_photo: torch.Tensor | None = None) -> "Scores":
        """The softmax probabilities and modality weights of a model output (`CMAOutput`)."""
        return cls({t: logits.detach().float().softmax(-1).cpu().numpy() for t, logits in out.logits.items()},
                   {t: w.detach().float().cpu().numpy() for t, w in out.modality_weights.items()},
                   None if blank_photo is None else blank_photo.cpu().numpy())

    @classmethod
    def concatenate(cls, parts: list["Scores"]) -> "Scores":
        first = parts[0]
        blank = [p.blank_photo if p.blank_photo is not None else np.zeros(len(p), bool) for p in parts]
        return cls({t: np.concatenate([p.probabilities[t] for p in parts]) for t in first.probabilities},
                   {t: np.concatenate([p.modality_weights[t] for p in parts]) for t in first.modality_weights},
                   None if all(p.blank_photo is None for p in parts) else np.concatenate(blank))


class Predictor:
    def __init__(self, model: Classifier, config: CheckpointConfig, backbone: DualEncoder) -> None:
        self.model, self.config, self.backbone = model, config, backbone
        self.device = next(model.parameters()).device
        self.max_tokens = config.catalogue.max_text_tokens
        self.classes = config.classes
        self.thresholds = config.thresholds
        self.names = config.display_names

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | torch.device | None = None) -> "Predictor":
        device = resolve_device(device)
        require_finished(folder)
        model, config = load_checkpoint(folder, device)
        return cls(model, config, load_backbone(folder, config, device))

    @property
    def tasks(self) -> list[str]:
        return list(self.classes)

    def predict(self, image: Image.Image, text: str, top_k: int = 3) -> Prediction:
        """One item, with every task's relevance (`relevance`: image patches and whole words, from one
        backward for all tasks), the last layer's attention maps and each token's gradient x input."""
        return self.predict_many([image], [text], top_k)[0]

    def predict_many(self, images: list[Image.Image], texts: list[str], top_k: int = 3) -> list[Prediction]:
        """`predict` for several items at once (one forward and one backward: a server's micro-batch);
        each item's result is the one `predict` gives it alone, up to float rounding."""
        if not _checked_items(images, texts):
            return []
        ex = explain(self.model, self.backbone, images, texts, self.max_tokens, single_precision=True)
        predictions = self.predictions(Scores.of(ex.output, ex.blank_photo), top_k, texts)
        maps = ex.output.attention
        if maps is not None:
            text_to_image = maps.text_to_image.float().cpu().numpy()
            cls_to_text = maps.cls_to_text("image").float().cpu().numpy()
            cls_to_patches = maps.cls_to_patches("image").float().cpu().numpy()
        for b, (prediction, image, text) in enumerate(zip(predictions, images, texts)):
            prediction.tokens = self.backbone.token_strings(text, self.max_tokens)
            prediction.words, prediction.token_words = words_of(self.backbone, text, self.max_tokens)
            prediction.words_unread = max(0, len(WORD.findall(text)) - len(prediction.words))
            n, count = len(prediction.tokens), len(prediction.words)  # the item's tokens, its padding left out
            for t, task in enumerate(ex.tasks):
                prediction.token_relevance[task] = ex.token_gradient_input[b, t, :n]
                words = word_relevance(ex.text[b, t, :n], prediction.token_words, count)  # [CLS]/[SEP] left out
                prediction.relevance[task] = TaskRelevance(
                    image=ex.image[b, t], image_fine=ex.image_fine[b, t],
                    words=words / max(words.sum(), 1e-12), tokens=ex.text[b, t, :n],
                    rollout_patches=ex.rollout_patches[b, t], image_share=float(ex.image_share[b, t]),
                    padding_share=float(ex.padding_share[b, t]))
            prediction.grid_size = self.backbone.grid_size
            prediction.model_image = letterbox(image, self.backbone.image_size)
            prediction.photo_fraction = ex.photo_fraction[b]
            if maps is not None:
                prediction.text_to_image = text_to_image[b, :n]
                prediction.image_cls_to_text = cls_to_text[b, :n]
                prediction.image_cls_to_patches = cls_to_patches[b]
        return predictions

    def predict_batch(self, images: list[Image.Image], texts: list[str], top_k: int = 3) -> list[Prediction]:
        """Many items at once, without attention maps (none for none)."""
        if not images and not texts:
            return []
        return self.predictions(self.score_batch(images, texts), top_k, texts)

    def score_batch(self, images: list[Image.Image], texts: list[str]) -> Scores:
        """Many items' probabilities over every class and modality weights, as arrays."""
        if not _checked_items(images, texts):
            raise ValueError("no items to score")
        return self.score_prepared(self.backbone.preprocess(images), self.backbone.tokenize(texts, self.max_tokens),
                                   absent_texts(texts))

    @torch.no_grad()
    def score_prepared(self, pixels: torch.Tensor, text: TextBatch, text_absent: torch.Tensor | None = None) -> Scores:
        """`score_batch` on images already preprocessed and texts already tokenised (by decode workers,
        while the model runs); `text_absent` marks the items without text (`model.absent_texts`)."""
        feats = self.backbone.encode_prepared(pixels, text, colour=self.model.cfg.colour)
        with autocast(self.device, batch_size=len(pixels)):
            return Scores.of(self.model(feats, text_absent=text_absent), self.backbone.blank_photos(pixels))

    def predict_prepared(self, pixels: torch.Tensor, text: TextBatch, top_k: int = 3,
                         texts: list[str] | None = None) -> list[Prediction]:
        """`predict_batch` on prepared inputs (`score_prepared`); `texts`, when known, mark the items without text."""
        absent = absent_texts(texts) if texts is not None else None
        return self.predictions(self.score_prepared(pixels, text, absent), top_k, texts)

    def predictions(self, scores: Scores, top_k: int = 3, texts: list[str] | None = None) -> list[Prediction]:
        """Each row of `scores` as a `Prediction`: every task's top-k labels with the checkpoint's thresholds.
        An item whose text is empty (`texts`) or whose photo is blank (`scores.blank_photo`) is never
        auto-accepted: the thresholds hold for items with both (`Prediction.withheld`)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k is how many labels to give per task, at least 1, not {top_k!r}")
        missing = absent_texts(texts) if texts is not None else None  # the model's one rule for "no text"
        absent = missing.tolist() if missing is not None else [False] * len(scores)
        blank = scores.blank_photo.tolist() if scores.blank_photo is not None else [False] * len(scores)
        per_item: list[dict[str, TaskPrediction]] = [{} for _ in range(len(scores))]
        for task, probs in scores.probabilities.items():
            top = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, probs.shape[1])]
            values = np.take_along_axis(probs, top, 1).tolist()
            weights = scores.modality_weights[task].tolist()
            threshold, classes = self.thresholds[task], self.classes[task]
            for item, labels, probabilities, weight, withheld in zip(per_item, top.tolist(), values, weights,
                                                                    np.logical_or(absent, blank).tolist()):
                item[task] = TaskPrediction(
                    labels=[classes[j] for j in labels], probabilities=probabilities,
                    modality_weights=dict(zip(self.model.modalities, weight)), threshold=threshold, name=self.names[task],
                    auto_accept=threshold is not None and probabilities[0] >= threshold and not withheld)
        return [Prediction(tasks, text_absent=missing, photo_blank=flat)
                for tasks, missing, flat in zip(per_item, absent, blank)]

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the model's weights and classes: what predictions kept on disk are keyed by."""
        digest = hashlib.sha256(json.dumps(self.classes, sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def predict_manifest(self, manifest: str | Path, out: str | Path, batch_size: int = 32,
                         skip_unreadable: bool = False) -> int:
        """Predict every row of a CSV, JSONL or Parquet manifest; writes JSONL, CSV or Parquet (by
        the suffix). Images are decoded as `features.image_batches` says. An unreadable image stops
        the run with its message, or, `skip_unreadable`, gets a row without labels and its message
        in the `error` column every row then has. Returns the row count."""
        catalogue = open_for_prediction(self.config, manifest, photos_required=not skip_unreadable)
        ids, texts, paths = catalogue.item_ids(), catalogue.texts(), catalogue.image_paths()
        if distributed.world_size() > 1:
            keys = [key.hex() for key in row_keys(catalogue)]
            return self._predict_sharded(ids, keys, texts, paths, Path(out), batch_size, skip_unreadable)
        records = []
        for start, rows in self._predict_paths(paths, texts, batch_size, skip_unreadable):
            records += [{"id": item_id, **row} for item_id, row in zip(ids[start:], rows)]
        write_table(out, records)
        return len(records)

    def _predict_paths(self, paths: list[Path], texts: list[str], batch_size: int,
                       skip_unreadable: bool = False) -> Iterator[tuple[int, list[dict]]]:
        """(index of the batch's first item, its output rows), the images decoded and preprocessed
        by `features.image_batches`: beside the model on a GPU, between its batches on a CPU."""
        unreadable: dict[int, str] | None = {} if skip_unreadable else None
        batches = image_batches(paths, self.backbone, batch_size, unreadable=unreadable)
        for start, pixels in zip(range(0, len(paths), batch_size), batches):
            batch_texts = texts[start:start + len(pixels)]
            preds = self.predict_prepared(pixels, self.backbone.tokenize(batch_texts, self.max_tokens),
                                          texts=batch_texts)
            yield start, [prediction_row(p) if unreadable is None else
                          output_row(p, unreadable.get(start + i, "")) for i, p in enumerate(preds)]

    def shard_run(self, skip_unreadable: bool) -> str:
        """What a torchrun shard's name says of the run that wrote it (`_predict_sharded`)."""
        return hashlib.sha256(f"{self.fingerprint}|skip_unreadable={skip_unreadable}".encode()).hexdigest()[:12]

    def _predict_sharded(self, ids: list[str], keys: list[str], texts: list[str], paths: list[Path], out: Path,
                         batch_size: int, skip_unreadable: bool) -> int:
        """predict_manifest under torchrun: each rank predicts its contiguous share of the rows into
        OUT.shards/rank{r}-of-{w}-{run}.jsonl, appending and flushing every batch, and skips the rows a
        crashed earlier run already wrote there; then rank 0 merges the shards in manifest order
        into `out` and removes them. Shard lines carry their manifest row as "_row" and the row's
        content as "_key" (`features.row_keys`: its text and photo file), so a row whose text or photo
        was fixed before the rerun is predicted again. `run` names the checkpoint's weights and the
        options that shape a row: a rerun with others starts afresh."""
        rank, world = distributed.rank(), distributed.world_size()
        folder = Path(f"{out}.shards")
        folder.mkdir(parents=True, exist_ok=True)
        run = self.shard_run(skip_unreadable)
        shard = folder / f"rank{rank}-of-{world}-{run}.jsonl"
        rows = list(distributed.shard(range(len(ids)), rank, world))
        mine = set(rows)
        done = {r["_row"]: r for r in _read_shard(shard) if _unchanged(r, ids, keys) and r["_row"] in mine}
        shard.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))  # drop a torn line
        todo = [i for i in rows if i not in done]
        if done:
            print(f"rank {rank}: {len(done)} of {len(rows)} rows kept from an interrupted run, unchanged since",
                  file=sys.stderr)
        with open(shard, "a", encoding="utf-8") as handle:
            for start, rows in self._predict_paths([paths[i] for i in todo], [texts[i] for i in todo], batch_size,
                                                   skip_unreadable):
                handle.writelines(json.dumps({"_row": i, "_key": keys[i], "id": ids[i], **row}, ensure_ascii=False)
                                  + "\n" for i, row in zip(todo[start:], rows))
                handle.flush()
        distributed.barrier()
        if distributed.is_main():
            merged: dict[int, dict] = {}
            for path in sorted(folder.glob(f"rank*-{run}.jsonl")):  # an earlier run's with another world size too
                for record in _read_shard(path):
                    if _unchanged(record, ids, keys):
                        record.pop("_key")
                        merged.setdefault(record.pop("_row"), record)
            missing = [ids[i] for i in range(len(ids)) if i not in merged]
            if missing:
                raise CatalogueError(f"{len(missing)} rows missing from the shards in {folder}, e.g. {missing[:3]}")
            write_table(out, [merged[i] for i in range(len(ids))])
            shutil.rmtree(folder)
        distributed.barrier()
        return len(ids)


def _unchanged(record: dict, ids: list[str], keys: list[str]) -> bool:
    """A shard line written for the manifest's row as it is now: same id, same text and photo."""
    row = record.get("_row")
    return isinstance(row, int) and 0 <= row < len(ids) and record.get("id") == ids[row] \
        and record.get("_key") == keys[row]


def _read_shard(path: Path) -> list[dict]:
    """The complete lines of a shard; a line torn by a crash is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _checked_items(images: list[Image.Image], texts: list[str]) -> int:
    """How many items there are, once each is an image with a text (torch's and PIL's errors name
    neither: "Sizes of tensors must match", "no attribute 'size'")."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images and {len(texts)} texts: give one text per image ('' for none)")
    for i, (image, text) in enumerate(zip(images, texts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"item {i}: the image is a {type(image).__name__}, not a PIL image (open files with "
                            "cma_clip.data.load_image)")
        if not isinstance(text, str):
            raise TypeError(f"item {i}: the text is a {type(text).__name__}, not a string ('' for none)")
    return len(images)


def open_for_prediction(config: CheckpointConfig, manifest: str | Path, photos_required: bool = True) -> Catalogue:
    """A manifest to predict, read with the checkpoint's columns; it needs no label columns (`photos_required`:
    as `Catalogue.open`)."""
    return Catalogue.open(replace(config.catalogue_on(manifest), tasks=[]), photos_required=photos_required)


def repeated_ids(ids: Iterable[str]) -> str:
    """A note when ids repeat in a manifest (each row is predicted, but a join on the id is then
    ambiguous), else ""."""
    counts = Counter(ids)
    repeated = [item_id for item_id, n in counts.items() if n > 1]
    if not repeated:
        return ""
    many = len(repeated) > 1
    return (f"note: {len(repeated)} id{'s are' if many else ' is'} on several rows (e.g. "
            f"{', '.join(map(repr, repeated[:3]))}): each row has its own prediction, in the manifest's order; a join "
            "on the id matches them all")


def prediction_row(prediction: Prediction) -> dict:
    """One output row of batch prediction (without the id): per task its label, confidence and auto-accept;
    and why nothing of the item is auto-accepted, when its input rules it out (`Prediction.withheld`)."""
    row = {"withheld": prediction.withheld}
    for task, p in prediction.tasks.items():
        row[task] = p.label
        row[f"{task}_confidence"] = round(p.confidence, 4)
        row[f"{task}_auto_accept"] = p.auto_accept
    return row


def output_row(prediction: Prediction, error: str) -> dict:
    """`prediction_row` with an `error` column: "" for a readable image; for an unreadable one
    (`error`: why), no labels, confidence 0 and no auto-accept."""
    if not error:
        return {**prediction_row(prediction), "error": ""}
    row = {"withheld": "unreadable image"}
    for task in prediction.tasks:
        row.update({task: "", f"{task}_confidence": 0.0, f"{task}_auto_accept": False})
    return {**row, "error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.predict",
                                     description="Predict product attributes with a CMA-CLIP checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + config.json)")
    parser.add_argument("--image", help="one image file")
    parser.add_argument("--text", default="", help="its text")
    parser.add_argument("--manifest", help="predict every row of a CSV, JSONL or Parquet manifest instead")
    parser.add_argument("--out", help="output .jsonl, .csv or .parquet for --manifest "
                                      "(--engine ray: .jsonl or .parquet)")
    parser.add_argument("--batch-size", type=int, default=32, help="items per batch (default 32)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="--manifest: an unreadable image gets a row without labels and its message in an "
                             "'error' column, instead of stopping the run")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process (or torchrun's); ray: Ray Data, see docs/SCALE.md")
    ray_options = parser.add_argument_group("--engine ray")
    ray_options.add_argument("--ray-address",
                             help="a cluster's address ('auto' on its head node); default: a local Ray")
    ray_options.add_argument("--decode-workers", type=int,
                             help="CPU actors decoding images; 0: the model actors decode their own batches "
                                  "(default: 1 when the model actors have GPUs, else 0)")
    ray_options.add_argument("--inference-workers", type=int, default=1, help="model actors (default 1)")
    ray_options.add_argument("--gpus-per-worker", type=float,
                             help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    args = parser.parse_args(argv)
    if args.manifest and not args.out:
        parser.error("--manifest needs --out")
    if args.manifest and args.image:
        parser.error("give --image (one item) or --manifest (many), not both")
    if args.image and args.out:  # it was ignored: the JSON went to the screen and no file was written
        parser.error("--out is for --manifest: --image prints its prediction as JSON (redirect it: > prediction.json)")
    if args.manifest and Path(args.out).resolve() == Path(args.manifest).resolve():
        parser.error(f"--out {args.out} is the manifest itself: the predictions would replace the items; give "
                     "another file")
    if args.out and Path(args.out).suffix.lower() not in (".jsonl", ".csv", ".parquet"):
        parser.error(f"--out {args.out}: give a .jsonl, .csv or .parquet file")
    if args.out and (problem := output_file_problem("--out", args.out, "predictions.jsonl")):
        parser.error(problem)  # before the catalogue is predicted, not after
    for name in ("batch_size", "inference_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_workers is not None and args.decode_workers < 0:
        parser.error("--decode-workers must be 0 or more")
    if args.engine == "ray":
        return _main_ray(args)
    try:
        rank, world, _, device = distributed.setup()  # several processes under torchrun; else a no-op
        predictor = Predictor.from_checkpoint(args.checkpoint, device)
        if args.manifest:
            count = predictor.predict_manifest(args.manifest, args.out, args.batch_size, args.skip_unreadable)
            if rank == 0:
                _say_written(args, count, f" by {world} processes" if world > 1 else "")
        elif args.image:
            print(json.dumps(predictor.predict(load_image(args.image), args.text).to_dict(), indent=2))
        else:
            parser.error("give --image (and --text) or --manifest")
    except (CMAClipError, OSError) as exc:
        print(_failure(exc, args), file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0


def _main_ray(args: argparse.Namespace) -> int:
    """`--engine ray`: the manifest scored on Ray Data (cma_clip.ray_predict)."""
    if not args.manifest:
        print("error: --engine ray predicts a --manifest", file=sys.stderr)
        return 2
    from .ray_predict import RayOptions, predict_manifest_ray

    options = RayOptions(address=args.ray_address, batch_size=args.batch_size, decode_workers=args.decode_workers,
                         inference_workers=args.inference_workers, gpus_per_worker=args.gpus_per_worker,
                         skip_unreadable=args.skip_unreadable)
    try:
        count = predict_manifest_ray(args.checkpoint, args.manifest, args.out, options)
        _say_written(args, count, " by Ray")
    except (CMAClipError, OSError) as exc:
        print(_failure(exc, args), file=sys.stderr)
        return 2
    return 0


def _failure(exc: Exception, args: argparse.Namespace) -> str:
    """The message of a failed run; an unreadable image of a manifest says how to go past it."""
    hint = ("\n--skip-unreadable scores the other rows and names each unreadable image in an 'error' column"
            if isinstance(exc, ImageError) and args.manifest and not args.skip_unreadable else "")
    return f"error: {exc}{hint}"


def _say_written(args: argparse.Namespace, count: int, by: str) -> None:
    """A finished manifest run's last lines, of its output read back once: the ids on several rows
    (`repeated_ids`), then the count and, with --skip-unreadable, how many rows have an error."""
    rows = read_manifest(args.out)
    if repeated := repeated_ids(str(row["id"]) for row in rows):
        print(repeated, file=sys.stderr)
    errors = sum(1 for row in rows if row.get("error"))
    print(f"{count} predictions written to {args.out}{by}" + (
        f"; {errors} unreadable images (their rows say why in the 'error' column)" if args.skip_unreadable else ""))


if __name__ == "__main__":
    exit_on_stop_signals()  # Ctrl-C: exit 130 quietly (it printed a KeyboardInterrupt traceback)
    sys.exit(main())
