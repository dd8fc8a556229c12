"""Checkpoints: weights as safetensors plus a typed JSON config. Nothing is ever unpickled.

A checkpoint is a folder:
    model.safetensors     the CMA-CLIP weights (alignment heads, fusion, task heads; an ensemble's
                          members under members.<i>., stored compactly: `_compact`)
    config.json           a `CheckpointConfig`: backbone id, catalogue columns, tasks with label
                          vocabularies and auto-accept thresholds, model hyper-parameters,
                          training settings, history and metrics
    backbone.safetensors  only when the backbone was fine-tuned

`CheckpointConfig` is the one owner of that metadata (as timm's `PretrainedCfg`): it is read
and written here only, and the rest of the code uses its fields, never string keys.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .backbones import DualEncoder, create_backbone, shared_backbone
from .data import CatalogueConfig, CatalogueError, file_sha256, write_tensors
from .errors import CMAClipError
from .int8 import SCALE_SUFFIX, from_int8, to_int8
from .model import FUSIONS, MEMBER_SETTINGS, Classifier, CMAClip, CMAClipConfig, Ensemble, create_model

FORMAT = "cma-clip/1"
WEIGHTS = "model.safetensors"
SHARED_KEY = "same_as"  # metadata: {weight: the earlier member's equal weight it is read from}
FIRST_MEMBER_SHARED_KEY = "same_as_first_member"  # the same in files before 2026-12-05: a list, each the first member's
INT8_KEY = "int8_per_column"  # metadata: the weights stored as int8 (named for the words tables, the first so stored)
WORDS_TABLE = "words.proj.weight"  # the words token's [width, buckets] table: int8 with a scale per bucket
MEMBER_KEY = re.compile(r"members\.(\d+)\.(.+)")
BACKBONE_WEIGHTS = "backbone.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.safetensors"  # a run's resumable state (train.py): there until the run finishes
UNFINISHED = "unfinished_run"  # written as a run starts writing its folder (train.py), removed as it finishes
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MANIFEST_FIELDS = ("manifest", "image_column", "text_columns", "id_column")  # what a --catalogue config names itself
RUN_FIELDS = ("out", "resume", "overwrite", "quiet", "from_members")  # how a run was started, not what it trained


class CheckpointError(CMAClipError, RuntimeError):
    """A checkpoint that cannot be loaded, with the reason in words."""


@dataclass
class TrainConfig:
    """Everything one training run is given: the `python -m cma_clip.train` options, which
    `cma_clip.train.parse_config` fills, and the settings a checkpoint records (`config.json`
    "train", without the run's own `out`, `resume`, `overwrite` and `quiet`)."""

    out: str = ""  # the checkpoint folder to write
    # data
    catalogue: str | None = None  # a bundled config name or a JSON config; or give `manifest`
    data_root: str | None = None
    manifest: str | None = None
    image_column: str | None = None
    text_columns: list[str] | None = None
    tasks: list[str] | None = None
    # label columns learned beside the tasks, for what they teach the shared fusion; not kept in the checkpoint
    auxiliary_tasks: list[str] | None = None
    id_column: str | None = None
    max_text_tokens: int | None = None
    limit: int | None = None  # the first N items of each split
    min_count: int = 1  # a class needs this many training items to be learned
    extra_labels: str | None = None  # a label store (or its export) whose labels override the catalogue's
    auto_labels: bool = True  # with extra_labels: the labels a model auto-accepted count too
    cache_dir: str | None = None
    # model
    backbone: str = "bundled"
    finetune_backbone: bool = False
    # tuned layers loaded into the backbone and kept frozen (a safetensors of some of its tensors,
    # e.g. `lab.tower_finetune`'s); the checkpoint keeps them as its backbone.safetensors
    backbone_weights: str | None = None
    fusion: str = "cma"
    align_from: str | None = None  # take the alignment heads from this checkpoint
    width: int = 192
    depth: int = 1
    heads: int = 4
    embed_dim: int = 256
    dropout: float = 0.1
    modality_dropout: float = 0.0  # in training, hide text, colour and words from an item at this rate each
    lexical_buckets: int = 8192
    colour: bool = False  # the foreground colour descriptor as tokens and a modality (`colour.py`)
    words_buckets: int = 0  # >0: the TF-IDF words token and modality (`model.WordsBag`)
    image_tower: str = "main"  # "mobilenet_v2": read the second image tower's tokens (bundled+mobilenet_v2)
    # optimisation
    epochs: int = 15
    align_epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0  # share of each target spread over the other classes (calibration)
    ema: float = 0.0  # >0: validate and keep an exponential moving average of the weights with this decay per step
    warmup: float = 0.05  # share of steps spent warming up
    patience: int = 4  # epochs without val improvement before stopping
    seed: int = 0
    split_seed: int | None = None  # the seed of the split (catalogues without a split column); None: `seed`
    members: int = 1  # >1: train this many models from seeds seed, seed + 1, ... and keep them as an ensemble
    max_steps: int | None = None
    # the run
    resume: bool = False
    overwrite: bool = False  # replace the checkpoint `out` holds (the command line refuses to, without it)
    quiet: bool = False
    from_members: list[str] | None = None  # no training: keep these finished runs as one ensemble in `out`

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise CatalogueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.members < 1:
            raise CatalogueError(f"--members is how many models to train, at least 1, not {self.members}")
        self._check_ranges()
        if not 0 <= self.ema < 1:
            raise CatalogueError(f"--ema is a decay per step in [0, 1) (0: off), not {self.ema}")
        if not 0 <= self.modality_dropout < 1:
            raise CatalogueError(f"--modality-dropout is a rate in [0, 1), not {self.modality_dropout}")
        if self.image_tower != "main" and not self.backbone.endswith("+" + self.image_tower):
            raise CatalogueError(f"--image-tower {self.image_tower} reads a second image tower: use "
                                 f"--backbone bundled+{self.image_tower} (and its weights, --backbone-weights)")
        if self.backbone_weights and self.finetune_backbone:
            raise CatalogueError("--backbone-weights starts from tuned layers kept frozen; it does not go with "
                                 "--finetune-backbone")
        if self.ema and self.finetune_backbone:
            raise CatalogueError("--ema averages the fusion model's weights only; it does not go with --finetune-backbone")

    def _check_ranges(self) -> None:
        """Numbers training cannot use refused up front: torch met some only mid-run, with a traceback
        and an empty --out folder left behind, and trained through others (a NaN weight decay wrote a
        checkpoint of NaN weights)."""
        at_least = {1: {"--epochs": self.epochs, "--width": self.width, "--depth": self.depth, "--heads": self.heads,
                        "--embed-dim": self.embed_dim, "--batch-size": self.batch_size, "--patience": self.patience,
                        "--max-text-tokens": self.max_text_tokens, "--max-steps": self.max_steps},
                    0: {"--align-epochs": self.align_epochs, "--lexical-buckets": self.lexical_buckets,
                        "--words-buckets": self.words_buckets}}
        for low, values in at_least.items():
            for flag, value in values.items():
                if value is not None and value < low:
                    raise CatalogueError(f"{flag} must be at least {low}, not {value}")
        for flag, value in {"--dropout": self.dropout, "--label-smoothing": self.label_smoothing,
                            "--warmup": self.warmup}.items():
            if not 0 <= value < 1:
                raise CatalogueError(f"{flag} is a share in [0, 1), not {value}")
        if not 0 < self.lr < math.inf:
            raise CatalogueError(f"--lr must be a positive number, not {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise CatalogueError(f"--weight-decay must be 0 or a positive number, not {self.weight_decay}")
        if self.width % self.heads:
            raise CatalogueError(f"--width {self.width} must be a multiple of --heads {self.heads} (each attention "
                                 "head takes width / heads of it)")

    @property
    def splits_seed(self) -> int:
        """What `data.split_indices` draws a catalogue's split from when it has no split column."""
        return self.seed if self.split_seed is None else self.split_seed

    def catalogue_config(self) -> CatalogueConfig:
        """The catalogue this run trains on: a bundled or JSON config, or a manifest with its columns."""
        columns = {"--image-column": self.image_column, "--text-columns": self.text_columns,
                   "--id-column": self.id_column}
        if self.catalogue:
            given = [flag for flag, value in columns.items() if value]
            if self.manifest or given:
                raise CatalogueError(f"{' and '.join(given or ['--manifest'])} go with --manifest; a --catalogue "
                                     "config names its own manifest and columns")
            config = CatalogueConfig.load(self.catalogue, self.data_root)
        elif self.manifest:
            config = CatalogueConfig(name=Path(self.manifest).stem, manifest=self.manifest,
                                     image_column=self.image_column or "image",
                                     text_columns=self.text_columns or ["text"], tasks=self.tasks or [],
                                     id_column=self.id_column)
        else:
            raise CatalogueError("give --catalogue or --manifest")
        if self.tasks:
            config = replace(config, tasks=self.tasks)
        if self.max_text_tokens:
            config = replace(config, max_text_tokens=self.max_text_tokens)
        if not config.tasks:
            raise CatalogueError("no tasks: give --tasks with the label columns to learn")
        return config

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json records them."""
        return {k: v for k, v in asdict(self).items()
                if k not in RUN_FIELDS and not (self.catalogue and k in MANIFEST_FIELDS)}

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "TrainConfig":
        """Settings as recorded; keys this version does not know are ignored."""
        return cls(**_known(cls, settings))


THRESHOLD_RULES = {  # how val chose a task's auto-accept threshold (docs/THRESHOLDS.md)
    "point": "lowest confidence whose val precision (point estimate) is >= 0.90",
    "clustered-cp-99": "lowest confidence whose exact 99% interval of val precision lies above 0.90, "
                       "items with the same text counted as one cluster",
}


@dataclass
class TaskSpec:
    """One task of a checkpoint: its classes (the label vocabulary, in output order) and its
    auto-accept threshold: top-1 predictions with confidence >= `threshold_90` are accepted,
    None when no threshold could promise 90% precision. `threshold_rule` (a THRESHOLD_RULES
    key) says how val chose it; checkpoints written before it was recorded used "point", which
    does not hold 90% on unseen items (docs/THRESHOLDS.md)."""

    classes: list[str]
    threshold_90: float | None = None
    threshold_rule: str = "point"
    display_name: str | None = None  # what a person reads; None: `readable_name` of the column

    def __post_init__(self) -> None:
        """A hand-edited config.json checked: a threshold outside [0, 1] auto-accepted every item or
        none, a NaN one wrote invalid JSON, and repeated class names scored one class as another."""
        if not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a non-empty list of names, not {str(self.classes)[:80]}")
        if len(set(self.classes)) < len(self.classes):
            raise ValueError(f"classes repeat names: {sorted({c for c in self.classes if self.classes.count(c) > 1})}")
        threshold = self.threshold_90
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold <= 1):
            raise ValueError(f"threshold_90 must be a confidence in [0, 1] or null, not {threshold!r}")


def readable_name(column: str) -> str:
    """A label column as a person reads it: "perceived_colour_master_name" -> "Perceived colour",
    "articleType" -> "Article type" (the catalogue's own words, minus the "_name"/"_master" plumbing)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", column).replace("_", " ").replace("-", " ").split()
    words = [w.lower() for w in words]
    while len(words) > 1 and words[-1] in ("name", "master", "id"):
        words.pop()
    text = " ".join(words)
    return text[:1].upper() + text[1:] if text else column


@dataclass
class CatalogueColumns:
    """Which columns of a manifest a checkpoint reads; applied to any manifest by `on`."""

    name: str
    image_column: str = "image"
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    id_column: str | None = None
    max_text_tokens: int = 64

    @classmethod
    def of(cls, config: CatalogueConfig) -> "CatalogueColumns":
        return cls(name=config.name, image_column=config.image_column, text_columns=list(config.text_columns),
                   id_column=config.id_column, max_text_tokens=config.max_text_tokens)

    def on(self, manifest: str | Path, tasks: list[str]) -> CatalogueConfig:
        """These columns on `manifest`, with `tasks` as its label columns."""
        return CatalogueConfig(name=self.name, manifest=str(manifest), image_column=self.image_column,
                               text_columns=list(self.text_columns), tasks=list(tasks), id_column=self.id_column,
                               max_text_tokens=self.max_text_tokens)


@dataclass
class CheckpointConfig:
    """A checkpoint's config.json, typed."""

    backbone: str
    catalogue: CatalogueColumns
    tasks: dict[str, TaskSpec]
    model: CMAClipConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    training: dict[str, Any] = field(default_factory=dict)  # epoch history, alignment loss and seconds
    metrics: dict[str, Any] = field(default_factory=dict)  # split -> evaluation report

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no tasks")
        if set(self.tasks) != set(self.model.tasks):
            raise ValueError(f"the tasks {sorted(self.tasks)} are not the model's {sorted(self.model.tasks)}")
        for task, spec in self.tasks.items():
            if len(spec.classes) != self.model.tasks[task]:
                raise ValueError(f"task {task!r} names {len(spec.classes)} classes for the model's "
                                 f"{self.model.tasks[task]} outputs")
        if self.catalogue.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be at least 1, not {self.catalogue.max_text_tokens}")

    @property
    def classes(self) -> dict[str, list[str]]:
        return {task: spec.classes for task, spec in self.tasks.items()}

    @property
    def thresholds(self) -> dict[str, float | None]:
        return {task: spec.threshold_90 for task, spec in self.tasks.items()}

    @property
    def display_names(self) -> dict[str, str]:
        """Task -> the name the app shows (the API keeps the column names)."""
        return {task: spec.display_name or readable_name(task) for task, spec in self.tasks.items()}

    def catalogue_on(self, manifest: str | Path) -> CatalogueConfig:
        """The checkpoint's columns and tasks applied to another manifest."""
        return self.catalogue.on(manifest, list(self.tasks))

    def training_manifest(self, data_root: str | Path | None = None) -> str | None:
        """The manifest this checkpoint was trained on (None when it cannot be found here)."""
        if self.train.manifest:
            return self.train.manifest
        if not self.train.catalogue:
            return None
        try:
            return CatalogueConfig.load(self.train.catalogue, data_root or self.train.data_root).manifest
        except CatalogueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "backbone": self.backbone, "catalogue": asdict(self.catalogue),
                "tasks": {task: asdict(spec) for task, spec in self.tasks.items()}, "train": self.train.to_dict(),
                "training": self.training, "metrics": self.metrics, "model": asdict(self.model)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "CheckpointConfig":
        """Raises CheckpointError, naming the part that does not fit."""
        try:
            model = CMAClipConfig(**config["model"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model settings: {exc}") from exc
        try:
            tasks = {task: _task_spec(task, spec) for task, spec in config["tasks"].items()}
            return cls(backbone=config["backbone"], catalogue=CatalogueColumns(**config["catalogue"]), tasks=tasks,
                       model=model,
                       train=TrainConfig.from_dict(config.get("train", {})), training=config.get("training", {}),
                       metrics=config.get("metrics", {}))
        except ValueError as exc:  # a value checked by the dataclasses: their message says what and why
            raise CheckpointError(f"invalid settings: {exc}") from exc
        except (TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"invalid settings: {exc!r}") from exc

    def save(self, folder: str | Path) -> None:
        """Write config.json alone (the weights stay untouched)."""
        (Path(folder) / CONFIG).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def _task_spec(task: str, spec: dict[str, Any]) -> TaskSpec:
    try:
        return TaskSpec(**_known(TaskSpec, spec))
    except ValueError as exc:
        raise ValueError(f"task {task!r}: {exc}") from exc


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the keys `cls` does not know: a config written by a newer version loads."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def save_checkpoint(folder: str | Path, model: Classifier, config: CheckpointConfig,
                    backbone_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights and config (its `model` settings are the model's). The fine-tuned
    backbone's weights are written with `backbone_state`, and without it any left in the
    folder by an earlier run are removed, so they never load with these weights. An ensemble's
    weights are stored compactly (`_compact`); loading gives them back as float32."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state, compacted = _compact(state) if isinstance(model, Ensemble) else (state, {})
    write_tensors(folder / WEIGHTS, state, metadata={"format": FORMAT, **compacted})
    if backbone_state is not None:
        write_tensors(folder / BACKBONE_WEIGHTS, {k: v.detach().contiguous().cpu() for k, v in backbone_state.items()})
    else:
        (folder / BACKBONE_WEIGHTS).unlink(missing_ok=True)
    replace(config, model=model.cfg).save(folder)
    return folder


def read_config(folder: str | Path) -> CheckpointConfig:
    folder = _checkpoint_folder(folder)
    try:
        return CheckpointConfig.from_dict(_config_json(folder))
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / CONFIG}: {exc}") from exc


def is_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a CMA-CLIP config.json (its settings and weights are checked on loading)."""
    try:
        _config_json(_checkpoint_folder(folder))
    except CheckpointError:
        return False
    return True


def train_state_counters(folder: str | Path) -> dict:
    """The counters a run's resumable state holds (its epoch, step, history, extra labels)."""
    with safe_open(str(Path(folder) / TRAIN_STATE), "pt") as handle:
        return json.loads(handle.metadata()["counters"])


def unfinished(folder: str | Path) -> bool:
    """Whether a training run writes `folder` or stopped before it finished (its marker, or its
    resumable state: a run stopped while it saved an epoch may have left one without the other)."""
    folder = Path(folder)
    return (folder / UNFINISHED).is_file() or (folder / TRAIN_STATE).is_file()


def require_finished(folder: str | Path) -> None:
    """Refuse a folder whose training run has not finished (stopped, or still training): its weights
    are the best epoch so far, without the thresholds and test report the run ends with, so serving
    it would auto-accept nothing and say nothing of why."""
    folder = _checkpoint_folder(folder)
    if not unfinished(folder):
        return
    try:
        when = f"after epoch {train_state_counters(folder).get('epoch', '?')}"
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):  # none saved yet, or one half-written
        when = "before an epoch was saved to resume from"
    raise CheckpointError(f"{folder} holds a training run that has not finished (stopped or still training, {when}): "
                          "no thresholds or test report yet; a stopped run finishes with its train command and "
                          "--resume")


def _config_json(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder} has no {CONFIG}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "model" not in raw:
        raise CheckpointError(f"{folder / CONFIG} is not a CMA-CLIP config (expected format {FORMAT!r})")
    return raw


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[Classifier, CheckpointConfig]:
    """The model (in eval mode) and its config. Raises CheckpointError with a clear reason."""
    folder = _checkpoint_folder(folder)
    config = read_config(folder)
    model = create_model(config.model)
    state = model.drop_unbuilt(_load_tensors(folder / WEIGHTS))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{folder}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]})")
    model.load_state_dict(state)
    return model.to(device).eval(), config


def save_ensemble(folder: str | Path, members: list[str | Path]) -> Path:
    """One checkpoint holding the finished runs `members` (one catalogue; different seeds, and
    recipes that may differ in `model.MEMBER_SETTINGS`: the inputs they read) as an `Ensemble`:
    their weights, and the first one's config with every member's seed and history under
    `training["members"]`. Its thresholds and metrics are the first member's until
    `evaluate.rescore` chooses the ensemble's own. Returns the folder."""
    if len(members) < 2:
        raise CheckpointError("an ensemble needs at least two member checkpoints")
    models, configs = zip(*(load_checkpoint(m) for m in members))
    first, first_tuned = configs[0], tuned_backbone_digest(members[0])
    for path, config in zip(members[1:], configs[1:]):
        settings = replace(config.model, **{name: getattr(first.model, name) for name in MEMBER_SETTINGS})
        differs = [name for name, a, b in (("model settings", settings, first.model),
                                           ("tasks and classes", config.classes, first.classes),
                                           ("catalogue", config.catalogue, first.catalogue),
                                           ("backbone", config.backbone, first.backbone))
                   if a != b]
        if tuned_backbone_digest(path) != first_tuned:
            differs.append("backbone weights")
        if config.train.finetune_backbone or differs:
            raise CheckpointError(f"{path} cannot join {members[0]} in an ensemble: "
                                  + (", ".join(differs) or "its backbone was fine-tuned") + " differ")
    # the ensemble reads the colour descriptor when any member does; each member keeps its own settings
    shared = replace(first.model, members=len(models), colour=any(c.model.colour for c in configs))
    own = [{name: getattr(c.model, name) for name in MEMBER_SETTINGS
            if getattr(c.model, name) != getattr(shared, name)} for c in configs]
    ensemble = create_model(replace(shared, member_settings=own if any(own) else None))
    for member, model in zip(ensemble.members, models):
        member.load_state_dict(model.state_dict())
    training = {"members": [{"folder": Path(m).name, "seed": c.train.seed, **c.training}
                            for m, c in zip(members, configs)]}
    config = replace(first, train=replace(first.train, members=len(models)), training=training)
    tuned = _checkpoint_folder(members[0]) / BACKBONE_WEIGHTS  # the members' one set of tuned backbone layers
    return save_checkpoint(folder, ensemble, config, _load_tensors(tuned) if tuned.exists() else None)


def save_members(folder: str | Path, out: str | Path) -> list[Path]:
    """The inverse of `save_ensemble`: each member of the ensemble checkpoint `folder` written back
    as the finished run it was (its settings, seed and history; its weights as the ensemble stores
    them; the ensemble's backbone file byte for byte) in `out/recipe-R/seed-S`, one `recipe-R` per
    distinct member settings in order of first appearance: the folders `lab.member_subsets` reads as
    recipes, so shipped members can be weighed against new ones without training them again."""
    model, config = load_checkpoint(folder)
    records = config.training.get("members", [])
    if not isinstance(model, Ensemble) or len(records) != len(model.members):
        raise CheckpointError(f"{folder} is not an ensemble that records its members' training")
    tower = _checkpoint_folder(folder) / BACKBONE_WEIGHTS
    recipes: list[dict[str, Any]] = []
    written = []
    for member, own, record in zip(model.members, config.model.member_settings or [{}] * len(records), records):
        if own not in recipes:
            recipes.append(own)
        run = Path(out) / f"recipe-{recipes.index(own)}" / f"seed-{record['seed']}"
        if run.exists():
            raise CheckpointError(f"{run} exists: two members of one recipe share seed {record['seed']}")
        train = replace(config.train, members=1, seed=record["seed"], **own)
        training = {k: v for k, v in record.items() if k not in ("folder", "seed")}
        save_checkpoint(run, member, replace(config, train=train, training=training, metrics={}))
        if tower.exists():
            shutil.copyfile(tower, run / BACKBONE_WEIGHTS)
        written.append(run)
    return written


def as_stored_in_ensemble(model: CMAClip) -> CMAClip:
    """`model` (one run) with its weights as an ensemble checkpoint stores them (`_compact`): what
    it predicts as a member of a saved ensemble, for choosing members before they are joined."""
    model.load_state_dict(_expand(*_compact(model.state_dict())))
    return model


def load_backbone(folder: str | Path, config: CheckpointConfig, device: torch.device | str) -> DualEncoder:
    """The backbone a checkpoint runs on, shared by every checkpoint on the same backbone and weights:
    the pretrained one, or one with the checkpoint's tuned weights (`backbone.safetensors`, known by
    the digest of its contents: both shipped checkpoints carry the same MobileNetV2 tower, so the app
    builds one backbone for the two, as it did before they had one)."""
    digest = tuned_backbone_digest(folder)
    if digest is None:
        return shared_backbone(config.backbone, str(device))
    key = (config.backbone, str(device), digest)
    if key not in _TUNED_BACKBONES:
        if len(_TUNED_BACKBONES) >= 4:  # as many as `shared_backbone` keeps
            _TUNED_BACKBONES.pop(next(iter(_TUNED_BACKBONES)))
        backbone = create_backbone(config.backbone, device)
        load_backbone_weights(_checkpoint_folder(folder) / BACKBONE_WEIGHTS, backbone)
        _TUNED_BACKBONES[key] = backbone
    return _TUNED_BACKBONES[key]


_TUNED_BACKBONES: dict[tuple[str, str, str], DualEncoder] = {}  # (name, device, weights' digest) -> backbone


def load_backbone_weights(path: str | Path, backbone: DualEncoder) -> None:
    """Load a safetensors file of fine-tuned backbone weights (all or some of its tensors, under
    the backbone's names) into `backbone`; its cache key then names the file's contents."""
    backbone.load_finetuned(_load_tensors(Path(path)), _file_digest(Path(path)))


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


def tuned_backbone_digest(folder: str | Path) -> str | None:
    """The digest of a checkpoint's fine-tuned backbone weights (None: the pretrained backbone). With
    the backbone's name it says which features a checkpoint reads, without building the backbone."""
    path = _checkpoint_folder(folder) / BACKBONE_WEIGHTS
    return _file_digest(path) if path.exists() else None


def _checkpoint_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are refused; only safetensors + JSON are loaded")
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    if path.is_file():
        raise CheckpointError(f"{path} is a file: give the checkpoint's folder (model.safetensors + config.json)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _compact(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An ensemble's weights for storage, and the metadata that reads them back (`_expand`).
    A member's tensor equal to an earlier member's (the alignment of one `--members` run) is
    stored once. Weight matrices are int8 (`int8.to_int8`: a scale per row; per bucket for the
    words tables), everything else float16: H&M's four members of session 21 take 9.5 MB instead
    of 19.8 (docs/RESULTS.md, "Members stored smaller")."""
    shared = {key: source for key in state if (source := _earlier_equal(key, state))}
    stored, int8 = {}, []
    for key, value in state.items():
        if key in shared:
            continue
        if value.is_floating_point() and value.dim() == 2 and key.endswith("weight"):
            stored[key], stored[key + SCALE_SUFFIX] = to_int8(value, dims=(0,) if key.endswith(WORDS_TABLE) else (1,))
            int8.append(key)
        else:
            stored[key] = value.half() if value.is_floating_point() else value
    return stored, {SHARED_KEY: json.dumps(shared), INT8_KEY: json.dumps(int8)}


def _earlier_equal(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """The first earlier member's tensor equal to member weight `key` (stored itself: an equal
    tensor before it would come first), or None."""
    match = MEMBER_KEY.fullmatch(key)
    if match is None:
        return None
    for member in range(int(match.group(1))):
        earlier = state.get(f"members.{member}.{match.group(2)}")
        if earlier is not None and torch.equal(earlier, state[key]):
            return f"members.{member}.{match.group(2)}"
    return None


def _expand(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """`_compact`'s weights back as the model's (float16 stays: `load_state_dict` converts it)."""
    for key in json.loads(metadata.get(INT8_KEY, "[]")):
        tensors[key] = from_int8(tensors[key], tensors.pop(key + SCALE_SUFFIX))
    shared = json.loads(metadata.get(SHARED_KEY, "{}"))
    first_member_shared = json.loads(metadata.get(FIRST_MEMBER_SHARED_KEY, "[]"))  # files before 2026-12-05
    shared.update({key: MEMBER_KEY.sub(r"members.0.\2", key) for key in first_member_shared})
    tensors.update({key: tensors[source] for key, source in shared.items()})
    return tensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights, as the model holds them (an ensemble's read back by `_expand`)."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), "pt") as handle:  # one read: the metadata and every tensor
            return _expand({key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc
