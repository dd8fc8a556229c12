"""What the app shows of the service's results: table rows, token choices, heatmaps, text
shading, charts and status lines. Formatting only: no actions, no Gradio."""
from __future__ import annotations

from matplotlib.figure import Figure
from PIL import Image

from ..predict import Prediction
from ..robustness import Probe
from ..viz import SPECIAL_TOKENS, attention_overlay, modality_chart, modality_shift_chart, token_highlights
from .service import ReviewQueue

PREDICTION_HEADERS = ["task", "prediction", "confidence", "auto-accept (90% precision)", "runners-up"]
PROBE_HEADERS = ["task", "clean", "clean conf.", "noisy", "noisy conf.", "change", "image weight clean",
                 "image weight noisy"]
HISTORY_HEADERS = ["time (UTC)", "annotator", "item", "labels", "changed", "model"]


# ---------------------------------------------------------------------- one prediction
def prediction_rows(prediction: Prediction) -> list[list]:
    """Rows for the predictions table: task, top-1, confidence, auto-accept, runners-up."""
    rows = []
    for task, p in prediction.tasks.items():
        mark = "✓ auto-accept" if p.auto_accept else (
            "below threshold" if p.threshold is not None else "no 90% threshold")
        others = ", ".join(f"{label} ({prob:.0%})" for label, prob in zip(p.labels[1:], p.probabilities[1:]))
        rows.append([task, p.label, round(p.confidence, 3), mark, others])
    return rows


def token_choices(prediction: Prediction, task: str) -> tuple[list[tuple[str, int]], int | None]:
    """(label, index) choices over the readable tokens, and the most relevant one for `task`."""
    relevance = prediction.token_relevance.get(task)
    choices, best, best_score = [], None, -1.0
    for i, token in enumerate(prediction.tokens):
        if token in SPECIAL_TOKENS:
            continue
        score = float(relevance[i]) if relevance is not None else 0.0
        choices.append((f"{token}  (relevance {score:.2f})", i))
        if score > best_score and any(ch.isalnum() for ch in token):  # punctuation is never the default
            best, best_score = i, score
    return choices, best


def heatmap(prediction: Prediction, token_index: int | None) -> Image.Image | None:
    """The selected token's attention over the image patches (the image [CLS]'s when none)."""
    if prediction.model_image is None or prediction.text_to_image is None:
        return None
    if token_index is None or not 0 <= int(token_index) < len(prediction.text_to_image):
        weights = prediction.image_cls_to_patches
    else:
        weights = prediction.text_to_image[int(token_index)]
    return attention_overlay(prediction.model_image, weights, prediction.grid_size)


def text_shading(prediction: Prediction, task: str | None = None) -> list[tuple[str, float]]:
    """Tokens shaded by the image [CLS]'s attention, or by the task's relevance when given."""
    weights = prediction.token_relevance.get(task) if task else prediction.image_cls_to_text
    if weights is None:
        return []
    return token_highlights(prediction.tokens, weights)


def modality_figure(prediction: Prediction) -> Figure:
    """Each task's text and image modality weights, as stacked bars."""
    return modality_chart({t: p.modality_weights for t, p in prediction.tasks.items()})


# ---------------------------------------------------------------------- history
def history_rows(entries: list[dict]) -> list[list[str]]:
    """Rows for the history table from label-store entries (`Studio.history`): time, annotator,
    item, labels, the labels that changed ("(same)" when none) and the model."""
    rows = []
    for entry in entries:
        changes = ", ".join(f"{task}: {entry['labels'].get(task, '')}" for task in entry.get("changed", []))
        labels = ", ".join(f"{task}={value}" for task, value in entry["labels"].items())
        rows.append([entry["created_at"], entry["annotator"], entry["item_id"], labels, changes or "(same)",
                     entry.get("checkpoint", "")])
    return rows


# ---------------------------------------------------------------------- review queue
def review_progress(queue: ReviewQueue) -> str:
    """How many items are reviewed, in Markdown."""
    return f"**{queue.reviewed} reviewed of {len(queue.items)}**"


def review_status(queue: ReviewQueue | None) -> str:
    """The line above the item: the progress, then the item's id and confidence, or "all done"."""
    if queue is None:
        return ""
    item = queue.current
    if item is None:
        return review_progress(queue) + " — all done."
    return review_progress(queue) + f" · item `{item.item_id}` · confidence {item.confidence:.2f}"


def review_notes(queue: ReviewQueue) -> str:
    """The rows that could not be loaded (the first five), or nothing."""
    return ("Not loaded: " + "; ".join(queue.notes[:5])) if queue.notes else ""


# ---------------------------------------------------------------------- robustness
def probe_summary(result: Probe) -> dict:
    """Both predictions and the noisy text, as JSON."""
    return {"clean": result.clean.to_dict(), "noisy": result.noisy.to_dict(), "noisy_text": result.noisy_text}


def probe_rows(result: Probe) -> list[list]:
    """Per task: task, clean label and confidence, noisy label and confidence,
    "changed"/"same", and the image modality weight clean and noisy."""
    rows = []
    for task, clean in result.clean.tasks.items():
        noisy = result.noisy.tasks[task]
        rows.append([task, clean.label, round(clean.confidence, 3), noisy.label, round(noisy.confidence, 3),
                     "changed" if noisy.label != clean.label else "same",
                     round(clean.modality_weights["image"], 3), round(noisy.modality_weights["image"], 3)])
    return rows


def probe_shift_figure(result: Probe) -> Figure:
    """Each task's image modality weight, clean against noisy."""
    clean, noisy = ({t: p.modality_weights for t, p in pred.tasks.items()} for pred in (result.clean, result.noisy))
    return modality_shift_chart(clean, noisy)
