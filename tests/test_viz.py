import numpy as np
from PIL import Image

from cma_clip import viz
from cma_clip.viz import IMAGE_COLOUR, TEXT_COLOUR, colour, modality_chart, scaled_overlay


def bar_shares(chart: Image.Image) -> list[float]:
    """Per stacked bar of a modality chart, top to bottom: the share of its length in the text colour,
    read from the pixels of a line near the bar's top edge (clear of the values written on it)."""
    pixels = np.asarray(chart.convert("RGB")).astype(int)
    text, image = (np.array(Image.new("RGB", (1, 1), c).getpixel((0, 0))) for c in (TEXT_COLOUR, IMAGE_COLOUR))
    is_text, is_image = ((np.abs(pixels - c).sum(-1) == 0) for c in (text, image))
    rows = np.nonzero((is_text | is_image).sum(1) > 50)[0]  # lines across a bar (the legend's boxes are narrower)
    starts = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r - 1]
    return [is_text[y + 2].sum() / (is_text[y + 2].sum() + is_image[y + 2].sum()) for y in starts]


def test_modality_chart_has_a_bar_pair_per_task():
    chart = modality_chart({"colour": {"text": 0.3, "image": 0.7}, "type": {"text": 0.8, "image": 0.2}})
    shares = bar_shares(chart)
    assert len(shares) == 2
    assert abs(shares[0] - 0.3) < 0.01 and abs(shares[1] - 0.8) < 0.01
    taller = modality_chart({f"task {i}": {"text": 0.5, "image": 0.5} for i in range(6)})
    assert taller.height > chart.height and len(bar_shares(taller)) == 6


def test_modality_charts_of_one_model_share_their_frame_not_their_bars():
    """The names, axis and legend are drawn once per model and reused; the bars go on a copy, so
    the shared frame stays clean (the server's threads draw charts at once)."""
    first = {"colour": {"text": 0.3, "image": 0.7}, "type": {"text": 0.8, "image": 0.2}}
    before = np.asarray(modality_chart(first))
    other = modality_chart({"colour": {"text": 0.9, "image": 0.1}, "type": {"text": 0.15, "image": 0.85}})
    assert [round(s, 2) for s in bar_shares(other)] == [0.9, 0.15]
    np.testing.assert_array_equal(np.asarray(modality_chart(first)), before)
    frame = viz._chart_frame(("colour", "type"), ("text", "image"), before.shape[1])  # at the chart's width
    assert bar_shares(frame) == [] and np.asarray(frame).shape == before.shape


def test_colour_follows_the_colormap():
    values = np.array([0.0, 0.5, 1.0])
    assert (colour(values, "gray")[:, 0] == [0, 128, 255]).all()


def test_scaled_overlay_colours_the_peak_and_leaves_zero_clear():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    weights = np.zeros((4, 4))
    weights[0, 0] = 1.0
    picture = np.asarray(scaled_overlay(image, weights, alpha=1.0, cmap="gray", size=64), dtype=int)
    top = 48  # the room left above the map
    assert picture[top + 2, 2].tolist() == [255, 255, 255]  # the peak, fully opaque, in the colormap's top colour
    assert picture[top + 60, 60].tolist() == [128, 128, 128]  # zero: the photo untouched
