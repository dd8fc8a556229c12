"""Train CMA-CLIP on a catalogue.

    python -m cma_clip.train --catalogue hm-articles --out checkpoints/hm-articles
    python -m cma_clip.train --manifest items.csv --text-columns title --tasks colour pattern --out ckpt/

Stages: (1) backbone features, cached once; (2) CLIP-style alignment of the pooled
embeddings (LiT, towers locked); (3) CMA-CLIP with multi-task cross-entropy, AdamW,
warmup + cosine, early stopping on the validation split. Progress is saved every
epoch; `--resume` continues an interrupted run. The best epoch is written as a
checkpoint with its 90%-precision thresholds from `val` and, when there is a `test`
split, its report on `test` (eval_test.json).

Under torchrun (same options) the model is wrapped in DistributedDataParallel: every
rank takes its share of each global batch of --batch-size items, so the number of
steps and the loss are those of one process; rank 0 alone validates and writes.

    torchrun --standalone --nproc_per_node 2 -m cma_clip.train --catalogue hm-articles --out ckpt/
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .align import train_alignment
from .backbones import BackboneError, DualEncoder, EncoderOutput, create_backbone
from .checkpoint import (CheckpointError, load_checkpoint, load_finetuned_backbone,
                         save_checkpoint, write_config)
from .data import (Catalogue, CatalogueConfig, CatalogueError, Features, ImageError, LabelVocab, extract_features,
                   load_image, split_indices)
from .evaluate import (catalogue_for_checkpoint, format_table, predict_probabilities, score, task_targets,
                       training_manifest)
from .labels import LabelStore, LabelStoreError
from .metrics import threshold_at_precision
from .model import FUSIONS, CMAClip, CMAClipConfig, multitask_loss, no_decay
from .predict import shared_backbone
from .runtime import autocast, default_device, seed_everything

STATE_FILE = "train_state.safetensors"  # what --resume reads; removed when the run finishes
MANIFEST_ARGS = ("manifest", "image_column", "text_columns", "id_column")
SELECTION_METRIC = "recall_at_90_precision"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train CMA-CLIP on a catalogue.")
    src = p.add_argument_group("data")
    src.add_argument("--catalogue", help="bundled config name (fashion-product-images, hm-articles) or a JSON config")
    src.add_argument("--data-root", help="folder the bundled configs' manifests are relative to (default ../shared/data)")
    src.add_argument("--manifest", help="CSV/JSONL manifest (instead of --catalogue)")
    src.add_argument("--image-column", help="with --manifest: the image path column (default image)")
    src.add_argument("--text-columns", nargs="+", help="with --manifest: the text columns, joined (default text)")
    src.add_argument("--tasks", nargs="+", help="label columns to learn (default: the config's)")
    src.add_argument("--id-column", help="with --manifest: the item id column (default: none)")
    src.add_argument("--max-text-tokens", type=int)
    src.add_argument("--limit", type=int, help="use only the first N items of each split (quick runs, tests)")
    src.add_argument("--min-count", type=int, default=1, help="a class needs this many training items to be learned")
    src.add_argument("--extra-labels", help="SQLite label store whose corrections override catalogue labels")
    src.add_argument("--cache-dir", help="feature cache (default ~/.cache/cma_clip or $CMA_CLIP_CACHE)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="bundled", help="'bundled' or 'open_clip:MODEL[:PRETRAINED]'")
    m.add_argument("--finetune-backbone", action="store_true", help="train the backbone too (slow; for a GPU)")
    m.add_argument("--fusion", default="cma", choices=FUSIONS,
                   help="the full model, an ablation or a baseline (see cma_clip.model.FUSIONS)")
    m.add_argument("--align-from", help="take the CLIP-style alignment heads from this checkpoint instead of "
                                        "training them (same backbone); comparisons then share aligned embeddings")
    m.add_argument("--width", type=int, default=192)
    m.add_argument("--depth", type=int, default=1)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--embed-dim", type=int, default=256)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--lexical-buckets", type=int, default=8192,
                   help="size of the trainable hashed token-id embedding added to the text tokens (0: off)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=15)
    o.add_argument("--align-epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup", type=float, default=0.05, help="share of steps spent warming up")
    o.add_argument("--patience", type=int, default=4, help="stop after this many epochs without val improvement")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick runs)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def catalogue_config(args: argparse.Namespace) -> CatalogueConfig:
    columns = {"--image-column": args.image_column, "--text-columns": args.text_columns, "--id-column": args.id_column}
    if args.catalogue:
        given = [flag for flag, value in columns.items() if value]
        if args.manifest or given:
            raise CatalogueError(f"{' and '.join(given or ['--manifest'])} go with --manifest; a --catalogue config "
                                 "names its own manifest and columns")
        config = CatalogueConfig.load(args.catalogue, args.data_root)
    elif args.manifest:
        config = CatalogueConfig(name=Path(args.manifest).stem, manifest=args.manifest,
                                 image_column=args.image_column or "image", text_columns=args.text_columns or ["text"],
                                 tasks=args.tasks or [], id_column=args.id_column)
    else:
        raise CatalogueError("give --catalogue or --manifest")
    if args.tasks:
        config.tasks = args.tasks
    if args.max_text_tokens:
        config.max_text_tokens = args.max_text_tokens
    if not config.tasks:
        raise CatalogueError("no tasks: give --tasks with the label columns to learn")
    return config


def limit_splits(catalogue: Catalogue, limit: int) -> Catalogue:
    """The first `limit` rows of every split."""
    seen: dict[str, int] = {}
    rows = []
    for row in catalogue.rows:
        split = row.get("split", "")
        if seen.get(split, 0) < limit:
            seen[split] = seen.get(split, 0) + 1
            rows.append(row)
    return replace(catalogue, rows=rows)


class LiveBatches:
    """Backbone features computed per batch with gradients, for --finetune-backbone."""

    def __init__(self, backbone: DualEncoder, catalogue: Catalogue, encoder: torch.nn.Module | None = None) -> None:
        self.backbone, self.paths, self.texts = backbone, catalogue.image_paths(), catalogue.texts()
        self.encoder = encoder or backbone  # the backbone, or its DistributedDataParallel wrapper
        self.max_tokens = catalogue.config.max_text_tokens

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, index: np.ndarray, device: torch.device) -> EncoderOutput:
        pixels = self.backbone.preprocess([load_image(self.paths[i]) for i in index]).to(device)
        text = self.backbone.tokenize([self.texts[i] for i in index], self.max_tokens)
        return self.encoder(pixels, text.to(device))


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def save_state(out: Path, model: CMAClip, optimizer: torch.optim.Optimizer, counters: dict,
               backbone: DualEncoder | None = None) -> None:
    """Training state for --resume: one safetensors file (no pickles), the counters in its
    metadata; `backbone` when it is being fine-tuned. Written to a temporary file renamed into
    place, so a crash mid-write leaves the previous state."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if backbone is not None:
        tensors.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()})
    optim = optimizer.state_dict()
    for pid, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).cpu().contiguous()
    partial = out / f"{STATE_FILE}.partial"
    save_file(tensors, str(partial), metadata={"counters": json.dumps({**counters, "param_groups": optim["param_groups"]})})
    os.replace(partial, out / STATE_FILE)


def load_state(out: Path, model: CMAClip, optimizer: torch.optim.Optimizer,
               backbone: DualEncoder | None = None) -> dict:
    try:
        with safe_open(str(out / STATE_FILE), "pt") as handle:
            counters = json.loads(handle.metadata()["counters"])
        tensors = load_file(str(out / STATE_FILE))
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot resume from {out}: its training state is unreadable ({exc}); "
                              "start again without --resume") from exc
    if backbone is not None:
        if not any(k.startswith("backbone.") for k in tensors):
            raise CheckpointError(f"cannot resume {out} with --finetune-backbone: its state has no backbone weights")
        backbone.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": counters.pop("param_groups")})
    return counters


def thresholds_at_90(probabilities: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict[str, float | None]:
    out = {}
    for task, probs in probabilities.items():
        labelled = targets[task] != -1
        correct = (probs[labelled].argmax(1) == targets[task][labelled]).astype(float)
        out[task] = threshold_at_precision(correct, probs[labelled].max(1), 0.9)
    return out


def train(args: argparse.Namespace) -> dict:
    """Train and return the best epoch's metrics (on rank 0; {} on the other ranks)."""
    seed_everything(args.seed)
    rank, world, local_rank, device = distributed.setup()
    main_rank = rank == 0
    if args.batch_size < world:
        raise CatalogueError(f"--batch-size {args.batch_size} is smaller than the {world} processes")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = catalogue_config(args)
    catalogue = Catalogue.open(config)
    if args.limit:
        catalogue = limit_splits(catalogue, args.limit)
    if args.extra_labels:
        if not Path(args.extra_labels).is_file():
            raise CatalogueError(f"--extra-labels {args.extra_labels}: no such label store (the app keeps it in "
                                 "studio_data/labels.db)")
        catalogue = LabelStore(args.extra_labels).apply_to(catalogue)
    splits = split_indices(catalogue, args.seed)
    if not len(splits["train"]) or not len(splits["val"]):
        raise CatalogueError("training needs items in both the train and val splits")

    backbone = create_backbone(args.backbone, device, trainable=args.finetune_backbone)
    if config.max_text_tokens > backbone.max_text_tokens:  # e.g. a catalogue's 96 tokens on CLIP's 77
        if main_rank:
            print(f"note: texts are cut to {backbone.max_text_tokens} tokens, the backbone's limit "
                  f"(the catalogue asks for {config.max_text_tokens})", file=sys.stderr)
        config = replace(config, max_text_tokens=backbone.max_text_tokens)
        catalogue = replace(catalogue, config=config)
    if not main_rank:
        distributed.barrier()  # rank 0 builds the feature cache, the others then read it
    features = extract_features(backbone, catalogue, args.cache_dir, progress=not args.quiet and main_rank)
    if main_rank:
        distributed.barrier()
    source = LiveBatches(backbone, catalogue) if args.finetune_backbone else features
    labels = {t: catalogue.labels(t) for t in config.tasks}
    vocabs = {t: LabelVocab.build([labels[t][i] for i in splits["train"]], args.min_count) for t in config.tasks}
    empty = [t for t, v in vocabs.items() if not len(v)]
    if empty:
        raise CatalogueError(f"tasks without any training label: {empty}")
    targets = {t: vocabs[t].encode(labels[t]) for t in config.tasks}
    if not any((v[splits["val"]] != -1).any() for v in targets.values()):
        raise CatalogueError("no val item has a label for any task: early stopping and thresholds need some")

    cfg = CMAClipConfig(
        image_token_dim=backbone.image_token_dim, image_pooled_dim=backbone.image_pooled_dim,
        text_token_dim=backbone.text_token_dim, text_pooled_dim=backbone.text_pooled_dim,
        num_patches=backbone.num_patches, max_text_tokens=config.max_text_tokens,
        tasks={t: len(v) for t, v in vocabs.items()}, embed_dim=args.embed_dim, width=args.width,
        depth=args.depth, heads=args.heads, dropout=args.dropout, fusion=args.fusion,
        lexical_buckets=args.lexical_buckets)
    seed_everything(args.seed)  # again: building the feature cache draws from the RNG, reading it does not
    model = CMAClip(cfg).to(device)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("align.")]
    if args.finetune_backbone:
        named += [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = max(1, len(splits["train"]) // args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, int(args.warmup * total)), total))
    meta = {
        "backbone": args.backbone,
        "catalogue": {"name": config.name, "image_column": config.image_column, "text_columns": config.text_columns,
                      "id_column": config.id_column, "max_text_tokens": config.max_text_tokens},
        "tasks": {t: {"classes": v.classes, "threshold_90": None} for t, v in vocabs.items()},
        "train": {k: v for k, v in vars(args).items() if k not in ("out", "resume", "quiet")
                  and not (args.catalogue and k in MANIFEST_ARGS)},  # the catalogue entry holds the columns
    }

    counters = {"epoch": 0, "step": 0, "best": -1.0, "bad_epochs": 0, "history": [], "align_loss": []}
    if args.resume and (out / STATE_FILE).exists():
        counters = load_state(out, model, optimizer, backbone if args.finetune_backbone else None)
        schedule.last_epoch = counters["step"]
        if main_rank:
            print(f"resumed at epoch {counters['epoch']} (step {counters['step']})", file=sys.stderr)
    elif args.align_from:
        donor, donor_config = load_checkpoint(args.align_from, device)
        if donor_config["backbone"] != args.backbone:
            raise CheckpointError(f"--align-from {args.align_from} was trained on backbone "
                                  f"{donor_config['backbone']!r}, not {args.backbone!r}")
        model.align.load_state_dict(donor.align.state_dict())
    else:
        started = time.time()
        counters["align_loss"] = train_alignment(
            model.align, features.image_pooled[splits["train"]], features.text_pooled[splits["train"]],
            epochs=args.align_epochs, seed=args.seed, device=device)
        counters["align_seconds"] = round(time.time() - started, 2)
    model.align.requires_grad_(False)

    net, batches_of = model, source  # what training runs; validation uses model and source
    if world > 1:  # the same alignment ran on every rank; DDP also copies rank 0's weights to the others
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [local_rank] if device.type == "cuda" else None
        # unused: the ablations' parts (and the unfused norm under sequence attention)
        net = DDP(model, device_ids=ids, find_unused_parameters=True)
        if args.finetune_backbone:
            batches_of = LiveBatches(backbone, catalogue, DDP(backbone, device_ids=ids, find_unused_parameters=True))
        torch.manual_seed(args.seed + 1 + rank)  # different dropout masks on each rank

    train_targets = {t: torch.from_numpy(v) for t, v in targets.items()}
    while counters["epoch"] < args.epochs and counters["step"] < total:
        model.train()
        backbone.train(args.finetune_backbone)
        order = np.random.default_rng([args.seed, counters["epoch"]]).permutation(splits["train"])
        started, losses = time.time(), []
        batches = range(steps_per_epoch)
        for b in tqdm(batches, desc=f"epoch {counters['epoch'] + 1}/{args.epochs}", disable=args.quiet or not main_rank,
                      leave=False):
            index = order[b * args.batch_size:(b + 1) * args.batch_size]
            labelled = None  # one process: the batch's own counts
            if world > 1:  # this rank's share of the global batch, normalised by the global counts
                labelled = {t: int((v[index] >= 0).sum()) for t, v in train_targets.items()}
                index = distributed.shard(index, rank, world)
            with autocast(device):
                output = net(batches_of.batch(index, device))
            batch_targets = {t: v[index].to(device) for t, v in train_targets.items()}
            loss = multitask_loss(output.logits, batch_targets, labelled)
            if world > 1:  # DDP averages the gradients over ranks: scale the shares back to a sum
                loss = loss * world
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            counters["step"] += 1
            if counters["step"] >= total:
                break
        seconds = time.time() - started
        epoch_loss = distributed.mean(float(np.mean(losses)))
        val = None
        if main_rank:
            val = score(predict_probabilities(model, source, splits["val"]),
                        {t: v[splits["val"]] for t, v in targets.items()})
        val = distributed.broadcast(val)  # every rank takes the same early-stopping decision
        counters["epoch"] += 1
        value = val["mean"][SELECTION_METRIC]
        counters["history"].append({"epoch": counters["epoch"], "loss": epoch_loss,
                                    "seconds": round(seconds, 2), "val": val["mean"]})
        if main_rank:
            print(f"epoch {counters['epoch']}: loss {epoch_loss:.4f}  {seconds:.1f}s  val "
                  + "  ".join(f"{k} {v:.4f}" for k, v in val["mean"].items()), file=sys.stderr, flush=True)
        if value > counters["best"]:
            counters["best"], counters["bad_epochs"] = value, 0
            if main_rank:
                save_checkpoint(out, model, {**meta, "metrics": {"val": val}},
                                backbone.state_dict() if args.finetune_backbone else None)
        else:
            counters["bad_epochs"] += 1
        if main_rank:
            save_state(out, model, optimizer, counters, backbone if args.finetune_backbone else None)
        if counters["bad_epochs"] >= args.patience:
            if main_rank:
                print(f"early stop: no val improvement for {args.patience} epochs", file=sys.stderr)
            break
    if not main_rank:
        return {}
    return finish(out, meta, counters, source, backbone if args.finetune_backbone else None, targets, splits, device)


def finish(out: Path, meta: dict, counters: dict, features: Features | LiveBatches,
           finetuned: DualEncoder | None, targets: dict[str, np.ndarray],
           splits: dict[str, np.ndarray], device: torch.device) -> dict:
    """Reload the best epoch, add its 90%-precision thresholds (from val) and test report."""
    model, _ = load_checkpoint(out, device)
    if finetuned is not None:
        load_finetuned_backbone(out, finetuned)
        finetuned.eval()
    meta["training"] = {k: counters[k] for k in ("history", "align_loss", "align_seconds") if k in counters}
    metrics = calibrate(out, model, meta, features, targets, splits)
    write_config(out, model.cfg, {**meta, "metrics": metrics})  # the weights on disk are this epoch's already
    (out / STATE_FILE).unlink(missing_ok=True)
    return metrics


def calibrate(out: Path, model: CMAClip, meta: dict, features: Features | LiveBatches,
              targets: dict[str, np.ndarray], splits: dict[str, np.ndarray]) -> dict:
    """Set each task's 90%-precision threshold in `meta` from val, score val and test (the
    test report also to eval_test.json); returns the metrics."""
    val_probs = predict_probabilities(model, features, splits["val"])
    val_targets = {t: v[splits["val"]] for t, v in targets.items()}
    for task, threshold in thresholds_at_90(val_probs, val_targets).items():
        meta["tasks"][task]["threshold_90"] = threshold
    metrics = {"val": score(val_probs, val_targets)}
    if len(splits["test"]):
        metrics["test"] = score(predict_probabilities(model, features, splits["test"]),
                                {t: v[splits["test"]] for t, v in targets.items()})
        (out / "eval_test.json").write_text(json.dumps(metrics["test"], indent=2))
    return metrics


def rescore(folder: str | Path, data_root: str | None = None, cache_dir: str | None = None) -> dict:
    """Recompute a finished checkpoint's thresholds and val/test reports with the current
    metrics, on the features its training cached; the weights stay as they are. For after a
    change to the metrics: `python -m cma_clip.experiments --rescore` runs it on a study."""
    folder = Path(folder)
    device = default_device()
    model, config = load_checkpoint(folder, device)
    settings = config["train"]
    if settings.get("extra_labels") or settings.get("finetune_backbone"):
        raise CheckpointError(f"{folder}: rescoring runs with --extra-labels or --finetune-backbone is not supported")
    manifest = training_manifest(config, data_root)
    if manifest is None:
        raise CheckpointError(f"{folder}: the catalogue it was trained on is not available here")
    catalogue = Catalogue.open(catalogue_for_checkpoint(config, manifest))
    if settings.get("limit"):
        catalogue = limit_splits(catalogue, settings["limit"])
    splits = split_indices(catalogue, settings["seed"])
    # the runs of a study share one backbone and read only the val and test rows of its cache
    features = extract_features(shared_backbone(config["backbone"], str(device)), catalogue, cache_dir,
                                progress=False, memory_map=True)
    targets = task_targets(config, catalogue)
    meta = {k: v for k, v in config.items() if k not in ("format", "model", "metrics")}
    metrics = calibrate(folder, model, meta, features, targets, splits)
    write_config(folder, model.cfg, {**meta, "metrics": metrics})
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = train(args)
        distributed.barrier()  # the other ranks wait for rank 0's checkpoint
    except (BackboneError, CatalogueError, CheckpointError, ImageError, LabelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    for split, report in metrics.items():
        print(f"\n[{split}]\n{format_table(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
