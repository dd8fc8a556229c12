"""CLIP-style alignment of two frozen encoders (LiT: locked towers, trained projections).

The bundled image and text encoders were never trained together. Two projection
heads map their pooled embeddings into one space, trained with CLIP's symmetric
InfoNCE loss and a learnable temperature over the catalogue's image/text pairs.
The aligned space gives CMA-CLIP its starting [CLS] embeddings and a zero-shot
classifier from label prompts, the paper's "raw CLIP" baseline.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import DualEncoder

PROMPT = "a photo of a {label}"


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlignmentHeads(nn.Module):
    """Image and text projections into a shared, L2-normalised embedding space."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.image_proj = ProjectionHead(image_dim, embed_dim)
        self.text_proj = ProjectionHead(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """The similarity scale (inverse temperature), capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def loss(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross-entropy over the in-batch similarity matrix."""
        image, text = self.embed_image(image_pooled), self.embed_text(text_pooled)
        logits = self.scale() * image @ text.t()
        target = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def train_alignment(heads: AlignmentHeads, image_pooled: np.ndarray, text_pooled: np.ndarray,
                    epochs: int = 10, batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
                    device: torch.device | str = "cpu") -> list[float]:
    """Fit the projection heads on pooled features of the training pairs; returns the loss per epoch."""
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * max(1, len(image_pooled) // batch_size)
    # OneCycleLR divides by zero when its warm-up ends on the first step (10 steps: fewer than
    # 2 * batch_size training items at the default 10 epochs); a longer warm-up there
    warmup = 0.15 if 0.1 * steps == 1 else 0.1
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=warmup)
    heads.train()
    history = []
    for _ in range(epochs):
        order = generator.permutation(len(image_pooled))
        losses = []
        for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):  # drop the last partial batch
            index = order[start:start + batch_size]
            image = torch.from_numpy(image_pooled[index]).float().to(device)
            text = torch.from_numpy(text_pooled[index]).float().to(device)
            loss = heads.loss(image, text)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule.last_epoch < steps:
                schedule.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    heads.eval()
    return history


@torch.no_grad()
def label_embeddings(heads: AlignmentHeads, backbone: DualEncoder, labels: list[str],
                     prompt: str = PROMPT, max_tokens: int = 32) -> torch.Tensor:
    """Aligned text embeddings of one prompt per label, [num_labels, embed_dim]."""
    texts = [prompt.format(label=label) for label in labels]
    batch = backbone.tokenize(texts, max_tokens)
    device = backbone.device
    _, pooled = backbone.encode_text(batch.to(device))
    return heads.embed_text(pooled.float().to(next(heads.parameters()).device))


@torch.no_grad()
def zero_shot_probabilities(heads: AlignmentHeads, image_pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Class probabilities from image-to-prompt similarity, [B, num_labels]."""
    logits = heads.scale() * heads.embed_image(image_pooled) @ classes.t()
    return logits.softmax(dim=-1)
