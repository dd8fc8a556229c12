"""Pictures of what the model attends to: patch heatmaps, token shading, modality weights."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "<start_of_text>", "<end_of_text>"})


def attention_overlay(image: Image.Image, patch_weights: np.ndarray, grid_size: int,
                      alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """The image with a patch-grid heatmap on top: weights are min-max scaled,
    upsampled bilinearly to the image size and coloured with a matplotlib colormap."""
    grid = np.asarray(patch_weights, dtype=np.float32).reshape(grid_size, grid_size)
    span = grid.max() - grid.min()
    grid = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    heat = Image.fromarray(grid, mode="F").resize(image.size, Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps[cmap](np.clip(np.asarray(heat), 0, 1))[..., :3]
    coloured = Image.fromarray((colours * 255).astype(np.uint8))
    return Image.blend(image.convert("RGB"), coloured, alpha)


def merge_wordpieces(tokens: list[str], weights: np.ndarray) -> list[tuple[str, float]]:
    """Whole words with the summed weight of their pieces; special tokens are dropped."""
    words: list[tuple[str, float]] = []
    for token, weight in zip(tokens, np.asarray(weights, dtype=float)):
        if token in SPECIAL_TOKENS:
            continue
        if token.startswith("##") and words:
            word, total = words[-1]
            words[-1] = (word + token[2:], total + weight)
        else:
            words.append((token, weight))
    return words


def token_highlights(tokens: list[str], weights: np.ndarray) -> list[tuple[str, float]]:
    """(word, score in [0, 1]) pairs for gr.HighlightedText, scaled by the largest weight."""
    words = merge_wordpieces(tokens, weights)
    peak = max((w for _, w in words), default=0.0)
    return [(f"{word} ", round(w / peak, 3) if peak > 0 else 0.0) for word, w in words]


def modality_chart(weights: dict[str, dict[str, float]]) -> Figure:
    """Horizontal stacked bars: each task's text and image weight (they sum to 1)."""
    tasks = list(weights)
    text = np.array([weights[t]["text"] for t in tasks])
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(tasks) + 0.9), dpi=100)
    ax.barh(tasks, text, color="#4C72B0", label="text")
    ax.barh(tasks, 1 - text, left=text, color="#DD8452", label="image")
    for y, value in enumerate(text):
        ax.text(value / 2, y, f"{value:.2f}", va="center", ha="center", color="white", fontsize=9)
        ax.text(value + (1 - value) / 2, y, f"{1 - value:.2f}", va="center", ha="center", color="white", fontsize=9)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("modality-wise attention weight")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig
