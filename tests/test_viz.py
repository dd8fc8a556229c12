import numpy as np
from PIL import Image

from cma_clip.viz import attention_overlay, merge_wordpieces, modality_chart, token_highlights


def test_overlay_puts_the_heat_where_the_weight_is():
    image = Image.new("RGB", (70, 70), (128, 128, 128))
    weights = np.zeros(49)
    weights[0] = 1.0  # top-left patch
    overlay = np.asarray(attention_overlay(image, weights, 7, alpha=1.0, cmap="gray"), dtype=float)
    assert overlay.shape == (70, 70, 3)
    assert overlay[:5, :5].mean() > 200 and overlay[-10:, -10:].mean() < 20


def test_wordpieces_merge_and_specials_drop():
    tokens = ["[CLS]", "turtle", "##neck", "sweater", "[SEP]"]
    assert merge_wordpieces(tokens, np.array([0.5, 0.1, 0.2, 0.3, 0.5])) == [("turtleneck", 0.1 + 0.2), ("sweater", 0.3)]
    highlights = token_highlights(tokens, np.array([0.5, 0.1, 0.2, 0.6, 0.5]))
    assert highlights == [("turtleneck ", 0.5), ("sweater ", 1.0)]


def test_modality_chart_has_a_bar_pair_per_task():
    fig = modality_chart({"colour": {"text": 0.3, "image": 0.7}, "type": {"text": 0.8, "image": 0.2}})
    bars = fig.axes[0].patches
    assert len(bars) == 4
    assert np.isclose(bars[0].get_width(), 0.3) and np.isclose(bars[2].get_width(), 0.7)
