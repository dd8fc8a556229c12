"""Does fine-tuning the text tower's top layers earn its place? (issue 14; a measurement, not shipped)

    python -m cma_clip.lab.text_finetune --catalogue hm-articles --layers 1 --out runs/text-top1
    python -m cma_clip.lab.text_finetune --catalogue hm-articles --layers 0 --out runs/text-top0  # same loop, frozen

The bundled text tower (MiniLM, 6 layers) stays frozen in every shipped model. Here its top
`--layers` layers train with the fusion model, on a CPU: the states entering them are computed
once for the whole catalogue (`middle_states`, cached beside the features) and the image
features stay cached, so an epoch costs the top layers' forward and backward only. The text
tokens and pooled text the fusion model reads are the tuned layers' outputs. Everything else is
`cma_clip.train`'s recipe (its data, model, alignment, loss, schedule, weight average and
val-chosen 99%-confidence thresholds), so `--layers 0` reproduces a frozen run of the same loop;
the text layers learn at `--text-lr-scale` times the fusion model's rate. Writes
`OUT/eval.json` (val and test reports, timings, and how far the text layers' weight matrices
moved: their mean relative change) and prints the test table.
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
from ..checkpoint import TrainConfig
from ..evaluate import calibrate, format_table, predict_probabilities, score
from ..features import Features, default_cache_dir
from ..model import multitask_loss, no_decay
from ..runtime import autocast, default_device, seed_everything
from ..train import SELECTION_METRIC, TrainingData, align, build_model, checkpoint_config, load_data, lr_lambda


class TextTop(nn.Module):
    """Copies of the text tower's top `layers` layers, over the states entering them: the text
    tokens, and their mean over the real tokens as the pooled text (as `encode_text`)."""

    def __init__(self, backbone: DualEncoder, layers: int) -> None:
        super().__init__()
        self.layers = copy.deepcopy(backbone.text_model.encoder.layer[len(backbone.text_model.encoder.layer) - layers:])
        self.layers.requires_grad_(True)  # the copies of a frozen tower's layers are frozen too

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = mask[:, None, None, :]  # [B, 1, 1, L] True where a key may be attended to
        for layer in self.layers:
            states = layer(states, keep)
        weights = mask.unsqueeze(-1).to(states.dtype)
        return states, (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def middle_states(backbone: DualEncoder, features: Features, layers: int, cache_dir: Path,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


class TunedText:
    """Cached features with the text side from `top` over the middle states (anything with
    `__len__` and `batch`, as training and calibration read features)."""

    def __init__(self, features: Features, states: np.ndarray, top: TextTop) -> None:
        self.features, self.states, self.top = features, states, top
        self.text_ids = features.text_ids  # what `evaluate.item_groups` clusters items by

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> EncoderOutput:
        out = self.features.batch(index, device)
        states = torch.from_numpy(np.ascontiguousarray(self.states[index, :out.text_mask.shape[1]])).to(device).float()
        tokens, pooled = self.top(states, out.text_mask)
        return replace(out, text_tokens=tokens, text_pooled=pooled)


def run(cfg: TrainConfig, layers: int, text_lr_scale: float) -> dict:
    """Train as `cma_clip.train` does, with the top `layers` text layers trained too; returns
    the val and test reports (thresholds from val) and the timings."""
    seed_everything(cfg.seed)
    device = default_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = create_backbone(cfg.backbone, device)
    data: TrainingData = load_data(cfg, backbone)
    started = time.time()
    states = middle_states(backbone, data.features, layers, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    states_seconds = time.time() - started
    seed_everything(cfg.seed)
    model = build_model(cfg, data, backbone).to(device)
    align(cfg, model, data, device)
    model.align.requires_grad_(False)
    top = TextTop(backbone, layers).to(device)
    pretrained = [p.detach().clone() for p in top.parameters()]
    trained = nn.ModuleDict({"model": model, "top": top})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    if layers:
        groups.append({"params": list(top.parameters()), "lr": cfg.lr * text_lr_scale, "weight_decay": 0.01})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    steps_per_epoch = max(1, len(data.splits["train"]) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, int(cfg.warmup * total)), total))
    ema = AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    kept = ema.module if ema is not None else trained
    source, kept_source = TunedText(data.features, states, top), TunedText(data.features, states, kept["top"])
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
    report = {"layers": layers, "text_lr_scale": text_lr_scale, "seed": cfg.seed, "history": history,
              "text_weight_change": float(torch.stack(moved).mean()) if moved else 0.0,
              "states_seconds": round(states_seconds, 1), "train_seconds": round(train_seconds, 1), **metrics}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--catalogue", default="hm-articles")
    p.add_argument("--layers", type=int, default=1, help="top text layers to train (0: all frozen)")
    p.add_argument("--text-lr-scale", type=float, default=0.05, help="their learning rate over the fusion model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    # the shipped H&M recipe: colour, TF-IDF words, no hashed lexical channel, weight average
    cfg = TrainConfig(catalogue=args.catalogue, out=args.out, seed=args.seed, colour=True, words_buckets=16384,
                      lexical_buckets=0, ema=0.99)
    report = run(cfg, args.layers, args.text_lr_scale)
    print(f"[test] layers {args.layers}, {report['train_seconds']} s training\n{format_table(report['test'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
