"""Per-task relevance: what each task's prediction rests on, over the image and over the words.

    from cma_clip.relevance import explain
    ex = explain(model, backbone, [image], [text], max_tokens)   # every task, one backward
    ex.image[0, t]      # [grid*grid] relevance of the patches for task t, sums to 1
    ex.text[0, t]       # [L] relevance of the text tokens (word pieces) for task t, sums to 1

Two methods, both driven by the gradient of the task's top logit (its predicted class):

* **Text, and the fusion's own tokens: gradient-weighted attention rollout** (Chefer et al.,
  ICCV 2021). R = I; for every layer R <- R + mean_h[(grad A * A)^+] R. The task head reads
  the fused text [CLS] and image [CLS] mixed by the task's modality-wise weights (w_text,
  w_image), so the row it reads is w_text R[text CLS] + w_image R[image CLS]: the one-hot
  [CLS] row of a single-[CLS] model, generalised to the head's actual mixture.
* **Image: LayerCAM** (Jiang et al., IEEE TIP 2021; Grad-CAM with per-location positive
  gradients, made for layers finer than the last one) on the image encoder's last 14x14
  stage, summed into the 7x7 patch grid. The gradient reaches that layer through every route
  the model has to the image: the patch tokens in the fusion transformer and the pooled
  image embedding that starts the image [CLS].

Why the image map is not read at the patch tokens: the 7x7 tokens of the EfficientNet are
not local (each sees almost the whole 224 px image), so on H&M photos the rollout over the
patch tokens, and Grad-CAM on them, put only about 1.5x a uniform map's share on the product
(1.8-1.9x once the letterbox padding is removed) and 14-22% of their mass on that padding;
one stage earlier, where features are still local, LayerCAM puts 2.6x on the product
(docs/RESULTS.md, "Explanations"). Backbones without such a stage (open_clip ViTs) get
LayerCAM on the patch tokens themselves.

Ensembles with members on the second image tower (`bundled+mobilenet_v2`): the gradient also
runs back into MobileNetV2 at 14x14 (`MOBILENET_STAGE`: after its 64-channel 14x14 blocks, the
earliest 14x14 map; docs/RESULTS.md, "Explanations"), by autograd, LayerCAM is taken
there too, and the two towers' maps, each normalised, are mixed in proportion to the members that
read each tower (the ensemble is the mean of its members, so each member's explanation counts once).

The letterbox padding (`backbones.letterbox` fills the square with white) is not part of
the photo: relevance that lands there is removed (in proportion to the share of each cell
that is padding) and reported as `padding_share`. Maps are normalised to sum to 1.

Cost: all tasks in one backward. The fusion runs once per item; autograd's batched gradients
(`is_grads_batched`: one vector-Jacobian product per task, vectorised) give every task's gradients
at the patch tokens, the pooled embedding, the words and each layer's attention at once, and
`LiteTail.pullback` carries all of them through the encoder's last stage together. (It used to
run the fusion on one copy of the item per task: the same numbers, within float rounding, for
six times the fusion's forward; docs/PERFORMANCE.md.)
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import mobilenet
from .backbones import DualEncoder, EncoderOutput, TextBatch, upright_size
from .model import IMAGE_SIDE, Classifier, CMAOutput, absent_texts
from .runtime import autocast, bf16_supported

RELEVANCE_STAGE = 11  # the bundled EfficientNet's blocks before this one run at 14x14 (and finer)
MOBILENET_STAGE = 11  # MobileNetV2's `features` before this one end with its 64-channel 14x14 blocks (7-10)


@dataclass
class Explanation:
    """Relevance for every task of a batch of B items (T tasks, L text tokens, P patches)."""

    output: CMAOutput  # the model's output for the B items (attention maps of the last layer included)
    tasks: list[str]
    image: np.ndarray  # [B, T, P] relevance of the patches (LayerCAM, padding removed), sums to 1 (or 0)
    image_fine: np.ndarray  # [B, T, h, w] the same at the relevance layer's resolution, before pooling
    text: np.ndarray  # [B, T, L] relevance of the text tokens (rollout), sums to 1 over the real tokens
    rollout_patches: np.ndarray  # [B, T, P] the rollout's relevance of the patch tokens (padding removed)
    gradcam_patches: np.ndarray  # [B, T, P] Grad-CAM on the patch tokens (padding removed)
    token_gradient_input: np.ndarray  # [B, T, L] |gradient x input| of the text token states, sums to 1
    image_share: np.ndarray  # [B, T] the rollout's share on the image side (image and colour [CLS] and tokens)
    padding_share: np.ndarray  # [B, T] share of the LayerCAM map that fell on letterbox padding
    photo_fraction: np.ndarray  # [B, P] share of each patch covered by the photo (1 - padding)
    blank_photo: torch.Tensor  # [B] bool: the photo shows one flat colour (`DualEncoder.blank_photos`)
    # the image maps before the padding is removed, by name ("relevance", "rollout", "gradcam"): [B, T, P]
    unmasked: dict[str, np.ndarray] | None = None


# ---------------------------------------------------------------------- building blocks
def rollout(layers: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.'s rule for self-attention: R = I, then R <- R + mean_h[(grad * A)^+] R per layer.
    layers, grads: per layer [N, heads, S, S]; returns R [N, S, S]."""
    n, _, s, _ = layers[0].shape
    relevance = torch.eye(s, dtype=layers[0].dtype, device=layers[0].device).expand(n, s, s)
    for attention, grad in zip(layers, grads):
        relevance = relevance + (grad * attention).clamp(min=0).mean(dim=1) @ relevance
    return relevance


def read_row(relevance: torch.Tensor, weights: torch.Tensor, cls_positions: list[int]) -> torch.Tensor:
    """The row of R the task head reads: sum_m w_m R[CLS of modality m] (w_text R[text CLS] +
    w_image R[image CLS] for a text-and-image model). weights [N, M], one [CLS] position per modality."""
    return sum(weights[:, m:m + 1] * relevance[:, position] for m, position in enumerate(cls_positions))


def layercam(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """LayerCAM: sum over channels of ReLU(gradient) x activation, ReLU'd. [N, C, h, w] -> [N, h, w]."""
    return (grad.clamp(min=0) * activation).sum(dim=1).clamp(min=0)


def gradcam(tokens: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on tokens [N, P, C]: channel weights = mean gradient over the tokens. -> [N, P]."""
    return (tokens * grad.mean(dim=1, keepdim=True)).sum(-1).clamp(min=0)


def photo_fraction(sizes: list[tuple[int, int]], image_size: int, cells: int) -> np.ndarray:
    """[B, cells*cells]: the share of each cell of a cells x cells grid over the letterboxed square
    that the photo covers (the rest is `letterbox`'s white padding). `sizes`: the photos' (w, h)."""
    out = np.zeros((len(sizes), cells, cells), dtype=np.float32)
    edges = np.linspace(0, image_size, cells + 1)
    for i, (width, height) in enumerate(sizes):
        scale = image_size / max(width, height)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))  # as letterbox computes them
        x0, y0 = (image_size - w) // 2, (image_size - h) // 2
        cover_x = np.clip(np.minimum(edges[1:], x0 + w) - np.maximum(edges[:-1], x0), 0, None) / np.diff(edges)
        cover_y = np.clip(np.minimum(edges[1:], y0 + h) - np.maximum(edges[:-1], y0), 0, None) / np.diff(edges)
        out[i] = np.outer(cover_y, cover_x)
    return out.reshape(len(sizes), -1)


def pool_to_grid(fine: torch.Tensor, grid: int) -> torch.Tensor:
    """Sum a [N, h, w] map into a [N, grid*grid] patch grid (h a multiple of grid; nearest otherwise)."""
    n, h, w = fine.shape
    if h % grid or w % grid:
        fine = torch.nn.functional.interpolate(fine[:, None], size=(grid * max(1, h // grid),) * 2)[:, 0]
        n, h, w = fine.shape
    return fine.reshape(n, grid, h // grid, grid, w // grid).sum(dim=(2, 4)).reshape(n, grid * grid)


def normalise(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.sum(dim=dim, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------------- the image encoder's tail
class LiteTail:
    """The bundled EfficientNet-Lite0 from the relevance stage on (blocks RELEVANCE_STAGE.., the 1x1
    head, the mean pool), run forward once per item and pulled back for many seeds at once.

    The encoder is frozen and piecewise linear at an item (1x1 and depthwise convolutions, batch
    norm in eval mode, ReLU6), so its Jacobian there is fixed: the forward keeps each ReLU6's
    input, and `pullback` sends the T tasks' gradients back through the same layers in one batched
    pass: matrix products for the 1x1 convolutions, a depthwise convolution with the flipped kernel
    and ReLU6's slope, each batch norm's scale folded into a weight (a hand-written
    vector-Jacobian product, channels last). It equals autograd (tests/test_relevance.py) without re-running the
    forward T times or autograd's per-operation overhead. `LiteTail.of(cnn)`: one per encoder."""

    _made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, cnn) -> None:
        self.cnn = cnn
        self.blocks = list(cnn._blocks[RELEVANCE_STAGE:])
        self._weights: dict[torch.dtype, list] = {}

    @classmethod
    def of(cls, cnn) -> "LiteTail":
        if cnn not in cls._made:
            cls._made[cnn] = cls(cnn)
        return cls._made[cnn]

    @staticmethod
    def supports(backbone: DualEncoder) -> bool:
        cnn = getattr(backbone, "cnn", None)
        blocks = getattr(cnn, "_blocks", None)
        return (blocks is not None and len(blocks) > RELEVANCE_STAGE and isinstance(cnn._swish, nn.ReLU6)
                and all(isinstance(b._swish, nn.ReLU6) and not b.has_se for b in blocks[RELEVANCE_STAGE:]))

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder up to the relevance stage: [B, 3, 224, 224] -> [B, 112, 14, 14]."""
        cnn = self.cnn
        x = cnn._swish(cnn._bn0(cnn._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        for block in cnn._blocks[:RELEVANCE_STAGE]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(patch tokens [B, P, C], pooled [B, D], what `pullback` needs: each ReLU6's input, channels
        last, in `dtype`). The same operations in the same order as the encoder's own forward, so the
        outputs are the encoder's."""
        record = []
        for block in self.blocks:
            inputs, local = x, {}
            if block._block_args.expand_ratio != 1:
                z = block._bn0(block._expand_conv(x))
                local["expand"] = _channels_last(z, dtype)
                x = block._swish(z)
            z = block._bn1(block._depthwise_conv(x))
            local["depthwise"], local["size"] = _channels_last(z, dtype), tuple(x.shape[-2:])
            x = block._bn2(block._project_conv(block._swish(z)))
            if _has_skip(block):
                x = x + inputs
            record.append(local)
        tokens = x
        z = self.cnn._bn1(self.cnn._conv_head(x))
        record.append(_channels_last(z, dtype))
        pooled = self.cnn._swish(z).mean(dim=(2, 3))
        return tokens.flatten(2).transpose(1, 2), pooled, record

    def pullback(self, record: list, token_grad: torch.Tensor, pooled_grad: torch.Tensor, copies: int) -> torch.Tensor:
        """Gradients at the relevance stage [B*copies, C, h, w] (float32) from gradients at the patch
        tokens [B*copies, P, C'] and at the pooled embedding [B*copies, D]; copy t of item b is row
        b*copies+t. Computed in the dtype `forward` kept its record in."""
        dtype = record[-1].dtype
        weights = self._transposed(dtype)
        n, p, c = token_grad.shape
        side = int(round(p ** 0.5))
        g = token_grad.to(dtype).reshape(n, side, side, c)  # channels last: token p = row * side + column
        head = pooled_grad.to(dtype)[:, None, None, :].expand(n, side, side, -1) / (side * side)  # the mean pool
        g = g + _relu6_t(head, record[-1], copies) @ weights[-1]
        for block, (project, depthwise, expand), local in zip(reversed(self.blocks), reversed(weights[:-1]),
                                                               reversed(record[:-1])):
            skip = g if _has_skip(block) else None
            g = _relu6_t(g @ project, local["depthwise"], copies)
            g = _depthwise_t(g, depthwise, block._depthwise_conv, local["size"])
            if expand is not None:
                g = _relu6_t(g, local["expand"], copies) @ expand
            if skip is not None:
                g = g + skip
        return g.permute(0, 3, 1, 2).float()

    def _transposed(self, dtype: torch.dtype) -> list:
        """Per block (project, depthwise, expand) for the input gradient, each batch norm's scale
        folded into the layer it follows (the 1x1 convolutions as [Cout, Cin] matrices, the depthwise
        kernel flipped), then the head's matrix; made once per dtype."""
        if dtype not in self._weights:
            with torch.no_grad():
                def matrix(conv, scale):  # d(BN(conv x))/dx = W^T diag(scale): g -> (g * scale) @ W
                    return (conv.weight.detach().float().flatten(1) * scale[:, None]).to(dtype).contiguous()

                layers = []
                for b in self.blocks:
                    kernel = b._depthwise_conv.weight.detach().float() * _bn_scale(b._bn1)[:, None, None, None]
                    layers.append((matrix(b._project_conv, _bn_scale(b._bn2)), kernel.flip(-1, -2).to(dtype),
                                   matrix(b._expand_conv, _bn_scale(b._bn0)) if b._block_args.expand_ratio != 1
                                   else None))
                self._weights[dtype] = [*layers, matrix(self.cnn._conv_head, _bn_scale(self.cnn._bn1))]
        return self._weights[dtype]


def _has_skip(block) -> bool:
    args = block._block_args
    stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
    return bool(block.id_skip and stride == 1 and args.input_filters == args.output_filters)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """d(batch norm)/dx in eval mode, per channel."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().float()


def _channels_last(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).to(dtype)  # a view when z is already channels last in `dtype`


def _relu6_t(g: torch.Tensor, z: torch.Tensor, copies: int) -> torch.Tensor:
    """g [B*copies, ...] through ReLU6 at item b's input z [B, ...] (the slope: 1 inside (0, 6), else 0)."""
    shaped = g.reshape(z.shape[0], copies, *z.shape[1:])
    out = torch.ops.aten.hardtanh_backward(shaped, z[:, None].expand_as(shaped), 0.0, 6.0)
    return out.reshape(g.shape)


def _depthwise_t(g: torch.Tensor, flipped: torch.Tensor, conv, size: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a depthwise convolution with TensorFlow's static 'same' padding, on
    channels-last gradients [N, h, w, C] -> [N, H, W, C]: the output gradient spread back to the
    stride (zeros between), convolved with the flipped kernel, the padding cut off."""
    pad = getattr(conv.static_padding, "padding", (0, 0, 0, 0))  # (left, right, top, bottom)
    left, right, top, bottom = pad if len(pad) == 4 else (0, 0, 0, 0)
    x = g.permute(0, 3, 1, 2)  # a channels-last NCHW view, no copy
    stride = conv.stride[0]
    if stride > 1:
        spread = x.new_zeros(*x.shape[:2], (x.shape[2] - 1) * stride + 1, (x.shape[3] - 1) * stride + 1)
        spread[..., ::stride, ::stride] = x
        x = spread.contiguous(memory_format=torch.channels_last)
    grad = F.conv2d(x, flipped, padding=flipped.shape[-1] - 1, groups=conv.groups)
    height, width = size[0] + top + bottom, size[1] + left + right
    if grad.shape[-2:] != (height, width):  # inputs no window reached get 0
        grad = F.pad(grad, (0, width - grad.shape[-1], 0, height - grad.shape[-2]))
    return grad[..., top:top + size[0], left:left + size[1]].permute(0, 2, 3, 1).contiguous()


def _text_batch(backbone: DualEncoder, texts: list[str], max_tokens: int) -> TextBatch:
    text = backbone.tokenize(texts, max_tokens)
    length = max(1, int(text.mask.sum(1).max()))  # as DualEncoder.encode trims
    return TextBatch(text.ids[:, :length], text.mask[:, :length])


# ---------------------------------------------------------------------- all tasks at once
def explain(model: Classifier, backbone: DualEncoder, images: list[Image.Image], texts: list[str],
            max_tokens: int, keep_unmasked: bool = False, single_precision: bool = False) -> Explanation:
    """Every task's relevance for a batch of items, from one forward and one backward.
    `keep_unmasked`: also return the image maps before the letterbox padding is removed.
    `single_precision`: run the fusion at the precision of one item whatever the batch's size
    (a server's micro-batch answers each item as it would alone; see `runtime.autocast`)."""
    device = backbone.device
    tasks, count, batch = model.tasks, len(model.tasks), len(images)
    pixels = backbone.preprocess(images).to(device)
    text = _text_batch(backbone, texts, max_tokens).to(device)
    tail = LiteTail.of(backbone.cnn) if LiteTail.supports(backbone) else None
    towers = [member.cfg.image_tower for member in getattr(model, "members", [model])]
    second = "mobilenet_v2" in towers
    precision = torch.bfloat16 if bf16_supported(device) else torch.float32  # the encoder's, as autocast runs it
    with torch.no_grad(), autocast(device):  # the frozen encoders, as DualEncoder.forward runs them
        text_tokens, text_pooled = backbone.encode_text(text)
        if second:  # the second tower up to its relevance stage
            second_tower = backbone.mobilenet_features()
            second_activation = second_tower[:MOBILENET_STAGE](pixels.contiguous(memory_format=torch.channels_last))
        if tail is not None:
            activation = tail.stem(pixels)
            image_tokens, image_pooled, record = tail.forward(activation, precision)
        else:  # no finer stage: the patch tokens are the relevance layer, the pooled embedding is not spatial
            image_tokens, image_pooled = backbone.encode_image(pixels)
            side = int(round(image_tokens.shape[1] ** 0.5))
            activation = image_tokens.transpose(1, 2).reshape(batch, -1, side, side)

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.float().requires_grad_(True)

    # One forward of the fusion per item; every task's backward at once (autograd's batched gradients:
    # grad_outputs t holds task t's objective, the item's top logit), so row b * count + t of each
    # gradient is item b's for task t.
    tokens, pooled, text_tokens = leaf(image_tokens), leaf(image_pooled), leaf(text_tokens)
    second_leaf = leaf(second_activation) if second else None
    with torch.enable_grad():
        colour = backbone.describe_colour(pixels) if model.cfg.colour else None
        feats = EncoderOutput(tokens, pooled, text_tokens, text.mask, text_pooled.float(), text.ids, colour)
        if second_leaf is not None:
            with autocast(device):
                second_tokens, second_pooled = mobilenet.encode(second_tower, second_leaf, MOBILENET_STAGE)
            feats = replace(feats, mobilenet_tokens=second_tokens.float(), mobilenet_pooled=second_pooled.float())
        with autocast(device, batch_size=1 if single_precision else batch):  # the fusion's, as in Predictor.predict
            out = model(feats, return_attention=True, keep_layers=True, text_absent=absent_texts(texts))
        top = torch.stack([logits.float().max(dim=-1).values for logits in out.logits.values()], 1)  # [B, T]
        per_task = torch.eye(count, device=device)[:, None, :].expand(count, batch, count)
        layers = out.layer_attention or []
        inputs = [*layers, tokens, pooled, text_tokens, *[second_leaf] * second]
        grads = torch.autograd.grad(top, inputs, per_task, is_grads_batched=True, allow_unused=True)
    grads = [None if g is None else g.transpose(0, 1).flatten(0, 1) for g in grads]  # [T, B, ...] -> [B*T, ...]
    tokens, pooled, text_tokens = (x.detach().repeat_interleave(count, 0) for x in (tokens, pooled, text_tokens))
    layers = [a.detach().repeat_interleave(count, 0) for a in layers]
    layer_grads, (token_grad, pooled_grad, text_grad) = grads[:len(layers)], grads[len(layers):len(layers) + 3]
    token_grad = _zero_if_none(token_grad, tokens)
    with torch.no_grad():
        if tail is not None:  # on into the image encoder, every task at once
            activation_grad = tail.pullback(record, token_grad, _zero_if_none(pooled_grad, pooled), count)
        else:
            activation_grad = token_grad.transpose(1, 2).reshape(batch * count, *activation.shape[1:])
        activation = activation.float().repeat_interleave(count, dim=0)
    length = text.mask.shape[1]
    sizes = [upright_size(image) for image in images]  # as the encoder saw them (a phone photo lies on its side)
    fine = layercam(activation, activation_grad)  # [B*T, h, w]
    if second:  # each tower's map normalised, mixed as the members that read it
        second_activation = second_leaf.detach().repeat_interleave(count, 0)
        second_fine = layercam(second_activation, _zero_if_none(grads[-1], second_activation))
        share = towers.count("mobilenet_v2") / len(towers)
        fine = (1 - share) * normalise(fine.flatten(1)).reshape(fine.shape) + share * normalise(
            second_fine.flatten(1)).reshape(second_fine.shape)
    cells = fine.shape[-1]
    cover_fine = torch.from_numpy(photo_fraction(sizes, backbone.image_size, cells)).to(device)
    cover_fine = cover_fine.repeat_interleave(count, 0).reshape(fine.shape)
    total = fine.sum(dim=(1, 2)).clamp(min=1e-12)
    padding_share = ((fine * (1 - cover_fine)).sum(dim=(1, 2)) / total)
    grid = backbone.grid_size
    unmasked = {"relevance": normalise(pool_to_grid(fine, grid))}
    fine = normalise((fine * cover_fine).flatten(1)).reshape(fine.shape)
    cover = torch.from_numpy(photo_fraction(sizes, backbone.image_size, grid)).to(device).repeat_interleave(count, 0)
    image_map = normalise(pool_to_grid(fine, grid))
    unmasked["gradcam"] = normalise(gradcam(tokens.detach(), token_grad))
    cam = normalise(unmasked["gradcam"] * cover)
    real = text.mask.repeat_interleave(count, 0).float()
    gxi = normalise((_zero_if_none(text_grad, text_tokens) * text_tokens.detach()).sum(-1).abs() * real)

    weights = torch.stack([w for w in out.modality_weights.values()], 1).float().flatten(0, 1).detach()  # [B*T, M]
    if layers:
        # An ensemble's members each make their own rollout (their layers are not one stack), on their own
        # gradients (the ensemble's mean takes 1/N of each), read at their own [CLS] positions with the
        # ensemble's weights of the modalities they have; their readings are averaged.
        grads = [_zero_if_none(g, a).float() * out.layer_groups for g, a in zip(layer_grads, layers)]
        depth, patch_count = len(layers) // out.layer_groups, grid * grid
        readings = []
        for g, member in zip(range(0, len(layers), depth), getattr(model, "members", [model])):
            own = weights[:, [model.modalities.index(m) for m in member.modalities]]
            row = read_row(rollout([a.float() for a in layers[g:g + depth]], grads[g:g + depth]), own,
                           member.cls_positions(length, patch_count))
            text_side = row[:, :length + 1].sum(-1) + (row[:, -1] if "words" in member.modalities else 0)
            readings.append((row[:, 1:1 + length], row[:, length + 2:length + 2 + patch_count], text_side, row.sum(-1)))
        text_row, patches, text_side, total = (sum(parts) / len(readings) for parts in zip(*readings))
        text_map = normalise(text_row * real)
        unmasked["rollout"] = normalise(patches)
        rollout_map = normalise(patches * cover)
        image_side = 1 - text_side / total.clamp(min=1e-12)
    else:  # fusions without the sequence-wise attention read no tokens: no token relevance
        text_map = torch.zeros_like(real)
        rollout_map = unmasked["rollout"] = torch.zeros_like(cover)
        image_side = sum(weights[:, m] for m, name in enumerate(model.modalities) if name in IMAGE_SIDE)

    def per_item(x: torch.Tensor) -> np.ndarray:
        x = x.detach().float().cpu().numpy()
        return x.reshape(batch, count, *x.shape[1:])

    attention = out.attention
    if attention is not None:
        attention = replace(attention, **{name: getattr(attention, name).detach()
                                          for name in ("text_to_image", "text_cls", "image_cls")})
    output = CMAOutput({t: v.detach() for t, v in out.logits.items()},
                       {t: v.detach() for t, v in out.modality_weights.items()}, attention)
    return Explanation(output, tasks, per_item(image_map), per_item(fine), per_item(text_map), per_item(rollout_map),
                       per_item(cam), per_item(gxi), per_item(image_side), per_item(padding_share),
                       photo_fraction(sizes, backbone.image_size, grid), backbone.blank_photos(pixels),
                       {k: per_item(v) for k, v in unmasked.items()} if keep_unmasked else None)


def _zero_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


# ---------------------------------------------------------------------- words
WORD = re.compile(r"\S+")


def words_of(backbone: DualEncoder, text: str, max_tokens: int) -> tuple[list[str], list[int]]:
    """The text's whole words (as written, punctuation attached: "men's", "rib-trimmed,") that the
    model saw, and for each model token the index of its word (-1: a special token)."""
    tokenizer = getattr(backbone, "tokenizer", None)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
        spans = [(m.start(), m.end(), m.group()) for m in WORD.finditer(text)]
        words, index, token_words = [], {}, []
        for (start, end), special in zip(enc["offset_mapping"], enc["special_tokens_mask"]):
            if special or end <= start:
                token_words.append(-1)
                continue
            k = next((k for k, (a, b, _) in enumerate(spans) if a <= start < b), None)
            if k is None:
                token_words.append(-1)
                continue
            if k not in index:
                index[k] = len(words)
                words.append(spans[k][2])
            token_words.append(index[k])
        return words, token_words
    return _words_from_pieces(backbone.token_strings(text, max_tokens))


def _words_from_pieces(tokens: list[str]) -> tuple[list[str], list[int]]:
    """Fallback without offsets: BERT word pieces (##) join the word before them."""
    from .viz import SPECIAL_TOKENS

    words, token_words = [], []
    for token in tokens:
        if token in SPECIAL_TOKENS:
            token_words.append(-1)
        elif token.startswith("##") and words:
            words[-1] += token[2:]
            token_words.append(len(words) - 1)
        else:
            words.append(token)
            token_words.append(len(words) - 1)
    return words, token_words


def word_relevance(token_relevance: np.ndarray, token_words: list[int], count: int) -> np.ndarray:
    """Sum token relevance into words. [L] -> [count]."""
    out = np.zeros(count, dtype=np.float64)
    for value, word in zip(np.asarray(token_relevance, dtype=np.float64), token_words):
        if word >= 0:
            out[word] += value
    return out


def is_word(word: str) -> bool:
    """A word with a letter or digit: punctuation alone is never a default."""
    return any(ch.isalnum() for ch in word)
