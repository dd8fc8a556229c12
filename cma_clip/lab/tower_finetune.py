"""Does fine-tuning the top of a frozen tower earn its place? (issue 14; a measurement, not shipped)

    python -m cma_clip.lab.tower_finetune --tower text --layers 1 --out runs/text-top1
    python -m cma_clip.lab.tower_finetune --tower image --layers 1 --out runs/image-top1
    python -m cma_clip.lab.tower_finetune --tower image --layers 0 --out runs/image-top0  # same loop, frozen

The bundled towers stay frozen in every shipped model. Here the top `--layers` layers of one of
them train with the fusion model, on a CPU: the states entering them are computed once for the
whole catalogue (`text_middle_states` / `image_middle_states`, cached beside the features) and
the other side's features stay cached, so an epoch costs the top layers' forward and backward
only. Text: MiniLM's top transformer layers; the tokens and pooled text the fusion model reads
are their outputs. Image: EfficientNet-Lite0's last MBConv blocks and its 1x1 head conv; the
7x7 tokens and the pooled head are their outputs (the colour descriptor is the pixels', as
before). Everything else is `cma_clip.train`'s recipe (its data, model, alignment, loss,
schedule, weight average and val-chosen 99%-confidence thresholds), so `--layers 0`
reproduces a frozen run of the same loop; the tower's layers learn at `--lr-scale` times the
fusion model's rate. Writes `OUT/eval.json` (val and test reports, timings, and how far the
tower's weight matrices moved: their mean relative change), `OUT/tuned-layers.safetensors` (the
trained layers under the backbone's own names) and prints the test table.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..backbones import DualEncoder, EncoderOutput, create_backbone
from ..checkpoint import TrainConfig, load_backbone_weights
from ..data import Catalogue, write_tensors
from ..evaluate import calibrate, format_table, predict_probabilities, score
from ..features import Features, default_cache_dir, image_batches
from ..model import multitask_loss, no_decay
from ..runtime import autocast, resolve_device, seed_everything
from ..train import SELECTION_METRIC, TrainingData, align, build_model, checkpoint_config, load_data, lr_lambda


class TextTop(nn.Module):
    """Copies of the text tower's top `layers` layers, over the states entering them: the text
    tokens, and their mean over the real tokens as the pooled text (as `encode_text`)."""

    def __init__(self, backbone: DualEncoder, layers: int) -> None:
        super().__init__()
        first = len(backbone.text_model.encoder.layer) - layers
        self.layers = copy.deepcopy(backbone.text_model.encoder.layer[first:])
        self.layers.requires_grad_(True)  # the copies of a frozen tower's layers are frozen too
        self.backbone_names = {f"layers.{i}": f"text_model.encoder.layer.{first + i}" for i in range(layers)}

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = mask[:, None, None, :]  # [B, 1, 1, L] True where a key may be attended to
        for layer in self.layers:
            states = layer(states, keep)
        weights = mask.unsqueeze(-1).to(states.dtype)
        return states, (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def apply(self, out: EncoderOutput, states: torch.Tensor) -> EncoderOutput:
        tokens, pooled = self(states[:, :out.text_mask.shape[1]], out.text_mask)
        return replace(out, text_tokens=tokens, text_pooled=pooled)


class ImageTail(nn.Module):
    """Copies of the image tower's last `layers` MBConv blocks and its head, over the states
    entering them: the last block's map as the tokens and the head's global mean as the pooled
    image (as `BundledBackbone.encode_image`)."""

    def __init__(self, backbone: DualEncoder, layers: int) -> None:
        super().__init__()
        cnn = backbone.cnn
        first = len(cnn._blocks) - layers
        self.blocks = copy.deepcopy(cnn._blocks[first:])
        self.head = nn.Sequential(copy.deepcopy(cnn._conv_head), copy.deepcopy(cnn._bn1), copy.deepcopy(cnn._swish))
        self.requires_grad_(True)  # the copies of a frozen tower's layers are frozen too
        self.backbone_names = {**{f"blocks.{i}": f"cnn._blocks.{first + i}" for i in range(layers)},
                               "head.0": "cnn._conv_head", "head.1": "cnn._bn1"}

    def train(self, mode: bool = True) -> "ImageTail":
        """Batch norm keeps the tower's ImageNet statistics (a fine-tuning batch is small and one catalogue's)."""
        return super().train(False)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            states = block(states)
        return states.flatten(2).transpose(1, 2), self.head(states).mean(dim=(2, 3))

    def apply(self, out: EncoderOutput, states: torch.Tensor) -> EncoderOutput:
        tokens, pooled = self(states)
        return replace(out, image_tokens=tokens, image_pooled=pooled)


@torch.no_grad()
def text_middle_states(backbone: DualEncoder, features: Features, layers: int, cache_dir: Path,
                       batch_size: int = 256) -> np.ndarray:
    """[N, L, C] float16: the text tower's states entering its top `layers` layers, for the token
    ids the feature cache holds; computed once, kept in `cache_dir` under the backbone and the ids."""
    texts = hashlib.sha256(np.ascontiguousarray(features.text_ids).tobytes()).hexdigest()[:16]
    path = cache_dir / "text-states" / f"{backbone.cache_key()}-{texts}-top{layers}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    model, device = backbone.text_model, backbone.device
    ids, mask = features.text_ids, features.text_mask
    out = np.zeros((len(ids), ids.shape[1], model.config.hidden_size), np.float16)
    for start in range(0, len(ids), batch_size):
        batch_ids = torch.from_numpy(ids[start:start + batch_size].astype(np.int64)).to(device)
        batch_mask = torch.from_numpy(mask[start:start + batch_size]).to(device)
        with autocast(device):
            hidden = model(input_ids=batch_ids, attention_mask=batch_mask.long(), output_hidden_states=True).hidden_states
        out[start:start + batch_size] = hidden[len(hidden) - 1 - layers].float().cpu().numpy()
    return _saved(path, out)


@torch.no_grad()
def image_middle_states(backbone: DualEncoder, catalogue: Catalogue, layers: int, cache_dir: Path,
                        batch_size: int = 64) -> np.ndarray:
    """[N, C, H, W] float16: the image tower's map entering its last `layers` blocks, for every
    photo of `catalogue`; computed once, kept in `cache_dir` under the backbone and the photos."""
    paths = catalogue.image_paths()
    photos = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:16]
    path = cache_dir / "image-states" / f"{backbone.cache_key()}-{photos}-top{layers}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    cnn, parts = backbone.cnn, []
    for pixels in image_batches(paths, backbone, batch_size):
        with autocast(backbone.device):
            x = cnn._swish(cnn._bn0(cnn._conv_stem(pixels.to(backbone.device).contiguous(memory_format=torch.channels_last))))
            for block in cnn._blocks[:len(cnn._blocks) - layers]:
                x = block(x)
        parts.append(x.float().cpu().numpy().astype(np.float16))
    return _saved(path, np.concatenate(parts))


def backbone_state(top: TextTop | ImageTail) -> dict[str, torch.Tensor]:
    """The tuned layers' tensors under the backbone's own names: a partial backbone state that
    `DualEncoder.load_finetuned` takes (what a checkpoint's backbone.safetensors holds). In
    float16: half the bytes in a checkpoint, and the backbone computes in float32 from them."""
    state = {}
    for name, tensor in top.state_dict().items():
        module, rest = next((m, name[len(m):]) for m in top.backbone_names if name.startswith(m + "."))
        tensor = tensor.detach().contiguous().cpu()
        state[top.backbone_names[module] + rest] = tensor.half() if tensor.is_floating_point() else tensor
    return state


def _saved(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return array


class TunedFeatures:
    """Cached features with one side from `top` over its middle states (anything with
    `__len__` and `batch`, as training and calibration read features)."""

    def __init__(self, features: Features, states: np.ndarray, top: TextTop | ImageTail) -> None:
        self.features, self.states, self.top = features, states, top
        self.text_ids = features.text_ids  # what `evaluate.item_groups` clusters items by

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> EncoderOutput:
        states = torch.from_numpy(np.ascontiguousarray(self.states[index])).to(device).float()
        return self.top.apply(self.features.batch(index, device), states)


TOWERS = {"text": TextTop, "image": ImageTail}
TUNED_LAYERS = "tuned-layers.safetensors"  # in OUT: the trained layers as backbone tensors


def run(cfg: TrainConfig, tower: str, layers: int, lr_scale: float, backbone_weights: str | None = None) -> dict:
    """Train as `cma_clip.train` does, with the top `layers` layers of `tower` ("text" or
    "image") trained too, on the backbone with `backbone_weights` (an earlier run's tuned layers)
    if given; returns the val and test reports (thresholds from val) and the timings."""
    seed_everything(cfg.seed)
    device = resolve_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = create_backbone(cfg.backbone, device)
    if backbone_weights:
        load_backbone_weights(backbone_weights, backbone)
    data: TrainingData = load_data(cfg, backbone)
    started = time.time()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # at --layers 0 the image side still runs through a (frozen) copy of its last block, so the
    # frozen reference is computed the way the tuned runs are
    copied = max(layers, 1) if tower == "image" else layers
    states = (text_middle_states(backbone, data.features, copied, cache) if tower == "text"
              else image_middle_states(backbone, data.catalogue, copied, cache))
    states_seconds = time.time() - started
    seed_everything(cfg.seed)
    model = build_model(cfg, data, backbone).to(device)
    align(cfg, model, data, device)
    model.align.requires_grad_(False)
    top = TOWERS[tower](backbone, copied).to(device)
    top.requires_grad_(bool(layers))
    pretrained = [p.detach().clone() for p in top.parameters()]
    trained = nn.ModuleDict({"model": model, "top": top})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    if layers:
        groups.append({"params": list(top.parameters()), "lr": cfg.lr * lr_scale, "weight_decay": 0.01})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, len(data.splits["train"]) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, int(cfg.warmup * total)), total))
    ema = AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    kept = ema.module if ema is not None else trained
    source, kept_source = TunedFeatures(data.features, states, top), TunedFeatures(data.features, states, kept["top"])
    targets = {t: torch.from_numpy(v) for t, v in data.targets.items()}
    val_targets = {t: v[data.splits["val"]] for t, v in data.targets.items()}
    best, best_state, bad, history = -1.0, None, 0, []
    started = time.time()
    for epoch in range(cfg.epochs):
        trained.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(data.splits["train"])
        losses, epoch_started = [], time.time()
        for b in range(steps_per_epoch):
            index = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            with autocast(device):
                output = model(source.batch(index, device))
            loss = multitask_loss(output.logits, {t: v[index].to(device) for t, v in targets.items()},
                                  None, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(trained)
            losses.append(loss.item())
        kept.eval()
        with torch.no_grad():
            val = score(predict_probabilities(kept["model"], kept_source, data.splits["val"]), val_targets)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - epoch_started, 1),
                        "val": val["mean"][SELECTION_METRIC]})
        print(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}  {history[-1]['seconds']}s  val R@90P "
              f"{history[-1]['val']:.4f}", file=sys.stderr, flush=True)
        if val["mean"][SELECTION_METRIC] > best:
            best, best_state, bad = val["mean"][SELECTION_METRIC], copy.deepcopy(kept.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    train_seconds = time.time() - started
    kept.load_state_dict(best_state)
    with torch.no_grad():
        metrics = calibrate(out, kept["model"], checkpoint_config(cfg, data, model), kept_source, data.targets,
                            data.splits)
    moved = [(tuned.detach() - before).norm() / before.norm() for tuned, before in zip(kept["top"].parameters(), pretrained)
             if before.dim() > 1]  # the weight matrices' relative change
    report = {"tower": tower, "layers": layers, "lr_scale": lr_scale, "backbone_weights": backbone_weights,
              "seed": cfg.seed, "history": history,
              "weight_change": float(torch.stack(moved).mean()) if moved else 0.0,
              "states_seconds": round(states_seconds, 1), "train_seconds": round(train_seconds, 1), **metrics}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    if layers:
        write_tensors(out / TUNED_LAYERS, backbone_state(kept["top"]))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cma_clip.lab.tower_finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--catalogue", default="hm-articles")
    p.add_argument("--tower", choices=sorted(TOWERS), default="text")
    p.add_argument("--layers", type=int, default=1, help="top layers to train (0: all frozen)")
    p.add_argument("--lr-scale", type=float, default=0.05, help="their learning rate over the fusion model's")
    p.add_argument("--backbone-weights", help="start from an earlier run's tuned layers (its tuned-layers.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    # the shipped H&M recipe: colour, TF-IDF words, no hashed lexical channel, weight average
    cfg = TrainConfig(catalogue=args.catalogue, out=args.out, seed=args.seed, colour=True, words_buckets=16384,
                      lexical_buckets=0, ema=0.99)
    report = run(cfg, args.tower, args.layers, args.lr_scale, args.backbone_weights)
    print(f"[test] {args.tower} layers {args.layers}, {report['train_seconds']} s training\n{format_table(report['test'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
