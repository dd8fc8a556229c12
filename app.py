"""CMA-CLIP Studio: predict product attributes from an image and its text, see why, and correct them.

    python app.py            # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or PORT override)

UI only: one builder per tab lays out its components and wires its events to a
`cma_clip.studio.Studio` (the actions) and `cma_clip.studio.views` (how results are shown),
both tested without a browser. `serve()` launches the app: `python app.py`, the tests and
the benchmark all go through it.
"""
from __future__ import annotations

import functools
import html
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from cma_clip.runtime import SettingError, server_port  # noqa: E402

try:  # before Gradio, whose import reads GRADIO_SERVER_PORT as a number: a bad or empty one was its traceback
    server_port()
except SettingError as exc:
    raise SystemExit(f"error: {exc}") from None
if not os.environ.get("GRADIO_SERVER_PORT", "unset").strip():
    del os.environ["GRADIO_SERVER_PORT"]  # set empty (docker -e GRADIO_SERVER_PORT=): unset, as every setting here

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from gradio.components.plot import PlotData  # noqa: E402
from gradio.context import LocalContext  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from cma_clip import hub  # noqa: E402
from cma_clip.checkpoint import CheckpointError  # noqa: E402
from cma_clip.data import atomic_write, default_data_root  # noqa: E402
from cma_clip.errors import CMAClipError  # noqa: E402
from cma_clip.noise import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS  # noqa: E402
from cma_clip.predict import Prediction  # noqa: E402
from cma_clip.labels import AUDIT_SOURCES, MAX_NAME_CHARS, STATUSES  # noqa: E402
from cma_clip.review import STRATEGIES  # noqa: E402
from cma_clip.studio import (ALL_TASKS, CHOICES_KEPT, MAX_QUEUE_ITEMS, MAX_SWEEP_ITEMS, MAX_TASKS,  # noqa: E402
                             MAX_TEXT_CHARS, THRESHOLDS, ItemView, ReviewItem, ReviewQueue, SaveOutcome, Shown, Studio,
                             SPLITS, StudioError, UndoOutcome, new_id, open_user_image, text_is_cut, views)
from cma_clip.studio.accounts import Login, login_from_env  # noqa: E402
from cma_clip.studio.service import AUDIT_PAGE, MAX_BATCH, MAX_SEED, SweepStopped  # noqa: E402
from cma_clip.studio.uploads import upload_hours, upload_storage_bytes  # noqa: E402
from cma_clip.viz import catalogue_sweep_figure, item_sweep_figure, png_data_url  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# any one uploaded file (Gradio refuses a larger one with 413): a zip of a few thousand product photos
# fits (Label Studio's default is alike); an upload may hold several, up to uploads.MAX_UPLOAD_BYTES
MAX_UPLOAD = "250mb"
# Keys outside text fields click the Review tab's buttons (when shown): 1-9 the active task's
# choices, t the next task, a accept, s or n skip, u undo, p previous (views.KEYS_HELP).
SHORTCUTS = """
<script>
document.addEventListener("keydown", (event) => {
  // a held key decides once: its auto-repeat (about 30 a second) accepted or undid item after item unseen
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const field = event.target, tag = (field.tagName || "").toLowerCase();
  const typing = tag === "textarea" || tag === "select" || field.isContentEditable ||
    (tag === "input" && !["radio", "checkbox", "button", "submit"].includes((field.type || "").toLowerCase()));
  if (typing) return;
  const key = event.key.toLowerCase();
  const target = /^[1-9]$/.test(key) ? `review-choice-${key}` :
    {a: "review-accept", s: "review-skip", n: "review-next", u: "review-undo", p: "review-previous",
     t: "review-next-task"}[key];
  const button = target && document.getElementById(target);
  // a digit's button may still be hidden for the task before (its pick checks the active task's choices)
  const shown = (element) => element && element.offsetParent !== null;
  const reviewing = shown(document.getElementById("review-accept"));
  if (button && !button.disabled && (shown(button) || (/^[1-9]$/.test(key) && reviewing))) {
    button.click(); event.preventDefault();
  }
});
// A second click on a choice button soon after the first (a thumb's double tap, a double click) is dropped: the
// first pick moved the buttons on to the next task, so the second picked that task's label, unseen (QA phone
// labeler, s38). A number key's click (not a person's: isTrusted false) is never dropped: "3 1" picks two tasks.
// Two quick taps on two buttons are two picks (one task each).
let choiceClicked = {at: -Infinity, id: ""};
document.addEventListener("click", (event) => {
  const button = event.isTrusted && event.target.closest?.("[id^=review-choice-]");
  if (!button) return;
  if (button.id === choiceClicked.id && event.timeStamp - choiceClicked.at < 600) {
    event.stopImmediatePropagation(); event.preventDefault(); return;
  }
  choiceClicked = {at: event.timeStamp, id: button.id};
}, true);
// Gradio's Textbox says "input" (which clears the Predict tab's item id: another text, another item) on a key press:
// a paste, a cut, a drop or Backspace changed the text unsaid, and a pasted text was saved under the last item's id.
// The item id box too: its line names the id a paste put there.
document.addEventListener("input", (event) => {
  const box = event.target;
  if (!box.closest?.("#input-text, #item-id") || ["insertText", "insertLineBreak"].includes(event.inputType)) return;
  setTimeout(() => box.dispatchEvent(new KeyboardEvent("keypress", {bubbles: true})));
}, true);
// The lines that say what a click did (saved, undone, refused, the next item) are live regions, so a screen reader
// reads them out when they change (Gradio's Markdown has no role; only its error toasts were announced), and the
// item under review has a name (its photo's alt text was empty), as has each group of radio buttons (Gradio's
// fieldset holds its label in a span, not a legend, so "Active task" was never read out).
const LIVE = ["review-status", "review-progress", "save-status", "bulk-status", "robustness-status"];
new MutationObserver(() => {
  for (const id of LIVE) {
    const line = document.getElementById(id);
    if (line && !line.hasAttribute("aria-live")) {
      line.setAttribute("role", "status");
      line.setAttribute("aria-live", "polite");
    }
  }
  for (const info of document.querySelectorAll("fieldset > [data-testid=block-info]")) {
    const group = info.parentElement;
    if (!group.hasAttribute("aria-label")) group.setAttribute("aria-label", info.textContent.trim());
    if (!group.hasAttribute("role") && group.querySelector("input[type=radio]")) {
      group.setAttribute("role", "radiogroup");
    }
  }
  // a dropdown's open list of options scrolls, so Chromium put it in the Tab order: Tab from a long list's box
  // went into the list, which closed under it, and the focus fell to the page's body (QA keyboard user, s37)
  for (const list of document.querySelectorAll("ul.option-list:not([tabindex])")) list.tabIndex = -1;
  // a name, not a sentence: a phone's keyboard wrote "Rita" for the laptop's "rita" (the store matches them, but
  // the reviewers' list and the History filter are typed too), and autocorrect changed unknown names
  const name = document.querySelector("#annotator :is(textarea, input):not([autocapitalize])");
  if (name) {
    name.setAttribute("autocapitalize", "none"); name.setAttribute("autocorrect", "off"); name.spellcheck = false;
  }
  const photo = document.querySelector("#review-image img:not([alt^='Photo'])");
  if (photo) photo.alt = "Photo of the item under review";
  // a picture that is a button (the image map: a click shows it whole) is named by its block's label, and an
  // example's photo by its text: both were read out as a nameless "button" and an empty grid cell
  for (const picture of document.querySelectorAll("button img[alt='']")) {
    const label = picture.closest(".block")?.querySelector("[data-testid=block-label]")?.textContent.trim();
    if (label) picture.alt = label;
  }
  for (const picture of document.querySelectorAll("#predict-examples td img")) {  // its text may come after it
    const text = picture.closest("td").nextElementSibling?.textContent.trim();
    const name = text ? `Photo of the example: ${text}` : "Photo of the example";
    if (picture.alt !== name) picture.alt = name;
  }
}).observe(document.documentElement, {childList: true, subtree: true});
// A request refused as unauthenticated (a logout in another tab, a restart with new accounts) failed
// without a word: a banner says so, and that nothing was done.
const gradioFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await gradioFetch(...args);
  const url = String(args[0] && args[0].url || args[0]);
  if (response.status === 401 && url.includes("/gradio_api/") && !document.getElementById("signed-out")) {
    const banner = document.createElement("div");
    banner.id = "signed-out"; banner.setAttribute("role", "alert");
    banner.innerHTML = "You are signed out (a logout in another tab, or the server restarted): this page's " +
      "last action did nothing. <a href='/'>Sign in again</a> (your queue resumes where you left off).";
    document.body.prepend(banner);
  }
  return response;
};
</script>
"""
# Gradio's files (uploads, outputs): every hour, those older than a day go (and all of them when the
# server stops); a review upload's images are kept apart, in the studio's own folder (`studio.uploads`).
CACHE_RETENTION = (3600, 86400)
# Before a save: an empty Annotator box (at the top of the page) is scrolled into view, where its message shows,
# and takes the focus, so the name can be typed at once (a keyboard labeler's focus was left on the page's body).
# The audit's Page box as a page: 0, a fraction or nothing is read as the nearest page from 1 (as a page past the
# end shows the last); Gradio refused them before the search ran, with an error badge over the table (QA, s39).
AUDIT_PAGE_JS = """(...args) => {
  const page = Math.round(Number(args[args.length - 1]));
  args[args.length - 1] = page >= 1 ? page : 1;
  return args;
}"""
SCROLL_TO_ANNOTATOR = """(...args) => {
  const box = document.querySelector('#annotator textarea, #annotator input');
  if (box && !box.value.trim()) { box.scrollIntoView({block: 'center'}); box.focus({preventScroll: true}); }
  return args;
}"""
# A review decision or move (Accept, Skip, Undo, Previous, Next, a conflict's choices): on a narrow screen (a
# phone) the item sits far above these buttons, so the next item is brought into view; a refusal (the item stays)
# brings its message into view, on any screen. The item on screen before is read off the progress line.
REVIEW_ITEM = "document.getElementById('review-progress')?.innerText.match(/item (\\S+) \\(/)?.[1]"
REVIEW_BEFORE = f"""(...args) => {{
  window.reviewItemBefore = {REVIEW_ITEM};
  return ({SCROLL_TO_ANNOTATOR})(...args);
}}"""
REVIEW_AFTER = f"""() => {{
  const name = document.querySelector('#annotator textarea, #annotator input');
  if (name && !name.value.trim()) return;  // the Annotator box is in view, with its message
  const tab = document.getElementById('review-tab');
  if ({REVIEW_ITEM} === window.reviewItemBefore) {{  // the message, and the buttons under it that answer it
    tab?.classList.remove('moved-on');
    const answers = [...document.querySelectorAll('#review-keep-theirs, #review-overwrite, #review-use-suggestion, ' +
      '#review-new-class')].filter((button) => button.offsetParent !== null);
    answers.at(-1)?.scrollIntoView({{block: 'nearest'}});
    document.getElementById('review-status')?.scrollIntoView({{block: 'nearest'}});
  }} else if (window.innerWidth < 768) {{
    tab?.classList.add('moved-on');
    document.getElementById('review-progress')?.scrollIntoView({{block: 'start'}});
  }}
}}"""
# A queue opened (or resumed): the focus goes to its progress line, which a screen reader reads out and from where
# Tab goes on to the item's controls (the button pressed folds away with the source panel: the focus fell back to
# the page's body, and the next Tab started again from the top of the page).
FOCUS_QUEUE = """() => {
  const line = document.getElementById('review-progress');
  if (line) { line.tabIndex = -1; line.focus(); }
}"""
# After an example's click, on a narrow screen (results stacked above the examples), its prediction comes into view.
SCROLL_TO_RESULTS = """(...args) => {
  if (window.innerWidth < 768) document.getElementById('predict-results')?.scrollIntoView({block: 'start'});
  return args;
}"""
# Gradio's default theme, but bold text in the fonts' bold: the wheel's SemiBold (600) files hold only a few
# letters ("A", "B" and a space), so the other letters of a semibold title came from another font.
THEME = gr.themes.Default(
    font=(gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)), "ui-sans-serif", "system-ui", "sans-serif"),
    font_mono=(gr.themes.LocalFont("IBM Plex Mono", weights=(400, 700)), "ui-monospace", "monospace"))
# A pick (a number key or button) and the next task (t) change the controls in the browser at once, from the
# item's choices (`views.choice_map`): a round trip to the server let a quick "2 a" save the label before the
# pick, and a quick "t t 3" pick on the task before.
# A key beyond the active task's choices says so (it did nothing, silently).
PICK_JS = """(map, active, ...slots) => {
  const number = %d, tasks = (map && map.tasks) || [], at = tasks.indexOf(active);
  const labels = at < 0 ? [] : (map.labels[active] || []);
  if (number > labels.length) {
    const name = (map && map.names && map.names[active]) || active, n = labels.length;
    if (!map) return [active, ...slots, "No item is on screen: the number keys pick the labels of one."];
    return [active, ...slots, at < 0 ? "Choose the active task first: the number keys pick its choices." :
      `Key ${number} picks nothing: ${name} has ${n} choice${n === 1 ? "" : "s"} here (keys 1-${n}). ` +
      `Any other label: type it in ${name}'s box.`];
  }
  slots[at] = labels[number - 1];
  return [tasks[(at + 1) %% tasks.length], ...slots, ""];
}"""
NEXT_TASK_JS = """(map, active) => {
  const tasks = (map && map.tasks) || [];
  return tasks.length ? tasks[(tasks.indexOf(active) + 1) % tasks.length] : active;
}"""
BROWSER_KEY = "cma-clip-studio"  # localStorage keys of what a reload restores: annotator, model, queue, tab
TABS = {"predict": "Predict", "review": "Review", "robustness": "Robustness", "history": "History"}  # id: label
# Layout that fits a 1366 x 768 laptop and a 412 px phone: tables scroll inside their own box, headers
# break between words only, and on a narrow screen the Predict tab shows its results before the examples.
CSS = """
#signed-out { position: fixed; top: 0; left: 0; right: 0; z-index: 1000; padding: 12px 16px;
  background: #b91c1c; color: white; font-weight: 700; text-align: center; }
#signed-out a { color: white; text-decoration: underline; }
.table-wrap th, .table-wrap th * { word-break: normal !important; overflow-wrap: normal !important;
  hyphens: none !important; }
.table-wrap td, .table-wrap td *, .body-cell, .body-cell * { word-break: normal !important; }
/* tables in the page's font, not monospace: more of their columns fit a phone */
.table-wrap th, .table-wrap td, .table-wrap th *, .table-wrap td *, .virtual-row, .virtual-row * {
  font-family: var(--font) !important; }
#predict-examples td:last-child { white-space: nowrap; }
.rtl .textfield { direction: rtl; }  /* a right-to-left text's words from the right (views.word_direction) */
/* a dropdown's value stops short of its arrow, cut with "…" (on a phone the arrow covered its last letters) */
.secondary-wrap:has(> .icon-wrap) input { padding-right: calc(2 * var(--size-5)) !important;
  text-overflow: ellipsis; }
/* a word as long as the text box allows breaks inside the notes, not past the page's edge */
#input-note, #input-note *, #map-note, #map-note * { overflow-wrap: anywhere !important; }
/* A refused review action (a wrong upload after a right one, a save without a name) leaves the open queue as
   it was, and its message in the toast: Gradio's "Error" badge over each of the queue's outputs would hide it. */
#review-tab [data-testid="status-tracker"]:has(> .error), #robustness-tab [data-testid="status-tracker"]:has(> .error) {
  display: none !important; }
/* a field's hint (under the correction controls, the item id) readable: 7:1 on white, not Gradio's 1.9:1 */
.gradio-container { --block-info-text-color: #52525b; }
.dark .gradio-container, .gradio-container.dark { --block-info-text-color: #a1a1aa; }
/* A dropdown's list only while focus is in it: Gradio's stayed drawn after a Tab past it, over the fields below. */
.wrap:not(:focus-within) > .options { display: none !important; }
/* the progress line holds the focus when a queue opens (FOCUS_QUEUE): its ring clear of the text */
#review-progress:focus { outline-offset: 4px; border-radius: 4px; }
/* a number key's button beyond the active task's choices (kept in the page, so a quick key can click it) */
.unused-choice { display: none !important; }
/* a small catalogue photo (fashion's are 60 x 80) fills the item's box, as on the Predict tab */
#review-image img { width: 100%; height: 100%; object-fit: contain; }
/* A chart's label sits above it, not over its top (a title, the first bars), at any width. */
.chart > label[data-testid="block-label"] { position: static !important; }
@media (max-width: 767px) {
  /* one column: the inputs, the results, "Correct and save", then the examples (between the results and the
     correction they were 2,000 px of scrolling on a phone, per item: QA phone labeler, session 38) */
  #predict-row, #predict-inputs { display: contents; }
  #predict-row > *, #predict-inputs > * { width: 100%; max-width: 100%; min-width: 0; margin-left: 0;
    margin-right: 0; flex: none; }
  #predict-results { order: 2; }
  #predict-row ~ * { order: 3; }
  #predict-examples { order: 4; }
  /* a sweep's 3 x 2 panels keep readable ticks and legends: the chart scrolls sideways instead of shrinking */
  #item-sweep .matplotlib, #batch-sweep .matplotlib { display: block; overflow-x: auto; }
  #item-sweep .matplotlib img, #batch-sweep .matplotlib img { width: 760px; max-width: none; }
  #item-sweep .matplotlib::before, #batch-sweep .matplotlib::before { content: "Scroll sideways for every panel \\2192";
    display: block; position: sticky; left: 0; font-size: var(--text-sm); color: var(--block-info-text-color); }
  /* a results table wider than the phone says so above it: its auto-accept column (a probe's changes, a review
     item's saved labels) lay past the screen's edge unseen (QA s42) */
  #predictions .table-wrap::before, #probe-table .table-wrap::before, #review-table .table-wrap::before {
    content: "Swipe the table sideways for every column \\2192"; display: block; font-size: var(--text-sm);
    color: var(--block-info-text-color); padding: 0 var(--size-2) var(--size-1); }
  /* After a tap on Accept the next item comes into view, its progress line at the top: what the tap did (a
     ruling's number, say) shows right under it; under the buttons it was below the screen's foot. A refusal
     (the item stays) shows under the buttons, beside the controls and choices that answer it. */
  #review-tab.moved-on #review-progress ~ * { order: 2; }
  #review-tab.moved-on #review-progress, #review-tab.moved-on #review-status { order: 1; }
  /* a dropdown's value read whole: half a phone cut the model's name ("fashion-…"), a word and its share,
     a corruption's name ("word_m…") */
  #model, #annotator, #explain-task, #map-word, #image-noise, #text-noise { min-width: 100% !important; }
  /* a severity slider a row of its own (Text severity shared one with Seed, its box adrift in the middle) */
  #image-severity, #text-severity, #seed { min-width: 100% !important; }
  /* the clean and noisy maps one above the other, at a width their colour bars can be read */
  #probe-maps { flex-wrap: wrap; }
  #probe-maps > * { min-width: 100% !important; }
}
/* a touch screen: no keys to list, and the choice buttons big enough to tap */
@media (hover: none) and (pointer: coarse) {
  #review-keys { display: none; }
  /* targets a thumb hits (44 px, WCAG 2.5.5): the choices looked 26 px tall in 12 px type, a radio was 16 px
     and a tab 32 px (QA phone labeler, session 38) */
  [id^="review-choice-"] { min-height: 44px; font-size: var(--text-md) !important; }
  button[role="tab"] { min-height: 44px; }
  fieldset input[type="radio"], fieldset input[type="checkbox"] { width: 22px; height: 22px; }
  fieldset label:has(> input[type="radio"]) { min-height: 44px; }
}
"""


UNDECODED: set[str] = set()  # the elem_ids of the image inputs `undecoded` made
GRADIO_IMAGE_PREPROCESS = gr.Image.preprocess


def _preprocess_image(self: gr.Image, payload):
    if self.elem_id in UNDECODED and payload is not None and payload.path is not None:
        return payload.path
    return GRADIO_IMAGE_PREPROCESS(self, payload)


def undecoded(image: gr.Image) -> gr.Image:
    """Make an image input hand the event the uploaded file's path, undecoded.

    gr.Image opens and converts every upload before the event runs: an unreadable file then
    fails with Gradio's bare "Error", a large image is decoded before the studio's pixel
    limit is checked, alpha turns black and 16-bit images clip. The studio decodes it
    instead (`cma_clip.data.load_image`: size limit first, then EXIF, modes, alpha) and
    words every failure. Gradio still checks, before this, that the path is one of its
    uploads. Set on the class for the image's elem_id: an event that updates an input's
    properties (an example's click does) gives the session a new instance of its class, which
    an override on the instance did not reach; and Gradio writes a .pyi stub beside any
    component subclass."""
    UNDECODED.add(image.elem_id)
    gr.Image.preprocess = _preprocess_image
    return image


def written_per_call(image: gr.Image) -> gr.Image:
    """Make an image output write each value it shows to a file of its own.

    Gradio saves a PIL image or array as `<content hash>/image.webp` in its cache and writes
    that file again on every call producing the same image: a client still downloading it
    then reads a short file ("Too little data for declared Content-Length"; 2 of 50 concurrent
    /predict calls failed so). A path already inside Gradio's cache folder is served as it
    is, so each value goes to a new file there first (`outputs/<random id>.<format>`), which
    nothing writes again; `delete_cache` ages it out with the app's other files."""
    def postprocess(value):
        if isinstance(value, (PILImage.Image, np.ndarray)):
            folder = Path(image.GRADIO_CACHE) / "outputs"
            folder.mkdir(parents=True, exist_ok=True)
            picture = value if isinstance(value, PILImage.Image) else PILImage.fromarray(np.asarray(value))
            path = folder / f"{new_id()}.{image.format or 'webp'}"
            try:
                picture.save(path)
            except (KeyError, ValueError, OSError):  # a mode the format cannot hold: PNG holds them all
                path.unlink(missing_ok=True)
                path = path.with_suffix(".png")
                picture.save(path)
            value = str(path)
        return gr.Image.postprocess(image, value)

    image.postprocess = postprocess
    return image


def typed_inputs(demo: gr.Blocks) -> None:
    """Refuse, with a message naming the field, an API payload of the wrong type for a number,
    a slider, a text box, a checkbox, a radio or a single-choice dropdown (or outside its
    choices), and a number out of its field's bounds. Gradio compares a number's payload with
    its bounds (`"abc" < 0`: a TypeError, shown as a bare "Error"), words a bound or a choice
    without naming the field, turns any
    payload into text for a text box and hands a list sent to a dropdown that takes typed
    values on to the handler. A field of whole numbers (a number of precision 0, a slider of whole
    steps) refuses a fraction, which Gradio would round without a word; a slider refuses an empty value
    (Gradio's own check fails on it with a bare "Error")."""
    for block in demo.blocks.values():
        if isinstance(block, (gr.Number, gr.Slider)):
            kinds, what = (int, float), "a number"
        elif isinstance(block, gr.Textbox):
            kinds, what = (str,), "text"
        elif isinstance(block, gr.Checkbox):
            kinds, what = (bool,), "true or false"
        elif (isinstance(block, gr.Dropdown) and not block.multiselect) or isinstance(block, gr.Radio):
            kinds, what = (str, int, float), "one value (text or a number)"
        else:
            continue
        block.preprocess = _typed(block, kinds, what)


def _typed(block: gr.components.Component, kinds: tuple[type, ...], what: str) -> Callable:
    original = block.preprocess  # the component's own, or one set on the instance (`signed_in`, `undecoded`)

    def preprocess(payload):
        wrong = (not isinstance(payload, kinds) or (isinstance(payload, bool) and bool not in kinds)
                 or payload != payload)  # NaN
        name = block.label or "This field"
        if payload is not None and wrong:
            raise error(f"{name} takes {what}, not {repr(payload)[:80]}.")
        if payload is not None and kinds[0] is int and _whole(block) and not float(payload).is_integer():
            raise error(f"{name} takes a whole number, not {payload!r}.")
        if payload is None and isinstance(block, gr.Slider):
            raise error(f"{name} takes a number, not None.")
        if payload is not None and kinds[0] is int:  # a number: within the field's bounds
            low, high = block.minimum, block.maximum
            if (low is not None and payload < low) or (high is not None and payload > high):
                bounds = (f"from {_shown(low)} to {_shown(high)}" if low is not None and high is not None
                          else f"at least {_shown(low)}" if low is not None else f"at most {_shown(high)}")
                raise error(f"{name} must be {bounds}, not {payload!r}.")
        try:
            return original(payload)
        except gr.Error as exc:  # Gradio's own refusals quote the payload but name no field
            raise error(f"{name}: {exc.message.removeprefix('Value: ')}") from None

    return preprocess


def _whole(block: gr.components.Component) -> bool:
    """Does the field hold whole numbers only (a number of precision 0, a slider of whole steps from a whole start)?"""
    if isinstance(block, gr.Slider):
        return float(block.step).is_integer() and float(block.minimum).is_integer()
    return getattr(block, "precision", None) == 0


def _shown(number: float) -> str:
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


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


def error(message: str) -> gr.Error:
    """A message for the UI's error toast, which Gradio renders as HTML: escaped, so that a name
    or an id in it shows as text (an `<img>` in it would otherwise be fetched). The user's to fix:
    no traceback in the server's log, where it would hide real faults."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def shown_path(path: Path) -> str:
    """A server path as a visitor reads it: relative to the folder the app runs in, when it is inside it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def chart(picture) -> PlotData:
    """A chart `viz` drew as a picture, for a gr.Plot: shown as a static image, as a matplotlib figure
    is, without a figure to lay out and rasterise on each call."""
    return PlotData(type="matplotlib", plot=png_data_url(picture))


class LatestInputs:
    """Each browser session's latest input (a photo; a photo, text and model) and when it came. A result
    computed for inputs replaced while it ran is not shown: a prediction landing after a new upload had
    cleared the results put the last item's labels beside the new photo, and its map's task was no longer
    among the cleared choices ("Value: gender is not in the list of choices: []"). Cancelling it instead
    (Gradio's `cancels`) also ended, on a busy server, the prediction of the new photo clicked right after
    its upload. An API client's session sends no input events: its results always stand."""

    KEPT = 10_000  # sessions remembered, the oldest forgotten first

    def __init__(self) -> None:
        self._latest: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _session() -> str | None:
        return getattr(LocalContext.request.get(None), "session_hash", None)

    def note(self, value: object) -> None:
        if (session := self._session()) is not None:
            with self._lock:
                self._latest[session] = (str(value), time.monotonic())
                self._latest.move_to_end(session)
                while len(self._latest) > self.KEPT:
                    self._latest.popitem(last=False)

    def superseded(self, value: object, started: float | None = None) -> bool:
        """Whether another input came in this session since a result for `value` began (at `started`); without
        `started`, whether the session's latest input is another (a result queued behind others began late:
        an input noted while it waited came before its start)."""
        with self._lock:
            latest, at = self._latest.get(self._session() or "", (None, float("-inf")))
        return latest is not None and latest != str(value) and (started is None or at > started)


def event_ended() -> bool:
    """Whether Gradio has ended the event the calling handler runs for (a client's `job.cancel()`):
    it cancels the event's task, not a function running in a worker thread, which went on for
    minutes. Gradio offers no public test; its queue drops the event from its bookkeeping
    (read defensively: False when it cannot be read)."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    return isinstance(events, dict) and event_id is not None and event_id not in events


def user_errors(fn: Callable) -> Callable:
    """Show a CMAClipError (the service's StudioError, or one of the library's it let through: a
    label store locked by another process, say) as a message in the UI instead of a stack trace
    (and, with a login on, give the event the signed-in user as its annotator: `signed_in`). It
    keeps `fn`'s signature, which Gradio reads to hand a `gr.Progress` parameter its progress bar."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*as_signed_in(args), **kwargs)
        except CMAClipError as exc:
            raise error(str(exc)) from None
    return wrapped


def errors_in(note: gr.Markdown) -> Callable[[Callable], Callable]:
    """`user_errors` for a button whose results lie beside `note`: the message shows there, as a
    warning that stays, and every other output keeps what it showed (a raised error put an "Error"
    badge on each output, and its toast faded, leaving no word of what went wrong). A success clears
    the note. `fn` returns its outputs as a dict; the API twin of the button keeps `user_errors`."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return {note: "", **fn(*as_signed_in(args), **kwargs)}
            except CMAClipError as exc:
                return {note: f"⚠️ {views.plain(exc)}"}
        return wrapped
    return decorate


def shown_with_api(trigger: gr.Button, api_trigger: gr.Button, fn: Callable, note: gr.Markdown, inputs: list,
                   outputs: list, api_name: str, **shown) -> None:
    """`fn` behind `trigger`, a refusal said in `note` while the other outputs keep what they showed
    (`errors_in`), and behind the invisible `api_trigger` as the public `api_name`, a refusal an error for
    API clients (`user_errors`): registered first, so that no private event takes its name. `shown`: the
    on-screen event's other settings (js, validator)."""
    api_trigger.click(user_errors(fn), inputs, outputs, api_name=api_name)
    trigger.click(errors_in(note)(fn), inputs, list(dict.fromkeys([*outputs, note])),
                         api_name=f"{api_name}_shown", api_visibility="private", **shown)


def kept_upload(path: object, uploads: Path) -> str | None:
    """`path` when it names a file still kept in `uploads` (Gradio's upload folder), else None. A
    browser's saved value is the browser's to change: a path anywhere else (the label store) is never served."""
    if not isinstance(path, str) or not path:
        return None
    try:
        found = Path(path).resolve()
        return str(found) if found.is_relative_to(uploads.resolve()) and found.is_file() else None
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a loop of links
        return None


def readable(value: object) -> str:
    """A browser's saved text as text the page can be sent: "" for anything else (a number, a lone surrogate)."""
    if not isinstance(value, str):
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return value


def image_problem(image_path: str | None) -> str:
    """Why the image cannot be predicted ('' when it can): none given, gone, or `open_user_image`'s
    refusal (unreadable, too large). Decoded here as well as in the prediction, so that a validator
    can show the refusal on the image field."""
    if not image_path:
        return "Upload a product image (JPEG, PNG, WebP, GIF or BMP) first."
    try:
        open_user_image(image_path).close()
    except StudioError as exc:
        return str(exc)
    return ""


class SignedIn:
    """What the annotator box hands an event when a login is on, whatever the client sent:
    `as_signed_in` puts the signed-in user's name in its place."""


SIGNED_IN = SignedIn()


def signed_in(annotator: gr.Textbox) -> gr.Textbox:
    """The annotator box of an app with a login: not editable, and its value ignored by the
    server (a client may send any name): every event gets the signed-in user instead."""
    annotator.preprocess = lambda payload: SIGNED_IN
    return annotator


def as_signed_in(args: tuple) -> tuple:
    """`args` with the signed-in user's name for each SIGNED_IN (refused when nobody is signed in)."""
    if not any(a is SIGNED_IN for a in args):
        return args
    user = current_user()
    if not user:
        raise error("Sign in to save labels: the annotator is the signed-in user.")
    return tuple(user if a is SIGNED_IN else a for a in args)


def current_user() -> str | None:
    """The user signed in for the event being run: Gradio's login (`auth`), else the Hugging
    Face account of the OAuth session (a Space with `hf_oauth: true`); None when neither."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    if request is None:
        return None
    if request.username:
        return str(request.username)
    try:
        info = request.session.get("oauth_info") or {}
    except (AssertionError, AttributeError):  # no session middleware: OAuth is off
        return None
    return (info.get("userinfo") or {}).get("preferred_username")


def examples(models: list[str]) -> list[list[str]]:
    """Example items committed under assets/ (assets/examples.csv), for the models at hand."""
    import csv

    path = os.path.join(ASSETS, "examples.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [[os.path.join(ASSETS, r["image"]), r["text"], r["model"], r["item_id"]]
                for r in csv.DictReader(handle) if r["model"] in models]


def operating_figures(studio: Studio, model: str | None) -> str:
    """What auto-accept did on the model's held-out items, per task (issue 14's operating figures)."""
    return views.operating_figures(studio.held_out_metrics(model), studio.display_names(model)) if model else ""


def correction_slots(elem_id: str | None = None) -> list[gr.Dropdown]:
    """One label dropdown per task, hidden until a model's tasks fill them (`slot_updates`)."""
    return [gr.Dropdown([], label=f"task {i + 1}", allow_custom_value=True, visible=False,
                        elem_id=f"{elem_id}-{i}" if elem_id else None) for i in range(MAX_TASKS)]


def slot_updates(studio: Studio, slots: list[gr.Dropdown], model: str, prediction: Prediction | None,
                 view: ItemView | None = None, catalogue: dict[str, str] | None = None,
                 tasks: list[str] | None = None) -> dict:
    """One dropdown per task (the model's, or `tasks`), starting where `view` says (`Studio.item_view`), else at
    the prediction, with the model's, the catalogue's and the saved label beside it; unused slots hidden."""
    catalogue = catalogue if catalogue is not None else (view.catalogue if view else {})
    choices, names = view.choices if view and view.choices else studio.label_choices(model), studio.display_names(model)
    tasks = list(choices) if tasks is None else tasks
    updates = {}
    for i, slot in enumerate(slots):
        if i < len(tasks):
            task = tasks[i]
            p = prediction.tasks.get(task) if prediction else None
            state = view.states.get(task) if view else None
            value = view.values.get(task) if view else (p.label if p else None)
            info = views.slot_info(p.label if p else None, p.confidence if p else None,
                                   (catalogue or {}).get(task), state, views.hidden_label(view, task) if view else ""
                                   ) if prediction or view else ""
            updates[slot] = gr.update(label=views.task_name(task, p, names),
                                      choices=views.typing_order(choices[task]),
                                      value=value, visible=True, info=info)
        else:
            updates[slot] = gr.update(visible=False, value=None)
    return updates


def suggested(slots: list[gr.Dropdown], tasks: list[str], waiting: dict | None, names: dict[str, str],
              again: str) -> tuple[dict, str]:
    """The refused save's (`waiting`) unknown labels replaced, in the controls of `tasks`, by their closest
    class, and a line that names them and the labels left without one (`again`: "save", "accept"); refused
    when no label waits, or none has a class close to it (the API's "filled in" was empty)."""
    if not waiting or not waiting.get("unknown"):
        raise StudioError("No label is waiting for a suggestion.")
    unknown = [(t, value, suggestions) for t, value, suggestions, _ in waiting["unknown"] if t in tasks]
    updates = {slots[tasks.index(t)]: gr.update(value=suggestions[0]) for t, _, suggestions in unknown if suggestions}
    if not updates:
        raise StudioError("No class is close to the label you typed: correct it, or save it as a new class.")
    filled = ", ".join(f"{names.get(t, t)} {suggestions[0]}" for t, _, suggestions in unknown if suggestions)
    left = [f"{names.get(t, t)} {value.strip()!r}" for t, value, suggestions in unknown if not suggestions]
    note = (f"; no class is close to {', '.join(left)}: correct it, or {again} again and save it as a new class"
            if left else "")
    return updates, f"Suggestion filled in ({filled}): check it and {again} again{note}."


def labels_in_slots(tasks: list[str], labels: list, whose: str) -> dict:
    """The label slots' values by `tasks`, in order; a label in a slot past them is refused (an API
    client's labels in the wrong slots would be stored under other tasks). `whose`: "hm-articles
    has", "the queue reviews"."""
    if extra := [(i + 1, label) for i, label in enumerate(labels[len(tasks):], len(tasks)) if label]:
        raise StudioError(f"{whose} {len(tasks)} task{'s' * (len(tasks) != 1)} ({', '.join(tasks)}): label slot "
                          f"{extra[0][0]} ({extra[0][1]!r}) has no task: only the first {len(tasks)} slots take "
                          "labels.")
    return dict(zip(tasks, labels))


def resolution(buttons: "Resolution", outcome: SaveOutcome | UndoOutcome | None) -> dict:
    """Which of the conflict / new-class buttons a refused save shows (none otherwise)."""
    conflict = bool(outcome is not None and outcome.conflicts)
    unknown = bool(isinstance(outcome, SaveOutcome) and outcome.unknown)
    suggest = unknown and any(u.suggestions for u in outcome.unknown)
    new_class = unknown and not all(u.same_as for u in outcome.unknown)  # a class written otherwise is none
    return {buttons.keep_theirs: gr.update(visible=conflict), buttons.overwrite: gr.update(visible=conflict),
            buttons.use_suggestion: gr.update(visible=suggest), buttons.new_class: gr.update(visible=new_class)}


@dataclass
class Resolution:
    """The choices a refused save offers: keep theirs or overwrite (a conflict), use the
    suggestion or save as a new class (an unknown label)."""

    keep_theirs: gr.Button
    overwrite: gr.Button
    use_suggestion: gr.Button
    new_class: gr.Button

    @classmethod
    def make(cls, prefix: str) -> "Resolution":
        with gr.Row():
            return cls(gr.Button("Keep theirs", visible=False, elem_id=f"{prefix}-keep-theirs"),
                       gr.Button("Overwrite with mine", variant="stop", visible=False, elem_id=f"{prefix}-overwrite"),
                       gr.Button("Use the suggestion", visible=False, elem_id=f"{prefix}-use-suggestion"),
                       gr.Button("Save as new class", variant="stop", visible=False, elem_id=f"{prefix}-new-class"))

    @property
    def buttons(self) -> list[gr.Button]:
        return [self.keep_theirs, self.overwrite, self.use_suggestion, self.new_class]


def answered(waiting: dict, how: str) -> tuple[dict, dict, bool]:
    """A refused save's labels, confirmed new classes and force, as the labeler's choice `how` answers it:
    keep_theirs leaves out the tasks in conflict, overwrite forces, new_class confirms each new label and
    saves a class written otherwise as the class it spells (the message named it; "Save as new class"
    stored nothing while a variant was in the save beside a new class)."""
    labels, new_classes = dict(waiting["labels"]), dict(waiting["new_classes"])
    if how == "keep_theirs":
        labels = {t: v for t, v in labels.items() if t not in waiting["conflicts"]}
    elif how == "new_class":
        for task, value, _, same_as in waiting["unknown"]:
            if same_as:
                labels[task] = same_as
            else:
                new_classes[task] = value
    return labels, new_classes, how == "overwrite"


def kept_theirs(outcome: SaveOutcome, waiting: dict, how: str) -> SaveOutcome:
    """The save a Keep theirs made, naming the tasks it left as decided since (its message listed only the tasks
    saved: QA s42)."""
    if how == "keep_theirs" and outcome.result == "saved":
        outcome.kept_theirs = [t for t in waiting["conflicts"] if t not in outcome.labels]
    return outcome


def pending_save(outcome: SaveOutcome | UndoOutcome) -> dict | None:
    """What a refused save or undo leaves for the labeler's choice (kept in a gr.State)."""
    if isinstance(outcome, UndoOutcome):
        return ({"kind": "undo", "save_id": outcome.save_id, "request_id": outcome.request_id}
                if outcome.conflicts else None)
    if outcome.result not in ("conflict", "unknown"):
        return None
    return {"kind": outcome.kind, "labels": outcome.labels, "request_id": outcome.request_id,
            "new_classes": outcome.new_classes, "conflicts": [c.task for c in outcome.conflicts],
            "unknown": [[u.task, u.value, u.suggestions, u.same_as] for u in outcome.unknown]}


def shown_of(value: dict | None) -> Shown | None:
    return Shown.from_dict(value)


def decided_on(seen: dict | None, item_on_screen: str | None) -> Shown | None:
    """What a decision was made on: the item the panel showed last (`seen`, kept on the server), or,
    when the labeler's screen still shows another item (an event moved the queue and its answer is
    not on screen yet), that item, which the studio then refuses to decide for the queue's current one."""
    shown = shown_of(seen)
    on_screen = (item_on_screen or "").strip() if isinstance(item_on_screen, str) else ""
    if on_screen and (shown is None or shown.item_id != on_screen):
        return Shown(on_screen, {})
    return shown


@dataclass
class Shared:
    """What more than one tab uses: the fields above the tabs, and the history table."""

    model: gr.Dropdown
    annotator: gr.Textbox
    history: gr.Dataframe  # laid out in the History tab; a save in the Predict tab refreshes it
    history_rows: Callable[[], list[list[str]]]  # the table's rows: the latest corrections, newest first
    remember_queue: gr.BrowserState  # the review queue's id, for a reload to resume it
    remember_inputs: gr.BrowserState  # the Predict tab's photo, text and item id, for a reload to put back


# ---------------------------------------------------------------------- tabs
def predict_tab(studio: Studio, shared: Shared) -> tuple[gr.Image, gr.Textbox, Callable, list, list]:
    """Predict, explain and correct one item. Returns its image and text inputs (the Robustness tab's too),
    `restore(kept, *entered)` (the inputs' updates for a page load, {} when the browser kept none), the
    inputs it reads as `entered` and the components it updates."""
    with gr.Tab(TABS["predict"], id="predict"):
        prediction_state = gr.State(None)
        shown = gr.State(None)  # the item the controls show: its id and the versions of its labels
        pending = gr.State(None)  # a refused save waiting for the labeler's choice
        id_for_upload = gr.State("")  # the item id put back without its photo: the photo's next upload keeps it
        with gr.Row(elem_id="predict-row"):
            with gr.Column(scale=1, min_width=280, elem_id="predict-inputs"):
                # image, text and the button above a laptop's fold (1366 x 768); the item id, rarely typed, below
                image = undecoded(gr.Image(type="filepath", label="Product image", height=260, elem_id="input-image"))
                # one character past the limit: a longer paste keeps it, so the prediction says the text was
                # cut (at the limit itself the box cut a 20,000-character paste without a word)
                text = gr.Textbox(label="Product text", lines=3, max_length=MAX_TEXT_CHARS + 1, elem_id="input-text",
                                  placeholder="e.g. Turtle Check Men Navy Blue Shirt")
                input_note = gr.Markdown("", elem_id="input-note")
                predict_button = gr.Button("Predict", variant="primary", elem_id="predict")
                item_id = gr.Textbox("", label="Item id", elem_id="item-id",
                                     placeholder="the catalogue id; empty: a content id from the image and text",
                                     info="An example sets it; a new upload or an edited text clears it (the "
                                          "upload of a photo a reload could not put back keeps it).")
                with gr.Column(elem_id="predict-examples"):
                    catalogue_examples = gr.Examples(examples(studio.model_names),
                                                     inputs=[image, text, shared.model, item_id],
                                                     label="Catalogue examples (a click predicts it)")
            with gr.Column(scale=2, min_width=300, elem_id="predict-results"):
                table = gr.Dataframe(headers=views.PREDICTION_HEADERS, interactive=False, wrap=True,
                                     column_widths=views.PREDICTION_WIDTHS, elem_id="predictions",
                                     label="Predictions (top-1, confidence, auto-accept at the task's threshold)")
                operating = gr.Markdown(operating_figures(studio, studio.default_model),
                                        elem_id="operating-figures")
                with gr.Row():
                    task = gr.Dropdown([], label="Task to explain", elem_id="explain-task")
                    map_kind = gr.Radio(views.MAP_CHOICES, value="relevance", label="Image map", elem_id="map-kind")
                    token = gr.Dropdown([], label="Word for the attention map (its share of the text relevance)",
                                        elem_id="map-word")
                    opacity = gr.Slider(0.1, 1.0, value=views.DEFAULT_OPACITY, step=0.05, label="Map opacity",
                                        elem_id="map-opacity")
                with gr.Row():  # side by side on a laptop; each too wide for half a phone, so stacked there
                    with gr.Column(min_width=320):
                        # a short label: a long one ran under the image's buttons on a phone (its colour bar
                        # says what a cell holds)
                        heat = written_per_call(gr.Image(label="Map on the photo",
                                                        height=320, interactive=False, elem_id="heatmap",
                                                        format="jpeg"))  # 1 ms to encode; WebP: 20 ms
                    with gr.Column(min_width=320):
                        weights_plot = gr.Plot(label="Modality weights per task", elem_id="modality-chart",
                                               elem_classes=["chart"])
                map_note = gr.Markdown(views.MAP_NOTE, elem_id="map-note")
                relevance = gr.HighlightedText(label="Words: relevance for the selected task (attention rollout; "
                                               "1 = the most relevant word)", combine_adjacent=False,
                                               show_legend=False, elem_id="word-relevance")
                shading = gr.HighlightedText(label="Words: attention of the image [CLS] (raw attention)",
                                             combine_adjacent=False, show_legend=False)
                result_json = gr.JSON(label="Raw prediction", visible=False)
        gr.Markdown("### Correct and save\nEach control starts at the item's saved label, else at the catalogue's "
                    "(an item with its catalogue id), else at the model's; "
                    "the model's, the catalogue's and the saved label show under it. A label outside the task's "
                    "classes (but for the item's own catalogue label) asks before it becomes a new class; a label "
                    "someone else saved since you predicted "
                    "asks before it is replaced. Undo reverts your newest decision, made on any tab.")
        item_line = gr.Markdown(label="item", elem_id="item-line")
        with gr.Row():
            slots = correction_slots(elem_id="slot")
        request_id = gr.Textbox("", visible=False, label="request id", elem_id="save-request-id")
        # the item whose labels the controls show, sent from the browser with a save (a prediction's answer
        # may not be on screen yet when an example's photo, text and id already are)
        labels_for = gr.Textbox("", visible=False, label="labels of item", elem_id="save-labels-for")
        with gr.Row():
            save_button = gr.Button("Save correction", variant="primary", elem_id="save")
            undo_button = gr.Button("Undo my last save", elem_id="save-undo")
        save_status = gr.Markdown(label="save status", elem_id="save-status")
        choice = Resolution.make("save")
        legacy_save = gr.Button(visible=False)  # /save_correction: the unchecked API, kept for scripts
        api_predict = gr.Button(visible=False)  # /predict for API clients (the Predict button validates first)
        api_save = gr.Button(visible=False)  # /save_label for API clients (the Save button validates first)

    def check_inputs(image_path, text_value, model_name, item):
        """Input errors shown on the field at fault (the other outputs stay as they were): a missing or
        unreadable image (an error raised by the prediction would mark every output), an unknown model."""
        problem = image_problem(image_path)
        return [gr.validate(not problem, problem),
                gr.validate(True, ""),
                gr.validate(model_name in studio.checkpoints, f"Unknown model {model_name!r}: choose one of "
                                                              f"{', '.join(studio.model_names) or 'none found'}."),
                gr.validate(True, "")]

    uploads = LatestInputs()

    @user_errors
    def predict(image_path, text_value, model_name, item):
        """Predict every task for an image and its text. Returns the prediction as JSON first."""
        started = time.monotonic()
        result, view = studio.predict_item(image_path, text_value, model_name, item)
        if uploads.superseded(image_path, started):  # nothing: the new photo's cleared results stay
            return {}
        first = next(iter(result.tasks))
        choices, best = views.word_choices(result, first)
        direction = views.word_direction(result)  # an Arabic or Hebrew text's words laid out from the right
        return {result_json: result.to_dict(), table: views.prediction_rows(result),
                input_note: views.input_note(result, text_is_cut(text_value)),
                task: gr.update(choices=[(views.task_name(t, p), t) for t, p in result.tasks.items()], value=first),
                token: gr.update(choices=choices, value=best),
                heat: views.image_map(result, first, "relevance", best),
                weights_plot: chart(views.modality_figure(result)),
                shading: gr.update(value=views.word_attention_shading(result), elem_classes=direction),
                relevance: gr.update(value=views.word_shading(result, first), elem_classes=direction),
                map_kind: "relevance", map_note: views.relevance_summary(result, first),
                prediction_state: result, shown: view.shown.to_dict(), request_id: new_id(), pending: None,
                labels_for: view.item_id,
                item_line: views.item_line(view, bool((item or "").strip())), save_status: "",
                **resolution(choice, None), **slot_updates(studio, slots, model_name, result, view)}

    def explain_task(result, task_name, kind, strength):
        if result is None or task_name not in result.tasks:
            return gr.skip()
        choices, best = views.word_choices(result, task_name)
        return {token: gr.update(choices=choices, value=best),
                heat: views.image_map(result, task_name, kind, best, strength),
                relevance: views.word_shading(result, task_name), map_note: views.relevance_summary(result, task_name)}

    def redraw(result, task_name, kind, word, strength):
        return views.image_map(result, task_name, kind, word, strength) if result else None

    def pick_word(result, task_name, word, strength):  # a word's map is its attention: switch to that view
        return {map_kind: "attention", heat: redraw(result, task_name, "attention", word, strength)}

    def after_save(outcome: SaveOutcome, image_path, text_value, model_name, item, result) -> dict:
        """The save's message and the choices it leaves; a stored save refreshes the controls and the request id."""
        updates = {save_status: views.save_message(outcome, studio.display_names(model_name)),
                   pending: pending_save(outcome), **resolution(choice, outcome)}
        if outcome.stored:
            view = studio.model_view(model_name, outcome.item_id, result, bool((item or "").strip()))
            updates.update({shown: view.shown.to_dict(), request_id: new_id(), shared.history: shared.history_rows(),
                            labels_for: view.item_id,
                            item_line: views.item_line(view, bool((item or "").strip())),
                            **slot_updates(studio, slots, model_name, result, view)})
        return updates

    def after_undo(outcome: UndoOutcome, model_name, item, seen, result) -> dict:
        """The undo's message and the choices it leaves (a conflict); the controls follow it when it reverted
        the item they show (`seen`; else a save would meet its own undo as a label changed since)."""
        updates = {save_status: views.undo_message(outcome, studio.display_names(model_name)),
                   pending: pending_save(outcome), **resolution(choice, outcome)}
        if outcome.conflicts:
            return updates
        updates.update({request_id: new_id(), shared.history: shared.history_rows()})
        controls = shown_of(seen)
        if result is not None and controls is not None and outcome.item_id == controls.item_id:
            view = studio.model_view(model_name, outcome.item_id, result, bool((item or "").strip()))
            updates.update({shown: view.shown.to_dict(), labels_for: view.item_id,
                            item_line: views.item_line(view, bool((item or "").strip())),
                            **slot_updates(studio, slots, model_name, result, view)})
        return updates

    def undo_save(image_path, text_value, model_name, annotator_name, item, rid, seen, result):
        """Revert your newest decision, made on any tab (again: the one before), as the Review tab's Undo does.
        A refusal (nothing left to undo, no name) is said in the save's line, in place of the last message: as
        an error it put a red badge over each correction control and left "Undone ..." under them (QA, s38)."""
        try:
            outcome = studio.review_undo(None, annotator_name, request_id=rid)
        except StudioError as exc:
            return {save_status: f"⚠️ {views.plain(str(exc))}", pending: None, **resolution(choice, None)}
        return after_undo(outcome, model_name, item, seen, result)

    def labels_by_task(model_name: str, labels: list) -> dict:
        return labels_in_slots(list(studio.task_classes(model_name)), labels, f"{model_name} has")

    def save_label(image_path, text_value, model_name, annotator_name, item, *rest):
        """Save the labels (one per task of the model, in order) of the item on screen: checked
        against the labels saved since it was predicted and the task's classes; a request id
        already stored stores nothing. The last input, optional for API clients, is the item
        whose labels the controls show. On screen a refusal is said in the save's line (an error put a
        badge over each correction control: a new photo saved before Predict, QA s39)."""
        *labels, rid, seen, result, controls_item = rest
        outcome = studio.save_item(image_path, text_value, model_name, annotator_name, item,
                                   labels_by_task(model_name, labels), shown_of(seen), request_id=rid,
                                   prediction=result, labels_for=controls_item)
        return after_save(outcome, image_path, text_value, model_name, item, result)

    def resolve(how: str):
        @user_errors
        def handler(image_path, text_value, model_name, annotator_name, item, waiting, seen, result):
            if waiting and waiting.get("kind") == "undo":  # an undo that met someone's later decision
                outcome = studio.review_undo(None, annotator_name, force=how == "overwrite",
                                             keep_theirs=how == "keep_theirs", save_id=waiting.get("save_id"),
                                             request_id=waiting.get("request_id"))
                return after_undo(outcome, model_name, item, seen, result)
            if not waiting or waiting.get("kind") != "label":
                raise StudioError("Nothing is waiting for a choice: save again.")
            labels, new_classes, force = answered(waiting, how)
            if how == "keep_theirs" and not labels:
                view = studio.model_view(model_name, studio.resolve_item_id(image_path, text_value, item),
                                         result, bool((item or "").strip()))
                return {save_status: "Kept their labels; nothing of yours was left to save.", pending: None,
                        shown: view.shown.to_dict(), **resolution(choice, None),
                        **slot_updates(studio, slots, model_name, result, view)}
            outcome = studio.save_item(image_path, text_value, model_name, annotator_name, item, labels,
                                       shown_of(seen), request_id=waiting["request_id"], new_classes=new_classes,
                                       force=force, prediction=result)
            return after_save(kept_theirs(outcome, waiting, how), image_path, text_value, model_name, item, result)
        handler.__name__ = f"save_{how}"
        return handler

    @user_errors
    def use_suggestion(model_name, waiting):
        """Put each unknown label's closest class in its control (nothing is saved)."""
        updates, message = suggested(slots, list(studio.task_classes(model_name)), waiting,
                                     studio.display_names(model_name), "save")
        return {**updates, pending: None, **resolution(choice, None), save_status: message}

    @user_errors
    def save_correction(image_path, text_value, model_name, annotator_name, item, *rest):
        """Save the labels (one per task of the model, in order) as a correction, unchecked (the
        API scripts were written against); an optional request id makes a retry store one row."""
        *labels, rid = rest
        row = studio.save_correction(image_path, text_value, model_name, annotator_name, item,
                                     labels_by_task(model_name, labels), request_id=rid)
        saved_as = studio.resolve_item_id(image_path, text_value, item)
        return {save_status: f"Saved correction #{row} for item {views.code(saved_as)}.",
                shared.history: shared.history_rows()}

    def forget_item_id(cleared: str | None = "", line: str | None = "") -> dict:
        """A new image or an edited text is another item: its id no longer applies. The item line names the id
        `cleared` (it went without a word: an id typed before the photo was uploaded, QA s41), and keeps its
        note while the labeler types on (`line`: the item line now)."""
        cleared = cleared.strip() if isinstance(cleared, str) else ""
        noted = isinstance(line, str) and line.startswith("New item")
        return {item_id: "", shown: None, pending: None, input_note: "", labels_for: "", id_for_upload: "",
                item_line: views.cleared_id_line(cleared) if cleared else gr.update() if noted else
                views.cleared_id_line(""), **resolution(choice, None)}

    def new_photo(image_path, model_name, kept_id, shown_id):
        """A new upload is a new item: the last item's results go (beside the new photo they read as
        its own), and a file that cannot be predicted is said at once, under the inputs. The photo of an
        item put back without it keeps the item's id, while the id box still shows that id (uploaded
        again as the note asked, it lost it: QA, s40; an example clicked since is another item)."""
        uploads.note(image_path)
        problem = image_problem(image_path)
        same = isinstance(kept_id, str) and kept_id and kept_id == (shown_id or "").strip()
        return {**forget_item_id("" if same else shown_id), item_id: kept_id if same else "",
                input_note: f"⚠️ {views.plain(problem)}" if problem else "",
                result_json: None, table: None, task: gr.update(choices=[], value=None),
                token: gr.update(choices=[], value=None), heat: None, weights_plot: None, shading: None,
                relevance: None, map_note: views.MAP_NOTE, prediction_state: None, save_status: "",
                **slot_updates(studio, slots, model_name, None)}

    item_outputs = [item_id, shown, pending, item_line, input_note, labels_for, id_for_upload, *choice.buttons]
    image.upload(new_photo, [image, shared.model, id_for_upload, item_id],
                 [*item_outputs, result_json, table, task, token, heat, weights_plot, shading, relevance, map_note,
                  prediction_state, save_status, *slots], api_visibility="private")
    image.clear(forget_item_id, [item_id, item_line], item_outputs, api_visibility="private")
    item_id.input(lambda typed: views.typed_id_line(typed if isinstance(typed, str) else ""), item_id, item_line,
                  api_visibility="private", show_progress="hidden", trigger_mode="always_last")  # each key
    text.input(forget_item_id, [item_id, item_line], item_outputs, api_visibility="private")
    save_outputs = [save_status, shared.history, pending, shown, request_id, item_line, *choice.buttons, *slots,
                    labels_for]
    predict_outputs = [result_json, table, task, token, heat, weights_plot, shading, relevance, prediction_state,
                       shown, request_id, pending, item_line, save_status, *choice.buttons, *slots, map_kind,
                       map_note, input_note, labels_for]
    # The button's input errors show on the field at fault (a validator); the /predict API answers
    # them, and the errors of Gradio's own input checks, as messages (a validator would answer a bare 400).
    predict_button.click(predict, [image, text, shared.model, item_id], predict_outputs, validator=check_inputs,
                         api_name="predict_checked", api_visibility="private",
                         concurrency_limit=MAX_BATCH  # batched in the studio
                         ).then(redraw, [prediction_state, task, map_kind, token, opacity], heat,
                                api_visibility="private")  # at the opacity the slider shows
    api_predict.click(predict, [image, text, shared.model, item_id], predict_outputs, api_name="predict",
                      concurrency_limit=MAX_BATCH)
    catalogue_examples.load_input_event.then(  # a visitor's click on an example shows its prediction at once
        predict, [image, text, shared.model, item_id], predict_outputs, api_visibility="private", js=SCROLL_TO_RESULTS,
        concurrency_limit=MAX_BATCH).then(redraw, [prediction_state, task, map_kind, token, opacity], heat,
                                          api_visibility="private")
    task.input(explain_task, [prediction_state, task, map_kind, opacity], [token, heat, relevance, map_note],
               api_visibility="private")
    token.input(pick_word, [prediction_state, task, token, opacity], [map_kind, heat], api_visibility="private")
    for control in (map_kind.input, opacity.input):  # input: a drag and a typed opacity (release misses the latter)
        control(redraw, [prediction_state, task, map_kind, token, opacity], heat, api_visibility="private",
                trigger_mode="always_last")
    item_inputs = [image, text, shared.model, shared.annotator, item_id]
    save_inputs = [*item_inputs, *slots, request_id, shown, prediction_state, labels_for]

    def check_save(image_path, text_value, model_name, annotator_name, *rest):
        """A missing annotator shown on the Annotator box (which `SCROLL_TO_ANNOTATOR` brings into view),
        once; nothing else changes."""
        named = annotator_name is SIGNED_IN or (isinstance(annotator_name, str) and bool(annotator_name.strip()))
        fine = gr.validate(True, "")
        return [fine, fine, fine, gr.validate(named, "Enter your name here to save: every decision is saved "
                                                     "under it."), *[fine for _ in rest]]

    shown_with_api(save_button, api_save, save_label, save_status, save_inputs, save_outputs, "save_label",
                   validator=check_save, js=SCROLL_TO_ANNOTATOR)
    undo_button.click(undo_save, [*item_inputs, request_id, shown, prediction_state], save_outputs,
                      js=SCROLL_TO_ANNOTATOR, api_name="save_undo")
    for how, button in (("keep_theirs", choice.keep_theirs), ("overwrite", choice.overwrite),
                        ("new_class", choice.new_class)):
        button.click(resolve(how), [*item_inputs, pending, shown, prediction_state], save_outputs,
                     api_name=f"save_{how}")
    choice.use_suggestion.click(use_suggestion, [shared.model, pending],
                                [*slots, pending, save_status, *choice.buttons], api_name="save_use_suggestion")
    legacy_save.click(save_correction, [*item_inputs, *slots, request_id], [save_status, shared.history],
                      api_name="save_correction")
    shared.model.change(user_errors(lambda m: slot_updates(studio, slots, m, None)), shared.model, slots,
                        api_visibility="private")
    shared.model.change(lambda m: operating_figures(studio, m), shared.model, operating, api_visibility="private")

    def remember_inputs(image_path, text_value, item) -> dict:
        return {"image": image_path, "text": text_value, "item": item}

    for source in (image, text, item_id):  # typed, uploaded, an example's or put back
        source.change(remember_inputs, [image, text, item_id], shared.remember_inputs, trigger_mode="always_last",
                      api_visibility="private", show_progress="hidden")

    def restore(kept, *entered) -> dict:
        """A page load: the photo, text and item id this browser had last (a phone's browser reloads a page it
        left for the camera, say), the photo while Gradio keeps the upload (a day); nothing when the
        labeler `entered` a photo, text or id before the page finished loading (theirs wins)."""
        if not isinstance(kept, dict) or not any(kept.values()) or any(entered):
            return {}
        text_value, item = (readable(kept.get(key)) for key in ("text", "item"))
        photo = kept_upload(kept.get("image"), Path(image.GRADIO_CACHE))
        problem = image_problem(photo) if photo else ""
        gone = bool(kept.get("image")) and not photo
        if problem:
            note = f"⚠️ {views.plain(problem)}"
        elif gone:
            note = ("⚠️ Your last item in this browser is put back but for its photo, which is no longer kept (an "
                    f"upload is kept a day): upload it again{' (its item id stays)' if item else ''}, then predict it.")
        elif photo:
            note = "Your last item in this browser is put back: predict it to see its labels."
        else:  # its photo taken off before: predicting now would refuse (the note said "predict it": QA, s40)
            note = (f"Your last {'text and item id' if item else 'text'} in this browser {'are' if item else 'is'} "
                    f"put back: upload the photo{' (its item id stays)' if item else ''}, then predict it.")
        return {image: photo, text: text_value, item_id: item, input_note: note, id_for_upload: "" if photo else item}

    return image, text, restore, [image, text, item_id], [image, text, item_id, input_note, id_for_upload]


@dataclass
class ReviewPanel:
    """The Review tab's view of its queue: what `show_queue` fills."""

    queue: gr.State
    shown: gr.State
    pending: gr.State
    progress: gr.Markdown
    image: gr.Image
    text: gr.Textbox
    table: gr.Dataframe
    active: gr.Radio
    choices: list[gr.Button]
    slots: list[gr.Dropdown]
    request_id: gr.Textbox
    status: gr.Markdown
    notes: gr.Markdown
    item_history: gr.Dataframe
    choice: Resolution
    choice_map: gr.JSON  # the item's tasks and each one's top choices, for the picks made in the browser
    # The id of the item on the labeler's screen, sent from the browser with a decision: `shown` (and
    # the queue) live on the server and move with an event as soon as it runs, before its answer
    # reaches the screen; a decision made meanwhile would go to the next item with this one's labels.
    on_screen: gr.Textbox
    key_note: gr.Markdown  # a number key that picked nothing says so here (app.PICK_JS)

    @property
    def outputs(self) -> list:
        return [self.queue, self.shown, self.pending, self.progress, self.image, self.text, self.table, self.active,
                *self.choices, *self.slots, self.request_id, self.status, self.notes, self.item_history,
                *self.choice.buttons, self.on_screen, self.choice_map, self.key_note]


def choice_updates(panel: ReviewPanel, item: ReviewItem | None, task: str | None) -> dict:
    """The number-key buttons for the active task's top choices."""
    labels = views.choice_labels(item, task) if item is not None and task in item.predictions else []
    return {button: gr.update(value=labels[n], elem_classes=[]) if n < len(labels)
            else gr.update(elem_classes=["unused-choice"]) for n, button in enumerate(panel.choices)}


def show_queue(studio: Studio, panel: ReviewPanel, queue: ReviewQueue | None, message: str = "",
               outcome: SaveOutcome | UndoOutcome | None = None) -> dict:
    """The panel's updates for the queue's current item (an empty panel when none is left):
    each control where `Studio.current_view` starts it, a fresh request id, the
    versions shown, and `message` (with the choices a refused `outcome` offers)."""
    item = queue.current if queue else None
    common = {panel.queue: queue, panel.progress: views.review_status(queue), panel.status: message,
              panel.notes: views.review_notes(queue) if queue else "", panel.request_id: new_id(),
              panel.on_screen: item.item_id if item else "",
              panel.choice_map: views.choice_map(queue.tasks, item, studio.display_names(queue.model)) if item
              else None,
              panel.key_note: "",
              panel.pending: pending_save(outcome) if outcome is not None else None,
              **resolution(panel.choice, outcome)}
    if item is None:
        return {**common, panel.shown: None, panel.image: None, panel.text: "", panel.table: [],
                panel.active: gr.update(choices=[], value=None), **choice_updates(panel, None, None),
                **dict.fromkeys(panel.slots, gr.update(visible=False)), panel.item_history: []}
    view, first = studio.current_view(queue), views.first_task(queue.tasks, item.disputed)
    return {**common, panel.shown: view.shown.to_dict(), panel.image: open_user_image(item.image_path),
            panel.text: item.text, **standing(studio, panel, queue, view),
            panel.active: gr.update(choices=views.task_choices(queue.tasks, studio.display_names(queue.model)),
                                    value=first),
            **choice_updates(panel, item, first),
            **review_slots(studio, panel, queue, view)}


def standing(studio: Studio, panel: ReviewPanel, queue: ReviewQueue, view: ItemView) -> dict:
    """Where the queue's current item stands: its table and its history."""
    return {panel.table: views.review_rows(queue.current, view, queue.tasks),
            panel.item_history: views.item_history_rows(view.history, studio.display_names(queue.model))}


def review_slots(studio: Studio, panel: ReviewPanel, queue: ReviewQueue, view: ItemView) -> dict:
    """The label controls of the queue's current item (`slot_updates` over the queue's tasks)."""
    item = queue.current
    return slot_updates(studio, panel.slots, queue.model, Prediction(item.predictions), view, item.catalogue,
                        queue.tasks)


def review_tab(studio: Studio, shared: Shared) -> tuple[ReviewPanel, Callable, list]:
    """A queue of catalogue or uploaded items, the most uncertain first, to accept, correct, skip and undo.
    Returns its panel, `restore(annotator, model, queue_id)` (the panel's updates for a page
    load, {} when there is no queue to resume) and the components it updates."""
    models = studio.model_names
    tasks = views.task_choices(studio.tasks_of(models[0]), studio.display_names(models[0])) if models else []
    with gr.Tab(TABS["review"], id="review", elem_id="review-tab") as tab:
        gr.Markdown("Items ranked by how unsure the model is (least confidence, margin or entropy), decided items "
                    "left out. Each control starts at the item's saved label, else its catalogue (or manifest) "
                    "label, else the model's: Accept confirms what is shown. Your place in the queue is kept: a "
                    "reload or a restart resumes it.")
        with gr.Accordion("Queue: source, order and filters", open=True, elem_id="review-source") as source_box:
            with gr.Row():
                with gr.Column():
                    split = gr.Dropdown(list(SPLITS), value="train", label="Split of the model's catalogue",
                                        elem_id="review-split")
                    split_note = gr.Markdown(views.split_note("train"), elem_id="review-split-note")
                    size = gr.Number(value=50, precision=0, minimum=1, maximum=MAX_QUEUE_ITEMS, label="Sample size",
                                     elem_id="review-size")
                    load_split = gr.Button("Load catalogue sample", elem_id="review-load")
                    split_loading = gr.Markdown(min_height=48)  # its progress bar, under the button
                with gr.Column():
                    manifest = gr.File(label="...or upload a manifest (CSV/JSONL)", file_types=[".csv", ".jsonl"],
                                       elem_id="review-manifest")
                    images = gr.File(label="...and its images (a .zip keeps their folders: rows red/1.jpg and "
                                     "blue/1.jpg need one)", file_count="multiple", file_types=["image", ".zip"],
                                     elem_id="review-images")
                    gr.Markdown(views.split_note("upload"))
                    load_upload = gr.Button("Load uploaded catalogue", elem_id="review-load-upload")
                    upload_loading = gr.Markdown(min_height=48)
                with gr.Column(elem_id="review-source-mislabels"):
                    gr.Markdown("**Suspected mislabels**  \nCatalogue labels of the task chosen below that "
                                "out-of-fold heads on the cached features doubt most (cleanlab's confident "
                                "learning), most suspect first; as many as the sample size. The first time, the "
                                "whole catalogue is encoded (on 2 CPU cores about 15 minutes for H&M, 2 hours for "
                                "fashion), then it opens at once. Each control starts at the catalogue's label: "
                                "Accept confirms it.")
                    load_mislabels = gr.Button("Load suspected mislabels", elem_id="review-load-mislabels")
                    mislabels_loading = gr.Markdown(min_height=48)
                    gr.Markdown("**Disagreements**  \nItems whose annotators' labels differ on the tasks chosen below "
                                "(a second labeler reviewing decided items, or an overwrite), the oldest first. A task "
                                "in dispute starts empty (the number keys list the annotators' labels first): your "
                                "choice settles it; the agreement figures keep the annotators' own labels. "
                                + views.reviewers_note(studio.reviewers))
                    load_disagreements = gr.Button("Load disagreements", elem_id="review-load-disagreements")
                    disagreements_loading = gr.Markdown(min_height=48)
            with gr.Row():
                strategy = gr.Radio(views.order_choices(), value=STRATEGIES[0],
                                    label="Order: most uncertain first by", elem_id="review-strategy")
                task_filter = gr.Dropdown([ALL_TASKS, *tasks], value=ALL_TASKS, label="Tasks under review",
                                          allow_custom_value=True, elem_id="review-task-filter")
                min_conf = gr.Number(0, minimum=0, maximum=1, step=0.05, label="Confidence from",
                                     elem_id="review-min-conf")
                max_conf = gr.Number(1, minimum=0, maximum=1, step=0.05, label="to", elem_id="review-max-conf")
                show_decided = gr.Checkbox(False, label="Show decided items", elem_id="review-show-decided")
                resume = gr.Button("Resume my last queue", elem_id="review-resume")
        progress = gr.Markdown(label="review progress", elem_id="review-progress")
        gr.Markdown(views.KEYS_HELP, elem_id="review-keys")
        with gr.Row():
            image = written_per_call(gr.Image(label="Item", height=280, interactive=False, elem_id="review-image"))
            with gr.Column(scale=2):
                text = gr.Textbox(label="Text", interactive=False, lines=2, elem_id="review-text")
                # tall enough for 8 tasks whose "saved by" cells wrap (the default 500 px hid the last rows)
                table = gr.Dataframe(headers=views.REVIEW_HEADERS, interactive=False, wrap=True, label="item labels",
                                     show_label=False, elem_id="review-table", column_widths=views.REVIEW_WIDTHS,
                                     max_height=900)
        with gr.Row():
            active = gr.Radio([], label="Active task (keys 1-9 pick its choices)", elem_id="review-active-task",
                              scale=3)
            next_task = gr.Button("Next task (t)", elem_id="review-next-task", scale=1)
        with gr.Row():
            choices = [gr.Button(str(n + 1), size="sm", elem_id=f"review-choice-{n + 1}",
                                 elem_classes=["unused-choice"]) for n in range(CHOICES_KEPT)]
        key_note = gr.Markdown("", elem_id="review-key-note")
        with gr.Row():
            slots = correction_slots(elem_id="review-slot")
        request_id = gr.Textbox("", visible=False, label="request id", elem_id="review-request-id")
        on_screen = gr.Textbox("", visible=False, label="item on screen", elem_id="review-on-screen")
        choice_map = gr.JSON(None, visible=False, elem_id="review-choice-map")
        with gr.Row():
            accept = gr.Button("Accept / save and next (a)", variant="primary", elem_id="review-accept")
            skip = gr.Button("Skip (s)", elem_id="review-skip")
            undo = gr.Button("Undo (u)", elem_id="review-undo")
            api_undo = gr.Button(visible=False)  # /review_undo: a refusal is an error for API clients
            previous = gr.Button("‹ Previous (p)", elem_id="review-previous")
            forward = gr.Button("Next › (n, no decision)", elem_id="review-next")
        status = gr.Markdown(label="review status", elem_id="review-status")
        choice = Resolution.make("review")
        notes = gr.Markdown(label="queue notes", elem_id="review-notes")
        with gr.Accordion("Bulk accept by filter", open=False) as bulk_panel:
            gr.Markdown("Accept the model's label of every pending item of this queue whose tasks clear the bar. "
                        "Each label is audited as an auto-accept; decided tasks and labels someone saved are never "
                        "replaced, and training never lets one replace a catalogue item's own label. The items go "
                        "in chunks, each acknowledged once stored: after an interruption, run "
                        "it again to finish without duplicates. Undo (u) takes a bulk accept back whole.")
            with gr.Row():  # (each control wide enough to read its value on a phone: "each tas…" was all it showed)
                bulk_task = gr.Dropdown([ALL_TASKS, *tasks], value=ALL_TASKS, label="Task(s)", elem_id="bulk-task",
                                        allow_custom_value=True, min_width=260)  # any model's task (API): checked
                # a dropdown's Enter takes the first choice holding what was typed: no digit in the thresholds'
                # name ("0" took "90%-precision thresholds": QA s41), and "0" before every number holding it
                bulk_min = gr.Dropdown([("each task's own threshold", THRESHOLDS),
                                        *views.typing_order(["0", "0.7", "0.8", "0.9", "0.95"])], value=THRESHOLDS,
                                       allow_custom_value=True, elem_id="bulk-min-conf", min_width=300,
                                       label="Bar: each task's 90%-precision threshold, or a minimum confidence "
                                             "(type one from 0 to 1)")
            bulk_preview = gr.Markdown(elem_id="bulk-preview")  # how many it would take, before it is pressed
            bulk = gr.Button("Bulk accept", elem_id="review-bulk")
            bulk_status = gr.Markdown(label="bulk accept status", min_height=48, elem_id="bulk-status")
        with gr.Accordion("History of this item", open=False):
            item_history = gr.Dataframe(headers=views.ITEM_HISTORY_HEADERS, interactive=False, wrap=True,
                                        elem_id="review-item-history", column_widths=views.ITEM_HISTORY_WIDTHS)
        panel = ReviewPanel(gr.State(None), gr.State(None), gr.State(None), progress, image, text, table, active,
                            choices, slots, request_id, status, notes, item_history, choice, choice_map, on_screen,
                            key_note)

    def loaded(queue: ReviewQueue | None) -> ReviewQueue:
        if queue is None:
            raise StudioError("Load a catalogue sample to review first (or resume your last queue).")
        return queue

    def labels_of(queue: ReviewQueue, values) -> dict:
        return labels_in_slots(queue.tasks, values, "the queue reviews")

    def keys_for(queue: ReviewQueue, task: str) -> dict:
        """The active task `task`, and the number keys for it among the current item's choices now."""
        return {panel.active: gr.update(value=task), **choice_updates(panel, queue.current, task),
                panel.choice_map: views.choice_map(queue.tasks, queue.current, studio.display_names(queue.model))}

    def after(queue: ReviewQueue, outcome: SaveOutcome) -> dict:
        """A stored decision shows the next item; a refused one stays on the item with its choices,
        the labeler's own choices kept, and (a conflict) the item's table and history as they stand now."""
        message = views.save_message(outcome, studio.display_names(queue.model))
        if outcome.kind == "skip" and outcome.stored and (again := views.shown_again(outcome.item_id, queue)):
            message += " " + again
        updates = {panel.status: message, panel.pending: pending_save(outcome), **resolution(choice, outcome)}
        if outcome.result == "conflict" and queue.current is not None:
            view = studio.current_view(queue)
            updates.update({panel.progress: views.review_status(queue), **standing(studio, panel, queue, view)})
            updates.update({slot: gr.update(info=update["info"])  # the lines under the controls, values kept
                            for slot, update in review_slots(studio, panel, queue, view).items() if update["visible"]})
            if queue.current.disputed:  # the keys as the dispute stands now (they offered "1 · Stripe (ana)" after
                # ana had come round to Check, and picked for a task no longer in dispute)
                updates.update(keys_for(queue, views.first_task(queue.tasks, queue.current.disputed)))
            for task, label in outcome.ended.items():  # the pick there was not stored: the task as it stands
                slot = panel.slots[queue.tasks.index(task)]
                updates[slot] = {**updates.get(slot, gr.update()), "value": label}
        if outcome.result == "unchosen" and queue.current is not None:  # the keys now pick for the task to choose,
            # among the labels said now (they offered those of before, which the message no longer named)
            updates.update({**keys_for(queue, views.first_task(queue.tasks, outcome.unchosen)),
                            panel.progress: views.review_status(queue),
                            **standing(studio, panel, queue, studio.current_view(queue))})
        if outcome.result in ("conflict", "unknown", "unchosen"):  # the item stays, the labeler's choices kept
            return updates
        return show_queue(studio, panel, queue, message)

    def opened(queue: ReviewQueue, message: str = "") -> dict:
        """A newly loaded (or resumed) queue at its item, the source panel folded away, the controls as
        the queue has them: order (a suspected-mislabels queue's ranking among them), task, confidence
        range, decided items shown, and a catalogue sample's split and size (a reload showed the
        defaults, and a re-sort then dropped the queue's confidence range unasked)."""
        single = queue.tasks[0] if len(queue.tasks) == 1 else ALL_TASKS
        low, high = queue.filters.get("min_conf"), queue.filters.get("max_conf")
        sample = {split: queue.split, size: queue.sampled} if queue.split in SPLITS else {}
        return {**show_queue(studio, panel, queue, message), source_box: gr.update(open=False),
                strategy: gr.update(choices=views.order_choices(queue), value=queue.strategy),
                task_filter: gr.update(value=single), min_conf: 0 if low is None else low,
                max_conf: 1 if high is None else high, show_decided: queue.show_decided, **sample}

    def options(order, task_name, low, high, decided, annotator_name) -> dict:
        return {"strategy": order, "task": task_name, "min_conf": low, "max_conf": high, "show_decided": decided,
                "annotator": annotator_name}

    @user_errors
    def load_catalogue(model_name, split_name, sample_size, order, task_name, low, high, decided, annotator_name,
                       progress=gr.Progress()):
        """A sample of the model's catalogue split, its decided items left out, most uncertain first.
        (Gradio hands a progress bar only to a positional parameter: the filters are spelled out.)"""
        return opened(studio.review_catalogue(model_name, split_name, sample_size, progress,
                                              **options(order, task_name, low, high, decided, annotator_name)))

    @user_errors
    def rearrange(queue, order, task_name, low, high, annotator_name):
        """Re-sort and re-filter the open queue over the items it sampled (in memory: nothing is
        predicted again), from its first item to review; with no queue open, the choices wait for the next load."""
        if queue is None:
            return {panel.status: "The order and filters apply to the queue you load next."}
        if studio.arranged_as(queue, strategy=order, task=task_name, min_conf=low, max_conf=high):
            return {panel.status: gr.skip()}  # a box left as it was (its blur): the controls keep the picks
        return show_queue(studio, panel, studio.arrange_queue(queue, annotator_name, strategy=order, task=task_name,
                                                              min_conf=low, max_conf=high))

    @user_errors
    def load_uploaded(model_name, manifest_file, image_files, order, task_name, low, high, decided, annotator_name,
                      progress=gr.Progress()):
        """An uploaded manifest and its images, its decided items left out, most uncertain first."""
        return opened(studio.review_upload(model_name, manifest_file, image_files, progress,
                                           **options(order, task_name, low, high, decided, annotator_name)))

    @user_errors
    def load_suspects(model_name, task_name, sample_size, decided, annotator_name, progress=gr.Progress()):
        """The catalogue labels of one task most likely wrong (cma_clip.mislabels), most suspect first."""
        return opened(studio.review_mislabels(model_name, task_name, sample_size, progress, show_decided=decided,
                                              annotator=annotator_name))

    @user_errors
    def load_disputes(model_name, task_name, sample_size, annotator_name, progress=gr.Progress()):
        """The items whose annotators disagree, oldest first: a save here adjudicates."""
        return opened(studio.review_disagreements(model_name, task_name, sample_size, progress,
                                                  annotator=annotator_name))

    @user_errors
    def accept_item(queue, seen, annotator_name, *rest):
        """Save the current item's labels (one per task under review, in order) and show the next item.
        The last input, optional for API clients, is the id of the item on the labeler's screen."""
        *values, rid, item_on_screen = rest
        queue = loaded(queue)
        if why := queue.nothing_to_decide():  # a key pressed on a finished queue: one line, not a toast a press
            return {panel.status: why}
        return after(queue, studio.review_save(queue, annotator_name, labels_of(queue, values),
                                               decided_on(seen, item_on_screen), request_id=rid))

    @user_errors
    def skip_item(queue, seen, annotator_name, rid, item_on_screen=""):
        """Mark the current item's tasks skipped and show the next item."""
        queue = loaded(queue)
        if why := queue.nothing_to_decide():
            return {panel.status: why}
        return after(queue, studio.review_skip(queue, annotator_name, decided_on(seen, item_on_screen),
                                               request_id=rid))

    def undone(queue: ReviewQueue | None, outcome: UndoOutcome) -> dict:
        """An undo's outcome: the queue at its item (with the choice, when it met a conflict), or
        only the message when no queue is open."""
        message = views.undo_message(outcome, studio.display_names(queue.model if queue else None))
        if queue is not None:
            updates = show_queue(studio, panel, queue, message, outcome if outcome.conflicts else None)
            if queue.current is not None and queue.current.item_id == outcome.item_id and not outcome.conflicts:
                for task, (undone_label, restored) in outcome.tasks.items():  # your answer back, to edit (Prodigy's)
                    if undone_label is not None and restored is None and task in queue.tasks:
                        slot = panel.slots[queue.tasks.index(task)]
                        updates[slot] = {**updates[slot], "value": undone_label}
            return updates
        return {panel.status: message, panel.pending: pending_save(outcome), **resolution(choice, outcome)}

    def undo_last(queue, annotator_name, rid):
        """Revert your newest decision (again: the one before); the queue goes to that item. On screen a refusal
        ("nothing to undo") is said in the status line: as a toast it came twice, under the last undo's
        "Undone on item ..." line, which read as if it had undone again (QA s42)."""
        return undone(queue, studio.review_undo(queue, annotator_name, request_id=rid))

    @user_errors
    def previous_item(queue, annotator_name):
        """Go back to the item before, showing its saved labels."""
        queue = loaded(queue)
        moved = studio.review_previous(queue, annotator_name)
        return show_queue(studio, panel, queue, "" if moved else "This is the first item of the queue.")

    @user_errors
    def next_item(queue, annotator_name, item_on_screen=""):
        """Go on to the next item without deciding this one. The last input, optional for API clients, is
        the id of the item on the labeler's screen: pressed before the item an accept moved to reached the
        screen, Next would pass it over unseen, so it only shows it."""
        queue = loaded(queue)
        left = queue.current.item_id if queue.current is not None else None
        on_screen = (item_on_screen or "").strip() if isinstance(item_on_screen, str) else ""
        if on_screen and left is not None and on_screen != left:
            return show_queue(studio, panel, queue, f"Item {views.code(left)} had not reached your screen: here "
                                                    "it is (nothing passed over).")
        studio.review_next(queue, annotator_name)
        return show_queue(studio, panel, queue, views.shown_again(left, queue))

    def resolve(how: str):
        @user_errors
        def handler(queue, seen, annotator_name, waiting):
            if waiting and waiting["kind"] == "undo":  # an undo needs no open queue
                return undone(queue, studio.review_undo(queue, annotator_name, force=how == "overwrite",
                                                        keep_theirs=how == "keep_theirs",
                                                        save_id=waiting.get("save_id"),
                                                        request_id=waiting.get("request_id")))
            queue = loaded(queue)
            if not waiting:
                raise StudioError("Nothing is waiting for a choice.")
            if waiting["kind"] == "skip":
                if how == "keep_theirs":
                    studio.review_next(queue, annotator_name)
                    return show_queue(studio, panel, queue, "Kept their decision; nothing was skipped.")
                return after(queue, studio.review_skip(queue, annotator_name, shown_of(seen),
                                                       request_id=waiting["request_id"], force=True))
            labels, new_classes, force = answered(waiting, how)
            if how == "keep_theirs" and not labels:
                studio.review_next(queue, annotator_name)
                return show_queue(studio, panel, queue, "Kept their labels; nothing of yours was left to save.")
            return after(queue, kept_theirs(studio.review_save(queue, annotator_name, labels, shown_of(seen),
                                                               request_id=waiting["request_id"],
                                                               new_classes=new_classes, force=force), waiting, how))
        handler.__name__ = f"review_{how}"
        return handler

    @user_errors
    def use_suggestion(queue, waiting):
        """Put each unknown label's closest class in its control (nothing is saved)."""
        queue = loaded(queue)
        updates, message = suggested(slots, queue.tasks, waiting, studio.display_names(queue.model), "accept")
        return {**updates, panel.pending: None, **resolution(choice, None), panel.status: message}

    def buttons_for(queue, task_name, item_on_screen):
        """The number-key buttons of the active task (which a pick or `t` set in the browser), for the item on
        screen only: after a quick "t a" the queue has moved on, and the next item's answer sets them."""
        item = queue.current if queue is not None else None
        if item is None or item.item_id != item_on_screen or task_name not in queue.tasks:
            return dict.fromkeys(choices, gr.skip())
        return choice_updates(panel, item, task_name)

    @user_errors
    def bulk_accept(queue, annotator_name, task_name, minimum, progress=gr.Progress()):
        """Auto-accept every pending item of the queue whose task(s) clear the bar (empty: each task's threshold)."""
        queue = loaded(queue)
        outcome = studio.bulk_accept(queue, annotator_name, task=task_name, min_conf=minimum, progress=progress)
        message = views.bulk_message(outcome, studio.display_names(queue.model))
        return {**show_queue(studio, panel, queue, message), bulk_status: message}

    @user_errors
    def resume_last(annotator_name, model_name):
        """The queue you moved in last on this model, where you left it."""
        if not (annotator_name or "").strip():
            raise StudioError("Enter your name in the annotator field: queues are kept per annotator.")
        queue = studio.resume_queue(None, annotator_name, model_name)
        if queue is None:
            raise StudioError(f"No queue kept for {annotator_name.strip()} on {model_name}: load a sample.")
        return opened(queue, "Resumed where you left off.")

    def restore(annotator_name, model_name, queue_id) -> dict:
        """A page load: the queue this browser had (else the annotator's last), where it was."""
        try:
            queue = studio.resume_queue(queue_id, annotator_name, model_name)
            if queue is None:
                return {}
            return opened(queue, "Resumed where you left off.")
        except (StudioError, OSError) as exc:
            return {panel.status: f"Could not resume the queue: {views.plain(exc)}"}

    def remember(queue):
        return queue.queue_id if queue else gr.skip()

    filters = [strategy, task_filter, min_conf, max_conf, show_decided, shared.annotator]
    queue_inputs = [panel.queue, panel.shown, shared.annotator]
    loaded_outputs = [*panel.outputs, source_box, strategy, task_filter, min_conf, max_conf, show_decided, split, size]
    for event in (  # one progress bar under the button pressed and one on the item, not one on every output
        load_split.click(load_catalogue, [shared.model, split, size, *filters], [*loaded_outputs, split_loading],
                         api_name="review_catalogue", show_progress_on=[split_loading, panel.image]),
        load_upload.click(load_uploaded, [shared.model, manifest, images, *filters], [*loaded_outputs, upload_loading],
                          api_name="review_upload", show_progress_on=[upload_loading, panel.image]),
        load_mislabels.click(load_suspects, [shared.model, task_filter, size, show_decided, shared.annotator],
                             [*loaded_outputs, mislabels_loading], api_name="review_mislabels",
                             show_progress_on=[mislabels_loading, panel.image]),
        load_disagreements.click(load_disputes, [shared.model, task_filter, size, shared.annotator],
                                 [*loaded_outputs, disagreements_loading], api_name="review_disagreements",
                                 show_progress_on=[disagreements_loading, panel.image]),
        resume.click(resume_last, [shared.annotator, shared.model], loaded_outputs, api_name="review_resume",
                     show_progress_on=panel.image),
    ):
        event.success(remember, panel.queue, shared.remember_queue, api_visibility="private")
        event.success(None, js=FOCUS_QUEUE, api_visibility="private")
    split.change(views.split_note, split, split_note, api_visibility="private")

    @user_errors
    def looked_again(queue, annotator_name) -> dict:
        """Back on the tab: where the queue and its item stand now (an undo or a save on the Predict tab, or
        another labeler, may have changed them meanwhile: the progress still counted an item undone there). The
        controls keep what the labeler set; a decision is checked against the store as ever."""
        if queue is None:
            return {panel.progress: gr.skip()}  # (an empty dict reads as one output value)
        changed = studio.reread(queue, annotator_name)
        view = studio.current_view(queue)
        # the line under the item told of the last decision here, which may stand no more (QA s42)
        moved = {panel.status: "The queue was read again on your return: decisions made meanwhile (an undo on the "
                               "Predict tab, another labeler) changed how many items are reviewed."} if changed else {}
        return {panel.progress: views.review_status(queue), **moved,
                **(standing(studio, panel, queue, view) if view else {})}

    tab.select(looked_again, [panel.queue, shared.annotator],
               [panel.progress, panel.status, panel.table, panel.item_history], api_visibility="private",
               show_progress="hidden")
    arrange_inputs = [panel.queue, strategy, task_filter, min_conf, max_conf, shared.annotator]
    strategy.input(rearrange, arrange_inputs, panel.outputs, api_name="review_arrange")
    task_filter.input(rearrange, arrange_inputs, panel.outputs, api_visibility="private")
    for bound in (min_conf, max_conf):  # typing "0.35" passes through 0.3: re-filter once it is in
        bound.submit(rearrange, arrange_inputs, panel.outputs, api_visibility="private")
        # without the pending overlay over the panel: a click that blurs the box (on an Active task
        # radio, say) would land on it and be lost, and the next key picked for the task before
        bound.blur(rearrange, arrange_inputs, panel.outputs, api_visibility="private", show_progress="hidden")
    moves = [accept.click(accept_item, [*queue_inputs, *slots, request_id, on_screen], panel.outputs,
                          api_name="review_accept", js=REVIEW_BEFORE),
             skip.click(skip_item, [*queue_inputs, request_id, on_screen], panel.outputs, api_name="review_skip",
                        js=REVIEW_BEFORE),
             api_undo.click(user_errors(undo_last), [panel.queue, shared.annotator, request_id], panel.outputs,
                            api_name="review_undo"),
             undo.click(errors_in(panel.status)(undo_last), [panel.queue, shared.annotator, request_id],
                        panel.outputs, api_name="review_undo_shown", api_visibility="private", js=REVIEW_BEFORE),
             previous.click(previous_item, [panel.queue, shared.annotator], panel.outputs,
                            api_name="review_previous", js=REVIEW_BEFORE),
             forward.click(next_item, [panel.queue, shared.annotator, on_screen], panel.outputs,
                           api_name="review_next", js=REVIEW_BEFORE)]
    for how, button in (("keep_theirs", choice.keep_theirs), ("overwrite", choice.overwrite),
                        ("new_class", choice.new_class)):
        moves.append(button.click(resolve(how), [*queue_inputs, panel.pending], panel.outputs,
                                  api_name=f"review_{how}", js=REVIEW_BEFORE))
    for move in moves:
        move.then(None, js=REVIEW_AFTER, api_visibility="private")
    choice.use_suggestion.click(use_suggestion, [panel.queue, panel.pending],
                                [*slots, panel.pending, panel.status, *choice.buttons],
                                api_name="review_use_suggestion")
    # The buttons follow the active task one answer at a time, in the order of the keys, and the last key's
    # always runs: Gradio drops a trigger while the event before is running ("once"), which left the task
    # before's choices on the buttons after a quick "t t". Every pick and "t" runs ("multiple").
    buttons = {"fn": buttons_for, "inputs": [panel.queue, active, on_screen], "outputs": choices,
               "api_visibility": "private",
               "concurrency_limit": 1, "concurrency_id": "review-choice-buttons", "trigger_mode": "always_last"}
    for n, button in enumerate(choices, 1):
        button.click(None, [choice_map, active, *slots], [active, *slots, key_note], js=PICK_JS % n,
                     trigger_mode="multiple",
                     api_visibility="private").then(**buttons)
    active.input(**buttons)
    next_task.click(None, [choice_map, active], active, js=NEXT_TASK_JS, trigger_mode="multiple",
                    api_visibility="private").then(**buttons)

    def preview_bulk(queue, annotator_name, task_name, minimum):
        """What Bulk accept would do now with these filters, shown before it is pressed."""
        if queue is None:
            return "Load a queue: bulk accept takes its items."
        try:
            outcome, count = studio.bulk_preview(queue, current_user() if annotator_name is SIGNED_IN
                                                 else annotator_name, task=task_name, min_conf=minimum)
        except CMAClipError as exc:
            return f"⚠️ {views.plain(exc)}"
        return views.bulk_preview_message(outcome, count, studio.display_names(queue.model))

    preview = {"fn": preview_bulk, "inputs": [panel.queue, shared.annotator, bulk_task, bulk_min],
               "outputs": bulk_preview, "api_visibility": "private", "show_progress": "hidden",
               "trigger_mode": "always_last"}
    bulk.click(bulk_accept, [panel.queue, shared.annotator, bulk_task, bulk_min], [*panel.outputs, bulk_status],
               api_name="bulk_accept", show_progress_on=bulk_status).then(**preview)  # beside its button
    for counts_change in (bulk_panel.expand, bulk_task.change, bulk_min.change, panel.progress.change,
                          panel.status.change):
        counts_change(**preview)  # (the progress line changes with each decision and queue, the status with an
        # undo: an undone bulk accept left the count at "0 items, 5 stored by an earlier run")

    def model_tasks(model_name, task_now):  # the filters offer the model's tasks (one still its own stays chosen)
        tasks = studio.tasks_of(model_name)
        names = views.task_choices(tasks, studio.display_names(model_name))
        return {task_filter: gr.update(choices=[ALL_TASKS, *names], value=task_now if task_now in tasks else ALL_TASKS),
                bulk_task: gr.update(choices=[ALL_TASKS, *names], value=ALL_TASKS)}

    shared.model.change(user_errors(model_tasks), [shared.model, task_filter], [task_filter, bulk_task],
                        api_visibility="private")
    return panel, restore, loaded_outputs


def robustness_tab(studio: Studio, shared: Shared, image: gr.Image, text: gr.Textbox) -> Callable:
    """The Predict tab's item, corrupted: clean against noisy, sweeps over severities, a catalogue sweep."""
    with gr.Tab(TABS["robustness"], id="robustness", elem_id="robustness-tab"):
        gr.Markdown("Corrupt the current image and text (from *Predict*) and compare. Severity 0 is "
                    "clean; the same seed gives the same corruption.")
        with gr.Row():
            image_noise = gr.Dropdown(["none", *IMAGE_CORRUPTIONS], value="occlusion", label="Image corruption",
                                      elem_id="image-noise")
            image_severity = gr.Slider(0, 5, value=3, step=1, label="Image severity", elem_id="image-severity")
            text_noise = gr.Dropdown(["none", *TEXT_CORRUPTIONS], value="word_mask", label="Text corruption",
                                     elem_id="text-noise")
            text_severity = gr.Slider(0, 5, value=3, step=1, label="Text severity", elem_id="text-severity")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
        with gr.Row():
            probe_button = gr.Button("Probe clean vs noisy", variant="primary", elem_id="probe")
            sweep_button = gr.Button("Sweep all severities for this item")
        status = gr.Markdown(elem_id="robustness-status")  # why a probe or a sweep could not run
        api_probe, api_sweep = gr.Button(visible=False), gr.Button(visible=False)  # their API: errors as errors
        probe_json = gr.JSON(visible=False)
        probe_table = gr.Dataframe(headers=views.PROBE_HEADERS, interactive=False, wrap=True, elem_id="probe-table",
                                   column_widths=views.PROBE_WIDTHS,
                                   label="Clean vs noisy: prediction, confidence and its change, image weight per task")
        probe_state = gr.State(None)
        probe_task = gr.Dropdown([], label="Task whose relevance the maps show", elem_id="probe-task")
        with gr.Row(elem_id="probe-maps"):
            clean_heat = written_per_call(gr.Image(label="Clean: relevance for the task", height=260,
                                                   interactive=False, elem_id="clean-heatmap"))
            noisy_heat = written_per_call(gr.Image(label="Noisy: relevance for the task", height=260,
                                                   interactive=False, elem_id="noisy-heatmap"))
            shift_plot = gr.Plot(label="Image-side modality weight, clean vs noisy", elem_classes=["chart"])
        probe_note = gr.Markdown(elem_id="probe-shift")
        noisy_text = gr.Textbox(label="Noisy text", interactive=False)
        item_sweep_plot = gr.Plot(label="Confidence in the clean prediction and image-side weight against severity",
                                  elem_id="item-sweep", elem_classes=["chart"])
        gr.Markdown("### Batch sweep on the model's catalogue (`test` split)")
        with gr.Row():
            sweep_size = gr.Number(value=40, precision=0, minimum=1, maximum=MAX_SWEEP_ITEMS, label="Items")
            batch_sweep_button = gr.Button("Run batch sweep")
            stop_sweep_button = gr.Button("Stop", variant="stop", scale=0, elem_id="stop-sweep")
        batch_status = gr.Markdown(elem_id="batch-sweep-status")  # a Stop said where it was pressed
        api_batch = gr.Button(visible=False)  # /sweep_catalogue: a stop as a notice and no plot
        batch_plot = gr.Plot(label="Accuracy per task and its mean against severity", elem_id="batch-sweep",
                             elem_classes=["chart"])
        batch_csv = gr.File(label="The numbers (CSV)")

    def need_item(image_path):
        if not image_path:  # the tab has no image field of its own: say where the item comes from
            raise StudioError("Robustness corrupts the Predict tab's item: click an example or upload an image "
                              "there first.")

    items = LatestInputs()  # the Predict tab's item and the model, as `forget_probe` last saw them

    def unless_item_changed(what: str, *item) -> None:
        """Refuse a probe or sweep result whose item or model is no longer the page's: it landed after
        `forget_probe` had cleared the results, as the new item's."""
        if items.superseded(item):
            raise StudioError(f"The item or the model changed while the {what} ran: nothing of it is shown. "
                              f"Run it again for this one.")

    def probe(image_path, text_value, model_name, i_noise, i_severity, t_noise, t_severity, seed_value):
        """Predict on the clean and the corrupted item; returns both predictions as JSON first."""
        need_item(image_path)
        result = studio.probe(image_path, text_value, model_name, i_noise, i_severity, t_noise, t_severity,
                              seed_value)
        unless_item_changed("probe", image_path, text_value, model_name)
        first = next(iter(result.clean.tasks))
        clean_map, noisy_map, moved = views.probe_maps(result, first)
        return {probe_json: views.probe_summary(result), probe_table: views.probe_rows(result),
                clean_heat: clean_map, noisy_heat: noisy_map, probe_note: moved, probe_state: result,
                probe_task: gr.update(choices=[(views.task_name(t, p), t) for t, p in result.clean.tasks.items()],
                                      value=first),
                shift_plot: views.probe_shift_figure(result), noisy_text: result.noisy_text}

    def probe_for_task(result, task_name):
        if result is None:
            return gr.skip()
        return dict(zip((clean_heat, noisy_heat, probe_note), views.probe_maps(result, task_name)))

    def sweep_item(image_path, text_value, model_name, i_noise, t_noise, seed_value):
        need_item(image_path)
        sweep = studio.item_sweep(image_path, text_value, model_name, i_noise, t_noise, seed_value)
        unless_item_changed("sweep", image_path, text_value, model_name)
        for note in sweep.notes:  # beside the plot, whose flat text curves would read as robustness
            gr.Info(html.escape(note))
        return {item_sweep_plot: item_sweep_figure(sweep.confidence, sweep.image_weight,
                                                   studio.display_names(model_name), sweep.corruptions)}

    def sweep_catalogue(model_name, items, i_noise, t_noise, seed_value, request: gr.Request,
                        progress=gr.Progress()):
        """The batch sweep's plot, titled with what it swept, and its CSV; SweepStopped when stopped. On screen a
        stop is said under the buttons and the plot before stays (it threw both away: QA researcher, s39)."""
        def progress_unless_cancelled(fraction: float, step: str) -> None:
            if event_ended():  # a client's job.cancel(): Gradio ends the event, not the thread running it
                raise SweepStopped("The batch sweep's client cancelled it.")
            progress(fraction, step)

        rows, path = studio.catalogue_sweep(model_name, items, i_noise, t_noise, seed_value,
                                            progress_unless_cancelled, session=request.session_hash)
        swept = next(row for row in rows if row["task"] == "mean")
        title = f"{model_name}: {swept['n']} test items, seed {swept['seed']}"
        return {batch_plot: catalogue_sweep_figure(rows, names=studio.display_names(model_name), title=title),
                batch_csv: str(path)}

    @user_errors
    def sweep_catalogue_api(model_name, items, i_noise, t_noise, seed_value, request: gr.Request,
                            progress=gr.Progress()):
        try:
            return sweep_catalogue(model_name, items, i_noise, t_noise, seed_value, request, progress)
        except SweepStopped as exc:  # the client's own stop: a notice, not an error
            gr.Warning(html.escape(str(exc)))
            return {batch_plot: None, batch_csv: None}

    def stop_sweep(request: gr.Request) -> str:
        """Stop this page's batch sweep (an API client's: from the same Client) after its current batch; what
        it did (a Stop said nothing, even with no sweep running: QA researcher, s39)."""
        if studio.stop_sweep(request.session_hash):
            return "Stopping the batch sweep after its current batch…"
        return "No batch sweep of this page is running."

    def stop_on_leave(request: gr.Request) -> None:
        """A closed or reloaded page's batch sweep stops too (`demo.unload`: no output to say it in)."""
        studio.stop_sweep(request.session_hash)

    def forget_probe(image_path, text_value, model_name) -> dict:
        """Another item or model: the probe's and the item sweep's results were of the one before, unsaid."""
        items.note((image_path, text_value, model_name))
        return {probe_json: None, probe_table: None, clean_heat: None, noisy_heat: None, shift_plot: None,
                noisy_text: "", probe_note: "", probe_state: None, probe_task: gr.update(choices=[], value=None),
                item_sweep_plot: None, status: ""}

    probe_inputs = [image, text, shared.model, image_noise, image_severity, text_noise, text_severity, seed]
    probe_outputs = [probe_json, probe_table, clean_heat, noisy_heat, shift_plot, noisy_text, probe_note,
                     probe_state, probe_task]
    shown_with_api(probe_button, api_probe, probe, status, probe_inputs, probe_outputs, "probe")
    probe_task.input(probe_for_task, [probe_state, probe_task], [clean_heat, noisy_heat, probe_note],
                     api_visibility="private")
    for noise, severity in ((image_noise, image_severity), (text_noise, text_severity)):  # "none": nothing to set
        noise.change(lambda name: gr.update(interactive=name != "none"), noise, severity, api_visibility="private")
    sweep_inputs = [image, text, shared.model, image_noise, text_noise, seed]
    shown_with_api(sweep_button, api_sweep, sweep_item, status, sweep_inputs, [item_sweep_plot], "sweep_item")
    for source in (image, text, shared.model):  # another item or model: its results, and a refusal, no longer apply
        source.change(forget_probe, [image, text, shared.model], [*probe_outputs, item_sweep_plot, status],
                      api_visibility="private", show_progress="hidden")
    batch_inputs = [shared.model, sweep_size, image_noise, text_noise, seed]
    api_batch.click(sweep_catalogue_api, batch_inputs, [batch_plot, batch_csv], api_name="sweep_catalogue")
    batch_sweep_button.click(errors_in(batch_status)(sweep_catalogue), batch_inputs,
                             [batch_plot, batch_csv, batch_status], api_name="sweep_catalogue_shown",
                             api_visibility="private")
    # not behind the queue's busy workers (a sweep may be one of them)
    stop_sweep_button.click(stop_sweep, None, batch_status, api_name="stop_sweep", concurrency_limit=None,
                            show_progress="hidden")
    return stop_on_leave


def history_tab(studio: Studio, shared: Shared) -> None:
    """The audit of every decision (filtered, searched, paged), one item's history, the
    annotators' agreement, the latest saves, export for the trainer and an optional push to the Hub."""
    names = studio.display_names()
    tasks = sorted(views.task_choices(list(names), names))
    with gr.Tab(TABS["history"], id="history") as tab:
        gr.Markdown("### Audit\nEvery decision, newest first: the label and its status, who and whether a human or "
                    "an auto-accept, what changed against the model's prediction and the catalogue's label, and "
                    "the checkpoint. Search looks in item ids, labels, annotators and texts. An undo's status is "
                    "that of the label it restored. Wide tables scroll sideways (on a phone, swipe them).")
        with gr.Row():
            audit_task = gr.Dropdown(["any", *tasks], value="any", label="Task", allow_custom_value=True,
                                     elem_id="audit-task")
            audit_annotator = gr.Textbox(label="Annotator", placeholder="any", elem_id="audit-annotator")
            audit_status = gr.Dropdown(["any", *STATUSES], value="any", label="Status", elem_id="audit-status")
            audit_source = gr.Dropdown(["any", *AUDIT_SOURCES], value="any", label="Source",
                                       elem_id="audit-source")
            audit_search = gr.Textbox(label="Search", placeholder="item id, label, annotator or text",
                                      elem_id="audit-search")
            audit_page = gr.Number(1, precision=0, minimum=1, label="Page", elem_id="audit-page")
            audit_button = gr.Button("Search", elem_id="audit-run")
        api_audit = gr.Button(visible=False)  # /audit: its errors as errors
        audit_summary = gr.Markdown(label="audit summary", elem_id="audit-summary")
        audit_table = gr.Dataframe(headers=views.AUDIT_HEADERS, interactive=False, wrap=True, elem_id="audit",
                                   max_height=520, column_widths=views.AUDIT_WIDTHS)
        gr.Markdown("### One item's history\nEvery decision on one item, oldest first: labels, skips, undos and "
                    "auto-accepts.")
        with gr.Row():
            history_item = gr.Textbox(label="Item id", elem_id="history-item-id", scale=3)
            history_button = gr.Button("Show its history", elem_id="history-item", scale=1)
        item_table = gr.Dataframe(headers=views.ITEM_HISTORY_HEADERS, interactive=False, wrap=True,
                                  elem_id="item-history", column_widths=views.ITEM_HISTORY_WIDTHS)
        gr.Markdown("### Agreement\nWhere two annotators or more labelled the same item and task (each one's "
                    "standing human label; auto-accepts, adjudications and undone labels do not count): raw "
                    "agreement and Cohen's kappa (the mean over annotator pairs sharing two items or more; it "
                    "discounts the agreement chance alone gives, so it is 0 where one annotator gave every item the "
                    "same class, however high the raw agreement, and blank where both did; *kappa over* says how "
                    "many of the annotator pairs sharing an item it counts), and "
                    "the items whose annotators still disagree, or where a label since goes against a reviewer's "
                    "ruling (even one annotator's: so there may be more of them than items labelled twice; the "
                    "Review tab's Disagreements source settles them). The export writes it beside itself, as "
                    "`<name>.agreement.json`.  \n**Second opinions only:** a label saved where another "
                    "annotator's label of the task was shown (on Predict each control starts at it) is a review of it, "
                    "not an independent opinion: it is left out of these figures and counted under *reviews left "
                    "out*. For the agreement, label blind: Review with *Show decided items* on hides the others' "
                    "labels until you decide.")
        agreement_button = gr.Button("Refresh agreement", elem_id="agreement-refresh")
        # filled when the tab opens (a callable value would add a second public API name for /agreement)
        agreement_table = gr.Dataframe(headers=views.AGREEMENT_HEADERS, interactive=False, elem_id="agreement")
        gr.Markdown("### Latest saves")
        refresh = gr.Button("Refresh")
        shared.history.render()
        with gr.Row():
            export_format = gr.Radio(["CSV", "JSONL"], value="CSV", label="Format (the trainer's manifest format)")
            export_button = gr.Button("Export labels")
        with gr.Row():
            export_file = gr.File(label="Exported labels (each label's source, annotator, checkpoint and time)",
                                  interactive=False, elem_id="export-file")
            agreement_json = gr.File(label="Agreement (JSON)", interactive=False, elem_id="agreement-file")
        with gr.Row():
            push_button = gr.Button("Push labels to the Hugging Face Hub (optional)")
            push_status = gr.Markdown()
        gr.Markdown("Train with the corrections: `python -m cma_clip.train --catalogue NAME --extra-labels "
                    f"{shown_path(studio.store.path)} --out checkpoints/NEW` (or `--extra-labels` the export you "
                    "downloaded), then restart the app: it lists the checkpoints it found when it started.")

    def audit(task_name, annotator_name, status_name, source_name, search, page):
        """One page of the audit, filtered by task, annotator, status and source, and searched. On screen a
        refused filter (page 0, a task no decision names) is said in the summary, and the table and the filters
        keep what they showed (an error put a badge over them, the Page box could not be typed in, and the
        summary above still counted the last search: QA team lead, session 39)."""
        rows, total, page = studio.audit(task_name, annotator_name, status_name, source_name, search, page or 1)
        return {audit_table: views.audit_rows(rows, names), audit_summary: views.audit_summary(total, page, AUDIT_PAGE),
                audit_page: page}

    @user_errors
    def item_history(item):
        """Every decision on one item, oldest first."""
        return views.item_history_rows(studio.item_history(item), names)

    def agreement():
        """Per task: items two annotators or more labelled, raw agreement, Cohen's kappa, annotators."""
        return views.agreement_rows(studio.agreement(), names)

    @user_errors
    def export_labels(fmt):
        """Export the current labels as a CSV or JSONL manifest the trainer reads."""
        return str(studio.export(fmt))

    def agreement_beside(exported):
        """The agreement the export wrote beside itself (the export's file component holds Gradio's copy
        of the export, elsewhere, by the same name)."""
        found = studio.export_agreement(exported) if exported else None
        return str(found) if found else None

    @user_errors
    def push_labels(_annotator):
        """Push the label store to $CMA_CLIP_HUB_DATASET with $HF_TOKEN; off unless both are set. With a
        login on, `user_errors` refuses it to a visitor not signed in (one pushed to the owner's dataset)."""
        try:
            return f"Pushed to {views.plain(hub.push_label_store(studio.store.path, studio.export('jsonl')))}"
        except (hub.HubError, StudioError) as exc:
            return f"Not pushed: {views.plain(exc)}"

    audit_inputs = [audit_task, audit_annotator, audit_status, audit_source, audit_search, audit_page]  # page last
    audit_outputs = [audit_table, audit_summary, audit_page]
    # the public events first: a private one named after the same function would take its API name
    shown_with_api(audit_button, api_audit, audit, audit_summary, audit_inputs, audit_outputs, "audit",
                   js=AUDIT_PAGE_JS)
    shown_audit = errors_in(audit_summary)(audit)  # the tab's opening and Enter in a box, as the button
    history_button.click(item_history, history_item, item_table, api_name="item_history")
    agreement_button.click(agreement, None, agreement_table, api_name="agreement")
    refresh.click(shared.history_rows, None, shared.history, api_name="history")
    tab.select(shown_audit, audit_inputs, audit_outputs, api_visibility="private", js=AUDIT_PAGE_JS).then(
        agreement, None, agreement_table, api_visibility="private").then(
        shared.history_rows, None, shared.history, api_visibility="private")
    for box in (audit_annotator, audit_search):
        box.submit(shown_audit, audit_inputs, audit_outputs, api_visibility="private", js=AUDIT_PAGE_JS)
    history_item.submit(item_history, history_item, item_table, api_visibility="private")
    export_button.click(export_labels, export_format, export_file, api_name="export_labels").success(
        agreement_beside, export_file, agreement_json, api_visibility="private")
    push_button.click(push_labels, shared.annotator, push_status, api_visibility="private")


def tasks_api(studio: Studio) -> None:
    """The /tasks endpoint (no component: the API only). Call it after the tabs, which it would split."""
    def tasks(model_name: str) -> dict:
        """The model's tasks and their classes, in the order /save_correction takes them, and the new
        classes labelers confirmed since (labels items hold outside those classes)."""
        if not isinstance(model_name, str):
            raise error(f"/tasks takes a model's name (text), not {type(model_name).__name__}; the models: "
                           f"{', '.join(studio.model_names)}.")
        if model_name not in studio.checkpoints:
            raise error(f"No model {model_name!r}; the models: {', '.join(studio.model_names)}.")
        try:
            return {"tasks": studio.task_classes(model_name), "new_classes": studio.new_classes(model_name)}
        except StudioError as exc:
            raise error(str(exc)) from None

    gr.api(tasks, api_name="tasks")


def annotator_box(login: Login) -> gr.Textbox:
    """The name every decision is saved under: typed freely, or, with a login on, the signed-in user's."""
    if login.on:  # (a value, so that API clients may leave out the name the server replaces)
        return signed_in(gr.Textbox("", label="Annotator (signed in)", interactive=False, scale=2,
                                    elem_id="annotator"))
    return gr.Textbox(label="Annotator", placeholder="your name (needed to save)", max_length=MAX_NAME_CHARS,
                      scale=2, elem_id="annotator")


def browser_secret(studio: Studio) -> str:
    """The key the browser's saved fields are encrypted with, kept in the data folder, so
    that they still read after a server restart (a new random key would lose them). Two processes
    starting at once on a new folder share one key (each wrote its own: one read the other's
    half-written file, an empty key, and Gradio then drew a key of its own)."""
    path = studio.data_dir / "browser_state.key"
    if not path.is_file():
        atomic_write(path, new_id().encode(), keep_existing=True)
    return path.read_text().strip()


def build(studio: Studio, login: Login | None = None) -> gr.Blocks:
    """The app: a header, the fields every tab shares, then the tabs; a page load restores
    the annotator, the model and the review queue this browser had. With a `login` on, the
    annotator is the signed-in user (the box shows the name and cannot be edited)."""
    login = login or Login()
    models = studio.model_names

    def history_rows() -> list[list[str]]:
        return views.history_rows(studio.history(), studio.display_names())

    secret = browser_secret(studio)
    with gr.Blocks(title="CMA-CLIP Studio", delete_cache=CACHE_RETENTION) as demo:
        gr.Markdown("# CMA-CLIP Studio\nMulti-task product attribute prediction with cross-modality attention "
                    "([CMA-CLIP, Liu et al. 2021](https://arxiv.org/abs/2112.03562)). Upload a product photo and its "
                    "text, see every attribute with its confidence and what the model looked at, and correct it.")
        remembered = {name: gr.BrowserState(None, storage_key=f"{BROWSER_KEY}-{name}", secret=secret)
                      for name in ("annotator", "model", "queue", "tab", "inputs")}
        with gr.Row():
            shared = Shared(
                model=gr.Dropdown(models, value=studio.default_model, label="Model", scale=2,
                                  elem_id="model"),
                annotator=annotator_box(login),
                history=gr.Dataframe(headers=views.HISTORY_HEADERS, interactive=False,  # filled as agreement is
                                     wrap=True, elem_id="history", render=False, column_widths=views.HISTORY_WIDTHS),
                history_rows=history_rows, remember_queue=remembered["queue"], remember_inputs=remembered["inputs"])
            if login.oauth:
                gr.LoginButton(scale=1)
            elif login.on:
                gr.Button("Log out", link="/logout", scale=0, elem_id="logout")
        with gr.Tabs() as tabs:
            image, text, restore_inputs, entered_inputs, restored_inputs = predict_tab(studio, shared)
            panel, restore_queue, restored_outputs = review_tab(studio, shared)
            stop_on_leave = robustness_tab(studio, shared, image, text)
            history_tab(studio, shared)
        tasks_api(studio)
        typed_inputs(demo)
        demo.unload(stop_on_leave)

        def restore(annotator_name, model_name, queue_id, tab, kept_inputs, typed_name, chosen_model, *entered):
            """What this browser had before the reload: the annotator, the model, the queue, the tab and the
            Predict tab's inputs (a name typed before the page finished loading wins). A restored queue shows
            its tab, unless another tab was open (a reload on Predict went to Review: QA phone labeler, session 38)."""
            annotator_name = (typed_name or "").strip() or annotator_name or ""
            # the model it had, else the one chosen, unless its weights failed to load (known once loaded)
            model_name = next((m for m in (model_name, chosen_model) if m in studio.checkpoints
                               and m not in studio.unusable), studio.default_model)
            queue = restore_queue(annotator_name, model_name, queue_id)
            return {shared.annotator: annotator_name if annotator_name != typed_name or login.on else gr.skip(),
                    shared.model: model_name if model_name != chosen_model else gr.skip(),
                    **restore_inputs(kept_inputs, *entered), **queue,
                    **({tabs: gr.Tabs(selected=tab or "review")} if tab or panel.queue in queue else {})}

        demo.load(user_errors(restore), [*remembered.values(), shared.annotator, shared.model, *entered_inputs],
                  [shared.annotator, shared.model, tabs, *restored_inputs, *restored_outputs],
                  api_visibility="private")

        def remember_tab(evt: gr.SelectData) -> str | None:
            return next((tab for tab, label in TABS.items() if label == evt.value), None)

        tabs.select(remember_tab, None, remembered["tab"], api_visibility="private")
        shared.annotator.change(user_errors(lambda name: name), shared.annotator, remembered["annotator"],
                                api_visibility="private")
        shared.model.change(lambda name: name, shared.model, remembered["model"], api_visibility="private")
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
    if not (catalogues := default_data_root()).is_dir():  # said when a catalogue view was opened, not before
        print(f"[cma-clip] no catalogues at {catalogues} (CMA_CLIP_DATA): the catalogue review queues, suspected "
              "mislabels and the batch sweep say so when opened; the rest works")
    if os.environ.get("CMA_CLIP_HUB_DATASET", "").strip() and not os.environ.get("HF_TOKEN", "").strip():
        print("[cma-clip] CMA_CLIP_HUB_DATASET is set without HF_TOKEN: 'Push labels to the Hub' will refuse")
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
          block: bool = True, login: Login | None = None) -> Served:
    """Build and launch the app, uploads kept under the studio's data folder (`keep_uploads_in`).

    `studio` defaults to `default_studio()`; `host` to $GRADIO_SERVER_NAME, else 0.0.0.0 on a
    Hugging Face Space and 127.0.0.1 elsewhere; `port` to $GRADIO_SERVER_PORT, $PORT or 7860
    when blocking, to a free port otherwise. The models load in a background thread while the
    UI is built (`Studio.load_models`), and the server starts once they are loaded and warm, so
    its first prediction is as fast as the next ones. `block=True` serves until interrupted;
    `block=False` returns the running app (tests, benchmarks)."""
    login = login_from_env() if login is None else login  # a login that cannot work stops us first, at once
    for setting in (upload_hours, upload_storage_bytes, hub.hub_deadline_s):
        setting()  # a number set that cannot be used stops us too, naming its variable (not at first use)
    studio = default_studio() if studio is None else studio
    host = host or os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    if port is None:
        port = server_port() if block else free_port(host)
    uploads = ExitStack()
    uploads.enter_context(keep_uploads_in(studio))
    if studio.loading is None:
        studio.load_models()  # in the background, while the UI is built
    try:
        demo = build(studio, login)
        studio.wait_loaded()  # the server says it is running once the models are loaded and warm
        for name, why in studio.unusable.items():  # a broken folder in checkpoints/ is named, not served unsaid
            print(f"[cma-clip] checkpoints/{name} is not usable: {why}")
        demo.queue(default_concurrency_limit=4).launch(
            server_name=host, server_port=port, head=SHORTCUTS, css=CSS, theme=THEME, max_file_size=MAX_UPLOAD,
            prevent_thread_lock=not block, quiet=not block, auth=login.users.check if login.users else None,
            auth_message="CMA-CLIP Studio: sign in to label.")
    except BaseException:
        uploads.close()
        raise
    if block:  # launch() returned: the server has stopped
        uploads.close()
    return Served(demo, demo.local_url, uploads)


if __name__ == "__main__":
    try:
        serve()
    except CMAClipError as exc:  # a login or a device asked for but not usable: say why, start nothing
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:  # Gradio's "Cannot find empty port in range" when the port is taken, say
        raise SystemExit(f"error: {exc}") from None
