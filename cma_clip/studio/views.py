"""What the app shows of the service's results: table rows, token choices, heatmaps, text
shading, charts and status lines. Formatting only: no actions, no Gradio.

Status lines are Markdown: every value a user or a manifest supplied (ids, labels, names)
goes in a code span (`code`) or through `plain`, so it shows as text and never runs."""
from __future__ import annotations

import functools
import heapq
import html
import unicodedata
from collections import Counter
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from ..checkpoint import readable_name
from ..labels import CLAIM_MINUTES, Conflict, TaskState, UnknownClass, same_class
from ..predict import Prediction, TaskPrediction
from ..robustness import Probe
from ..viz import modality_chart, modality_shift_chart, scaled_overlay
from ..review import STRATEGIES
from .service import MAX_TEXT_CHARS
from .workflow import (SOURCE_ORDER, SPLIT_NOTES, BulkOutcome, ItemView, ReviewItem, ReviewQueue, SaveOutcome,
                       UndoOutcome, plural)

PREDICTION_HEADERS = ["task", "prediction", "confidence", "auto-accept (threshold)", "runners-up"]
# Column widths in pixels, not shares: a table keeps readable columns and scrolls inside its box on a
# phone (shares of a 412 px screen left "pending" a few letters a line).
PREDICTION_WIDTHS = ["130px", "130px", "100px", "170px", "210px"]
# clean and noisy side by side, each label with its confidence: a phone shows the task and both (nine columns
# showed only the clean ones there: QA researcher, session 39)
PROBE_HEADERS = ["task", "clean", "noisy", "clean label's conf. change", "image-side weight clean → noisy"]
PROBE_WIDTHS = ["110px", "120px", "140px", "100px", "110px"]
NO_TEXT_NOTE = ("**No text: the prediction rests on the image only** (its modality weights are all on the image), "
                "and nothing is auto-accepted: the thresholds hold 90% precision for items with a text; without "
                "one, the auto-accepted validation items of the shipped models reached only 70% (fashion) to 88% "
                "(H&M).")
BLANK_PHOTO_NOTE = ("**The photo is one flat colour**: it tells the model nothing, so nothing is auto-accepted: the "
                    "thresholds hold 90% precision for items with a photo; with every test photo replaced by a blank "
                    "placeholder (1 x 1 pixels), the shipped models' auto-accepted test items fell to 78% precision "
                    "on H&M's pattern and 87% on fashion's season.")
TEXT_CUT_NOTE = (f"**The text was cut to its first {MAX_TEXT_CHARS:,} characters**, as a save stores it (the model "
                 "reads fewer: its first tokens).")
HISTORY_HEADERS = ["time (UTC)", "annotator", "item", "labels", "changed", "model"]
MAP_CHOICES = [("Relevance for the task", "relevance"), ("Attention (raw, last layer)", "attention")]
MAP_NOTE = ("*The maps are estimates.* Relevance follows the gradient of the task's top score (LayerCAM on the image "
            "encoder, attention rollout over the words): what the prediction leans on locally, not a proof. Attention "
            "shows where the model looked, which is often the empty background, not why it decided. The modality "
            "weights are each task's modality-wise attention over its inputs (the text and the image; colour and "
            "words where the model has them): how its head mixes them, a measure other than the relevance split, so "
            "the two need not agree.")
DEFAULT_OPACITY = 0.55
REVIEW_HEADERS = ["task", "saved label", "status", "saved by", "model's label", "confidence", "catalogue label"]
REVIEW_WIDTHS = ["115px", "105px", "95px", "130px", "110px", "100px", "125px"]  # "corrected" on one line; 780 px in all
# the kind beside the status (an undo's status is the label it restored); the widths fit a 1366-px screen
AUDIT_HEADERS = ["time (UTC)", "item", "task", "label", "status", "kind", "by", "source", "vs model", "vs catalogue",
                 "checkpoint", "version"]
AUDIT_WIDTHS = ["125px", "115px", "155px", "120px", "90px", "70px", "80px", "95px", "90px", "100px", "100px",
                "65px"]
HISTORY_WIDTHS = ["150px", "100px", "130px", "300px", "150px", "110px"]
# what an undo undid, and what a label overwrote, beside who did it: at the end it was past a laptop's edge
ITEM_HISTORY_HEADERS = ["time (UTC)", "task", "kind", "label", "status", "by", "source", "undid / overwrote",
                        "vs model", "vs catalogue", "checkpoint", "version"]
# 1,185 px: the Review tab's accordion is 1,190 wide on a 1366-px screen (a long "overwrote ..." pushed the last
# columns past its edge); the task's wide enough for "Colour (colour_group_name)" (two models' tasks sharing a name)
ITEM_HISTORY_WIDTHS = ["125px", "155px", "70px", "110px", "90px", "65px", "95px", "125px", "90px", "95px", "100px",
                       "65px"]
AGREEMENT_HEADERS = ["task", "items labelled by 2+ annotators", "raw agreement", "Cohen's kappa", "annotators",
                     "open disagreements", "kappa over", "reviews left out"]
# another labeler's saved label in a second pass ('Show decided items'): hidden until the labeler decides
HIDDEN_LABEL = "saved by another labeler: hidden until you decide (a blind second pass)"
KEYS_HELP = ("**Keys** (outside text fields): **1-9** pick the active task's choice (then the next task is "
             "active) · **t** next task · **a** accept / save and next · **s** skip · **n** next item (no "
             "decision) · **u** undo · **p** previous item")


# ---------------------------------------------------------------------- safe Markdown
def _one_line(value: object) -> str:
    """A value on one line, its backticks made quotes (they would open or close a code span)."""
    return " ".join(str(value).split()).replace("`", "'")


def code(value: object) -> str:
    """A value as a Markdown code span: shown verbatim, never run as HTML."""
    text = _one_line(value)
    return f"`{text}`" if text else "``"


def plain(value: object) -> str:
    """A value as Markdown text: HTML escaped, Markdown's own marks neutralised. Quotes stay as they
    are: text is never an attribute, and an entity such as "&#x27;" would show as typed once its "#"
    is escaped."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return "".join("\\" + ch if ch in "\\`*_[]#|~<>" else ch for ch in text)


def info_text(value: object) -> str:
    """A value for a component's `info` line. Gradio escapes its HTML itself (escaping it here
    showed "&gt;" to people) and then reads a little Markdown without backslash escapes: a code
    span's backtick becomes a quote and a link's "](" is split by a zero-width space, so data
    neither styles as code nor becomes a link; emphasis marks stay (they cannot fetch or run)."""
    return _one_line(value).replace("](", "]\u200b(")


# ---------------------------------------------------------------------- names and numbers
def task_name(task: str, prediction: TaskPrediction | None = None, names: dict[str, str] | None = None) -> str:
    """The name a person reads for a task: the prediction's, else `names`', else the column made readable."""
    return (prediction.name if prediction is not None and prediction.name else None) or (names or {}).get(task) \
        or readable_name(task)


def task_choices(tasks: list[str], names: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(shown name, task) pairs for a dropdown or radio: people read names, events get the column."""
    return [(task_name(task, names=names), task) for task in tasks]


def typing_order(classes: list[str]) -> list[str]:
    """`classes` for a label dropdown: alphabetical, except that each comes before every class that
    contains it (case aside). A dropdown filters its choices by what is typed and Enter takes the
    first one left, so typing "Grey" must not give "Dark Grey", nor "Solid" "Mixed solid/pattern"."""
    return list(_typing_order(tuple(classes)))


@functools.lru_cache(maxsize=64)
def _typing_order(classes: tuple[str, ...]) -> tuple[str, ...]:
    names = sorted(set(classes), key=lambda c: (c.casefold(), c))
    key = {c: c.casefold() for c in names}
    holders = {c: [d for d in names if key[c] != key[d] and key[c] in key[d]] for c in names}  # come after c
    waiting = Counter(d for held in holders.values() for d in held)  # classes each one must wait for
    ready = [(key[c], c) for c in names if not waiting[c]]
    heapq.heapify(ready)
    order = []
    while ready:  # Kahn's topological sort, the alphabetically first ready class each time
        _, c = heapq.heappop(ready)
        order.append(c)
        for d in holders[c]:
            waiting[d] -= 1
            if not waiting[d]:
                heapq.heappush(ready, (key[d], d))
    return tuple(order)


def percent(value: float | None) -> str:
    """A probability as a percent; near 0% and 100% with the decimals that tell it apart from them
    ("99.3%": a threshold of 99.3% must not read as 99%)."""
    if value is None:
        return "—"
    if 0 < value < 0.00005 or 0.99995 <= value < 1:
        return "<0.01%" if value < 0.5 else ">99.99%"
    digits = 1 if 0 < value < 1 and not 0.01 <= value < 0.99 else 0
    while 0 < digits < 2 and round(value * 100, digits) in (0, 100):
        digits += 1
    return f"{value:.{digits}%}"


def verdict(p: TaskPrediction, withheld: str = "") -> str:
    """Auto-accept or not, with the task's threshold beside it; `withheld`: why the item's input
    rules auto-accept out (`Prediction.withheld`)."""
    if p.threshold is None:
        return "no threshold holds 90%"
    bar = f"≥\u00a0{percent(p.threshold)}"  # never broken between the sign and its number
    if withheld:
        return f"withheld: {withheld} ({bar})"
    return f"✓ auto-accept ({bar})" if p.auto_accept else f"below {percent(p.threshold)}"


# ---------------------------------------------------------------------- one prediction
def prediction_rows(prediction: Prediction) -> list[list]:
    """Rows for the predictions table: task, top-1, confidence, auto-accept with its threshold, runners-up."""
    rows = []
    for task, p in prediction.tasks.items():
        others = ", ".join(f"{label} ({percent(prob)})" for label, prob in zip(p.labels[1:], p.probabilities[1:]))
        rows.append([task_name(task, p), p.label, percent(p.confidence), verdict(p, prediction.withheld), others])
    return rows


def input_note(prediction: Prediction, text_cut: bool = False) -> str:
    """The note under the inputs: what an empty text, a blank photo, a text longer than the model
    reads, or a text cut to its first `MAX_TEXT_CHARS` characters (an API client's; the box takes no
    more) means ("" for none)."""
    rest = "word is" if prediction.words_unread == 1 else f"{prediction.words_unread:,} are"
    unread = (f"**The model read the first {plural(len(prediction.words), 'word')} of the text**; the other "
              f"{rest} past its encoder's token limit: not read, and not in the maps.")
    return "  \n".join(note for note, present in ((NO_TEXT_NOTE, prediction.text_absent),
                                                  (BLANK_PHOTO_NOTE, prediction.photo_blank),
                                                  (unread, prediction.words_unread > 0),
                                                  (TEXT_CUT_NOTE, text_cut)) if present)


def tenths(value: float) -> str:
    """A precision beside the 90% promise, to a tenth of a percent: 0.897 must not read as 90%."""
    return f"{value * 100:.1f}%"


def operating_figures(metrics: dict, names: dict[str, str]) -> str:
    """What auto-accept did on held-out items, per task (`CheckpointConfig.metrics`' split report): its
    precision with the 95% interval, at which threshold, and the share of items it labels correctly."""
    tasks = (metrics or {}).get("tasks", {})
    lines = []
    for task, m in tasks.items():
        name = plain(task_name(task, names=names))
        if m.get("threshold") is None or not m.get("auto_accepted"):
            lines.append(f"- **{name}**: no threshold holds 90% precision; nothing is auto-accepted.")
            continue
        low, high = m["auto_accept_precision_ci"]
        lines.append(f"- **{name}**: {tenths(m['auto_accept_precision'])} precision "
                     f"[{tenths(low)}–{tenths(high)}] at ≥\u00a0{percent(m['threshold'])}; labels "
                     f"{percent(m['operating_recall'])} of items correctly")
    if not lines:
        return ""
    n = max((m.get("n", 0) for m in tasks.values()), default=0)
    return (f"**Auto-accept on {n:,} held-out test items** (precision with its 95% interval, threshold, share of "
            "items it labels correctly):\n" + "\n".join(lines))


# ---------------------------------------------------------------------- relevance (whole words, colour bar)
def word_choices(prediction: Prediction, task: str) -> tuple[list[tuple[str, int]], int | None]:
    """(label, word index) choices over the whole words, with the task's relevance, and the most
    relevant word (one with a letter or digit) as the default."""
    relevance = prediction.relevance.get(task)
    if relevance is None:
        return [], None
    choices = [(f"{isolated(word)}  ({relevance.words[i]:.0%})", i)
               for i, word in enumerate(word_names(prediction.words))]
    return choices, relevance.top_word(prediction.words)


def reads_right_to_left(text: str) -> bool:
    """Whether a text reads right to left: its first letter with a direction is Arabic, Hebrew, ...
    (Unicode's bidirectional classes R and AL), as a browser's `dir="auto"` decides."""
    for ch in text:
        direction = unicodedata.bidirectional(ch)
        if direction in ("R", "AL", "L"):
            return direction != "L"
    return False


def isolated(word: str) -> str:
    """A right-to-left word set apart from the text around it (Unicode's first-strong isolate), so
    "بأكمام  (22%)" does not read "(%22) بأكمام"."""
    return f"\u2068{word}\u2069" if reads_right_to_left(word) else word


def word_direction(prediction: Prediction) -> list[str]:
    """The CSS classes of the word views: "rtl" lays a right-to-left text's words out from the right."""
    return ["rtl"] if reads_right_to_left(" ".join(prediction.words)) else []


def word_names(words: list[str]) -> list[str]:
    """Each word as a person picks it: a word the text holds more than once numbered by its turn
    ("mesh #2"), so that three "mesh" of different relevance are told apart."""
    counts, seen, names = Counter(words), Counter(), []
    for word in words:
        seen[word] += 1
        names.append(f"{word} #{seen[word]}" if counts[word] > 1 else word)
    return names


def word_attention(prediction: Prediction, word: int | None) -> np.ndarray | None:
    """[patches] the last layer's attention of a word over the patches (the mean of its tokens' rows),
    as shares of that attention; the image [CLS]'s when no word is chosen."""
    if prediction.text_to_image is None:
        return None
    rows = [i for i, w in enumerate(prediction.token_words) if word is not None and w == int(word)]
    weights = prediction.text_to_image[rows].mean(0) if rows else prediction.image_cls_to_patches
    return weights / max(float(weights.sum()), 1e-12)


def image_map(prediction: Prediction, task: str | None, kind: str = "relevance", word: int | None = None,
              opacity: float = DEFAULT_OPACITY, peak: float | None = None) -> Image.Image | None:
    """The image map the app shows, with a colour bar: the task's relevance (default; `peak`: the
    bar's top, default the map's largest cell), or the raw attention of a word (of the image [CLS]
    when none) over the patches."""
    if prediction.model_image is None:
        return None
    opacity = float(DEFAULT_OPACITY if opacity is None else opacity)
    if kind == "attention":
        weights = word_attention(prediction, word)
        if weights is None:
            return None
        valid = word is not None and 0 <= int(word) < len(prediction.words)
        name = f"'{prediction.words[int(word)]}'" if valid else "the image [CLS]"
        return scaled_overlay(prediction.model_image, weights, opacity, title=f"Attention (raw) of {name}",
                              unit="of its patch attention per patch")
    relevance = prediction.relevance.get(task or "")
    if relevance is None:
        return None
    p = prediction.tasks.get(task)
    label, name = (p.label, task_name(task, p)) if p is not None else ("", task_name(task))
    coverage = prediction.photo_fraction
    fine = relevance.image_fine
    if coverage is not None and fine.shape[0] != prediction.grid_size:
        side = fine.shape[0]
        coverage = np.kron(coverage.reshape(prediction.grid_size, -1), np.ones((side // prediction.grid_size,) * 2))
    return scaled_overlay(prediction.model_image, fine, opacity, title=f"Relevance for {name}: {label}",
                          unit="of the relevance per cell", coverage=coverage, peak=peak)


def word_shading(prediction: Prediction, task: str) -> list[tuple[str, float]]:
    """Whole words shaded by the task's relevance, scaled so the most relevant word is 1."""
    relevance = prediction.relevance.get(task)
    if relevance is None:
        return []
    return _scaled_words(prediction.words, relevance.words)


def word_attention_shading(prediction: Prediction) -> list[tuple[str, float]]:
    """Whole words shaded by the image [CLS]'s raw attention (summed over each word's tokens)."""
    if prediction.image_cls_to_text is None:
        return []
    from ..relevance import word_relevance

    weights = word_relevance(prediction.image_cls_to_text, prediction.token_words, len(prediction.words))
    return _scaled_words(prediction.words, weights)


def _scaled_words(words: list[str], weights: np.ndarray) -> list[tuple[str, float]]:
    peak = float(max(weights, default=0.0))
    return [(f"{word} ", round(float(w) / peak, 3) if peak > 0 else 0.0) for word, w in zip(words, weights)]


def relevance_summary(prediction: Prediction, task: str | None) -> str:
    """One line on the task's relevance: image against text, the top words, the padding removed."""
    relevance = prediction.relevance.get(task or "")
    if relevance is None:
        return MAP_NOTE
    order = [i for i in np.argsort(-relevance.words, kind="stable") if any(c.isalnum() for c in prediction.words[i])]
    names = word_names(prediction.words)
    top = ", ".join(f"{code(names[i])} ({relevance.words[i]:.0%})" for i in order[:3])
    name = plain(task_name(task, prediction.tasks.get(task)))
    if prediction.words:
        line = (f"**{name}**: relevance on the image {relevance.image_share:.0%}, on the text "
                f"{1 - relevance.image_share:.0%}" + (f"; most relevant words: {top}" if top else "") + ".")
    else:  # the modality weights are all on the image; the gradient still reaches the text's markers
        line = (f"**{name}**: no text; relevance on the image {relevance.image_share:.0%}, the rest on the empty "
                "text's start and end markers.")
    if relevance.padding_share >= 0.005:
        line += f" The white letterbox padding drew {relevance.padding_share:.0%} of the image map; it is left out."
    return line + "\n\n" + MAP_NOTE


def modality_figure(prediction: Prediction) -> Figure:
    """Each task's text and image modality weights, as stacked bars."""
    return modality_chart({task_name(t, p): p.modality_weights for t, p in prediction.tasks.items()})


# ---------------------------------------------------------------------- history
def history_rows(entries: list[dict], names: dict[str, str] | None = None) -> list[list[str]]:
    """Rows for the history table from label-store entries (`Studio.history`): time, annotator,
    item, labels, the labels that changed ("(same)" when none; what undos took back of it) and the model."""
    rows = []
    for entry in entries:
        changes = ", ".join(f"{task_name(task, names=names)}: {entry['labels'].get(task, '')}"
                            for task in entry.get("changed", []))
        labels = ", ".join(f"{task_name(task, names=names)}={value}" for task, value in entry["labels"].items())
        rows.append([entry["created_at"][:23].replace("T", " "), entry["annotator"], entry["item_id"], labels,
                     (changes or "(same)") + taken_back(entry, names), entry.get("checkpoint", "")])
    return rows


def taken_back(entry: dict, names: dict[str, str] | None = None) -> str:
    """What undos took back of a save (`LabelStore.history`): " · undone by ana", " · dropped by
    ben's undo" (someone's forced undo) or " · withdrawn by ana (theirs kept)" when one undo took all
    of it, else with the tasks: " · Colour undone by ana"."""
    marks = []
    for what, by_task in (("undone by {}", entry.get("undone", {})),
                          ("dropped by {}'s undo", entry.get("dropped", {})),
                          ("withdrawn by {} (theirs kept)", entry.get("withdrawn", {}))):
        whole = set(by_task) >= set(entry["labels"]) and len(set(by_task.values())) == 1
        for who in dict.fromkeys(by_task.values()):
            tasks = "" if whole else ", ".join(task_name(t, names=names) for t, w in by_task.items() if w == who) + " "
            marks.append(f" · {tasks}{what.format(who or 'someone')}")
    return "".join(marks)


# ---------------------------------------------------------------------- review queue
def review_progress(queue: ReviewQueue) -> str:
    """How many items are reviewed, in Markdown: by anyone, said where decided items are shown (a second
    pass read the team's count as its own: "6 reviewed of 6" before its first decision)."""
    anyone = " (by anyone)" if queue.filters.get("show_decided") else ""
    return f"**{queue.reviewed} reviewed of {len(queue.items)}{anyone}**"


def order_choices(queue: ReviewQueue | None = None) -> list[tuple[str, str]]:
    """The Order control's choices: the uncertainty strategies, and the order of a queue whose source ranks
    its items (suspected mislabels, disagreements)."""
    choices = [(s.replace("_", " "), s) for s in STRATEGIES]
    own = queue.source_order_name if queue else None
    return choices + [(own, SOURCE_ORDER)] if own else choices


def review_status(queue: ReviewQueue | None) -> str:
    """The line above the item: the progress, then the item's id, place, status and confidence, or "all done"."""
    if queue is None:
        return ""
    item = queue.current
    if item is None and (taken := queue.waiting_on) and not queue.show_decided:
        who = ", ".join(code(name) for name in sorted({other.claimed_by for other in taken if other.claimed_by}))
        return (review_progress(queue) + f" — nothing left for you now: {plural(len(taken), 'item')} left "
                f"{'is' if len(taken) == 1 else 'are'} open with {who or 'other labelers'} (a claim lapses "
                f"{CLAIM_MINUTES:g} minutes after its labeler's last step). Next looks again; Previous goes back.")
    if item is None:
        return review_progress(queue) + " — all done." + ("" if queue.show_decided else
                                                          " Previous (p) goes back; undo (u) reverts.")
    tasks = [t for t in queue.tasks if t in item.predictions] or list(item.predictions)  # the tasks under review
    lowest = min(item.predictions[t].confidence for t in tasks)
    status = "decided" if queue.blind and item.status != "pending" else item.status  # "corrected" said a hidden
    # label was not the model's (QA s42)
    line = (review_progress(queue) + f" · item {code(item.item_id)} ({queue.position + 1} of {len(queue.items)})"
            f" · **{status}** · {'confidence' if len(tasks) == 1 else 'lowest confidence'} {percent(lowest)}")
    line += f" · {code(item.claimed_by)} is on this item too" if item.claimed_by else ""
    line += f" · {item.withheld}: never auto-accepted" if item.withheld else ""
    return line + (f"  \n{plain(item.note)}" if item.note else "")


def review_notes(queue: ReviewQueue) -> str:
    """Where the queue's items come from, its order and filter, and the rows that could not be loaded."""
    filters = queue.filters
    order = queue.source_order_name if queue.strategy == SOURCE_ORDER else None
    parts = [f"Queue: {plain(queue.source)}", f"order: {order or queue.strategy.replace('_', ' ')}"]
    if len(queue.tasks) == 1:
        task = queue.tasks[0]
        parts.append(f"task {code(task_name(task, queue.items[0].predictions.get(task) if queue.items else None))}")
    if filters.get("min_conf") is not None or filters.get("max_conf") is not None:
        low, high = filters.get("min_conf"), filters.get("max_conf")
        parts.append(f"confidence {0 if low is None else low:g} to {1 if high is None else high:g}: "
                     f"{len(queue.items)} of {queue.sampled} items")
    if filters.get("show_decided"):
        parts.append("decided items shown")
    line = " · ".join(parts) + "."
    if queue.notes:
        line += "  \nNotes: " + plain("; ".join(queue.notes[:5]))
    return line


def reviewers_note(reviewers: frozenset[str]) -> str:
    """Who may settle disagreements, for the Disagreements source."""
    if not reviewers:
        return "Anyone may settle them (`CMA_CLIP_REVIEWERS` names the reviewers)."
    return "Settled by the reviewers: " + ", ".join(code(name) for name in sorted(reviewers)) + "."


def split_note(split: str | None) -> str:
    """What becomes of the corrections of a split's items, in Markdown."""
    return SPLIT_NOTES.get(split or "", "")


def choice_labels(item: ReviewItem, task: str) -> list[str]:
    """The buttons of a task's top choices: "1 · Beige 62%", in dispute "1 · Red (ana) 12%"."""
    return [" ".join(filter(None, [f"{n} · {label}", f"({', '.join(said)})" if said else "",
                                   percent(probability) if probability is not None else ""]))
            for n, (label, probability, said) in enumerate(item.choices(task), 1)]


def first_task(tasks: list[str], disputed: Mapping[str, object]) -> str:
    """The task the number keys pick for: the first of `tasks` in dispute (an item's `disputed`, or the tasks a
    ruling left unchosen), else the first (the keys picked for Product type while Colour waited for a choice)."""
    return next((t for t in tasks if t in disputed), tasks[0])


def choice_map(tasks: list[str], item: ReviewItem, names: dict[str, str] | None = None) -> dict:
    """The tasks under review, in order, each one's choices (as the number keys pick them) and shown
    name: what the browser sets the controls from, at once (app.PICK_JS)."""
    return {"tasks": list(tasks), "labels": {t: [label for label, _, _ in item.choices(t)] for t in tasks},
            "names": {t: task_name(t, names=names) for t in tasks}}


def review_rows(item: ReviewItem, view: ItemView, tasks: list[str]) -> list[list]:
    """Per task under review: the saved label, its status and who saved it, the model's label
    and confidence, and the catalogue's label."""
    rows = []
    for task in tasks:
        p, state = item.predictions[task], view.states.get(task)
        if task in view.hidden:  # another labeler's, in a blind second pass
            rows.append([task_name(task, p), hidden_label(view, task, cell=True), "", "", p.label,
                         percent(p.confidence), item.catalogue.get(task, "")])
            continue
        saved = state.label if state and state.label is not None else ""
        rows.append([task_name(task, p), saved, state.status if state else "pending", _who(state), p.label,
                     percent(p.confidence), item.catalogue.get(task, "")])
    return rows


def hidden_label(view: ItemView, task: str, cell: bool = False) -> str:
    """What a blind second pass says of a task's saved label, another labeler's ('' when it is shown); `cell`: in
    the item's table, shorter (the hint's words took six lines a row on a phone)."""
    if task not in view.hidden:
        return ""
    if cell:
        return f"yours: {view.own[task]}; a later one hidden" if task in view.own else "hidden until you decide"
    return (f"yours: {view.own[task]}; another labeler saved since: hidden (a blind second pass)" if task in view.own
            else HIDDEN_LABEL)


def slot_info(prediction_label: str | None, confidence: float | None, catalogue: str | None,
              state: TaskState | None, hidden: str = "") -> str:
    """The line under a task's control: the model's label, the catalogue's, and the saved one (`hidden`: what
    stands in for it in a blind second pass, `hidden_label`)."""
    parts = []
    if prediction_label is not None:
        parts.append(f"model: {prediction_label}" + (f" ({percent(confidence)})" if confidence is not None else ""))
    parts.append(f"catalogue: {catalogue}" if catalogue else "catalogue: —")
    if hidden:
        parts.append(hidden)
    elif state is not None and state.label is not None:
        parts.append(f"saved: {state.label} ({state.status}, {_who(state)})")
    elif state is not None:
        parts.append(f"{state.status} again ({_who(state)})" if state.status == "pending"
                     else f"{state.status} ({_who(state)})")
    else:
        parts.append("not saved yet")
    return info_text(" · ".join(parts))


def cleared_id_line(cleared: str) -> str:
    """The item line once a new photo or an edited text made the item on screen another: the id it cleared."""
    line = "New item: predict it to see its labels."
    return line if not cleared else (f"{line} The item id {code(cleared)} was cleared, as a new photo or an edited "
                                     "text is another item: if this is still that item, type its id again first.")


def typed_id_line(typed: str) -> str:
    """The item line while the labeler types an item id, before Predict: the id a save will go to (the line
    still named the id a new photo had cleared, and asked for it to be typed again: QA s41)."""
    typed = typed.strip()
    return (f"Item {code(typed)} (the catalogue id given): predict it to see its saved and catalogue labels."
            if typed else cleared_id_line(""))


def item_line(view: ItemView, explicit: bool) -> str:
    """The Predict tab's line naming the item a save goes to, and where its labels stand."""
    origin = "the catalogue id given" if explicit else "a content id (image + text): no catalogue id given"
    # the model's tasks only: another model's labels of the item are no control here ("10 tasks saved" of 6: QA, s40)
    saved = {t: s for t, s in view.states.items() if s.label is not None and t in view.values}
    unsaved = ("the catalogue's label (empty where its cell is blank)" if view.catalogue
               else "the model's label")
    where = (f"{plural(len(saved), 'task')} saved before; each control starts at its saved label, else at {unsaved}"
             if saved else f"nothing saved yet; each control starts at {unsaved}")
    held_out = {"val": "a **val** item: the next training run validates on its labels, never trains on them",
                "test": "a **test** item: its labels never reach training (test keeps the catalogue's)"}
    splits = {**held_out, "train": "a **train** item: its labels feed the next training run"}
    note = f" · {splits[view.split]}" if view.split in splits else ""
    if explicit and not saved and not view.catalogue and view.split is None and view.catalogue_read:
        note += (" · **no catalogue item has this id, and nothing is saved under it**: check it for a typo (a save "
                 "makes it a new item)")
    if view.photo_of and view.item_id not in (owners := [item for item, _ in view.photo_of]):
        item, split = view.photo_of[0]
        kind = f" (a **{split}** item)" if split in held_out else ""
        note += (f" · **this is the photo of catalogue item {code(item)}**{kind}: type its id in Item id to label "
                 "that item, with its saved and catalogue labels beside (training counts a save of the photo as "
                 "that item's anyway)" if not explicit else
                 f" · **this is the photo of catalogue item {code(item)}**{kind}, not of {code(view.item_id)}: check "
                 f"the id (a save stores this photo with {code(view.item_id)}'s labels"
                 + ("" if split in held_out else  # a held-out item's labels never train (QA s42: said both)
                    f", and training counts it as {' and '.join(code(owner) for owner in owners)}'s too") + ")")
    return f"Item {code(view.item_id)} ({origin}) · {where}{note}."


def _who(state: TaskState | None) -> str:
    """Who set the task's label, human or auto-accept, and when; for a task without a label
    (an undo took it back), who undid it."""
    if state is None:
        return ""
    when = state.created_at[5:16].replace("T", " ")  # month, day and minute: the cell stays two lines high
    if state.label is None and state.status == "pending":
        return f"undone by {state.annotator or 'someone'}, {when}"
    # a skip keeps the label standing: its author, and who skipped (a reviewer passing over a dispute)
    skipped_by = state.status == "skipped" and state.skipped_by and state.skipped_by != state.annotator
    skipper = f", skipped by {state.skipped_by}" if skipped_by else ""
    return f"{state.annotator or 'someone'}, {source_word(state.source, state.adjudicated)}, {when}{skipper}"


# ---------------------------------------------------------------------- outcomes
VERSUS_MODEL = {"accepted": "the model's", "corrected": "not the model's"}  # a save's statuses, as its line says them


def save_message(outcome: SaveOutcome, names: dict[str, str] | None = None) -> str:
    """The line after a save or a skip: what was stored, for which item, or why nothing was
    (tasks by the names people read, `names`: task -> name)."""
    if outcome.result == "duplicate":
        return (f"Already saved (save #{outcome.save_id}): this request was stored before, so nothing new was "
                f"written" + (f" for item {code(outcome.item_id)}." if outcome.item_id else "."))
    left = "your pick there was not stored" if outcome.kind == "label" else "it is not skipped"
    ended = "".join(f" {task_name(t, names=names)}'s disagreement ended meanwhile (its annotators' labels no longer "
                    f"differ; it stands at {code(label) if label else 'no label'}): {left}."
                    for t, label in outcome.ended.items())
    if outcome.result == "conflict":
        return conflict_message(outcome.conflicts, names, outcome.kind, outcome.annotator) + (
            f"\n\n{ended.strip()}" if ended else "")
    if outcome.result == "unknown":
        return unknown_message(outcome.unknown, names)
    if outcome.result == "unchosen":
        return (f"Nothing was saved: choose a label for {who_said(outcome.unchosen, names)}: a ruling is your "
                "choice, and the choices list the annotators' labels first. Skip leaves the disagreement open.")
    if outcome.result == "settled":
        return (f"Item {code(outcome.item_id)}'s disagreement ended meanwhile: its annotators' labels no longer "
                "differ (one came round, or withdrew theirs). Nothing to settle, nothing saved, moved on.")
    if outcome.result == "unchanged" and outcome.annotator:
        return (f"Item {code(outcome.item_id)} was settled by {code(outcome.annotator)} with these labels "
                "meanwhile: nothing new saved, moved on.")
    if outcome.result == "unchanged" and outcome.own_before:
        return (f"Item {code(outcome.item_id)}: these are your labels, saved before (another labeler's since stay "
                "hidden in this blind pass): nothing new saved, moved on.")
    if outcome.result == "unchanged":
        return (f"Item {code(outcome.item_id)} already stands at your labels: nothing new saved"
                f"{', moved on' if outcome.moved_on else ''} (undo reverts your save).")
    if outcome.result == "kept":
        return f"Kept their labels on item {code(outcome.item_id)}; nothing of yours was left to save."
    by = f" by {code(outcome.annotator)}" if outcome.annotator else ""
    if outcome.kind == "skip":
        tasks = ", ".join(task_name(t, names=names) for t in outcome.statuses)
        return f"Skipped item {code(outcome.item_id)}{by} (save #{outcome.save_id}): {tasks}.{ended}"
    # a status is against the model: a catalogue's label confirmed read "(corrected)" beside no change (QA s41)
    labels = ", ".join(f"{task_name(t, names=names)} = {code(v)} ({VERSUS_MODEL.get(outcome.statuses.get(t), '')})"
                       for t, v in outcome.labels.items())
    new = f" New class confirmed: {', '.join(code(v) for v in outcome.new_classes.values())}." \
        if outcome.new_classes else ""
    differ = [f"{task_name(t, names=names)} (the catalogue says {code(outcome.catalogue[t])})"
              for t, v in outcome.labels.items() if not same_class(v, outcome.catalogue.get(t, v))]
    differ_note = f" Not the catalogue's label: {', '.join(differ)}." if differ else ""
    pending = (f" No label given for {', '.join(task_name(t, names=names) for t in outcome.unlabelled)}: the item "
               "stays pending for it, and comes round again." if outcome.unlabelled else "")
    against = "".join(f" This goes against {code(r.annotator)}'s ruling on {task_name(t, names=names)} "
                      f"({code(r.label)}): the disagreement is open again until a reviewer settles it, and training "
                      "leaves the label out meanwhile." for t, r in outcome.against.items())
    kept = (f" Left as decided since (Keep theirs; yours not saved): "
            f"{', '.join(task_name(t, names=names) for t in outcome.kept_theirs)}." if outcome.kept_theirs else "")
    disputed = (f" Another labeler's label differs: {who_said(outcome.disputed, names)}. A reviewer settles it "
                "(Review, Disagreements); training leaves the task's label out until then."
                if outcome.disputed else "")
    if outcome.ruling:
        return (f"Ruling #{outcome.save_id}{by} on item {code(outcome.item_id)}: {labels}. It settles the "
                f"disagreement: the export takes it as the label (source: adjudication).{new}{differ_note}{pending}"
                f"{ended}")
    return (f"Saved correction #{outcome.save_id}{by} for item {code(outcome.item_id)}: {labels}.{kept}{new}"
            f"{differ_note}{pending}{against}{disputed}")


def shown_again(left: str | None, queue: ReviewQueue) -> str:
    """Why the item the labeler just left (`left`: a skip that kept it open, as in a disagreements queue,
    or Next) is on screen again: no other item of the queue is free to review."""
    if left and queue.current is not None and queue.current.item_id == left:
        return "It stays open, and no other item of the queue is free to review, so it shows again."
    return ""


CONFLICT_TEXT = {  # action -> (what was refused, since when, the choice)
    "label": ("Not saved: someone else saved", "since you opened it",
              "Choose **Keep theirs** (their label stands; your labels for the other tasks are then saved) or "
              "**Overwrite with mine**."),
    "skip": ("Not skipped: someone else decided", "since you opened it",
             "Choose **Keep theirs** (move on, their decision stands) or **Overwrite with mine** (skip anyway)."),
    "undo": ("Not undone: someone else decided", "after you",
             "Undo would drop their decision: **Keep theirs** leaves it and undoes the rest of your save, "
             "**Overwrite with mine** undoes anyway."),
}


def standing(c: Conflict) -> str:
    """The decision standing in a conflict: its label, status and who made it."""
    auto = "'s bulk accept (the model's label, no person's)" if c.source == "auto" else ""
    return (f"{code(c.theirs) if c.theirs else '(none)'}{f', {c.status}' if c.status else ''}"
            f" by {code(c.annotator or 'someone')}{auto}")


def conflict_message(conflicts: list[Conflict], names: dict[str, str] | None = None, action: str = "label",
                     annotator: str = "") -> str:
    """Both labels of each conflicting task, who made theirs (a label, a skip) and when, and
    the choice, for a refused `action` (label, skip or undo). Decisions all by `annotator`, the
    one refused, were made in another tab or window: said so, not "someone else"."""
    refused, since, choice = CONFLICT_TEXT[action]
    theirs = "theirs"
    if annotator and all(c.annotator == annotator for c in conflicts):
        refused, since, theirs = refused.replace("someone else", "you"), f"in another tab or window {since}", "saved"
        choice = (choice.replace("their label stands", "the label you saved there stands")  # not someone else's
                  .replace("their decision", "the decision you made there"))
    what = "this item" if len({c.item_id for c in conflicts}) == 1 else "these items"
    lines = [f"**{refused} {what} {since}.**"]
    for c in conflicts:
        yours = {"skip": "yours: skip", "undo": f"undo restores {code(c.yours) if c.yours else '(none: pending)'}"
                 }.get(action, f"yours {code(c.yours) if c.yours else '(none)'}")
        lines.append(f"- {task_name(c.task, names=names)} of {code(c.item_id)}: {yours} · {theirs} {standing(c)}"
                     f" at {plain(c.created_at[:19].replace('T', ' '))}")
    lines.append("\n" + choice)
    return "\n".join(lines)


def unknown_message(unknown: list[UnknownClass], names: dict[str, str] | None = None) -> str:
    """Each label outside its task's classes, the close classes it may be a typo of, and the choice."""
    lines = ["**Not saved: not a known class.**"]
    for u in unknown:
        if u.same_as:
            lines.append(f"- {task_name(u.task, names=names)}: {code(u.value)} is the class {code(u.same_as)} "
                         "written otherwise (case, spaces, '-' or '_'): it cannot be a class of its own.")
            continue
        hint = (f" Did you mean {' or '.join(code(s) for s in u.suggestions)}?" if u.suggestions
                else " No class is close to it.")
        lines.append(f"- {task_name(u.task, names=names)}: {code(u.value)} is not one of its classes.{hint}")
    fix = "**Use the suggestion** to correct it" if any(u.suggestions for u in unknown) else "Correct it"
    variants = [f"{task_name(u.task, names=names)} as {code(u.same_as)}" for u in unknown if u.same_as]
    if len(variants) == len(unknown):
        new = ""
    elif variants:  # the new classes confirmed, each class written otherwise saved as the class it spells
        new = f", or **Save as new class** if it really is a new class ({', '.join(variants)})"
    else:
        new = ", or **Save as new class** if it really is a new class"
    lines.append(f"\n{fix}{new}.")
    return "\n".join(lines)


def who_said(disputes: dict[str, dict[str, str]], names: dict[str, str] | None = None) -> str:
    """Who said what on each task of a dispute: "Colour (ana `Red`, ben `Blue`)"."""
    return "; ".join(f"{task_name(t, names=names)} ({', '.join(f'{a} {code(v)}' for a, v in by.items())})"
                     for t, by in disputes.items())


def undo_message(outcome: UndoOutcome, names: dict[str, str] | None = None) -> str:
    if outcome.conflicts:
        return conflict_message(outcome.conflicts, names, "undo")
    if outcome.batch:
        return bulk_undo_message(outcome, names)
    taken = dict(outcome.tasks)
    taken.update({c.task: (None if c.status == "skipped" else c.theirs, c.yours)  # what stood, not your older label
                  for c in outcome.dropped})
    changes = ", ".join(f"{task_name(t, names=names)}: {code(undone) if undone else '(skip)'} → "
                        f"{code(restored) if restored else '(none: pending)'}"
                        for t, (undone, restored) in taken.items() if undone is None or undone != restored)
    same = ", ".join(f"{task_name(t, names=names)} {code(undone)}" for t, (undone, restored) in taken.items()
                     if undone is not None and undone == restored)  # saved as it stood: "Men → Men" said nothing
    if same:
        changes = f"{changes}; as before, unchanged: {same}" if changes else f"{same}, as before (unchanged)"
    where = " (not in this queue)" if outcome.queue_open and not outcome.in_queue else ""
    kept = ", ".join(task_name(t, names=names) for t in outcome.kept)
    if not outcome.tasks:
        return (f"Nothing reverted on item {code(outcome.item_id)}{where}: someone else decided {kept} after you, "
                "and their decisions stand; your label is withdrawn (it no longer counts in the agreement). Undo "
                "goes on from your decision before it.")
    kept = f" Kept as someone else decided since, your label withdrawn: {kept}." if kept else ""
    dropped = "".join(f" Dropped {task_name(c.task, names=names)} {standing(c)}." for c in outcome.dropped)
    reopened = (f" Your ruling is withdrawn: the disagreement is open again on {who_said(outcome.reopened, names)}."
                if outcome.reopened else "")
    return f"Undone on item {code(outcome.item_id)}{where}: {changes}.{kept}{dropped}{reopened}"


def bulk_undo_message(outcome: UndoOutcome, names: dict[str, str] | None = None) -> str:
    """An undone bulk accept: how many of its labels went back to pending, on which tasks, and the items
    someone decided since, left as they stand."""
    undone = [u for u in outcome.batch if u.tasks]
    tasks = ", ".join(task_name(t, names=names) for t in dict.fromkeys(t for u in outcome.batch
                                                                       for t in (*u.tasks, *u.kept)))
    line = (f"Undid your bulk accept ({tasks}): {plural(sum(len(u.tasks) for u in undone), 'auto-accepted label')} "
            f"on {plural(len(undone), 'item')} back to pending.")
    if kept := [u for u in outcome.batch if u.kept]:
        line += (f" Left as someone else decided since: {plural(len(kept), 'item')} ("
                 + ", ".join(code(u.item_id) for u in kept[:5]) + (", ..." if len(kept) > 5 else "") + ").")
    return line + " Undo goes on from your decision before it."


def bulk_message(outcome: BulkOutcome, names: dict[str, str] | None = None) -> str:
    """What a bulk accept did, its tasks by the names people read (`names`: task -> name)."""
    tasks = ", ".join(task_name(t, names=names) for t in outcome.tasks)
    at = f" at {outcome.bar}" if outcome.bar else ""  # the bar said: a typed "0" and Enter picked the thresholds
    parts = [f"Bulk accept ({tasks}){at}: {plural(outcome.selected, 'item')} of the queue "
             f"{'clears' if outcome.selected == 1 else 'clear'} the bar",
             f"{outcome.stored} auto-accepted now"]
    line = (", ".join(parts + _left_alone(outcome)) + f" (stored in {plural(outcome.chunks, 'transaction')})."
            + _under_catalogue(outcome))
    if outcome.took_open:
        line += f" It took the item you had open, {code(outcome.took_open)}: " + (
            "the queue moved on." if outcome.moved_on else "its other tasks wait for you there.")
    if outcome.conflicts:
        line += " Left out, labelled otherwise since: " + "; ".join(
            f"{code(c.item_id)} {task_name(c.task, names=names)} = {code(c.theirs)} by {code(c.annotator or 'someone')}"
            for c in outcome.conflicts[:5])
    return line


def bulk_preview_message(outcome: BulkOutcome, count: int, names: dict[str, str] | None = None) -> str:
    """What a bulk accept with these filters would do now, before it is pressed (`count`: the items it takes)."""
    tasks = ", ".join(task_name(t, names=names) for t in outcome.tasks)
    at = f" at {outcome.bar}" if outcome.bar else ""
    return ", ".join([f"Bulk accept ({tasks}){at} would auto-accept the model's labels of "
                      f"**{plural(count, 'item')}** now "
                      f"({outcome.selected} of the queue {'clears' if outcome.selected == 1 else 'clear'} the bar)",
                      *_left_alone(outcome)]) + "." + _under_catalogue(outcome) + " Undo takes it back whole."


def _under_catalogue(outcome: BulkOutcome) -> str:
    """The labels a bulk accept takes that training leaves under their item's catalogue label (QA s41: said
    only by `train --extra-labels`)."""
    if not outcome.under_catalogue:
        return ""
    return (f" {plural(outcome.under_catalogue, 'label')} of these differ from their item's catalogue label: "
            "training keeps the catalogue's there.")


def _left_alone(outcome: BulkOutcome) -> list[str]:
    """The items a bulk accept that clear its bar leaves alone, and why."""
    parts = []
    if outcome.already_there:
        parts.append(f"{outcome.already_there} stored by an earlier run of this bulk accept")
    if outcome.decided:
        parts.append(f"{outcome.decided} already decided, left as they are")
    if outcome.withheld:
        parts.append(f"{outcome.withheld} without a text or with a blank photo left to review (the thresholds hold "
                     "for items with both)")
    if outcome.claimed:
        parts.append(f"{len(outcome.claimed)} left to the labelers who have them open ("
                     + ", ".join(f"{code(item)} by {code(who)}" for item, who in list(outcome.claimed.items())[:5])
                     + ")")
    return parts


# ---------------------------------------------------------------------- audit, item history, agreement
def _versus(other: str | None, changed: bool | None) -> str:
    """"same", "differs: X" (X the label compared with), or nothing to compare with."""
    if changed is None:
        return ""
    return "same" if not changed else f"differs: {other}"


def audit_rows(rows: list[dict], names: dict[str, str] | None = None) -> list[list]:
    """Rows for the audit table (`Studio.audit`): when, which item and task, the label, its
    status and the kind of save, who and whether a human or an auto-accept, what changed against
    the model's prediction and the catalogue's label, the checkpoint and the version (the text is
    searched, not shown)."""
    return [[r["created_at"][:23].replace("T", " "), r["item_id"], task_name(r["task"], names=names), r["label"] or "",
             r["status"], r["kind"], r["annotator"] or "", source_word(r["source"], r.get("adjudicated")),
             _versus(r["predicted_label"], r["changed_vs_model"]),
             _versus(r["catalogue_label"], r["changed_vs_catalogue"]), r["checkpoint"] or "", r["version"]]
            for r in rows]


def source_word(source: str, adjudicated: bool | None) -> str:
    """Who made a decision: an auto-accept, a human, or a human settling a disagreement (adjudication)."""
    return "auto-accept" if source == "auto" else "adjudication" if adjudicated else "human"


def audit_summary(total: int, page: int, page_size: int) -> str:
    if not total:
        return "No decision matches."
    first = (page - 1) * page_size + 1
    pages = (total - 1) // page_size + 1
    return f"Decisions {first}-{min(total, first + page_size - 1)} of {total} (page {page} of {pages}), newest first."


def item_history_rows(rows: list[dict], names: dict[str, str] | None = None) -> list[list]:
    """Rows for one item's history (`Studio.item_history`), oldest first. An undo's label is the one it
    restored, said so: "Melange" alone read as the undoer's own label (QA, session 33)."""
    return [[r["created_at"][:23].replace("T", " "), task_name(r["task"], names=names), r["kind"], _label_of(r),
             r["status"],
             r["annotator"] or "", source_word(r["source"], r.get("adjudicated")), _reverts(r),
             _versus(r["predicted_label"], r["changed_vs_model"]),
             _versus(r["catalogue_label"], r["changed_vs_catalogue"]), r["checkpoint"] or "", r["version"] or ""]
            for r in rows]


def _label_of(row: dict) -> str:
    if row["kind"] != "undo" or row["status"] == "kept theirs":
        return row["label"] or ""
    return f"{row['label']} (restored)" if row["label"] else "none (restored)"


def _reverts(row: dict) -> str:
    """An undo row's reverted version, and the decisions it dropped (someone else's, made since); a
    "keep theirs" row, that the task was left as decided since; a label's row, the label of someone
    else's it overwrote (its save did not start from it: an Overwrite with mine, an unchecked API save)."""
    if row["status"] == "kept theirs":
        return f"left as decided since; {row['annotator'] or 'the undoer'}'s label withdrawn"
    if row["reverts"] is None:
        replaced = row.get("replaced")
        return f"overwrote {replaced['by'] or 'someone'}'s {replaced['label']} ({replaced['version']})" \
            if replaced else ""
    if not (dropped := row.get("dropped")):
        return f"undoes {row['reverts']}"
    return f"undoes {row['reverts']}; dropped " + ", ".join(
        f"{d['by'] or 'someone'}'s {'skip' if d['status'] == 'skipped' else d['label'] or d['status']} ({d['version']})"
        for d in dropped)


def agreement_rows(agreement: dict[str, dict], names: dict[str, str] | None = None) -> list[list]:
    """Per task: the items two annotators or more labelled, raw agreement, Cohen's kappa, who, how
    many of those items still wait for a reviewer (the Review tab's Disagreements source), the
    annotator pairs the kappa is over, of those sharing an item, and the labels left out as reviews."""
    def number(value):
        return "" if value is None else round(value, 3)

    return [[task_name(task, names=names), a["items"], percent(a["raw"]) if a["raw"] is not None else "",
             number(a["kappa"]),
             ", ".join(a["annotators"]), a["open_disagreements"],
             f"{a['kappa_pairs']} of {plural(a['pairs'], 'annotator pair')}" if a["pairs"] else "", a["reviews"]]
            for task, a in agreement.items()]


# ---------------------------------------------------------------------- robustness
def probe_summary(result: Probe) -> dict:
    """Both predictions and the noisy text, as JSON."""
    return {"clean": result.clean.to_dict(), "noisy": result.noisy.to_dict(), "noisy_text": result.noisy_text}


def probe_rows(result: Probe) -> list[list]:
    """Per task: task, "clean label · confidence", "noisy label · confidence" (and "(changed)" when it
    differs), the change in the confidence in the clean label (percentage points: as the item sweep
    plots it, so a flipped label shows how far its probability fell), and the image modality weight
    clean → noisy."""
    rows = []
    for task, clean in result.clean.tasks.items():
        noisy = result.noisy.tasks[task]
        change = round(100 * (result.clean_label_kept[task] - clean.confidence))
        rows.append([task_name(task, clean), f"{clean.label} · {percent(clean.confidence)}",
                     f"{noisy.label} · {percent(noisy.confidence)}" + (" (changed)" if noisy.label != clean.label
                                                                       else ""),
                     f"{change:+d} pts".replace("-", "−"),
                     f"{percent(clean.image_weight)} → {percent(noisy.image_weight)}"])
    return rows


def probe_maps(result: Probe, task: str | None, opacity: float = DEFAULT_OPACITY
               ) -> tuple[Image.Image | None, Image.Image | None, str]:
    """The task's relevance on the clean and on the noisy item, on one colour scale (a flatter map
    looks paler), and how far it moved: the share of the map's mass that changed place (total
    variation distance between the two patch maps)."""
    clean, noisy = result.clean.relevance.get(task or ""), result.noisy.relevance.get(task or "")
    if clean is None or noisy is None:
        return None, None, ""
    moved = 0.5 * float(np.abs(clean.image - noisy.image).sum())
    grid = result.clean.grid_size
    top_clean, top_noisy = (divmod(int(np.argmax(m.image)), grid) for m in (clean, noisy))
    where_clean, where_noisy = (f"row {row + 1}, column {column + 1}" for row, column in (top_clean, top_noisy))
    top = (f"stayed at {where_clean}" if top_clean == top_noisy else f"went from {where_clean} to {where_noisy}")
    name = plain(task_name(task, result.clean.tasks.get(task)))
    text = (f"**{name}**: {moved:.0%} of the image relevance moved under the noise (total variation "
            f"between the clean and noisy maps); the most relevant patch {top}. Relevance on the image: "
            f"{clean.image_share:.0%} clean, {noisy.image_share:.0%} noisy.")
    text += "".join(f"  \n{plain(note)}" for note in result.notes)  # what the text noise could not reach
    peak = max(float(clean.image_fine.max()), float(noisy.image_fine.max()))
    return (image_map(result.clean, task, opacity=opacity, peak=peak),
            image_map(result.noisy, task, opacity=opacity, peak=peak), text)


def probe_shift_figure(result: Probe) -> Figure:
    """Each task's image-side weight (the image's, and the colour's for a model that reads it: H&M's,
    not fashion's), clean against noisy."""
    clean, noisy = ({task_name(t, p): p.image_weight for t, p in pred.tasks.items()}
                    for pred in (result.clean, result.noisy))
    reads_colour = any("colour" in p.modality_weights for p in result.clean.tasks.values())
    return modality_shift_chart(clean, noisy, "image-side weight (image + colour)" if reads_colour else "image weight")
