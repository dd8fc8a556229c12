"""CMA-CLIP Studio: predict product attributes from an image and its text, see why, and correct them.

    python app.py            # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or PORT override)

UI only: one builder per tab lays out its components and wires its events to a
`cma_clip.studio.Studio` (the actions) and `cma_clip.studio.views` (how results are shown),
both tested without a browser. `serve()` launches the app: `python app.py`, the tests and
the benchmark all go through it.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from cma_clip import hub  # noqa: E402
from cma_clip.checkpoint import CheckpointError  # noqa: E402
from cma_clip.noise import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS  # noqa: E402
from cma_clip.predict import Prediction  # noqa: E402
from cma_clip.studio import (MAX_SWEEP_ITEMS, MAX_TASKS, MAX_TEXT_CHARS, ReviewQueue, Studio,  # noqa: E402
                             StudioError, open_user_image, views)
from cma_clip.viz import catalogue_sweep_figure, item_sweep_figure  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MAX_UPLOAD = "20mb"
SHORTCUTS = """
<script>
document.addEventListener("keydown", (event) => {
  const tag = (event.target.tagName || "").toLowerCase();
  if (["input", "textarea", "select"].includes(tag) || event.target.isContentEditable) return;
  const target = {a: "review-accept", n: "review-skip"}[event.key.toLowerCase()];
  if (target) { document.querySelector(`#${target}`)?.click(); event.preventDefault(); }
});
</script>
"""


def undecoded(image: gr.Image) -> gr.Image:
    """Make an image input hand the event the uploaded file's path, undecoded.

    gr.Image opens and converts every upload before the event runs: an unreadable file then
    fails with Gradio's bare "Error", a large image is decoded before the studio's pixel
    limit is checked, alpha turns black and 16-bit images clip. The studio decodes it
    instead (`cma_clip.data.load_image`: size limit first, then EXIF, modes, alpha) and
    words every failure. Gradio still checks, before this, that the path is one of its
    uploads. (Set on the instance: Gradio writes a .pyi stub beside any component subclass.)"""
    def preprocess(payload):
        if payload is None or payload.path is None:
            return gr.Image.preprocess(image, payload)
        return payload.path

    image.preprocess = preprocess
    return image


@contextmanager
def keep_uploads_in(studio: Studio) -> Iterator[Path]:
    """While the app runs, make Gradio write uploads (and the files it serves) under the
    app's data folder, in folders named by content hash, instead of the system's temp
    folder. Enter before build(); the previous setting comes back on exit, so apps built
    one after another in one process (tests, benchmarks) each keep their own folder."""
    folder = (studio.data_dir / "uploads").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def user_errors(fn: Callable) -> Callable:
    """Show StudioError as a message in the UI instead of a stack trace."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def examples(models: list[str]) -> list[list[str]]:
    """Example items committed under assets/ (assets/examples.csv), for the models at hand."""
    import csv

    path = os.path.join(ASSETS, "examples.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [[os.path.join(ASSETS, r["image"]), r["text"], r["model"], r["item_id"]]
                for r in csv.DictReader(handle) if r["model"] in models]


def correction_slots(elem_id: str | None = None) -> list[gr.Dropdown]:
    """One label dropdown per task, hidden until a model's tasks fill them (`slot_updates`)."""
    return [gr.Dropdown([], label=f"task {i + 1}", allow_custom_value=True, visible=False,
                        elem_id=f"{elem_id}-{i}" if elem_id else None) for i in range(MAX_TASKS)]


def slot_updates(studio: Studio, slots: list[gr.Dropdown], model: str, prediction: Prediction | None) -> dict:
    """One dropdown per task, pre-filled with the prediction; unused slots hidden."""
    classes = list(studio.task_classes(model).items())
    updates = {}
    for i, slot in enumerate(slots):
        if i < len(classes):
            task, labels = classes[i]
            value = prediction.tasks[task].label if prediction else None
            updates[slot] = gr.update(label=task, choices=labels, value=value, visible=True)
        else:
            updates[slot] = gr.update(visible=False, value=None)
    return updates


@dataclass
class Shared:
    """What more than one tab uses: the fields above the tabs, and the history table."""

    model: gr.Dropdown
    annotator: gr.Textbox
    item_id: gr.Textbox
    history: gr.Dataframe  # laid out in the History tab; a save in the Predict tab refreshes it
    history_rows: Callable[[], list[list[str]]]  # the table's rows: the latest corrections, newest first


# ---------------------------------------------------------------------- tabs
def predict_tab(studio: Studio, shared: Shared) -> tuple[gr.Image, gr.Textbox]:
    """Predict, explain and correct one item; returns its image and text inputs (the Robustness tab's too)."""
    with gr.Tab("Predict & correct"):
        prediction_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = undecoded(gr.Image(type="filepath", label="Product image", height=300, elem_id="input-image"))
                text = gr.Textbox(label="Product text", lines=3, max_length=MAX_TEXT_CHARS, elem_id="input-text",
                                  placeholder="e.g. Turtle Check Men Navy Blue Shirt")
                predict_button = gr.Button("Predict", variant="primary", elem_id="predict")
                gr.Examples(examples(studio.model_names), inputs=[image, text, shared.model, shared.item_id],
                            label="Catalogue examples")
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=views.PREDICTION_HEADERS, interactive=False, wrap=True,
                                     label="Predictions (top-1, confidence, auto-accept)", elem_id="predictions")
                with gr.Row():
                    task = gr.Dropdown([], label="Task to explain")
                    token = gr.Dropdown([], label="Text token (default: most relevant for the task)")
                with gr.Row():
                    heat = gr.Image(label="Attention of the token over image patches", height=280, interactive=False,
                                    elem_id="heatmap")
                    weights_plot = gr.Plot(label="Modality-wise attention per task")
                shading = gr.HighlightedText(label="Text tokens: attention of the image [CLS]",
                                             combine_adjacent=False, show_legend=False)
                relevance = gr.HighlightedText(label="Text tokens: relevance for the selected task "
                                               "(gradient x input)", combine_adjacent=False, show_legend=False)
                result_json = gr.JSON(label="Raw prediction", visible=False)
        gr.Markdown("### Correct and save\nEach dropdown starts at the prediction; pick another label or type a "
                    "new one, then save.")
        with gr.Row():
            slots = correction_slots(elem_id="slot")
        save_button = gr.Button("Save correction", variant="primary", elem_id="save")
        save_status = gr.Markdown(elem_id="save-status")

    @user_errors
    def predict(image_path, text_value, model_name):
        """Predict every task for an image and its text. Returns the prediction as JSON first."""
        result = studio.predict(image_path, text_value, model_name)
        first = next(iter(result.tasks))
        choices, best = views.token_choices(result, first)
        return {result_json: result.to_dict(), table: views.prediction_rows(result),
                task: gr.update(choices=list(result.tasks), value=first), token: gr.update(choices=choices, value=best),
                heat: views.heatmap(result, best), weights_plot: views.modality_figure(result),
                shading: views.text_shading(result), relevance: views.text_shading(result, first),
                prediction_state: result, **slot_updates(studio, slots, model_name, result)}

    def explain_task(result, task_name):
        if result is None or task_name not in result.tasks:
            return gr.skip()
        choices, best = views.token_choices(result, task_name)
        return {token: gr.update(choices=choices, value=best), heat: views.heatmap(result, best),
                relevance: views.text_shading(result, task_name)}

    @user_errors
    def save_correction(image_path, text_value, model_name, annotator_name, item, *labels):
        """Save the labels (one per task of the model, in order) as a correction in the label store."""
        tasks = list(studio.task_classes(model_name))
        row = studio.save_correction(image_path, text_value, model_name, annotator_name, item,
                                     dict(zip(tasks, labels)))
        return {save_status: f"Saved correction #{row}.", shared.history: shared.history_rows()}

    predict_button.click(predict, [image, text, shared.model],
                         [result_json, table, task, token, heat, weights_plot, shading, relevance, prediction_state,
                          *slots], api_name="predict")
    task.input(explain_task, [prediction_state, task], [token, heat, relevance], api_visibility="private")
    token.input(lambda result, index: views.heatmap(result, index) if result else None, [prediction_state, token],
                heat, api_visibility="private")
    save_button.click(save_correction, [image, text, shared.model, shared.annotator, shared.item_id, *slots],
                      [save_status, shared.history], api_name="save_correction")
    shared.model.change(user_errors(lambda m: slot_updates(studio, slots, m, None)), shared.model, slots,
                        api_visibility="private")
    return image, text


@dataclass
class ReviewPanel:
    """The Review tab's view of its queue: what `show_queue` fills."""

    queue: gr.State
    progress: gr.Markdown
    image: gr.Image
    text: gr.Textbox
    table: gr.Dataframe
    slots: list[gr.Dropdown]
    notes: gr.Markdown

    @property
    def outputs(self) -> list:
        return [self.queue, self.progress, self.image, self.text, self.table, *self.slots, self.notes]


def show_queue(studio: Studio, panel: ReviewPanel, queue: ReviewQueue | None) -> dict:
    """The panel's updates for the queue's current item (an empty panel when none is left)."""
    item = queue.current if queue else None
    if item is None:
        return {panel.queue: queue, panel.progress: views.review_status(queue), panel.image: None, panel.text: "",
                panel.table: [], **dict.fromkeys(panel.slots, gr.update(visible=False)), panel.notes: ""}
    predicted = Prediction(item.predictions)
    return {panel.queue: queue, panel.progress: views.review_status(queue),
            panel.image: open_user_image(item.image_path), panel.text: item.text,
            panel.table: views.prediction_rows(predicted), **slot_updates(studio, panel.slots, queue.model, predicted),
            panel.notes: views.review_notes(queue)}


def review_tab(studio: Studio, shared: Shared) -> None:
    """A queue of catalogue or uploaded items, least confident first, to accept, correct or skip."""
    with gr.Tab("Review queue"):
        gr.Markdown("Items sorted by uncertainty, least confident first (an item's confidence is its lowest "
                    "top-1 probability over the tasks). Shortcuts: **a** accept/save and next, **n** skip.")
        with gr.Row():
            with gr.Column():
                split = gr.Dropdown(["test", "val", "train"], value="test", label="Split of the model's catalogue")
                size = gr.Number(value=50, precision=0, minimum=1, maximum=2000, label="Sample size",
                                 elem_id="review-size")
                load_split = gr.Button("Load catalogue split", elem_id="review-load")
            with gr.Column():
                manifest = gr.File(label="...or upload a manifest (CSV/JSONL)", file_types=[".csv", ".jsonl"],
                                   elem_id="review-manifest")
                images = gr.File(label="...and its images", file_count="multiple", file_types=["image"],
                                 elem_id="review-images")
                load_upload = gr.Button("Load uploaded catalogue", elem_id="review-load-upload")
        progress = gr.Markdown(elem_id="review-progress")
        with gr.Row():
            image = gr.Image(label="Item", height=280, interactive=False)
            with gr.Column():
                text = gr.Textbox(label="Text", interactive=False, lines=3)
                table = gr.Dataframe(headers=views.PREDICTION_HEADERS, interactive=False, wrap=True)
        with gr.Row():
            slots = correction_slots()
        with gr.Row():
            accept = gr.Button("Accept / save and next (a)", variant="primary", elem_id="review-accept")
            skip = gr.Button("Skip (n)", elem_id="review-skip")
            bulk = gr.Button("Bulk accept every item above all thresholds")
        notes = gr.Markdown(elem_id="review-notes")
        panel = ReviewPanel(gr.State(None), progress, image, text, table, slots, notes)

    def loaded(queue: ReviewQueue | None) -> ReviewQueue:
        if queue is None:
            raise StudioError("Load a catalogue to review first.")
        return queue

    @user_errors
    def load_catalogue(model_name, split_name, sample_size, progress=gr.Progress()):
        return show_queue(studio, panel, studio.review_catalogue(model_name, split_name, sample_size, progress))

    @user_errors
    def load_uploaded(model_name, manifest_file, image_files, progress=gr.Progress()):
        return show_queue(studio, panel, studio.review_upload(model_name, manifest_file, image_files, progress))

    @user_errors
    def accept_item(queue, annotator_name, *labels):
        tasks = list(studio.task_classes(loaded(queue).model))
        return show_queue(studio, panel, studio.review_save(queue, annotator_name, dict(zip(tasks, labels))))

    @user_errors
    def skip_item(queue):
        return show_queue(studio, panel, studio.review_skip(queue) if queue else None)

    @user_errors
    def bulk_accept(queue, annotator_name, progress=gr.Progress()):
        count = studio.bulk_accept(loaded(queue), annotator_name, progress)
        return {**show_queue(studio, panel, queue), notes: f"Bulk-accepted {count} items."}

    load_split.click(load_catalogue, [shared.model, split, size], panel.outputs, api_name="review_catalogue")
    load_upload.click(load_uploaded, [shared.model, manifest, images], panel.outputs, api_name="review_upload")
    accept.click(accept_item, [panel.queue, shared.annotator, *slots], panel.outputs, api_name="review_accept")
    skip.click(skip_item, panel.queue, panel.outputs, api_name="review_skip")
    bulk.click(bulk_accept, [panel.queue, shared.annotator], panel.outputs, api_name="bulk_accept")


def robustness_tab(studio: Studio, shared: Shared, image: gr.Image, text: gr.Textbox) -> None:
    """The Predict tab's item, corrupted: clean against noisy, sweeps over severities, a catalogue sweep."""
    with gr.Tab("Robustness"):
        gr.Markdown("Corrupt the current image and text (from *Predict & correct*) and compare. Severity 0 is "
                    "clean; the same seed gives the same corruption.")
        with gr.Row():
            image_noise = gr.Dropdown(["none", *IMAGE_CORRUPTIONS], value="occlusion", label="Image corruption")
            image_severity = gr.Slider(0, 5, value=3, step=1, label="Image severity")
            text_noise = gr.Dropdown(["none", *TEXT_CORRUPTIONS], value="word_mask", label="Text corruption")
            text_severity = gr.Slider(0, 5, value=3, step=1, label="Text severity")
            seed = gr.Number(value=0, precision=0, label="Seed")
        with gr.Row():
            probe_button = gr.Button("Probe clean vs noisy", variant="primary", elem_id="probe")
            sweep_button = gr.Button("Sweep all severities for this item")
        probe_json = gr.JSON(visible=False)
        probe_table = gr.Dataframe(headers=views.PROBE_HEADERS, interactive=False, wrap=True, elem_id="probe-table",
                                   label="Clean vs noisy: prediction, confidence and image weight per task")
        with gr.Row():
            clean_heat = gr.Image(label="Clean: image [CLS] attention", height=240, interactive=False)
            noisy_heat = gr.Image(label="Noisy: image [CLS] attention", height=240, interactive=False,
                                  elem_id="noisy-heatmap")
            shift_plot = gr.Plot(label="Image modality weight, clean vs noisy")
        noisy_text = gr.Textbox(label="Noisy text", interactive=False)
        item_sweep_plot = gr.Plot(label="Confidence in the clean prediction against severity")
        gr.Markdown("### Batch sweep on the model's catalogue (`test` split)")
        with gr.Row():
            sweep_size = gr.Number(value=40, precision=0, minimum=1, maximum=MAX_SWEEP_ITEMS, label="Items")
            batch_sweep_button = gr.Button("Run batch sweep")
        batch_plot = gr.Plot(label="Mean accuracy against severity")
        batch_csv = gr.File(label="The numbers (CSV)")

    @user_errors
    def probe(image_path, text_value, model_name, i_noise, i_severity, t_noise, t_severity, seed_value):
        """Predict on the clean and the corrupted item; returns both predictions as JSON first."""
        result = studio.probe(image_path, text_value, model_name, i_noise, i_severity, t_noise, t_severity,
                              seed_value)
        return {probe_json: views.probe_summary(result), probe_table: views.probe_rows(result),
                clean_heat: views.heatmap(result.clean, None), noisy_heat: views.heatmap(result.noisy, None),
                shift_plot: views.probe_shift_figure(result), noisy_text: result.noisy_text}

    @user_errors
    def sweep_item(image_path, text_value, model_name, i_noise, t_noise, seed_value):
        return item_sweep_figure(studio.item_sweep(image_path, text_value, model_name, i_noise, t_noise, seed_value))

    @user_errors
    def sweep_catalogue(model_name, items, i_noise, t_noise, seed_value, progress=gr.Progress()):
        rows, path = studio.catalogue_sweep(model_name, items, i_noise, t_noise, seed_value, progress)
        return {batch_plot: catalogue_sweep_figure(rows), batch_csv: str(path)}

    probe_button.click(probe, [image, text, shared.model, image_noise, image_severity, text_noise, text_severity, seed],
                       [probe_json, probe_table, clean_heat, noisy_heat, shift_plot, noisy_text], api_name="probe")
    sweep_button.click(sweep_item, [image, text, shared.model, image_noise, text_noise, seed], item_sweep_plot,
                       api_name="sweep_item")
    batch_sweep_button.click(sweep_catalogue, [shared.model, sweep_size, image_noise, text_noise, seed],
                             [batch_plot, batch_csv], api_name="sweep_catalogue")


def history_tab(studio: Studio, shared: Shared) -> None:
    """The latest corrections, export for the trainer, and an optional push to the Hub."""
    with gr.Tab("History & export"):
        refresh = gr.Button("Refresh")
        shared.history.render()
        with gr.Row():
            export_format = gr.Radio(["CSV", "JSONL"], value="CSV", label="Format (the trainer's manifest format)")
            export_button = gr.Button("Export labels")
        export_file = gr.File(label="Exported labels")
        with gr.Row():
            push_button = gr.Button("Push labels to the Hugging Face Hub (optional)")
            push_status = gr.Markdown()
        gr.Markdown("Train with the corrections: `python -m cma_clip.train --catalogue NAME --extra-labels "
                    f"{studio.store.path} --out checkpoints/NEW`")

    @user_errors
    def export_labels(fmt):
        """Export the current labels as a CSV or JSONL manifest the trainer reads."""
        return str(studio.export(fmt))

    def push_labels():
        """Push the label store to $CMA_CLIP_HUB_DATASET with $HF_TOKEN; off unless both are set."""
        try:
            return f"Pushed to {hub.push_label_store(studio.store.path, studio.export('jsonl'))}"
        except (hub.HubError, StudioError) as exc:
            return f"Not pushed: {exc}"

    refresh.click(shared.history_rows, None, shared.history, api_name="history")
    export_button.click(export_labels, export_format, export_file, api_name="export_labels")
    push_button.click(push_labels, None, push_status, api_visibility="private")


def tasks_api(studio: Studio) -> None:
    """The /tasks endpoint (no component: the API only). Call it after the tabs, which it would split."""
    def tasks(model_name: str) -> dict:
        """The model's tasks and their known labels, in the order /save_correction takes them."""
        if model_name not in studio.checkpoints:
            return {}
        try:
            return {"tasks": studio.task_classes(model_name)}
        except StudioError as exc:
            raise gr.Error(str(exc)) from None

    gr.api(tasks, api_name="tasks")


def build(studio: Studio) -> gr.Blocks:
    """The app: a header, the fields every tab shares, then the tabs."""
    models = studio.model_names

    def history_rows() -> list[list[str]]:  # named: the history table's load event is the API's /history_rows
        return views.history_rows(studio.history())

    with gr.Blocks(title="CMA-CLIP Studio") as demo:
        gr.Markdown("# CMA-CLIP Studio\nMulti-task product attribute prediction with cross-modality attention "
                    "([CMA-CLIP, Liu et al. 2021](https://arxiv.org/abs/2112.03562)). Upload a product photo and its "
                    "text, see every attribute with its confidence and what the model looked at, and correct it.")
        with gr.Row():
            shared = Shared(
                model=gr.Dropdown(models, value=models[0] if models else None, label="Model", scale=2),
                annotator=gr.Textbox(label="Annotator", placeholder="your name (needed to save)", scale=2,
                                     elem_id="annotator"),
                item_id=gr.Textbox(label="Item id (optional)", placeholder="catalogue id, if any", scale=1),
                history=gr.Dataframe(headers=views.HISTORY_HEADERS, value=history_rows, interactive=False,
                                     wrap=True, elem_id="history", render=False),
                history_rows=history_rows)
        image, text = predict_tab(studio, shared)
        review_tab(studio, shared)
        robustness_tab(studio, shared, image, text)
        history_tab(studio, shared)
        tasks_api(studio)
    return demo


# ---------------------------------------------------------------------- launch
@dataclass
class Served:
    """An app `serve(block=False)` started: its URL, and `close()` to stop it and give back GRADIO_TEMP_DIR."""

    demo: gr.Blocks
    url: str
    _uploads: ExitStack = field(repr=False)

    def close(self) -> None:
        self.demo.close()
        self._uploads.close()


def default_studio() -> Studio:
    """The studio `python app.py` serves: the local checkpoints, plus $CMA_CLIP_HUB_CHECKPOINT's when set."""
    studio = Studio()
    hub_checkpoint = hub.checkpoint_from_env()
    if hub_checkpoint:
        try:
            studio.add_checkpoint(*hub_checkpoint)
        except CheckpointError as exc:
            print(f"[cma-clip] {exc}; continuing with the local checkpoints")
    return studio


def free_port(host: str) -> int:
    """A port nothing listens on now, chosen by the system."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve(studio: Studio | None = None, *, host: str | None = None, port: int | None = None,
          block: bool = True) -> Served:
    """Build and launch the app, uploads kept under the studio's data folder (`keep_uploads_in`).

    `studio` defaults to `default_studio()`; `host` to $GRADIO_SERVER_NAME, else 0.0.0.0 on a
    Hugging Face Space and 127.0.0.1 elsewhere; `port` to $GRADIO_SERVER_PORT, $PORT or 7860
    when blocking, to a free port otherwise. `block=True` serves until interrupted;
    `block=False` returns at once with the running app (tests, benchmarks)."""
    studio = default_studio() if studio is None else studio
    host = host or os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    if port is None:
        port = int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", 7860))) if block else free_port(host)
    uploads = ExitStack()
    uploads.enter_context(keep_uploads_in(studio))
    try:
        demo = build(studio)
        demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, head=SHORTCUTS,
                                                       max_file_size=MAX_UPLOAD, prevent_thread_lock=not block,
                                                       quiet=not block)
    except BaseException:
        uploads.close()
        raise
    if block:  # launch() returned: the server has stopped
        uploads.close()
    return Served(demo, demo.local_url, uploads)


if __name__ == "__main__":
    serve()
