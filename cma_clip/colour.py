"""The product's own colours: a descriptor of the foreground pixels, the model's colour tokens.

Product photos show one product on a plain background. 62% of H&M items share their exact
text with another item, and 96% of those groups span several colours, so colour can only
come from the pixels; the pooled image embedding of a frozen encoder carries it poorly. The
descriptor is computed from the backbone's input pixels (letterboxed and normalised), so every
path that encodes an image (the feature cache, prediction, noise probes) gets the same one:

- the letterbox padding (white rows or columns at the edges) is left out;
- the background is the median colour of the photo's outer ring; the foreground is every pixel
  that differs from it (and from white) by more than `FOREGROUND_STEP` in some channel; when
  that leaves almost nothing (a white shirt on white), every photo pixel counts;
- a 198-bin HSV histogram of the foreground (18 hues x 3 saturations x 3 values for
  chromatic pixels, 36 values for greys), square-rooted (the Hellinger map, so a linear layer
  compares histograms well): the colour [CLS];
- one token per colour family (12 hue sectors, black, grey, white): its share of the
  foreground and its mean red, green, blue and saturation, so attention can point at
  "the navy part" of a striped shirt.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HUE_BINS, SATURATION_BINS, VALUE_BINS, GREY_BINS = 18, 3, 3, 36
HISTOGRAM_DIM = HUE_BINS * SATURATION_BINS * VALUE_BINS + GREY_BINS  # 198
FAMILIES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta",
            "pink", "black", "grey", "white")
FAMILY_FEATURES = 5  # share, mean R, G, B, mean saturation
DESCRIPTOR_DIM = HISTOGRAM_DIM + len(FAMILIES) * FAMILY_FEATURES
FOREGROUND_STEP = 0.08  # in [0, 1] pixel units
MIN_FOREGROUND = 0.02  # of the photo's pixels; below it every photo pixel is used
CHROMATIC_SATURATION, CHROMATIC_VALUE = 0.25, 0.2
POOL = 4  # 224 px -> 56 px: colour needs no fine detail


def colour_descriptor(pixels: torch.Tensor, mean: tuple[float, float, float],
                      std: tuple[float, float, float]) -> torch.Tensor:
    """[B, DESCRIPTOR_DIM] float32 descriptors of normalised letterboxed pixels [B, 3, H, W]."""
    device = pixels.device
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    rgb = F.avg_pool2d((pixels.float() * s + m).clamp(0, 1), POOL).permute(0, 2, 3, 1).cpu().numpy()
    return torch.from_numpy(np.stack([_describe(image) for image in rgb])).to(device)


def split(descriptor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram [B, HISTOGRAM_DIM] and the family tokens [B, len(FAMILIES), FAMILY_FEATURES]."""
    return (descriptor[:, :HISTOGRAM_DIM],
            descriptor[:, HISTOGRAM_DIM:].reshape(len(descriptor), len(FAMILIES), FAMILY_FEATURES))


def _photo_box(white: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns inside the letterbox padding (all-white edge rows/columns)."""
    rows, cols = ~white.all(1), ~white.all(0)
    if not rows.any() or not cols.any():
        return slice(None), slice(None)
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.select([high == r, high == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) / 6
    return np.where(chroma > 0, hue, 0.0), saturation, high


def _describe(image: np.ndarray) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] -> its descriptor."""
    white = (image > 0.97).all(-1)
    rows, cols = _photo_box(white)
    photo = image[rows, cols]
    ring = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]])
    background = np.median(ring, axis=0)
    step = np.abs(photo - background).max(-1)
    foreground = (step > FOREGROUND_STEP) & ~(photo > 0.97).all(-1)
    pixels = photo[foreground] if foreground.mean() >= MIN_FOREGROUND else photo.reshape(-1, 3)
    hue, saturation, value = _hsv(pixels)
    chromatic = (saturation >= CHROMATIC_SATURATION) & (value >= CHROMATIC_VALUE)
    h = np.minimum((hue * HUE_BINS).astype(int), HUE_BINS - 1)
    sb = np.minimum(((saturation - CHROMATIC_SATURATION) / (1 - CHROMATIC_SATURATION) * SATURATION_BINS).astype(int),
                    SATURATION_BINS - 1).clip(0)
    vb = np.minimum(((value - CHROMATIC_VALUE) / (1 - CHROMATIC_VALUE) * VALUE_BINS).astype(int), VALUE_BINS - 1).clip(0)
    grey = np.minimum((value * GREY_BINS).astype(int), GREY_BINS - 1)
    bins = np.where(chromatic, (h * SATURATION_BINS + sb) * VALUE_BINS + vb, HUE_BINS * SATURATION_BINS * VALUE_BINS + grey)
    histogram = np.bincount(bins, minlength=HISTOGRAM_DIM) / max(1, len(pixels))
    sector = np.minimum(((hue + 1 / 24) % 1 * 12).astype(int), 11)  # red centred on hue 0
    achromatic = np.where(value < 0.25, 12, np.where(value > 0.8, 14, 13))
    family = np.where(chromatic, sector, achromatic)
    tokens = np.zeros((len(FAMILIES), FAMILY_FEATURES))
    counts = np.bincount(family, minlength=len(FAMILIES))
    tokens[:, 0] = counts / max(1, len(pixels))
    present = counts > 0
    for k, channel in enumerate((pixels[:, 0], pixels[:, 1], pixels[:, 2], saturation), start=1):
        tokens[present, k] = np.bincount(family, weights=channel, minlength=len(FAMILIES))[present] / counts[present]
    return np.concatenate([np.sqrt(histogram), tokens.ravel()]).astype(np.float32)
