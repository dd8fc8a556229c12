"""CMA-CLIP: sequence-wise and modality-wise cross-modality attention over a dual encoder.

    text tokens ──proj──┐                                       ┌─ fused text [CLS] ──┐
    aligned text ─[CLS]─┤  + modality, position embeddings      │                     │  per task k:
                        ├─ transformer over [text ; image] ─────┤                     ├─ keyless attention (w_k)
    aligned image [CLS]─┤  (sequence-wise attention)            │                     │  → MLP head_k → logits_k
    patch tokens ─proj──┘                                       └─ fused image [CLS] ─┘

The model runs on backbone features (`EncoderOutput`), so it trains on cached
features of a frozen backbone in seconds per epoch. The [CLS] tokens start from the
CLIP-aligned pooled embeddings (`align.AlignmentHeads`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .align import AlignmentHeads
from .backbones import EncoderOutput

FUSIONS = ("cma", "no_modality_attention", "no_sequence_attention", "no_attention",  # the model, its ablations
           "late_fusion", "text_only", "image_only")  # baselines on the aligned embeddings
MODALITIES = ("text", "image")
MASKED = -100  # the target cross-entropy ignores: missing and out-of-vocabulary labels
SEQUENCE_FUSIONS = ("cma", "no_modality_attention")  # fusions with the sequence-wise attention
MODALITY_FUSIONS = ("cma", "no_sequence_attention")  # fusions with the modality-wise attention
# Fusions without modality-wise attention report fixed (text, image) weights: an even split for
# those that use both modalities, all of the weight on the one a single-modality baseline uses.
FIXED_WEIGHTS = {"no_modality_attention": (0.5, 0.5), "no_attention": (0.5, 0.5), "late_fusion": (0.5, 0.5),
                 "text_only": (1.0, 0.0), "image_only": (0.0, 1.0)}


@dataclass
class CMAClipConfig:
    image_token_dim: int
    image_pooled_dim: int
    text_token_dim: int
    text_pooled_dim: int
    num_patches: int
    max_text_tokens: int
    tasks: dict[str, int] = field(default_factory=dict)  # task -> number of classes
    embed_dim: int = 256  # the aligned (CLIP) space
    width: int = 192
    depth: int = 1
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    fusion: str = "cma"  # one of FUSIONS: the full model or an ablation
    lexical_buckets: int = 0  # >0: a trainable embedding of hashed token ids added to the text tokens

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")


@dataclass
class AttentionMaps:
    """Last-layer sequence attention, averaged over heads, for a batch of B items.

    The sequence is [text CLS, L text tokens, image CLS, P patches]."""

    text_to_image: torch.Tensor  # [B, L, P] each text token's attention on the patches
    text_cls: torch.Tensor  # [B, L + P + 2] the text [CLS]'s attention on the whole sequence
    image_cls: torch.Tensor  # [B, L + P + 2] the image [CLS]'s attention on the whole sequence
    text_length: int

    def cls_to_text(self, which: str = "image") -> torch.Tensor:
        """[B, L]: a [CLS]'s attention on the text tokens."""
        row = self.image_cls if which == "image" else self.text_cls
        return row[:, 1:1 + self.text_length]

    def cls_to_patches(self, which: str = "image") -> torch.Tensor:
        """[B, P]: a [CLS]'s attention on the image patches."""
        row = self.image_cls if which == "image" else self.text_cls
        return row[:, 2 + self.text_length:]


@dataclass
class CMAOutput:
    logits: dict[str, torch.Tensor]  # task -> [B, classes]
    modality_weights: dict[str, torch.Tensor]  # task -> [B, 2] weights of (text, image), summing to 1
    attention: AttentionMaps | None = None
    # With `keep_layers`: every layer's per-head attention probabilities [B, heads, S, S], first layer
    # first, still in the autograd graph, so a gradient can be taken w.r.t. them (`cma_clip.relevance`).
    layer_attention: list[torch.Tensor] | None = None


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`keep` [B, S] is True for tokens that may be attended to (not padding). With `need_weights`
        the explicit path also returns the per-head attention probabilities [B, heads, S, S], which
        stay in the autograd graph: the output is computed from them."""
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :]
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, s, w)
        return self.out(y), weights


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), keep, need_weights)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), weights


class SequenceAttention(nn.Module):
    """A transformer over the concatenated text and image token sequences (the paper's
    sequence-wise attention); returns the fused text and image [CLS] embeddings."""

    def __init__(self, cfg: CMAClipConfig) -> None:
        super().__init__()
        w = cfg.width
        self.text_in = nn.Linear(cfg.text_token_dim, w)
        # The frozen text encoder's states are contextual but not fine-tuned; a trainable
        # embedding of the (hashed) token ids gives the fusion a cheap lexical channel,
        # standing in for fine-tuning the text encoder's input embeddings.
        self.lexical = nn.Embedding(cfg.lexical_buckets, w) if cfg.lexical_buckets else None
        if self.lexical is not None:
            nn.init.normal_(self.lexical.weight, std=0.02)
        self.image_in = nn.Linear(cfg.image_token_dim, w)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.max_text_tokens + 1, w) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(1, cfg.num_patches + 1, w) * 0.02)
        self.modality = nn.Parameter(torch.randn(2, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)

    def forward(self, feats: EncoderOutput, text_cls: torch.Tensor, image_cls: torch.Tensor,
                need_weights: bool = False, keep_layers: list | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMaps | None]:
        """The fused text and image [CLS]; with `need_weights` the last layer's attention maps (mean
        over heads). A list passed as `keep_layers` receives every layer's per-head attention."""
        b, length = feats.text_mask.shape
        tokens = self.text_in(feats.text_tokens)
        if self.lexical is not None:
            tokens = tokens + self.lexical(feats.text_ids % self.lexical.num_embeddings)
        text = torch.cat([text_cls[:, None], tokens], 1) + self.text_pos[:, :length + 1]
        image = torch.cat([image_cls[:, None], self.image_in(feats.image_tokens)], 1) + self.image_pos
        x = torch.cat([text + self.modality[0], image + self.modality[1]], 1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        keep = torch.cat([ones, feats.text_mask.bool(), ones.expand(b, image.shape[1])], 1)
        weights = None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, keep, keep_layers is not None or (need_weights and i == len(self.blocks) - 1))
            if keep_layers is not None:
                keep_layers.append(weights)
        x = self.norm(x)
        maps = None
        if need_weights:
            weights = weights.mean(dim=1)
            maps = AttentionMaps(text_to_image=weights[:, 1:length + 1, length + 2:],
                                 text_cls=weights[:, 0], image_cls=weights[:, length + 1], text_length=length)
        return x[:, 0], x[:, length + 1], maps


class ModalityAttention(nn.Module):
    """Keyless attention over modalities, one learned vector w_k per task:
    weights = softmax_m(w_k . e_m), output = sum_m weights_m e_m.
    (The trainer exempts w_k from weight decay, which would pull every task to 50/50.)"""

    def __init__(self, num_tasks: int, width: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tasks, width) * 0.02)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, M, W] -> per-task outputs [B, T, W] and weights [B, T, M]."""
        scores = torch.einsum("tw,bmw->btm", self.queries, embeddings).float()
        weights = scores.softmax(dim=-1)  # in float32, so the weights sum to 1 under bf16 autocast too
        return weights.to(embeddings.dtype) @ embeddings, weights


class TaskHead(nn.Module):
    def __init__(self, width: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CMAClip(nn.Module):
    """Multi-task classifier over backbone features: alignment heads, sequence-wise
    attention, per-task modality-wise attention and MLP heads.

    `cfg.fusion` leaves parts out for ablations and baselines (only the parts a fusion uses
    are built): "late_fusion" is an MLP head per task on the concatenated aligned embeddings
    (the paper's fine-tuned CLIP), "text_only"/"image_only" a head on one of them."""

    OPTIONAL = ("sequence", "unfused_norm", "modality")  # parts some fusions do not build

    def __init__(self, cfg: CMAClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.align = AlignmentHeads(cfg.image_pooled_dim, cfg.text_pooled_dim, cfg.embed_dim)
        self.text_cls_in = nn.Linear(cfg.embed_dim, cfg.width)
        self.image_cls_in = nn.Linear(cfg.embed_dim, cfg.width)
        fused = cfg.fusion in SEQUENCE_FUSIONS
        self.sequence = SequenceAttention(cfg) if fused else None
        self.unfused_norm = None if fused else nn.LayerNorm(cfg.width)
        self.modality = ModalityAttention(len(cfg.tasks), cfg.width) if cfg.fusion in MODALITY_FUSIONS else None
        head_width = 2 * cfg.width if cfg.fusion == "late_fusion" else cfg.width
        self.heads = nn.ModuleDict({task: TaskHead(head_width, n, cfg.dropout) for task, n in cfg.tasks.items()})

    def drop_unbuilt(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` without the weights of parts this fusion does not build: checkpoints written
        before the model was built per fusion carry them, unused."""
        unbuilt = tuple(f"{name}." for name in self.OPTIONAL if getattr(self, name) is None)
        return {k: v for k, v in state.items() if not k.startswith(unbuilt)}

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    def forward(self, feats: EncoderOutput, return_attention: bool = False, keep_layers: bool = False,
                text_absent: torch.Tensor | None = None) -> CMAOutput:
        """Every task's logits and modality weights; `return_attention`: the last layer's attention maps;
        `keep_layers`: every layer's per-head attention probabilities, in the graph (`layer_attention`).
        `text_absent` [B] bool marks items without text: their modality weights go wholly to the image
        (an empty text still gets about half of the weight otherwise)."""
        text_cls = self.text_cls_in(self.align.embed_text(feats.text_pooled))
        image_cls = self.image_cls_in(self.align.embed_image(feats.image_pooled))
        maps, layers = None, [] if keep_layers and self.sequence is not None else None
        if self.sequence is not None:
            text_emb, image_emb, maps = self.sequence(feats, text_cls, image_cls, need_weights=return_attention,
                                                      keep_layers=layers)
        else:
            text_emb, image_emb = self.unfused_norm(text_cls), self.unfused_norm(image_cls)
        embeddings = torch.stack([text_emb, image_emb], dim=1)  # [B, 2, W] in MODALITIES order
        fusion = self.cfg.fusion
        if self.modality is not None:
            fused, weights = self.modality(embeddings)
        else:  # the same fixed weights for every item and task
            weights = embeddings.new_tensor(FIXED_WEIGHTS[fusion]).expand(len(embeddings), len(self.tasks), 2)
            if fusion == "late_fusion":
                fused = embeddings.flatten(1)[:, None].expand(-1, len(self.tasks), -1)
            else:  # a plain average of the two modalities, or the one modality a baseline uses
                fused = weights @ embeddings
        if text_absent is not None and fusion != "late_fusion":
            image_only = weights.new_tensor((0.0, 1.0))
            weights = torch.where(text_absent.to(weights.device)[:, None, None], image_only, weights)
            fused = weights.to(embeddings.dtype) @ embeddings
        logits = {task: head(fused[:, i]) for i, (task, head) in enumerate(self.heads.items())}
        return CMAOutput(logits, {task: weights[:, i] for i, task in enumerate(self.heads)}, maps, layers)


def absent_texts(texts: list[str]) -> torch.Tensor | None:
    """[B] bool, True where an item has no text (`CMAClip.forward`'s `text_absent`); None when all have one.
    Measured on the shipped checkpoints' val items with the text blanked (`cma_clip.lab.empty_text`):
    H&M mean accuracy 0.516 with the text absent against 0.495 fed as an empty string; fashion 0.636 both."""
    absent = [not text.strip() for text in texts]
    return torch.tensor(absent) if any(absent) else None


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters kept out of weight decay: biases, norms, position and modality embeddings,
    and the modality-attention vectors (decay would flatten every task's weights to 50/50)."""
    return param.dim() < 2 or name.endswith(("_pos", "sequence.modality", "modality.queries"))


def multitask_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   labelled: dict[str, int] | None = None) -> torch.Tensor:
    """Mean over tasks of cross-entropy on the items labelled for that task.

    Missing (-1) and out-of-vocabulary (-2) labels are masked out of their task only; a task
    without labelled items adds zero, still through its head (so under DDP every head has a
    gradient on every rank). `labelled` gives each task's count of labelled items in the whole
    (global) batch when these logits are only one rank's share of it: each rank's losses then
    sum to the single-process loss. By default the counts are this batch's own."""
    if labelled is None:
        labelled = {task: int((target >= 0).sum()) for task, target in targets.items()}
    total = 0.0
    for task, target in targets.items():
        masked = torch.where(target >= 0, target, torch.full_like(target, MASKED))
        summed = F.cross_entropy(logits[task].float(), masked, ignore_index=MASKED, reduction="sum")
        total = total + summed / max(1, labelled[task])
    return total / max(1, sum(count > 0 for count in labelled.values()))
