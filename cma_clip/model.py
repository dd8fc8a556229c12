"""CMA-CLIP: sequence-wise and modality-wise cross-modality attention over a dual encoder.

    text tokens ──proj──┐                                       ┌─ fused text [CLS] ──┐
    aligned text ─[CLS]─┤  + modality, position embeddings      │                     │  per task k:
                        ├─ transformer over [text ; image] ─────┤                     ├─ keyless attention (w_k)
    aligned image [CLS]─┤  (sequence-wise attention)            │                     │  → MLP head_k → logits_k
    patch tokens ─proj──┤                                       ├─ fused image [CLS] ─┤
    colour [CLS], family tokens (optional, `colour.py`) ────────┤─ fused colour [CLS]─┤
    TF-IDF words token (optional) ──────────────────────────────┘─ fused words ───────┘

The model runs on backbone features (`EncoderOutput`), so it trains on cached
features of a frozen backbone in seconds per epoch. The [CLS] tokens start from the
CLIP-aligned pooled embeddings (`align.AlignmentHeads`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .align import AlignmentHeads
from .backbones import IMAGE_TOWERS, EncoderOutput
from .colour import FAMILIES, FAMILY_FEATURES, HISTOGRAM_DIM, split as split_colour

FUSIONS = ("cma", "no_modality_attention", "no_sequence_attention", "no_attention",  # the model, its ablations
           "late_fusion", "text_only", "image_only",  # baselines on the aligned embeddings
           "text_tokens", "image_tokens")  # baselines: the sequence-wise attention over one side's tokens
MODALITIES = ("text", "image")  # always present; "colour" and "words" join them when the config asks
# what the members of one Ensemble may differ in: the inputs they read and how they were regularised, not
# the shapes a rollout per member assumes (depth, the tasks)
MEMBER_SETTINGS = ("colour", "words_buckets", "lexical_buckets", "modality_dropout", "dropout", "image_tower")
MASKED = -100  # the target cross-entropy ignores: missing and out-of-vocabulary labels
SEQUENCE_FUSIONS = ("cma", "no_modality_attention", "text_tokens", "image_tokens")  # with sequence-wise attention
MODALITY_FUSIONS = ("cma", "no_sequence_attention")  # fusions with the modality-wise attention
TEXT_SIDE, IMAGE_SIDE = ("text", "words"), ("image", "colour")
SINGLE_SIDE = {"text_only": TEXT_SIDE, "image_only": IMAGE_SIDE, "text_tokens": TEXT_SIDE, "image_tokens": IMAGE_SIDE}


def fixed_weights(fusion: str, modalities: tuple[str, ...]) -> tuple[float, ...]:
    """The weights a fusion without modality-wise attention reports: an even split over the
    modalities it uses (all of them, or one side's for the single-modality baselines)."""
    used = [m in SINGLE_SIDE.get(fusion, modalities) for m in modalities]
    return tuple(u / sum(used) for u in used)


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
    # in training, the chance that each of text, colour and words is hidden from an item (the image never
    # is): its tokens from the sequence-wise attention, its weight from the modality-wise attention
    modality_dropout: float = 0.0
    fusion: str = "cma"  # one of FUSIONS: the full model or an ablation
    lexical_buckets: int = 0  # >0: a trainable embedding of hashed token ids added to the text tokens
    colour: bool = False  # the foreground colour descriptor (`colour.py`) as tokens and a modality
    words_buckets: int = 0  # >0: TF-IDF of hashed word-piece uni- and bigrams as one token and a modality
    # whose image tokens and pooled embedding the model reads (`backbones.IMAGE_TOWERS`): the backbone's own
    # ("main") or the second tower's ("mobilenet_v2", same shapes), which some ensemble members read
    image_tower: str = "main"
    members: int = 1  # >1: an `Ensemble` of this many models of these settings
    # an Ensemble of several recipes: per member, its settings that differ from these (`MEMBER_SETTINGS` only)
    member_settings: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image tower must be one of {IMAGE_TOWERS}, not {self.image_tower!r}")
        if self.members < 1:
            raise ValueError(f"an ensemble has at least one member, not {self.members}")
        if self.member_settings is not None:
            if len(self.member_settings) != self.members:
                raise ValueError(f"{len(self.member_settings)} members' settings for {self.members} members")
            other = {key for settings in self.member_settings for key in settings} - set(MEMBER_SETTINGS)
            if other:
                raise ValueError(f"members of one ensemble may differ only in {MEMBER_SETTINGS}, not {sorted(other)}")

    def member_configs(self) -> list["CMAClipConfig"]:
        """Each member's own settings (an Ensemble's), as a single model's config."""
        settings = self.member_settings or [{}] * self.members
        return [replace(self, members=1, member_settings=None, **own) for own in settings]

    def only_tasks(self, tasks: list[str]) -> "CMAClipConfig":
        """This config for `tasks` (some of its own) alone."""
        return replace(self, tasks={t: self.tasks[t] for t in tasks})


@dataclass
class AttentionMaps:
    """Last-layer sequence attention, averaged over heads, for a batch of B items.

    The sequence is [text CLS, L text tokens, image CLS, P patches]."""

    text_to_image: torch.Tensor  # [B, L, P] each text token's attention on the patches
    text_cls: torch.Tensor  # [B, S] the text [CLS]'s attention on the whole sequence
    image_cls: torch.Tensor  # [B, S] the image [CLS]'s attention on the whole sequence
    text_length: int
    num_patches: int

    def cls_to_text(self, which: str = "image") -> torch.Tensor:
        """[B, L]: a [CLS]'s attention on the text tokens."""
        row = self.image_cls if which == "image" else self.text_cls
        return row[:, 1:1 + self.text_length]

    def cls_to_patches(self, which: str = "image") -> torch.Tensor:
        """[B, P]: a [CLS]'s attention on the image patches."""
        row = self.image_cls if which == "image" else self.text_cls
        return row[:, 2 + self.text_length:2 + self.text_length + self.num_patches]


@dataclass
class CMAOutput:
    logits: dict[str, torch.Tensor]  # task -> [B, classes]
    modality_weights: dict[str, torch.Tensor]  # task -> [B, M] weights of `CMAClip.modalities`, summing to 1
    attention: AttentionMaps | None = None
    # With `keep_layers`: every layer's per-head attention probabilities [B, heads, S, S], first layer
    # first, still in the autograd graph, so a gradient can be taken w.r.t. them (`cma_clip.relevance`).
    layer_attention: list[torch.Tensor] | None = None
    layer_groups: int = 1  # `layer_attention` holds this many models' layers in turn (an Ensemble's members)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor, need_weights: bool,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`keep` [B, S] is True for tokens that may be attended to (not padding). With `need_weights`
        the explicit path also returns the per-head attention probabilities [B, heads, S, S], which
        stay in the autograd graph: the output is computed from them. `rows` (positions [R]): only
        those tokens query, the output is [B, R, W] (keys and values still come from every token)."""
        b, s, w = x.shape
        d = w // self.heads
        if rows is None:
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        else:
            q_weight, kv_weight = self.qkv.weight.split([w, 2 * w])
            q_bias, kv_bias = self.qkv.bias.split([w, 2 * w])
            q = F.linear(x[:, rows], q_weight, q_bias).view(b, len(rows), self.heads, d).transpose(1, 2)
            k, v = F.linear(x, kv_weight, kv_bias).view(b, s, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :]
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = weights @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, q.shape[2], w)
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

    def forward(self, x: torch.Tensor, keep: torch.Tensor, need_weights: bool = False,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`rows`: only those positions' outputs, [B, R, W] (see `SelfAttention.forward`)."""
        y, weights = self.attn(self.norm1(x), keep, need_weights, rows)
        x = (x if rows is None else x[:, rows]) + self.drop(y)
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
        extras = int(cfg.colour) + int(bool(cfg.words_buckets))
        self.extra_modality = nn.Parameter(torch.randn(extras, w) * 0.02) if extras else None
        self.colour_pos = nn.Parameter(torch.randn(1, len(FAMILIES) + 1, w) * 0.02) if cfg.colour else None
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        # the single-side baselines hide the other side's tokens from every query
        self.visible = SINGLE_SIDE.get(cfg.fusion) if cfg.fusion.endswith("_tokens") else None

    def forward(self, feats: EncoderOutput, text_cls: torch.Tensor, image_cls: torch.Tensor,
                extras: list["ExtraInput"] | None = None, need_weights: bool = False, keep_layers: list | None = None,
                hidden: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], AttentionMaps | None]:
        """The fused [CLS] of every modality (text, image, then the extras in order); with
        `need_weights` the last layer's attention maps (mean over heads). A list passed as
        `keep_layers` receives every layer's per-head attention. `hidden`: modality -> [B] bool,
        the items whose tokens of that modality no query may attend to.

        The sequence is [text CLS, L text tokens, image CLS, P patches, then per extra its
        [CLS] and its tokens]."""
        b, length = feats.text_mask.shape
        tokens = self.text_in(feats.text_tokens)
        if self.lexical is not None:
            tokens = tokens + self.lexical(feats.text_ids % self.lexical.num_embeddings)
        text = torch.cat([text_cls[:, None], tokens], 1) + self.text_pos[:, :length + 1]
        image = torch.cat([image_cls[:, None], self.image_in(feats.image_tokens)], 1) + self.image_pos
        ones = torch.ones(b, 1, dtype=torch.bool, device=text.device)
        parts = [text + self.modality[0], image + self.modality[1]]
        keeps = [("text", ones), ("text", feats.text_mask.bool()), ("image", ones.expand(b, image.shape[1]))]
        starts = [0, length + 1]
        for i, extra in enumerate(extras or []):
            group = extra.cls[:, None] if extra.tokens is None else torch.cat([extra.cls[:, None], extra.tokens], 1)
            if extra.name == "colour":
                group = group + self.colour_pos
            starts.append(sum(p.shape[1] for p in parts))
            parts.append(group + self.extra_modality[i])
            keeps += [(extra.name, ones)] + ([] if extra.keep is None else [(extra.name, extra.keep)])
        x = torch.cat(parts, 1)
        hidden = hidden or {}
        keep = torch.cat([(k if name not in hidden else k & ~hidden[name][:, None])
                          if self.visible is None or name in self.visible else torch.zeros_like(k)
                          for name, k in keeps], 1)
        weights = None
        # Without maps, only the [CLS] tokens leave the last layer, so it computes their rows alone:
        # the H&M model's batch forward 3.3x faster, a training step 4x (docs/PERFORMANCE.md).
        cls_only = not (need_weights or keep_layers is not None)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            rows = torch.tensor(starts, device=x.device) if cls_only and last else None
            x, weights = block(x, keep, keep_layers is not None or (need_weights and last), rows)
            if keep_layers is not None:
                keep_layers.append(weights)
        x = self.norm(x)
        if cls_only:
            return list(x.unbind(1)), None
        maps = None
        if need_weights:
            weights = weights.mean(dim=1)
            patches = feats.image_tokens.shape[1]
            maps = AttentionMaps(text_to_image=weights[:, 1:length + 1, length + 2:length + 2 + patches],
                                 text_cls=weights[:, 0], image_cls=weights[:, length + 1], text_length=length,
                                 num_patches=patches)
        return [x[:, start] for start in starts], maps


@dataclass
class ExtraInput:
    """A modality beyond text and image: its [CLS] [B, W], its tokens [B, K, W] (or None) and
    which of them may be attended to [B, K]."""

    name: str
    cls: torch.Tensor
    tokens: torch.Tensor | None = None
    keep: torch.Tensor | None = None


class WordsBag(nn.Module):
    """The text as a bag of words: TF-IDF of its word-piece unigrams and bigrams, hashed into
    `buckets`, projected to one token. A sparse lexical view the frozen contextual states lack
    (a TF-IDF model beats them on product types); idf comes from the training texts (`fit_idf`)
    and is kept in the checkpoint. Pieces in every text (the [CLS] and [SEP] tokens) get idf 0."""

    def __init__(self, buckets: int, width: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.proj = nn.Linear(buckets, width)
        nn.init.normal_(self.proj.weight, std=0.02)
        self.register_buffer("idf", torch.ones(buckets))

    def grams(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket ids [B, 2L - 1] of the unigrams and bigrams, and which are real."""
        ids, mask = ids.long(), mask.bool()
        bigrams = ids[:, :-1] * 1_000_003 + ids[:, 1:] * 7_919 + 1
        grams = torch.cat([ids, bigrams], 1) % self.buckets
        return grams, torch.cat([mask, mask[:, :-1] & mask[:, 1:]], 1)

    def counts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        grams, real = self.grams(ids, mask)
        out = torch.zeros(len(ids), self.buckets, device=ids.device)
        return out.scatter_add_(1, grams, real.float())

    @torch.no_grad()
    def fit_idf(self, ids: torch.Tensor, mask: torch.Tensor, batch: int = 1024) -> None:
        """idf = log((1 + N) / (1 + df)) over the given texts (the training split)."""
        df = torch.zeros(self.buckets)
        for start in range(0, len(ids), batch):
            df += (self.counts(ids[start:start + batch], mask[start:start + batch]) > 0).float().sum(0).cpu()
        self.idf.copy_(torch.log((1 + len(ids)) / (1 + df)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`proj` of the L2-normalised TF-IDF vector (sublinear tf), computed from the text's own
        grams: only their columns of the [width, buckets] table are read, not all 16,384 of them
        (for 32 H&M texts, about 115 grams each: 1.4 ms instead of 4.7 ms for the dense product)."""
        grams, real = self.grams(ids, mask)
        tf = self.counts(ids, mask).gather(1, grams)  # each gram's count in its text
        value = torch.where(real, 1 + torch.log(tf.clamp(min=1)), 0) * self.idf[grams]
        share = value / tf.clamp(min=1)  # a bucket seen tf times: each occurrence carries 1/tf of its value
        norm = (value * share).sum(1, keepdim=True).sqrt().clamp(min=1e-12)  # the TF-IDF vector's norm
        # the grams' columns, gathered along the table's rows (the cache-friendly way of its layout)
        columns = self.proj.weight.index_select(1, grams.flatten()).view(-1, *grams.shape)  # [width, B, G]
        return torch.einsum("wbg,bg->bw", columns, share / norm) + self.proj.bias


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
    (the paper's fine-tuned CLIP baseline, with the towers frozen), "text_only"/"image_only" a head
    on one of them; "text_tokens"/"image_tokens" the sequence-wise attention over one side's tokens only
    (the other side's are hidden from every query) and that side's fused [CLS] embeddings."""

    OPTIONAL = ("sequence", "unfused_norm", "modality")  # parts some fusions do not build

    def __init__(self, cfg: CMAClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = MODALITIES + ("colour",) * cfg.colour + ("words",) * bool(cfg.words_buckets)
        self.align = AlignmentHeads(cfg.image_pooled_dim, cfg.text_pooled_dim, cfg.embed_dim)
        self.text_cls_in = nn.Linear(cfg.embed_dim, cfg.width)
        self.image_cls_in = nn.Linear(cfg.embed_dim, cfg.width)
        # the colour [CLS] from the foreground histogram; a token per colour family from its share and mean colour
        self.colour_cls_in = nn.Sequential(nn.Linear(HISTOGRAM_DIM, cfg.width), nn.GELU(),
                                           nn.Linear(cfg.width, cfg.width)) if cfg.colour else None
        self.colour_in = nn.Sequential(nn.Linear(FAMILY_FEATURES, cfg.width), nn.GELU(),
                                       nn.Linear(cfg.width, cfg.width)) if cfg.colour else None
        self.words = WordsBag(cfg.words_buckets, cfg.width) if cfg.words_buckets else None
        fused = cfg.fusion in SEQUENCE_FUSIONS
        self.sequence = SequenceAttention(cfg) if fused else None
        self.unfused_norm = None if fused else nn.LayerNorm(cfg.width)
        self.modality = (ModalityAttention(len(cfg.tasks), cfg.width) if cfg.fusion in MODALITY_FUSIONS else None)
        head_width = len(self.modalities) * cfg.width if cfg.fusion == "late_fusion" else cfg.width
        self.heads = nn.ModuleDict({task: TaskHead(head_width, n, cfg.dropout) for task, n in cfg.tasks.items()})

    def drop_unbuilt(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` without the weights of parts this fusion does not build: checkpoints written
        before the model was built per fusion carry them, unused."""
        unbuilt = tuple(f"{name}." for name in self.OPTIONAL if getattr(self, name) is None)
        return {k: v for k, v in state.items() if not k.startswith(unbuilt)}

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    @property
    def align_tower(self) -> str:
        """The image tower whose pooled embedding `align` embeds."""
        return self.cfg.image_tower

    def only_tasks(self, tasks: list[str]) -> "CMAClip":
        """This model for `tasks` (some of its own) alone: their heads and modality queries, every
        shared part as it is (copied). How training leaves its auxiliary tasks out of the checkpoint."""
        if tasks == self.tasks:
            return self
        with torch.device("meta"):  # built without drawing from the random generator: the weights come next
            model = CMAClip(self.cfg.only_tasks(tasks))
        state = {k: v.detach().clone() for k, v in self.state_dict().items()
                 if not k.startswith("heads.") or k.split(".")[1] in tasks}
        if self.modality is not None:
            state["modality.queries"] = state["modality.queries"][[self.tasks.index(t) for t in tasks]]
        model.load_state_dict(state, assign=True)
        return model.train(self.training)

    def forward(self, feats: EncoderOutput, return_attention: bool = False, keep_layers: bool = False,
                text_absent: torch.Tensor | None = None) -> CMAOutput:
        """Every task's logits and modality weights; `return_attention`: the last layer's attention maps;
        `keep_layers`: every layer's per-head attention probabilities, in the graph (`layer_attention`).
        `text_absent` [B] bool marks items without text: their modality weights go wholly to the image
        (an empty text still gets about half of the weight otherwise)."""
        feats = feats.seen_by(self.cfg.image_tower)
        text_cls = self.text_cls_in(self.align.embed_text(feats.text_pooled))
        image_cls = self.image_cls_in(self.align.embed_image(feats.image_pooled))
        extras = self.extra_inputs(feats)
        hidden = self.hidden_modalities(len(text_cls), text_cls.device)
        maps, layers = None, [] if keep_layers and self.sequence is not None else None
        if self.sequence is not None:
            fused_cls, maps = self.sequence(feats, text_cls, image_cls, extras, need_weights=return_attention,
                                            keep_layers=layers, hidden=hidden)
        else:
            fused_cls = [self.unfused_norm(x) for x in (text_cls, image_cls, *(e.cls for e in extras))]
        embeddings = torch.stack(fused_cls, dim=1)  # [B, M, W] in `modalities` order
        fusion = self.cfg.fusion
        if self.modality is not None:
            fused, weights = self.modality(embeddings)
        else:  # the same fixed weights for every item and task
            fixed = embeddings.new_tensor(fixed_weights(fusion, self.modalities))
            weights = fixed.expand(len(embeddings), len(self.tasks), len(self.modalities))
            if fusion == "late_fusion":
                fused = embeddings.flatten(1)[:, None].expand(-1, len(self.tasks), -1)
            else:  # a plain average of the modalities, or of the ones a single-side baseline uses
                fused = weights @ embeddings
        absent = self.absent_modalities(text_absent, hidden, len(weights), weights.device)
        if absent is not None and fusion != "late_fusion":  # the present modalities' weights, renormalised
            present = weights * ~absent[:, None, :]
            present = present / present.sum(-1, keepdim=True).clamp(min=1e-12)
            weights = torch.where(absent.any(-1)[:, None, None], present, weights)
            fused = weights.to(embeddings.dtype) @ embeddings
        logits = {task: head(fused[:, i]) for i, (task, head) in enumerate(self.heads.items())}
        return CMAOutput(logits, {task: weights[:, i] for i, task in enumerate(self.heads)}, maps, layers)

    def hidden_modalities(self, batch: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        """In training with `cfg.modality_dropout`: modality -> [B] bool, the items it is hidden from
        (each of text, colour and words independently; never the image)."""
        rate = self.cfg.modality_dropout
        if not self.training or rate <= 0:
            return None
        return {m: torch.rand(batch, device=device) < rate for m in self.modalities if m != "image"}

    def absent_modalities(self, text_absent: torch.Tensor | None, hidden: dict[str, torch.Tensor] | None,
                          batch: int, device: torch.device) -> torch.Tensor | None:
        """[B, M] bool: the modalities an item lacks (the text side where it has no text, the hidden
        ones), or None when every item has all of them."""
        if text_absent is None and not hidden:
            return None
        absent = torch.zeros(batch, len(self.modalities), dtype=torch.bool, device=device)
        for i, m in enumerate(self.modalities):
            if hidden and m in hidden:
                absent[:, i] |= hidden[m]
            if text_absent is not None and m in TEXT_SIDE:
                absent[:, i] |= text_absent.to(device)
        return absent

    def cls_positions(self, text_length: int, num_patches: int) -> list[int]:
        """Where each modality's [CLS] sits in the sequence-wise attention's sequence, in `modalities` order."""
        positions = [0, text_length + 1]
        after_image = text_length + num_patches + 2
        if self.cfg.colour:
            positions.append(after_image)
            after_image += len(FAMILIES) + 1
        if self.cfg.words_buckets:
            positions.append(after_image)
        return positions

    def extra_inputs(self, feats: EncoderOutput) -> list[ExtraInput]:
        """The colour and words modalities' inputs, where the config has them."""
        extras = []
        if self.colour_in is not None:
            if feats.colour is None:
                raise ValueError("this model reads the colour descriptor: encode with colour (`DualEncoder.colour`)")
            histogram, families = split_colour(feats.colour.float())
            extras.append(ExtraInput("colour", self.colour_cls_in(histogram), self.colour_in(families),
                                     families[..., 0] > 0))
        if self.words is not None:
            extras.append(ExtraInput("words", self.words(feats.text_ids, feats.text_mask)))
        return extras


class Ensemble(nn.Module):
    """Models trained from different seeds (`python -m cma_clip.train --members N`), or of several
    recipes (`--from-members`: `cfg.member_settings`), read as one: the mean of their class
    probabilities (returned as log-probabilities, so a softmax gives them back), of their modality
    weights (over every modality a member reads; a member without one gives it 0) and of their
    attention maps. The backbone runs once; only the fusion and heads run per member. Two seeds lift
    H&M's R@90P and operating recall more than any input added to one model (docs/RESULTS.md)."""

    def __init__(self, cfg: CMAClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(CMAClip(member) for member in cfg.member_configs())
        self.modalities = tuple(m for m in MODALITIES + ("colour", "words")
                                if any(m in member.modalities for member in self.members))

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    @property
    def align(self) -> AlignmentHeads:
        """The first member's CLIP-style alignment (the zero-shot baseline reads one)."""
        return self.members[0].align

    @property
    def align_tower(self) -> str:
        return self.members[0].align_tower

    def drop_unbuilt(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`CMAClip.drop_unbuilt` for each member's weights (`members.<i>.`)."""
        unbuilt = tuple(f"members.{i}.{name}." for i, member in enumerate(self.members)
                        for name in member.OPTIONAL if getattr(member, name) is None)
        return {k: v for k, v in state.items() if not k.startswith(unbuilt)}

    def forward(self, feats: EncoderOutput, return_attention: bool = False, keep_layers: bool = False,
                text_absent: torch.Tensor | None = None) -> CMAOutput:
        """`CMAClip.forward` of every member, averaged; `layer_attention` holds each member's layers
        in turn (`layer_groups` of them), for a rollout per member (`cma_clip.relevance`)."""
        outs = [member(feats, return_attention, keep_layers, text_absent) for member in self.members]
        count = len(outs)
        logits = {task: torch.stack([o.logits[task].float().log_softmax(-1) for o in outs]).logsumexp(0)
                  - math.log(count) for task in self.tasks}
        weights = {task: sum(self.widen(o.modality_weights[task], member.modalities)
                             for o, member in zip(outs, self.members)) / count for task in self.tasks}
        maps = None
        if outs[0].attention is not None:
            first = outs[0].attention
            maps = replace(first, **{name: padded_mean([getattr(o.attention, name) for o in outs])
                                     for name in ("text_to_image", "text_cls", "image_cls")})
        layers = None if outs[0].layer_attention is None else [a for o in outs for a in o.layer_attention]
        return CMAOutput(logits, weights, maps, layers, layer_groups=count)

    def widen(self, weights: torch.Tensor, modalities: tuple[str, ...]) -> torch.Tensor:
        """A member's modality weights [B, M'] over `modalities`, as [B, M] over the ensemble's."""
        if modalities == self.modalities:
            return weights
        wide = weights.new_zeros(*weights.shape[:-1], len(self.modalities))
        wide[..., [self.modalities.index(m) for m in modalities]] = weights
        return wide


def padded_mean(rows: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the members' attention rows, each zero-padded at the end to the longest: their
    sequences agree up to the image patches and differ only in the extra tokens after them."""
    length = max(r.shape[-1] for r in rows)
    return sum(F.pad(r, (0, length - r.shape[-1])) for r in rows) / len(rows)


Classifier = CMAClip | Ensemble  # what a checkpoint holds (`checkpoint.load_checkpoint`)


def create_model(cfg: CMAClipConfig) -> Classifier:
    """The model a config describes: one CMAClip, or an Ensemble when `cfg.members` > 1."""
    return Ensemble(cfg) if cfg.members > 1 else CMAClip(cfg)


def absent_texts(texts: list[str]) -> torch.Tensor | None:
    """[B] bool, True where an item has no text (`CMAClip.forward`'s `text_absent`); None when all have one.
    Measured on the shipped checkpoints' val items with the text blanked (`cma_clip.lab.empty_text`):
    H&M mean accuracy 0.516 with the text absent against 0.495 fed as an empty string; fashion 0.636 both."""
    # nothing to read: spaces of any kind, and invisible format characters (a zero-width space), which
    # the tokenizer drops too
    absent = [not any(ch.isprintable() and not ch.isspace() for ch in text) for text in texts]
    return torch.tensor(absent) if any(absent) else None


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters kept out of weight decay: biases, norms, position and modality embeddings,
    and the modality-attention vectors (decay would flatten every task's weights to 50/50)."""
    return param.dim() < 2 or name.endswith(("_pos", "sequence.modality", "modality.queries"))


def multitask_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   labelled: dict[str, int] | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over tasks of cross-entropy on the items labelled for that task.

    Missing (-1) and out-of-vocabulary (-2) labels are masked out of their task only; a task
    without labelled items adds zero, still through its head (so under DDP every head has a
    gradient on every rank). `labelled` gives each task's count of labelled items in the whole
    (global) batch when these logits are only one rank's share of it: each rank's losses then
    sum to the single-process loss. By default the counts are this batch's own. `label_smoothing`
    is cross-entropy's (a target of 1 - s on the label and s spread evenly over the classes)."""
    if labelled is None:
        labelled = {task: int((target >= 0).sum()) for task, target in targets.items()}
    total = 0.0
    for task, target in targets.items():
        masked = torch.where(target >= 0, target, torch.full_like(target, MASKED))
        summed = F.cross_entropy(logits[task].float(), masked, ignore_index=MASKED, reduction="sum",
                                 label_smoothing=label_smoothing)
        total = total + summed / max(1, labelled[task])
    return total / max(1, sum(count > 0 for count in labelled.values()))
