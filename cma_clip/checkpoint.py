"""Checkpoints: weights as safetensors plus a JSON config. Nothing is ever unpickled.

A checkpoint is a folder:
    model.safetensors     the CMA-CLIP weights (alignment heads, fusion, task heads)
    config.json           backbone id, catalogue columns, tasks with label vocabularies and
                          90%-precision thresholds, model hyper-parameters, training settings, metrics
    backbone.safetensors  only when the backbone was fine-tuned
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbones import DualEncoder
from .errors import CMAClipError
from .model import CMAClip, CMAClipConfig

FORMAT = "cma-clip/1"
WEIGHTS = "model.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class CheckpointError(CMAClipError, RuntimeError):
    """A checkpoint that cannot be loaded, with the reason in words."""


def save_checkpoint(folder: str | Path, model: CMAClip, meta: dict[str, Any],
                    backbone_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights and config; `meta` holds backbone, catalogue, tasks, training and metrics.
    The fine-tuned backbone's weights are written with `backbone_state`, and without it any
    left in the folder by an earlier run are removed, so they never load with these weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    if backbone_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in backbone_state.items()}, str(folder / BACKBONE_WEIGHTS))
    else:
        (folder / BACKBONE_WEIGHTS).unlink(missing_ok=True)
    write_config(folder, model.cfg, meta)
    return folder


def write_config(folder: str | Path, model_config: CMAClipConfig, meta: dict[str, Any]) -> None:
    """config.json alone: `meta` and the model's settings (the weights stay untouched)."""
    config = {"format": FORMAT, **meta, "model": asdict(model_config)}
    (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = _checkpoint_folder(folder)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder} has no {CONFIG}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{folder / CONFIG} is not a CMA-CLIP config (expected format {FORMAT!r})")
    return config


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu") -> tuple[CMAClip, dict[str, Any]]:
    """The model (in eval mode) and its config. Raises CheckpointError with a clear reason."""
    folder = _checkpoint_folder(folder)
    config = read_config(folder)
    try:
        model = CMAClip(CMAClipConfig(**config["model"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG}: invalid model settings: {exc}") from exc
    state = _load_tensors(folder / WEIGHTS)
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


def has_finetuned_backbone(folder: str | Path) -> bool:
    return (_checkpoint_folder(folder) / BACKBONE_WEIGHTS).exists()


def load_finetuned_backbone(folder: str | Path, backbone: DualEncoder) -> bool:
    """Load the checkpoint's fine-tuned backbone weights into `backbone`, when it has them
    (False when it has none). The backbone's cache key then names these weights."""
    path = _checkpoint_folder(folder) / BACKBONE_WEIGHTS
    if not path.exists():
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    backbone.load_finetuned(_load_tensors(path), digest.hexdigest()[:16])
    return True


def _checkpoint_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are refused; only safetensors + JSON are loaded")
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc
