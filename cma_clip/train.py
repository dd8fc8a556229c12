"""Train CMA-CLIP on a catalogue.

    python -m cma_clip.train --catalogue hm-articles --out checkpoints/hm-articles
    python -m cma_clip.train --manifest items.csv --text-columns title --tasks colour pattern --out ckpt/

From Python: `train(TrainConfig(catalogue="hm-articles", out="ckpt/"))`; the command line
only fills a `TrainConfig` (`parse_config`). The stages, in the order `train` runs them:
`load_data` (catalogue, splits, vocabularies, backbone features cached once),
`build_model`, `make_optimizer`, `align` (CLIP-style alignment of the pooled embeddings,
LiT: towers locked), `fit` (multi-task cross-entropy, AdamW, warmup + cosine, early
stopping on the validation split, progress saved every epoch so `--resume` continues an
interrupted run) and `finish` (the best epoch becomes the checkpoint, with its
90%-precision thresholds from `val` and, when there is a `test` split, its report on
`test` in eval_test.json).

Under torchrun (same options) the model is wrapped in DistributedDataParallel: every
rank takes its share of each global batch of --batch-size items, so the number of
steps and the loss are those of one process; rank 0 alone validates and writes.

    torchrun --standalone --nproc_per_node 2 -m cma_clip.train --catalogue hm-articles --out ckpt/

With --members N, N runs from seeds seed, seed + 1, ... on one split (each in OUT-members/seed-S)
become one checkpoint, an `Ensemble` with its own thresholds (`train_ensemble`); --from-members
keeps finished runs that way without training: seeds of one recipe, or recipes that differ in the
inputs they read (`model.MEMBER_SETTINGS`: a colour-only run beside colour + words runs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import distributed
from .align import train_alignment
from .backbones import IMAGE_TOWERS, DualEncoder, EncoderOutput, create_backbone
from .checkpoint import (TRAIN_STATE, UNFINISHED, CatalogueColumns, CheckpointConfig, CheckpointError, TaskSpec,
                         TrainConfig, is_checkpoint, load_backbone, load_backbone_weights, load_checkpoint,
                         read_config, save_checkpoint, save_ensemble, train_state_counters, unfinished)
from .data import Catalogue, CatalogueError, LabelVocab, limit_splits, load_image, split_indices
from .errors import CMAClipError
from .evaluate import calibrate, format_table, predict_probabilities, rescore, score
from .features import Features, extract_features
from .extra_labels import merge, read_corrections
from .model import FUSIONS, CMAClip, CMAClipConfig, multitask_loss, no_decay
from .runtime import autocast, exit_on_stop_signals, seed_everything

__all__ = ["TrainConfig", "combine", "main", "parse_config", "train"]

SELECTION_METRIC = "recall_at_90_precision"


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line's options as a TrainConfig (defaults: TrainConfig's)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m cma_clip.train", description="Train CMA-CLIP on a catalogue.")
    src = p.add_argument_group("data")
    src.add_argument("--catalogue", help="bundled config name (fashion-product-images, hm-articles) or a JSON config")
    src.add_argument("--data-root", help="folder the bundled configs' manifests are relative to (default: "
                     "$CMA_CLIP_DATA, else ../shared/data beside the repository)")
    src.add_argument("--manifest", help="CSV/JSONL manifest (instead of --catalogue)")
    src.add_argument("--image-column", help="with --manifest: the image path column (default image)")
    src.add_argument("--text-columns", nargs="+", help="with --manifest: the text columns, joined (default text)")
    src.add_argument("--tasks", nargs="+", help="label columns to learn (default: the config's)")
    src.add_argument("--auxiliary-tasks", nargs="+", metavar="COLUMN",
                     help="label columns learned beside the tasks to shape the shared fusion (e.g. H&M's "
                          "department_name); they do not count in early stopping and the checkpoint leaves them out")
    src.add_argument("--id-column", help="with --manifest: the item id column (default: none)")
    src.add_argument("--max-text-tokens", type=int)
    src.add_argument("--limit", type=int, help="use only the first N items of each split (quick runs, tests)")
    src.add_argument("--min-count", type=int, default=d.min_count,
                     help="a class needs this many training items to be learned")
    src.add_argument("--extra-labels", metavar="FILE",
                     help="the app's label store (studio_data/labels.db) or its CSV/JSONL export: its labels "
                          "override the catalogue's on train items and add uploaded items (cma_clip/extra_labels.py)")
    src.add_argument("--no-auto-labels", dest="auto_labels", action="store_false",
                     help="with --extra-labels: leave out the labels a model auto-accepted (bulk accept), "
                          "train on what people labelled")
    src.add_argument("--cache-dir", help="feature cache (default ~/.cache/cma_clip or $CMA_CLIP_CACHE)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default=d.backbone, help="'bundled', 'bundled+mobilenet_v2' or 'open_clip:MODEL[:PRETRAINED]'")
    m.add_argument("--finetune-backbone", action="store_true", help="train the backbone too (slow; for a GPU)")
    m.add_argument("--backbone-weights", metavar="FILE",
                   help="tuned layers to load into the backbone, kept frozen (e.g. lab.tower_finetune's "
                        "tuned-layers.safetensors); the checkpoint keeps them")
    m.add_argument("--fusion", default=d.fusion, choices=FUSIONS,
                   help="the full model, an ablation or a baseline (see cma_clip.model.FUSIONS)")
    m.add_argument("--align-from", help="take the CLIP-style alignment heads from this checkpoint instead of "
                                        "training them (same backbone); comparisons then share aligned embeddings")
    m.add_argument("--width", type=int, default=d.width)
    m.add_argument("--depth", type=int, default=d.depth)
    m.add_argument("--heads", type=int, default=d.heads)
    m.add_argument("--embed-dim", type=int, default=d.embed_dim)
    m.add_argument("--dropout", type=float, default=d.dropout)
    m.add_argument("--modality-dropout", type=float, default=d.modality_dropout,
                   help="in training, hide each of text, colour and words from an item at this rate (its tokens "
                        "and its modality weight; never the image), so no task leans on one input alone")
    m.add_argument("--lexical-buckets", type=int, default=d.lexical_buckets,
                   help="size of the trainable hashed token-id embedding added to the text tokens (0: off)")
    m.add_argument("--colour", action=argparse.BooleanOptionalAction, default=d.colour,
                   help="the product's foreground colours as tokens and a modality")
    m.add_argument("--words-buckets", type=int, default=d.words_buckets,
                   help="hash buckets of the TF-IDF words token and modality (0: off)")
    m.add_argument("--image-tower", choices=IMAGE_TOWERS, default=d.image_tower,
                   help="read the backbone's own image tokens (main) or its second tower's (mobilenet_v2: "
                        "--backbone bundled+mobilenet_v2; python -m cma_clip.mobilenet writes its weights)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d.epochs)
    o.add_argument("--align-epochs", type=int, default=d.align_epochs)
    o.add_argument("--batch-size", type=int, default=d.batch_size)
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="spread this share of each target over the other classes (default 0: none)")
    o.add_argument("--ema", type=float, default=d.ema,
                   help="validate and keep a moving average of the weights, this decay per step (e.g. 0.99; "
                        "default 0: the weights as trained)")
    o.add_argument("--warmup", type=float, default=d.warmup, help="share of steps spent warming up")
    o.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without val improvement")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--members", type=int, default=d.members,
                   help="train this many models (seeds seed, seed + 1, ...) and keep them as one ensemble checkpoint")
    o.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick runs)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--from-members", nargs="+", metavar="RUN",
                   help="no training: keep these finished runs (one catalogue; recipes may differ in their inputs) "
                        "as one ensemble checkpoint in --out, scored on val and test (the catalogue's photos are "
                        "encoded first unless the feature cache holds them)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint --out holds (refused without it: --out may name a shipped one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except CatalogueError as exc:  # options that do not go together: a usage error, not a traceback
        p.error(str(exc))


# ----------------------------------------------------------------------------- data

@dataclass
class TrainingData:
    """What training reads: the catalogue, its splits, the backbone features, the tasks'
    vocabularies and every item's targets (class indices; -1 missing, -2 out of vocabulary), the
    auxiliary tasks' after the catalogue's."""

    catalogue: Catalogue
    splits: dict[str, np.ndarray]
    features: Features
    vocabs: dict[str, LabelVocab]
    targets: dict[str, np.ndarray]
    extra_labels: dict | None = None  # what --extra-labels did (`extra_labels.Merged.report`), kept in the checkpoint

    @property
    def tasks(self) -> list[str]:
        """The catalogue's tasks: what the checkpoint keeps and validation scores."""
        return self.catalogue.config.tasks


def load_data(cfg: TrainConfig, backbone: DualEncoder, main_rank: bool = True) -> TrainingData:
    """The catalogue (with --limit and --extra-labels applied), its splits and labels, and
    its features, cached by rank 0 while the other ranks wait."""
    config = cfg.catalogue_config()
    catalogue = Catalogue.open(config)
    auxiliary = [t for t in cfg.auxiliary_tasks or [] if t not in catalogue.config.tasks]
    # before the features are built; the catalogue's own columns were checked as it opened
    absent = [t for t in auxiliary if t not in catalogue.rows[0]]
    if absent:
        raise CatalogueError(f"--auxiliary-tasks {absent}: no such column in {catalogue.config.manifest}")
    if cfg.limit:
        catalogue = limit_splits(catalogue, cfg.limit)
    extra_labels = None
    if cfg.extra_labels:
        merged = merge(catalogue, read_corrections(cfg.extra_labels), cfg.splits_seed, cfg.auto_labels)
        catalogue, extra_labels = merged.catalogue, merged.report()
        if main_rank:
            print(merged.summary(), file=sys.stderr)
    splits = split_indices(catalogue, cfg.splits_seed)
    if not len(splits["train"]) or not len(splits["val"]):
        raise CatalogueError("training needs items in both the train and val splits")
    if config.max_text_tokens > backbone.max_text_tokens:  # e.g. a catalogue's 96 tokens on CLIP's 77
        if main_rank:
            print(f"note: texts are cut to {backbone.max_text_tokens} tokens, the backbone's limit "
                  f"(the catalogue asks for {config.max_text_tokens})", file=sys.stderr)
        catalogue = replace(catalogue, config=replace(config, max_text_tokens=backbone.max_text_tokens))
    if not main_rank:
        distributed.barrier()  # rank 0 builds the feature cache, the others then read it
    features = extract_features(backbone, catalogue, cfg.cache_dir, progress=not cfg.quiet and main_rank,
                                colour=cfg.colour)
    if main_rank:
        distributed.barrier()
    tasks = catalogue.config.tasks + auxiliary
    labels = {t: catalogue.labels(t) for t in tasks}
    vocabs = {t: LabelVocab.build([labels[t][i] for i in splits["train"]], cfg.min_count) for t in tasks}
    empty = [t for t, v in vocabs.items() if not len(v)]
    if empty:
        raise CatalogueError(f"tasks without any training label: {empty}")
    targets = {t: vocabs[t].encode(labels[t]) for t in tasks}
    if not any((v[splits["val"]] != -1).any() for v in targets.values()):
        raise CatalogueError("no val item has a label for any task: early stopping and thresholds need some")
    return TrainingData(catalogue, splits, features, vocabs, targets, extra_labels)


class LiveBatches:
    """Backbone features computed per batch with gradients, for --finetune-backbone."""

    def __init__(self, backbone: DualEncoder, catalogue: Catalogue, encoder: torch.nn.Module | None = None,
                 colour: bool = False) -> None:
        self.backbone, self.paths, self.texts, self.colour = backbone, catalogue.image_paths(), catalogue.texts(), colour
        self.encoder = encoder or backbone  # the backbone, or its DistributedDataParallel wrapper
        self.max_tokens = catalogue.config.max_text_tokens

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, index: np.ndarray, device: torch.device) -> EncoderOutput:
        pixels = self.backbone.preprocess([load_image(self.paths[i]) for i in index]).to(device)
        text = self.backbone.tokenize([self.texts[i] for i in index], self.max_tokens)
        return self.encoder(pixels, text.to(device), self.colour)


# ----------------------------------------------------------------------------- model and optimiser

def build_model(cfg: TrainConfig, data: TrainingData, backbone: DualEncoder) -> CMAClip:
    model_cfg = CMAClipConfig(
        image_token_dim=backbone.image_token_dim, image_pooled_dim=backbone.image_pooled_dim,
        text_token_dim=backbone.text_token_dim, text_pooled_dim=backbone.text_pooled_dim,
        num_patches=backbone.num_patches, max_text_tokens=data.catalogue.config.max_text_tokens,
        tasks={t: len(v) for t, v in data.vocabs.items()}, embed_dim=cfg.embed_dim, width=cfg.width,
        depth=cfg.depth, heads=cfg.heads, dropout=cfg.dropout, modality_dropout=cfg.modality_dropout,
        fusion=cfg.fusion, lexical_buckets=cfg.lexical_buckets, colour=cfg.colour, words_buckets=cfg.words_buckets,
        image_tower=cfg.image_tower)
    model = CMAClip(model_cfg)
    if model.words is not None:  # idf from the training texts
        train = data.splits["train"]
        model.words.fit_idf(torch.from_numpy(data.features.text_ids[train]),
                            torch.from_numpy(data.features.text_mask[train]))
    return model


def checkpoint_config(cfg: TrainConfig, data: TrainingData, model: CMAClip) -> CheckpointConfig:
    """What the checkpoint will record; thresholds and metrics are filled in later."""
    names = data.catalogue.config.task_names
    return CheckpointConfig(backbone=cfg.backbone, catalogue=CatalogueColumns.of(data.catalogue.config),
                            tasks={t: TaskSpec(data.vocabs[t].classes, display_name=names.get(t)) for t in data.tasks},
                            model=model.cfg.only_tasks(data.tasks), train=cfg)


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]  # what gradient clipping covers
    steps_per_epoch: int
    total_steps: int


def make_optimizer(cfg: TrainConfig, model: CMAClip, data: TrainingData,
                   backbone: DualEncoder | None = None) -> Optimisation:
    """AdamW over the model (the alignment heads stay as aligned) and a fine-tuned backbone,
    weight decay off where `no_decay` says; linear warmup then cosine decay."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("align.")]
    if backbone is not None:
        named += [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, len(data.splits["train"]) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, int(cfg.warmup * total)), total))
    return Optimisation(optimizer, schedule, [p for _, p in named], steps_per_epoch, total)


def align(cfg: TrainConfig, model: CMAClip, data: TrainingData, device: torch.device) -> dict:
    """CLIP-style alignment of the pooled embeddings on the train split, or the heads of
    --align-from; the heads are frozen after. Returns the alignment's loss and seconds."""
    if cfg.align_from:
        donor, donor_config = load_checkpoint(cfg.align_from, device)
        if donor_config.backbone != cfg.backbone:
            raise CheckpointError(f"--align-from {cfg.align_from} was trained on backbone "
                                  f"{donor_config.backbone!r}, not {cfg.backbone!r}")
        if donor.align_tower != model.align_tower:
            raise CheckpointError(f"--align-from {cfg.align_from} aligned the {donor.align_tower!r} image tower, "
                                  f"not {model.align_tower!r}")
        model.align.load_state_dict(donor.align.state_dict())
        return {}
    started = time.time()
    train = data.splits["train"]
    losses = train_alignment(model.align, data.features.pooled_image(cfg.image_tower)[train],
                             data.features.text_pooled[train],
                             epochs=cfg.align_epochs, seed=cfg.seed, device=device)
    return {"align_loss": losses, "align_seconds": round(time.time() - started, 2)}


# ----------------------------------------------------------------------------- resumable state

def save_state(out: Path, model: CMAClip, optimizer: torch.optim.Optimizer, counters: dict,
               backbone: DualEncoder | None = None, ema: AveragedModel | None = None) -> None:
    """Training state for --resume: one safetensors file (no pickles), the counters in its
    metadata; `backbone` when it is being fine-tuned, `ema` the weights' moving average. Written
    to a temporary file renamed into place, so a crash mid-write leaves the previous state."""
    tensors = {}
    for prefix, module in (("model", model), ("backbone", backbone), ("ema", ema)):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    optim = optimizer.state_dict()
    for pid, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).cpu().contiguous()
    partial = out / f"{TRAIN_STATE}.partial"
    save_file(tensors, str(partial), metadata={"counters": json.dumps({**counters, "param_groups": optim["param_groups"]})})
    os.replace(partial, out / TRAIN_STATE)


def state_counters(out: Path) -> dict:
    """The counters an interrupted run's state holds (its epoch, step, history, extra labels)."""
    try:
        return train_state_counters(out)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume from {out}: its training state is unreadable ({exc}); "
                              "start again without --resume") from exc


def load_state(out: Path, model: CMAClip, optimizer: torch.optim.Optimizer,
               backbone: DualEncoder | None = None, ema: AveragedModel | None = None) -> dict:
    counters = state_counters(out)
    try:
        tensors = load_file(str(out / TRAIN_STATE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {out}: its training state is unreadable ({exc}); "
                              "start again without --resume") from exc
    if backbone is not None and not any(k.startswith("backbone.") for k in tensors):
        raise CheckpointError(f"cannot resume {out} with --finetune-backbone: its state has no backbone weights")
    if ema is not None and not any(k.startswith("ema.") for k in tensors):
        raise CheckpointError(f"cannot resume {out} with --ema: its state has no moving average")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    try:
        if backbone is not None:
            backbone.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        model.load_state_dict(model.drop_unbuilt({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer.load_state_dict({"state": state, "param_groups": counters.pop("param_groups")})
    except (RuntimeError, ValueError, KeyError) as exc:  # another model: other classes, widths or options
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if not line.startswith("Error(s) in loading")), type(exc).__name__)
        raise CheckpointError(f"cannot resume {out}: this run's model is not the one it began ({first[:200]}); "
                              "start again with --overwrite") from None
    return counters


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict:
    """Train and return the best epoch's metrics (on rank 0; {} on the other ranks); with
    `cfg.members` > 1, an ensemble of that many runs (`train_ensemble`)."""
    if cfg.members > 1:
        return train_ensemble(cfg)
    seed_everything(cfg.seed)
    rank, world, local_rank, device = distributed.setup()
    main_rank = rank == 0
    if cfg.batch_size < world:
        raise CatalogueError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes")
    out = Path(cfg.out)
    backbone = create_backbone(cfg.backbone, device, trainable=cfg.finetune_backbone)
    if cfg.backbone_weights:
        load_backbone_weights(cfg.backbone_weights, backbone)
    data = load_data(cfg, backbone, main_rank)
    out.mkdir(parents=True, exist_ok=True)  # once the data is usable: a refused run leaves no empty folder
    if main_rank:  # until `finish` removes it, the folder is no checkpoint to serve (`checkpoint.require_finished`)
        (out / UNFINISHED).write_text("a training run writes this folder: its checkpoint is finished when this "
                                      "file is gone\n")
    seed_everything(cfg.seed)  # again: building the feature cache draws from the RNG, reading it does not
    model = build_model(cfg, data, backbone).to(device)
    tuned = backbone if cfg.finetune_backbone else None
    optimisation = make_optimizer(cfg, model, data, tuned)
    counters = {"epoch": 0, "step": 0, "best": -1.0, "bad_epochs": 0, "history": [], "align_loss": [],
                "extra_labels": data.extra_labels}
    resume = cfg.resume and (out / TRAIN_STATE).exists()
    if cfg.resume and not resume and main_rank:  # it retrained from the start unsaid
        print(f"nothing to resume in {out} (no epoch of a run there was saved): training from the start",
              file=sys.stderr)
    if resume and (began := state_counters(out).get("extra_labels")) != data.extra_labels:
        # labels saved after the interruption: the epochs before and after would train on two label sets
        then, now = ((labels or {}).get("newest_label") for labels in (began, data.extra_labels))
        raise CheckpointError(f"cannot resume {out}: its --extra-labels are not those it began with (newest label "
                              f"then {then or 'none'}, now {now or 'none'}): start again with --overwrite")
    if not resume:
        counters.update(align(cfg, model, data, device))
    model.align.requires_grad_(False)
    ema = weight_average(cfg, model)
    if resume:
        counters = load_state(out, model, optimisation.optimizer, tuned, ema)
        optimisation.schedule.last_epoch = counters["step"]
        if main_rank:
            print(f"resumed at epoch {counters['epoch']} (step {counters['step']})", file=sys.stderr)
    try:
        fit(cfg, model, data, optimisation, counters, checkpoint_config(cfg, data, model), tuned, device,
            rank, world, local_rank, ema)
    except SystemExit:  # Ctrl-C or SIGTERM (runtime.exit_on_stop_signals): say what is kept, then stop
        if main_rank and (out / TRAIN_STATE).is_file():
            print(f"stopped: {out} keeps the run after epoch {state_counters(out).get('epoch', '?')} of "
                  f"{cfg.epochs}: the same command with --resume goes on with it", file=sys.stderr)
        elif main_rank:  # stopped in its first epoch, or while saving it
            print(f"stopped: {out} keeps no epoch to resume from: the same command with --overwrite starts again",
                  file=sys.stderr)
        raise
    if not main_rank:
        return {}
    return finish(out, counters, data, cfg.finetune_backbone, device)


def weight_average(cfg: TrainConfig, model: CMAClip) -> AveragedModel | None:
    """With --ema: an exponential moving average of the model's weights (torch's `AveragedModel`),
    updated after every step. It is what validation scores and the checkpoint keeps: the average
    of the last few hundred steps generalises better than the last step's weights on a small
    catalogue that a few epochs overfit (docs/RESULTS.md)."""
    if not cfg.ema:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


def fit(cfg: TrainConfig, model: CMAClip, data: TrainingData, optimisation: Optimisation, counters: dict,
        config: CheckpointConfig, tuned: DualEncoder | None, device: torch.device,
        rank: int = 0, world: int = 1, local_rank: int = 0, ema: AveragedModel | None = None) -> None:
    """The epochs: train, validate, keep the best epoch as the checkpoint, save the state for
    --resume; stops early after `patience` epochs without improvement. With `ema`, its averaged
    weights are validated and kept."""
    out, main_rank = Path(cfg.out), rank == 0
    kept = ema.module if ema is not None else model  # the weights validation scores and the checkpoint keeps
    given = load_file(cfg.backbone_weights) if cfg.backbone_weights else None  # tuned layers, kept as they came
    source = LiveBatches(tuned, data.catalogue, colour=cfg.colour) if tuned is not None else data.features
    net, batches_of = model, source  # what training runs; validation uses model and source
    if world > 1:  # the same alignment ran on every rank; DDP also copies rank 0's weights to the others
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [local_rank] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids)  # the model builds only what its fusion uses
        if tuned is not None:  # the backbone has parts we never read (e.g. its classifier)
            batches_of = LiveBatches(tuned, data.catalogue, DDP(tuned, device_ids=ids, find_unused_parameters=True),
                                     cfg.colour)
        torch.manual_seed(cfg.seed + 1 + rank)  # different dropout masks on each rank
    optimizer, splits = optimisation.optimizer, data.splits
    train_targets = {t: torch.from_numpy(v) for t, v in data.targets.items()}
    while counters["epoch"] < cfg.epochs and counters["step"] < optimisation.total_steps:
        model.train()
        if tuned is not None:
            tuned.train()
        order = np.random.default_rng([cfg.seed, counters["epoch"]]).permutation(splits["train"])
        started, losses = time.time(), []
        for b in tqdm(range(optimisation.steps_per_epoch), desc=f"epoch {counters['epoch'] + 1}/{cfg.epochs}",
                      disable=cfg.quiet or not main_rank, leave=False):
            index = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            labelled = None  # one process: the batch's own counts
            if world > 1:  # this rank's share of the global batch, normalised by the global counts
                labelled = {t: int((v[index] >= 0).sum()) for t, v in train_targets.items()}
                index = distributed.shard(index, rank, world)
            with autocast(device):
                output = net(batches_of.batch(index, device))
            batch_targets = {t: v[index].to(device) for t, v in train_targets.items()}
            loss = multitask_loss(output.logits, batch_targets, labelled, cfg.label_smoothing)
            if world > 1:  # DDP averages the gradients over ranks: scale the shares back to a sum
                loss = loss * world
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimisation.params, 1.0)
            optimizer.step()
            optimisation.schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
            counters["step"] += 1
            if counters["step"] >= optimisation.total_steps:
                break
        seconds = time.time() - started
        epoch_loss = distributed.mean(float(np.mean(losses)))
        val = None
        if main_rank:
            probabilities = predict_probabilities(kept, source, splits["val"])
            val = score({t: probabilities[t] for t in data.tasks},
                        {t: data.targets[t][splits["val"]] for t in data.tasks})
        val = distributed.broadcast(val)  # every rank takes the same early-stopping decision
        counters["epoch"] += 1
        counters["history"].append({"epoch": counters["epoch"], "loss": epoch_loss,
                                    "seconds": round(seconds, 2), "val": val["mean"]})
        if val["mean"][SELECTION_METRIC] > counters["best"]:
            counters["best"], counters["bad_epochs"] = val["mean"][SELECTION_METRIC], 0
            if main_rank:
                save_checkpoint(out, kept.only_tasks(data.tasks), replace(config, metrics={"val": val}),
                                tuned.state_dict() if tuned is not None else given)
        else:
            counters["bad_epochs"] += 1
        if main_rank:  # saved, then said: a Ctrl-C at the epoch's line lost the epoch it reported
            save_state(out, model, optimizer, counters, tuned, ema)
            print(f"epoch {counters['epoch']}: loss {epoch_loss:.4f}  {seconds:.1f}s  val "
                  + "  ".join(f"{k} {v:.4f}" for k, v in val["mean"].items()), file=sys.stderr, flush=True)
        if counters["bad_epochs"] >= cfg.patience:
            if main_rank:
                print(f"early stop: no val improvement for {cfg.patience} epochs", file=sys.stderr)
            break


def finish(out: Path, counters: dict, data: TrainingData, finetuned: bool, device: torch.device) -> dict:
    """Reload the best epoch, add its 90%-precision thresholds (from val) and test report."""
    model, config = load_checkpoint(out, device)
    config.training = {k: counters[k] for k in ("history", "align_loss", "align_seconds") if k in counters}
    if data.extra_labels:
        config.training["extra_labels"] = data.extra_labels
    source = (LiveBatches(load_backbone(out, config, device).eval(), data.catalogue, colour=model.cfg.colour)
              if finetuned else data.features)
    metrics = calibrate(out, model, config, source, data.targets, data.splits)
    config.save(out)  # the weights on disk are this epoch's already
    (out / TRAIN_STATE).unlink(missing_ok=True)
    (out / UNFINISHED).unlink(missing_ok=True)  # a checkpoint now
    return metrics


def train_ensemble(cfg: TrainConfig) -> dict:
    """`cfg.members` runs of the recipe from seeds seed, seed + 1, ..., all on the split of
    `cfg.splits_seed`, each in OUT-members/seed-S (with --resume, finished ones are kept), then
    one Ensemble checkpoint in OUT (`combine`). The members after the first take its alignment
    heads (unless --align-from gives them all one), so the checkpoint stores them once.
    Returns its metrics (on rank 0)."""
    runs = Path(f"{str(cfg.out).rstrip('/')}-members")
    folders = [runs / f"seed-{cfg.seed + k}" for k in range(cfg.members)]
    for k, folder in enumerate(folders):
        if cfg.resume and is_checkpoint(folder) and not unfinished(folder):
            continue  # finished before the interruption
        align_from = cfg.align_from or (str(folders[0]) if k else None)
        train(replace(cfg, out=str(folder), seed=cfg.seed + k, split_seed=cfg.splits_seed, members=1,
                      align_from=align_from))
        distributed.barrier()
    return combine(cfg.out, folders, cfg.data_root, cfg.cache_dir) if distributed.is_main() else {}


def combine(out: str | Path, members: list[str | Path], data_root: str | None = None,
            cache_dir: str | None = None) -> dict:
    """Keep finished runs (seeds, or recipes differing in their inputs) as one Ensemble checkpoint in `out`
    (`checkpoint.save_ensemble`), with its own thresholds from val and its val and test reports
    (`evaluate.rescore`, on the features the runs cached). The runs must share their split:
    a catalogue's split column, or one split seed."""
    configs = [read_config(m) for m in members]
    manifest = configs[0].training_manifest(data_root)
    if manifest is None:
        raise CheckpointError(f"{members[0]}: the catalogue it was trained on is not available here")
    if len({c.train.splits_seed for c in configs}) > 1 and not Catalogue.open(configs[0].catalogue_on(manifest)).has_splits:
        raise CatalogueError("these runs split the catalogue differently (it has no split column and their seeds "
                             "differ): train them with --members, which splits them alike")
    save_ensemble(out, list(members))
    return rescore(out, data_root, cache_dir)


def check_out(cfg: TrainConfig) -> None:
    """Refuse, before any work, an --out that is a file, or a folder holding a checkpoint that neither
    --overwrite nor --resume says to replace or continue: the README's retraining command names the
    shipped checkpoint's folder, and a quick run copied from it replaced the shipped weights unasked."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file: name a folder for the checkpoint")
    if unfinished(out) and not (cfg.overwrite or cfg.resume):  # it looked like a finished checkpoint
        when = (f"after epoch {state_counters(out).get('epoch', '?')}: add --resume to go on with it, "
                if (out / TRAIN_STATE).is_file() else "before an epoch was saved to resume from: add ")
        raise CheckpointError(f"{out} holds a run interrupted {when}--overwrite to start again, or name another "
                              "folder")
    if cfg.resume and not cfg.overwrite and is_checkpoint(out) and not unfinished(out):  # it retrained unsaid
        raise CheckpointError(f"{out} holds a finished checkpoint: there is nothing to resume; add --overwrite "
                              "(without --resume) to train it again, or name another folder")
    if is_checkpoint(out) and not (cfg.overwrite or cfg.resume):
        raise CheckpointError(f"{out} holds a checkpoint already: add --overwrite to replace it, or name another "
                              "folder")
    made = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:  # a folder that cannot be made is refused now, not by a traceback once the data has loaded
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    finally:
        for folder in made:  # deepest first: a refused run leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        check_out(cfg)
        metrics = combine(cfg.out, cfg.from_members, cfg.data_root, cfg.cache_dir) if cfg.from_members else train(cfg)
        distributed.barrier()  # the other ranks wait for rank 0's checkpoint
    except CMAClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    for split, report in metrics.items():
        print(f"\n[{split}]\n{format_table(report)}")
    return 0


if __name__ == "__main__":
    exit_on_stop_signals()
    sys.exit(main())
