"""Seeded image and text corruptions for probing robustness, each with severities 0 (clean) to 5.

    from cma_clip.noise import corrupt_image, corrupt_text
    noisy = corrupt_image(image, "blur", severity=3, seed=0)
    typo = corrupt_text("T-shirt in soft cotton jersey", "typos", severity=2, seed=0)

No library added: `imagecorruptions` needs scipy/scikit-image/opencv, `nlpaug` pulls more, and
torchvision's v2 transforms sample their own parameters, so Pillow + numpy give compact,
seed-deterministic corruptions with no new dependency.

Severity tables follow ImageNet-C in spirit. For a fixed seed the random draws do not depend on
the severity, so stronger severities extend weaker ones: noise is the same field scaled up,
occluders grow around the same places, and text edits hit a growing prefix of the same word order.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from .backbones import to_rgb

SEVERITIES = range(0, 6)  # 0 = clean (identity), 1..5 increasingly strong
# The model sees images letterboxed to a 224-pixel side: blur radii are given for this longer side
# and scaled with the image, and on an image REFERENCE_SIDE x g or larger, noise grains and JPEG
# blocks are g pixels wide, so downscaling to the model's input does not average them away.
REFERENCE_SIDE = 224

# image parameters, one entry per severity 1..5
NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)  # std of additive Gaussian noise, pixel range [0, 1]
BLUR_RADIUS = (1.0, 2.0, 3.0, 4.0, 6.0)  # Gaussian std in pixels at a 224-pixel longer side
JPEG_QUALITY = (80, 50, 30, 20, 10)
OCCLUDED_AREA = (0.05, 0.10, 0.20, 0.30, 0.40)  # grey share of the image, one rectangle per quadrant
BRIGHTNESS = (0.9, 0.8, 0.7, 0.6, 0.5)  # darker ...
CONTRAST = (0.9, 0.75, 0.6, 0.45, 0.3)  # ... and flatter (underexposed)
OCCLUSION_FILL = (128, 128, 128)

# text parameters: share of words touched, rounded up, and on short texts at least one word more
# than at the severity below (see _words_touched)
TYPO_SHARE = (0.1, 0.2, 0.3, 0.4, 0.5)
DROPOUT_SHARE = (0.1, 0.2, 0.3, 0.4, 0.5)
MASK_SHARE = (0.1, 0.2, 0.3, 0.4, 0.5)
SHUFFLE_SHARE = (0.2, 0.4, 0.6, 0.8, 1.0)  # moving words loses less than deleting them
TRUNCATION_CUT = (0.1, 0.25, 0.4, 0.6, 0.8)  # share of the words cut from the end
MASK_TOKEN = "[UNK]"  # MiniLM's tokenizer maps it to its unknown token
TYPO_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _grain(image: Image.Image) -> int:
    """Pixels per noise grain or JPEG block step: 1 up to twice the model's input side."""
    return max(1, max(image.size) // REFERENCE_SIDE)


def _gaussian_noise(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    g = _grain(image)
    height, width = -(-pixels.shape[0] // g), -(-pixels.shape[1] // g)
    field = rng.standard_normal((height, width, 3), dtype=np.float32) * NOISE_SIGMA[severity - 1]
    noise = field.repeat(g, axis=0).repeat(g, axis=1)[:pixels.shape[0], :pixels.shape[1]]
    return Image.fromarray((np.clip(pixels + noise, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    radius = BLUR_RADIUS[severity - 1] * max(image.size) / REFERENCE_SIDE
    return image.filter(ImageFilter.GaussianBlur(radius))


def _jpeg(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    g = _grain(image)
    small = image.resize((-(-image.width // g), -(-image.height // g)), Image.Resampling.BICUBIC) if g > 1 else image
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
    out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return out.resize(image.size, Image.Resampling.BICUBIC) if g > 1 else out


def _occlusion(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """One grey rectangle of the severity's area share inside each quadrant (so they never overlap)."""
    out, (width, height) = image.copy(), image.size
    draw, share = ImageDraw.Draw(out), OCCLUDED_AREA[severity - 1]
    for x0, x1 in ((0, width // 2), (width // 2, width)):
        for y0, y1 in ((0, height // 2), (height // 2, height)):
            aspect, u, v = np.exp(rng.uniform(-math.log(2), math.log(2))), rng.uniform(), rng.uniform()
            w = round((x1 - x0) * math.sqrt(share * aspect))
            h = round((y1 - y0) * math.sqrt(share / aspect))
            if w > 0 and h > 0:
                left, top = x0 + round(u * (x1 - x0 - w)), y0 + round(v * (y1 - y0 - h))
                draw.rectangle((left, top, left + w - 1, top + h - 1), fill=OCCLUSION_FILL)
    return out


def _brightness_contrast(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    flat = ImageEnhance.Contrast(image).enhance(CONTRAST[severity - 1])
    return ImageEnhance.Brightness(flat).enhance(BRIGHTNESS[severity - 1])


IMAGE_CORRUPTIONS: dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    "gaussian_noise": _gaussian_noise, "blur": _blur, "jpeg": _jpeg, "occlusion": _occlusion,
    "brightness_contrast": _brightness_contrast,
}


def _words_touched(shares: tuple[float, ...], severity: int, n: int, most: int) -> int:
    """How many of `n` words a text corruption touches at `severity`: the severity's share,
    rounded up, and at least one more than at the severity below (up to `most`), so every
    severity is stronger than the last on short titles too."""
    count = 0
    for share in shares[:severity]:
        count = min(most, max(count + 1, math.ceil(share * n - 1e-9)))
    return count


def _typo(word: str, rng: np.random.Generator) -> str:
    """One edit that always changes the word: swap, delete, insert or substitute a character."""
    op, i = int(rng.integers(4)), int(rng.integers(len(word)))
    letter = TYPO_ALPHABET[int(rng.integers(len(TYPO_ALPHABET)))]
    swaps = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
    if op == 0 and swaps:
        j = swaps[i % len(swaps)]
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    if op == 1 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + letter + word[i:]
    if letter == word[i]:
        letter = TYPO_ALPHABET[(TYPO_ALPHABET.index(letter) + 1) % len(TYPO_ALPHABET)]
    return word[:i] + letter + word[i + 1:]


def _typos(text: str, severity: int, rng: np.random.Generator) -> str:
    words = text.split()
    for i in rng.permutation(len(words))[:_words_touched(TYPO_SHARE, severity, len(words), len(words))]:
        words[i] = _typo(words[i], rng)
    return " ".join(words) if words else text


def _word_dropout(text: str, severity: int, rng: np.random.Generator) -> str:
    """Drop a share of the words, never the last one left."""
    words = text.split()
    k = _words_touched(DROPOUT_SHARE, severity, len(words), max(len(words) - 1, 0))
    dropped = set(rng.permutation(len(words))[:k].tolist())
    return " ".join(w for i, w in enumerate(words) if i not in dropped) if words else text


def _word_mask(text: str, severity: int, rng: np.random.Generator) -> str:
    words = text.split()
    for i in rng.permutation(len(words))[:_words_touched(MASK_SHARE, severity, len(words), len(words))]:
        words[i] = MASK_TOKEN
    return " ".join(words) if words else text


def _word_shuffle(text: str, severity: int, rng: np.random.Generator) -> str:
    """Rotate a share of the words (at least two) through each other's positions."""
    words = text.split()
    chosen = rng.permutation(len(words))[:max(2, _words_touched(SHUFFLE_SHARE, severity, len(words), len(words)))]
    moved = list(words)
    for src, dst in zip(chosen, np.roll(chosen, 1)):
        moved[dst] = words[src]
    return " ".join(moved) if words else text


def _truncation(text: str, severity: int, rng: np.random.Generator) -> str:
    """Cut a share of the words from the end, keeping at least one."""
    words = text.split()
    cut = _words_touched(TRUNCATION_CUT, severity, len(words), max(len(words) - 1, 0))
    return " ".join(words[:len(words) - cut]) if words else text


TEXT_CORRUPTIONS: dict[str, Callable[[str, int, np.random.Generator], str]] = {
    "typos": _typos, "word_dropout": _word_dropout, "word_mask": _word_mask,
    "word_shuffle": _word_shuffle, "truncation": _truncation,
}


def _check(name: str, severity: int, table: dict) -> int:
    if name not in table:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(sorted(table))}")
    integer = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not integer or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer from 0 (clean) to 5, got {severity!r}")
    return int(severity)


def corrupt_image(image: Image.Image, name: str, severity: int, seed: int = 0) -> Image.Image:
    """Corrupt `image` (converted with `to_rgb`) by `name` at `severity`; same size, mode RGB.
    Severity 0 returns the clean RGB image as a new object."""
    severity = _check(name, severity, IMAGE_CORRUPTIONS)
    image = to_rgb(image)  # always a new RGB image
    return image if severity == 0 else IMAGE_CORRUPTIONS[name](image, severity, np.random.default_rng(seed))


def corrupt_text(text: str, name: str, severity: int, seed: int = 0) -> str:
    """Corrupt the whitespace-separated words of `text` by `name` at `severity`; severity 0
    returns `text` unchanged, otherwise whitespace is normalised to single spaces."""
    severity = _check(name, severity, TEXT_CORRUPTIONS)
    return text if severity == 0 else TEXT_CORRUPTIONS[name](text, severity, np.random.default_rng(seed))
