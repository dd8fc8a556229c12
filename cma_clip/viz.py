"""Pictures of what the model attends to: patch heatmaps, token shading, modality weights.

The app's pictures (`scaled_overlay`, `modality_chart`) are drawn with numpy and PIL, not a
matplotlib figure: a figure's layout and rasterisation cost more than the model's prediction
(docs/PERFORMANCE.md). matplotlib draws the study's and the sweeps' charts, and lends its colormaps."""
from __future__ import annotations

import base64
import io
import textwrap
from functools import lru_cache

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageChops, ImageDraw, ImageFont  # noqa: E402

SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "<start_of_text>", "<end_of_text>"})
TEXT_COLOUR, IMAGE_COLOUR = "#4C72B0", "#DD8452"  # the modality chart's text and image bars
MODALITY_COLOURS = {"text": TEXT_COLOUR, "image": IMAGE_COLOUR, "colour": "#55A868", "words": "#8172B3"}


@lru_cache(maxsize=16)
def colour_table(cmap: str) -> np.ndarray:
    """[256, 3] uint8: a matplotlib colormap sampled once, for colouring maps by table lookup."""
    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colour(values: np.ndarray, cmap: str) -> np.ndarray:
    """Values in [0, 1] coloured by `cmap`: [..., 3] uint8 (256 levels)."""
    index = (np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)
    return colour_table(cmap)[index]


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at `size` pixels, loaded once."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=8)
def _colour_bar(cmap: str, height: int, width: int, unit: str) -> Image.Image:
    """The colour bar beside a map, from the top colour down to 0, with a black frame, its "0" and
    its `unit` beside it: the part of a map's picture that does not depend on the map."""
    ramp = np.linspace(1, 0, height, dtype=np.float32)[:, None].repeat(width, 1)
    bar = Image.fromarray(colour(ramp, cmap))
    ImageDraw.Draw(bar).rectangle((0, 0, width - 1, height - 1), outline="black")
    panel = Image.new("RGB", (width + 100, height), "white")
    panel.paste(bar, (0, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((width + 5, height - 22), "0", fill="black", font=font(20))
    draw.text((width + 5, height // 2 - 45), "\n".join(textwrap.wrap(unit, 10)), fill="#333333", font=font(17))
    return panel


@lru_cache(maxsize=32)
def _opacity_table(alpha: float) -> list[int]:
    """The colour's opacity (0-255) for each of a map's 256 levels: `alpha` at the top, growing as level^0.8."""
    return [round(255 * alpha * (level / 255) ** 0.8) for level in range(256)]


def scaled_overlay(image: Image.Image, weights: np.ndarray, alpha: float = 0.55, cmap: str = "inferno",
                   title: str = "", unit: str = "of the map per cell", coverage: np.ndarray | None = None,
                   size: int = 448, peak: float | None = None) -> Image.Image:
    """The image with a heatmap on top and a colour bar beside it.

    `weights` [h, w] (or a flat square grid) are shares of the map's mass per cell: the colour
    runs from 0 to the largest cell, never stretched from the smallest, so a nearly flat map
    looks flat. The colour's opacity grows with the value (`alpha` at the largest, clear at 0),
    so the photo stays visible where the map is low. `coverage` [h, w] (share of each cell the
    photo covers) fades the colour out on the letterbox padding. The bar reads 0 .. max, in
    percent `unit`; `peak` sets its top instead of the largest cell (two maps drawn to one scale, to be
    compared by eye). The map is drawn in 256 levels, blended by PIL (a server draws one per call)."""
    grid = np.asarray(weights, dtype=np.float32)
    if grid.ndim == 1:
        side = int(round(len(grid) ** 0.5))
        grid = grid.reshape(side, side)
    peak = float(grid.max()) if peak is None and grid.size else float(peak or 0.0)
    scaled = grid / peak if peak > 0 else np.zeros_like(grid)
    base = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    heat = np.asarray(Image.fromarray(scaled, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    levels = Image.fromarray((np.clip(heat, 0, 1) * 255 + 0.5).astype(np.uint8))
    mask = levels.point(_opacity_table(float(alpha)))
    if coverage is not None:
        cover = np.clip(np.asarray(coverage, dtype=np.float32).reshape(grid.shape), 0, 1)
        cover = Image.fromarray((cover * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        mask = ImageChops.multiply(mask, cover)
    painted = levels.copy()
    painted.putpalette(colour_table(cmap).tobytes())  # each level's colour, looked up by PIL
    bar_width, margin, top, bottom = 22, 12, 48, 34  # `top`: room for the app's label and buttons
    canvas = Image.new("RGB", (size + bar_width + 2 * margin + 100, top + size + bottom), "white")
    canvas.paste(Image.composite(painted.convert("RGB"), base, mask), (0, top))
    x = size + margin
    canvas.paste(_colour_bar(cmap, size, bar_width, unit), (x, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((x + bar_width + 5, top), f"{peak:.1%}", fill="black", font=font(20))
    draw.text((4, top + size + 6), title, fill="black", font=font(20))
    return canvas


FONT = 12  # the charts shrink to a phone's width: their text starts large
MIN_LABELLED = 0.12  # a bar segment narrower than this gets no number inside it


def modality_chart(weights: dict[str, dict[str, float]], width: int = 440) -> Image.Image:
    """Horizontal stacked bars, first task on top: each task's modality weights from the left (text
    blue, image orange, then colour and words where the model has them; they sum to 1), in percent
    on the bars wide enough for them, an axis from 0 to 100% below and the legend under it (at the
    top, the component's own label would cover it). What does not depend on the weights (names,
    axis, legend) is drawn once per model (`_chart_frame`), each percentage once (`_label_stamp`):
    a server draws one chart per prediction."""
    tasks = list(weights)
    modalities = list(next(iter(weights.values()), {"text": 0.5, "image": 0.5}))
    canvas = _chart_frame(tuple(tasks), tuple(modalities), width).copy()
    left, right, top, row = _chart_layout(tuple(tasks), width)
    span = right - left
    draw = ImageDraw.Draw(canvas)
    for n, task in enumerate(tasks):
        middle = top + n * row + row // 2
        y0, y1 = middle - round(0.4 * row), middle + round(0.4 * row) - 1
        start, total = left, 0.0
        for k, name in enumerate(modalities):
            value = min(max(float(weights[task][name]), 0.0), 1.0)
            total += value
            stop = right if k == len(modalities) - 1 else left + round(min(total, 1.0) * span)
            if stop > start:
                draw.rectangle((start, y0, stop - 1, y1), fill=MODALITY_COLOURS.get(name, "#8C8C8C"))
            if value >= MIN_LABELLED:
                stamp, dx, dy = _label_stamp(f"{value:.0%}")
                canvas.paste("white", (round((start + stop) / 2) + dx, middle + dy), stamp)
            start = stop
    draw.rectangle((left, top, right - 1, top + row * len(tasks)), outline="black")
    return canvas


def _chart_layout(tasks: tuple[str, ...], width: int) -> tuple[int, int, int, int]:
    """The bars' left and right edges (right of the longest task name), their top, a row's height."""
    return 10 + max((int(font(13).getlength(t)) for t in tasks), default=0), width - 16, 34, 45


@lru_cache(maxsize=16)
def _chart_frame(tasks: tuple[str, ...], modalities: tuple[str, ...], width: int) -> Image.Image:
    """A modality chart without its bars: the task names, the axis with its ticks and title, the legend."""
    label_font = font(13)
    (left, right, top, row), bottom = _chart_layout(tasks, width), 76
    span = right - left
    canvas = Image.new("RGB", (width, top + row * len(tasks) + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    x, legend = left + span // 2 - 45 * len(modalities), top + row * len(tasks) + 58
    for name in modalities:
        draw.rectangle((x, legend - 5, x + 22, legend + 5), fill=MODALITY_COLOURS.get(name, "#8C8C8C"))
        draw.text((x + 28, legend), name, fill="black", font=label_font, anchor="lm")
        x += 90
    for n, task in enumerate(tasks):
        draw.text((left - 6, top + n * row + row // 2), task, fill="black", font=label_font, anchor="rm")
    axis = top + row * len(tasks)
    for tick in np.linspace(0, 1, 6):
        tx = left + round(tick * (span - 1))
        draw.line((tx, axis, tx, axis + 4), fill="black")
        draw.text((tx, axis + 6), f"{tick:.0%}", fill="black", font=label_font, anchor="mt")
    draw.text((left + span / 2, axis + 26), "modality-wise attention weight", fill="black", font=label_font,
              anchor="mt")
    return canvas


@lru_cache(maxsize=128)
def _label_stamp(text: str, size: int = 12) -> tuple[Image.Image, int, int]:
    """`text` as a mask to paste in a colour, centred on a point: (mask, x and y offset from the point)."""
    left, top, right, bottom = font(size).getbbox(text, anchor="mm")
    stamp = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(stamp).text((-left, -top), text, fill=255, font=font(size), anchor="mm")
    return stamp, left, top


def png_data_url(image: Image.Image) -> str:
    """A picture as a PNG data URL (fast compression: these are flat-colour charts)."""
    with io.BytesIO() as out:
        image.save(out, format="png", compress_level=1)
        return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _severity_panels(panels: dict[str, dict[str, dict[str, list[float]]]], ylabels: dict[str, str],
                     names: dict[str, str] | None, emphasis: str | None = None,
                     corruptions: dict[str, str] | None = None, title: str | None = None) -> Figure:
    """A row of subplots per entry of `panels` (row -> mode -> line -> values at severities 0..5), a
    column per noise mode titled with its corruption ("image noise: blur", wrapped to the panel), one
    shared legend under them (tasks by their `names`), from the left edge: a phone shows the figure
    at its width and scrolls it sideways, and a centred legend was never whole beside a panel."""
    rows = list(panels)
    modes = list(next(iter(panels.values()))) or ["no noise chosen"]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(3.4 * len(modes) + 0.8, 3.0 * len(rows) + 1.2),
                             dpi=100, sharey="row", squeeze=False)
    for r, row in enumerate(rows):
        for c, mode in enumerate(modes):
            ax = axes[r][c]
            for line, values in panels[row].get(mode, {}).items():
                bold = line == emphasis
                ax.plot(range(len(values)), values, marker="o", markersize=4 if bold else 3,
                        linewidth=3 if bold else 1.4, color="black" if bold else None, zorder=3 if bold else 2,
                        label=(names or {}).get(line, line))
            named = f"{mode} noise" + (f": {corruptions[mode]}" if mode in (corruptions or {}) else "")
            ax.set_title(textwrap.fill(named if mode in panels[row] else mode, 34), fontsize=FONT)
            ax.set_xlabel("severity" if r == len(rows) - 1 else "", fontsize=FONT - 1)
            ax.set_xticks(range(6))
            ax.set_ylim(0, 1.02)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(ylabels[row], fontsize=FONT - 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = 2 if len(modes) == 1 else 3
    if handles:
        fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.01, 0), ncol=columns, frameon=False,
                   fontsize=FONT - 1)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=FONT + 1)  # from the left edge, as the legend
    legend_rows = (len(labels) + columns - 1) // columns
    fig.tight_layout(rect=(0, min(0.45, 0.32 * legend_rows / fig.get_figheight()), 1, 1))
    plt.close(fig)
    return fig


def item_sweep_figure(sweep: dict[str, dict[str, list[float]]],
                      image_weight: dict[str, dict[str, list[float]]] | None = None,
                      names: dict[str, str] | None = None, corruptions: dict[str, str] | None = None) -> Figure:
    """One subplot per noise mode (titled with its corruption: `robustness.corruptions`): each task's
    probability of its clean prediction against severity; with `image_weight` (same shape), a second
    row: each task's image modality weight."""
    panels = {"confidence": sweep, **({"image weight": image_weight} if image_weight is not None else {})}
    return _severity_panels(panels, {"confidence": "probability of the clean prediction",
                                     "image weight": "image-side weight"}, names,
                            corruptions=corruptions)


def catalogue_sweep_figure(rows: list[dict], metric: str = "accuracy", names: dict[str, str] | None = None,
                           title: str | None = None) -> Figure:
    """`metric` against severity, one subplot per noise mode (titled with the rows' corruption): a line
    per task and their mean (bold); `title` says what was swept (the app: the model, items and seed)."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    corruptions = {row["mode"]: row["corruption"] for row in rows if row.get("corruption")}
    for row in rows:
        curves.setdefault(row["mode"], {}).setdefault(row["task"], []).append(
            (int(row["severity"]), float(row[metric])))
    by_mode = {mode: {task: [v for _, v in sorted(points)] for task, points in tasks.items()}
               for mode, tasks in curves.items()}
    return _severity_panels({metric: by_mode}, {metric: metric}, {"mean": "mean over tasks", **(names or {})},
                            emphasis="mean", corruptions=corruptions, title=title)


def modality_shift_chart(clean: dict[str, float], noisy: dict[str, float], axis: str = "image-side weight"
                         ) -> Figure:
    """Grouped horizontal bars: each task's image weight on the clean and on the noisy input (`axis`:
    what it sums, e.g. "image-side weight (image + colour)" for a model that reads the colour)."""
    tasks = list(clean)
    y = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(5.2, 0.6 * len(tasks) + 1.4), dpi=100)
    for offset, (name, weights, colour) in zip((-0.2, 0.2), (("clean", clean, "#8C8C8C"), ("noisy", noisy, "#DD8452"))):
        values = [weights[t] for t in tasks]
        ax.barh(y + offset, values, height=0.4, color=colour, label=name)
        for yy, value in zip(y + offset, values):
            ax.text(value + 0.01, yy, f"{value:.0%}", va="center", fontsize=FONT - 2)
    ax.set_yticks(y, tasks)
    return _finish_task_bars(fig, ax, axis, 1.15, percent=True)


def _finish_task_bars(fig: Figure, ax, xlabel: str, xmax: float, percent: bool = False) -> Figure:
    """Shared layout of the per-task horizontal bar charts: first task on top, the legend in a band of
    its own under the axis (the app's label covers the figure's top left corner), large text."""
    ax.set_xlim(0, xmax)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    if percent:
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_xticks([t for t in (0, 0.25, 0.5, 0.75, 1.0) if t <= xmax])
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=FONT)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1 - 0.3 / fig.get_figheight()))
    plt.close(fig)
    return fig


def _severity_grid(curves: dict[str, dict[str, list[dict]]], rows: list[str], title: str,
                   ylabels: dict[str, str], emphasis: str | None = None) -> Figure:
    """A grid of curves against severity: one row per entry of `rows`, one column per noise mode;
    `curves[line][mode][row]` holds {"mean", "std"} per severity, drawn as a line and a ±std band.
    The `emphasis` line is drawn thicker and on top."""
    modes = list(next(iter(curves.values())))
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(4.2 * len(modes), 3.2 * len(rows)), dpi=100,
                             squeeze=False, sharex=True)
    for (r, row), (c, mode) in ((rc, mc) for rc in enumerate(rows) for mc in enumerate(modes)):
        ax = axes[r][c]
        for line, by_mode in curves.items():
            points = by_mode[mode][row]
            mean = np.array([p["mean"] for p in points])
            std = np.array([p["std"] for p in points])
            severities = np.arange(len(points))
            bold = line == emphasis
            ax.plot(severities, mean, marker="o", markersize=4 if bold else 3, linewidth=2.6 if bold else 1.2,
                    zorder=3 if bold else 2, label=line)
            ax.fill_between(severities, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"{mode} noise" if r == 0 else "", fontsize=10)
        ax.set_ylabel(ylabels[row] if c == 0 else "")
        ax.set_xlabel("severity" if r == len(rows) - 1 else "")
        ax.set_xticks(range(6))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 4) / len(rows), 1, 1))
    plt.close(fig)
    return fig


def noise_curves_figure(curves: dict[str, dict[str, dict[str, list[dict]]]], title: str,
                        emphasis: str | None = None) -> Figure:
    """Each method's mean accuracy and recall at 90% precision against severity, for image,
    text and both noises: curves[method][mode][metric] = [{"mean", "std"} per severity]."""
    return _severity_grid(curves, ["accuracy", "recall_at_90_precision"], title,
                          {"accuracy": "mean accuracy", "recall_at_90_precision": "mean recall@90%P"}, emphasis)


def corruption_curves_figure(curves: dict, title: str) -> Figure:
    """`lab.noise_curves`' results: one panel per corruption (image kinds above, text kinds below),
    against severity: the re-picked mean R@90P and, with the checkpoint's clean thresholds, the
    mean operating recall and the lowest task's auto-accept precision, beside the 0.90 it promises."""
    lines = {"R@90P (threshold re-picked)": "recall_at_90_precision",
             "operating recall (clean thresholds)": "operating_recall",
             "lowest task's precision (clean thresholds)": "lowest_auto_accept_precision"}
    sides = ("image", "text")
    columns = max(len(curves[side]) for side in sides)
    fig, axes = plt.subplots(2, columns, figsize=(3.3 * columns, 6.4), dpi=100, squeeze=False, sharey=True)
    for r, side in enumerate(sides):
        for c, (kind, by_severity) in enumerate(curves[side].items()):
            ax = axes[r][c]
            reports = [(0, curves["clean"])] + sorted((int(s), v) for s, v in by_severity.items())
            for label, key in lines.items():
                points = [(s, v["mean"].get(key)) for s, v in reports if v["mean"].get(key) is not None]
                ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.4, label=label)
            ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{side}: {kind}", fontsize=10)
            ax.set_xticks(range(6))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.set_xlabel("severity" if r == 1 else "")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    plt.close(fig)
    return fig


def modality_weight_curves_figure(image_weight: dict[str, dict[str, list[dict]]], title: str) -> Figure:
    """Each task's image weight in the modality-wise attention against severity, per noise mode:
    image_weight[mode][task] = [{"mean", "std"} per severity]."""
    by_task = {task: {mode: {"image weight": image_weight[mode][task]} for mode in image_weight}
               for task in next(iter(image_weight.values()))}
    return _severity_grid(by_task, ["image weight"], title, {"image weight": "image modality weight"})
