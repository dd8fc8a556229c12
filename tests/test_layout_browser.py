"""A real browser (Debian's chromium, driven by Playwright) at a 1366 x 768 laptop's size and a 412 px
phone's: every tab fits without horizontal scrolling of the page, people read task names (never a
raw column name), an input error shows on the field at fault, once, and on a phone the results
come before the examples. Screenshots go to artifacts/layout-*.png."""
import pytest
from playwright.sync_api import expect

from conftest import ARTIFACTS, EXAMPLE_IMAGE, EXAMPLE_TEXT, serving
from test_browser import chromium, fill_until_it_holds

SIZES = {"laptop": (1366, 768), "phone": (412, 915)}
TABS = {"predict": "Predict", "review": "Review", "robustness": "Robustness", "history": "History"}
# What sticks out of the page on the right: visible elements past the viewport's edge that no
# horizontally scrolling box holds (Gradio's aria-hidden copy of the tab bar, kept for measuring, aside).
OVERFLOW = """() => {
  const width = window.innerWidth;
  const inScroller = (el) => {
    for (let a = el.parentElement; a; a = a.parentElement) {
      if (a.getAttribute('aria-hidden') === 'true') return true;
      const style = getComputedStyle(a);
      if (['auto', 'scroll'].includes(style.overflowX) && a.scrollWidth > a.clientWidth) return true;
    }
    return false;
  };
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width && r.right > width + 1 && el.checkVisibility() && !inScroller(el))
      out.push(`${el.tagName.toLowerCase()}#${el.id} .${String(el.className.baseVal ?? el.className).slice(0, 40)}`);
  }
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: width, outside: out.slice(0, 10)};
}"""

# Table cells too narrow for a short word, which then wraps a few letters a line ("pending" as
# "pe / nd / in / g" on a phone): visible cells of every table whose words of up to 12 characters
# (split where a line may break: spaces, hyphens, slashes) are wider than the cell's room. Longer
# words may wrap; a table scrolls inside its box.
SQUEEZED = """() => {
  const context = document.createElement('canvas').getContext('2d');
  const out = [];
  for (const cell of document.querySelectorAll('.table-wrap td, .table-wrap th')) {
    if (!cell.checkVisibility()) continue;
    const words = cell.innerText.split(/[\\s\\/-]+/).filter((w) => w && w.length <= 12);
    if (!words.length) continue;
    const inner = cell.querySelector('span, div') || cell;
    const style = getComputedStyle(inner), box = getComputedStyle(cell);
    context.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const widest = Math.max(...words.map((w) => context.measureText(w).width));
    const room = cell.clientWidth - parseFloat(box.paddingLeft) - parseFloat(box.paddingRight);
    if (widest > room + 1) out.push(`${cell.innerText.trim().slice(0, 24)}: ${Math.round(widest)} > ${Math.round(room)} px`);
  }
  return out.slice(0, 10);
}"""


@pytest.fixture(params=list(SIZES))
def sized_page(request, running_app):
    """A fresh page on the running app at one of SIZES; yields (size name, page)."""
    width, height = SIZES[request.param]
    with chromium() as browser:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(running_app[0])
        expect(page.locator("#predict")).to_be_visible(timeout=60_000)
        yield request.param, page


def open_tab(page, name: str) -> None:
    """Select a tab, through the tab bar's "More tabs" menu when a narrow screen folds it away."""
    tab = page.get_by_role("tab", name=TABS[name])
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.get_by_role("button", name="More tabs").click()
    page.locator(".overflow-dropdown button", has_text=TABS[name]).click()


def assert_fits(page, where: str) -> None:
    measured = page.evaluate(OVERFLOW)
    assert measured["scrollWidth"] <= measured["innerWidth"], (where, measured)
    assert not measured["outside"], (where, measured)


def assert_no_column_names(page, where: str) -> None:
    text = page.evaluate("() => document.body.innerText")
    assert "_name" not in text, (where, [line for line in text.splitlines() if "_name" in line][:5])


def assert_every_column_in_view(page, table: str) -> None:
    """The table's last column ends inside the table's box: no sideways scrolling to reach it."""
    box, last = page.locator(table).bounding_box(), page.locator(f"{table} th").last.bounding_box()
    assert last["x"] + last["width"] <= box["x"] + box["width"] + 1, (table, last, box)


def predict_example(page, text: str = EXAMPLE_TEXT) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#input-text textarea").fill(text)
    page.locator("#predict").click()
    expect(page.locator("#predictions")).to_contain_text("Pattern", timeout=60_000)
    # its map drawn too, scrolled to as a person would: on a phone it lies past the lazy image's load distance
    page.locator("#heatmap").scroll_into_view_if_needed()
    expect(page.locator("#heatmap img")).to_be_visible(timeout=60_000)


CONTRAST = """(selector) => {
  const luminance = (rgb) => {
    const [r, g, b] = rgb.match(/[\\d.]+/g).slice(0, 3).map((v) => {
      const c = v / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const text = luminance(getComputedStyle(document.querySelector(selector)).color);
  return (Math.max(text, 1) + 0.05) / (Math.min(text, 1) + 0.05);
}"""


def contrast(page, selector: str) -> float:
    """The WCAG contrast ratio of an element's text against white (the light theme's page)."""
    return page.evaluate(CONTRAST, selector)


WIDE_TABLE = """(selector) => {
  const wrap = document.querySelector(selector + " .table-wrap");
  const viewport = wrap.querySelector(".virtual-table-viewport");
  return {wide: viewport.scrollWidth > viewport.clientWidth + 1, hint: getComputedStyle(wrap, "::before").content};
}"""


def assert_a_wide_table_says_it_scrolls(page, selector: str, size: str) -> None:
    """A table wider than its box says above it that it scrolls: on a phone the prediction's auto-accept
    column and a probe's changes lay past the screen's edge, unseen (QA s42)."""
    seen = page.evaluate(WIDE_TABLE, selector)
    assert seen["wide"] == (size == "phone"), (size, selector, seen)  # a laptop shows every column
    assert ("Swipe the table sideways" in seen["hint"]) == seen["wide"], (size, selector, seen)


def check_view(page, size: str, view: str) -> None:
    """A screenshot of the view, then: nothing sticks out of the page, no raw column name shows, no
    table column is too narrow for a short word."""
    page.screenshot(path=str(ARTIFACTS / f"layout-{size}-{view}.png"), full_page=True)
    assert_fits(page, f"{size} {view}")
    assert_no_column_names(page, f"{size} {view}")
    assert not page.evaluate(SQUEEZED), (f"{size} {view}", page.evaluate(SQUEEZED))


def test_every_tab_fits_and_shows_names_not_columns(sized_page):
    size, page = sized_page
    for name in TABS.values():  # each tab in the bar, none folded into a "More tabs" menu on a phone
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    if size == "laptop":  # image, text and Predict above the fold
        expect(page.locator("#predict")).to_be_in_viewport(ratio=1)
    predict_example(page)
    expect(page.locator("#predictions")).to_contain_text("%")  # confidences in percent
    expect(page.locator("#operating-figures")).to_contain_text("held-out test items")
    assert_a_wide_table_says_it_scrolls(page, "#predictions", size)
    expect(page.locator("#heatmap img")).to_be_visible(timeout=30_000)
    if size == "phone":  # the results, then the correction and its Save, then the examples
        results, examples = page.locator("#predictions").bounding_box(), page.locator("#predict-examples")
        save = page.locator("#save").bounding_box()
        assert results["y"] + results["height"] <= save["y"]
        assert save["y"] + save["height"] <= examples.bounding_box()["y"]
        assert page.locator("#predict").bounding_box()["y"] < results["y"]  # the inputs first
    for picture in ("#heatmap img", "#modality-chart img"):  # never squeezed into half a phone's width
        assert page.locator(picture).bounding_box()["width"] >= 300, (size, picture)
    label = page.locator("#modality-chart label[data-testid=block-label]").bounding_box()
    assert label["y"] + label["height"] <= page.locator("#modality-chart img").bounding_box()["y"] + 1  # not over it
    assert contrast(page, "#item-id .info-text") >= 4.5, size  # a field's hint, readable (Gradio's: 1.9)
    # every bold letter from one font: Gradio's SemiBold files hold a few letters only, so no 600 face loads
    assert page.evaluate("async () => { await document.fonts.ready; return [...document.fonts].filter("
                         "(f) => f.status === 'loaded' && f.weight === '600').length; }") == 0
    check_view(page, size, "predict")

    open_tab(page, "review")
    fill_until_it_holds(page.locator("#review-size input"), "3")
    page.locator("#review-load").click()
    expect(page.locator("#review-progress")).to_contain_text("reviewed of 3", timeout=60_000)
    expect(page.locator("#review-table")).to_contain_text("Pattern")
    assert_a_wide_table_says_it_scrolls(page, "#review-table", size)
    if size == "laptop":  # every column of the item's table in view ("catalogue label" was cut at the edge)
        assert_every_column_in_view(page, "#review-table")
        page.get_by_text("History of this item").click()
        assert_every_column_in_view(page, "#review-item-history")
    check_view(page, size, "review")

    open_tab(page, "robustness")
    page.locator("#probe").click()
    expect(page.locator("#probe-table")).to_contain_text("pts", timeout=60_000)
    expect(page.locator("#probe-table")).to_contain_text("Pattern")
    assert_a_wide_table_says_it_scrolls(page, "#probe-table", size)
    for picture in ("#clean-heatmap", "#noisy-heatmap"):  # on a phone one above the other, never 164 px each
        assert page.locator(picture).bounding_box()["width"] >= 300, (size, picture)
    page.get_by_role("button", name="Sweep all severities for this item").click()
    expect(page.locator("#item-sweep img")).to_be_visible(timeout=120_000)
    # a sweep's six panels keep readable text: on a phone the chart scrolls sideways, never shrinks to 346 px
    assert page.locator("#item-sweep img").bounding_box()["width"] >= 700, size
    check_view(page, size, "robustness")

    open_tab(page, "history")
    expect(page.locator("#audit-summary")).not_to_be_empty(timeout=30_000)
    if size == "laptop":  # every audit column in view (the kind and the version were past the edge)
        assert_every_column_in_view(page, "#audit")
        assert_every_column_in_view(page, "#item-history")  # one item's (checkpoint and version were past it)
    check_view(page, size, "history")


def test_an_input_error_shows_on_its_field_once_and_leaves_the_rest(sized_page, tmp_path):
    size, page = sized_page
    page.locator("#predict").click()
    message = page.get_by_text("Upload a product image")
    expect(message).to_have_count(1, timeout=30_000)
    expect(message).to_be_visible()
    field, shown = page.locator("#input-image").bounding_box(), message.bounding_box()
    assert field["y"] <= shown["y"] <= field["y"] + field["height"]  # on the image field itself
    assert page.locator(".error:visible").count() == 0  # no "Error" badge on the outputs
    assert "Error" not in page.locator("#predictions").inner_text()
    page.screenshot(path=str(ARTIFACTS / f"layout-{size}-input-error.png"), full_page=True)
    assert_fits(page, f"{size} input error")

    not_an_image = tmp_path / "notes.jpg"  # a text file named .jpg: refused on the image field too
    not_an_image.write_text("not a photo")
    page.locator("#input-image input[type=file]").set_input_files(str(not_an_image))
    expect(page.locator("#input-note")).to_contain_text("notes.jpg is not a readable image", timeout=30_000)
    page.locator("#predict").click()  # (said at the upload, under the inputs; and on the field at Predict)
    refusal = page.locator("#input-image").get_by_text("notes.jpg is not a readable image")
    expect(refusal).to_have_count(1, timeout=30_000)
    field, shown = page.locator("#input-image").bounding_box(), refusal.bounding_box()
    assert field["y"] <= shown["y"] <= field["y"] + field["height"]
    assert page.locator(".error:visible").count() == 0
    page.locator("#input-image button[aria-label*='Clear'], #input-image button[aria-label*='clear']").first.click()

    predict_example(page, text="")  # an empty text: a note beside the field, the model on the image alone
    expect(page.locator("#input-note")).to_contain_text("rests on the image only")
    expect(page.locator("#predictions")).not_to_contain_text("✓ auto-accept")  # never without a text
    expect(page.get_by_text("Upload a product image")).to_have_count(0)
    page.locator("#input-text textarea").fill(EXAMPLE_TEXT[:-1])  # an edited text: the note no longer applies
    page.locator("#input-text textarea").press_sequentially(EXAMPLE_TEXT[-1])  # (typed: `fill` is no input event)
    expect(page.locator("#input-note")).not_to_contain_text("image only", timeout=30_000)
    expect(page.locator("#item-line")).to_contain_text("New item: predict it")
    page.locator("#predict").click()
    expect(page.locator("#item-line")).not_to_contain_text("New item", timeout=60_000)  # predicted with the text
    expect(page.locator("#input-note")).not_to_contain_text("image only")

    predict_example(page, text=" ".join([EXAMPLE_TEXT] * 20))  # 20 texts: past the model's token limit
    expect(page.locator("#input-note")).to_contain_text("The model read the first", timeout=60_000)
    predict_example(page, text="x" * 3000)  # one word as long as a text: the note quoting it breaks it at the edge
    expect(page.locator("#map-note")).to_contain_text("x" * 100, timeout=60_000)
    note, panel = page.locator("#map-note").evaluate("n => [n.scrollWidth, n.clientWidth]")
    assert note <= panel, (note, panel)

    page.locator("#input-image input[type=file]").set_input_files(str(not_an_image))  # a new item: the last one's
    expect(page.locator("#input-note")).to_contain_text("not a readable image", timeout=30_000)  # results go
    expect(page.locator("#predictions")).not_to_contain_text("%")
    expect(page.locator("#heatmap img")).to_have_count(0)

    # after an example's click, Gradio decoded the next upload itself: a bare "Error" on ~20 fields and a
    # traceback (QA, session 34); the refusal is the app's, as before the click
    page.locator("#predict-examples tr.tr-body").first.click()
    expect(page.locator("#predictions")).to_contain_text("%", timeout=60_000)
    page.locator("#input-image input[type=file]").set_input_files(str(not_an_image))
    expect(page.locator("#input-note")).to_contain_text("notes.jpg is not a readable image", timeout=30_000)
    assert page.locator(".error:visible").count() == 0


ARROW_CLEARANCE = """(box) => {
  const input = box.querySelector('input'), arrow = box.querySelector('.icon-wrap');
  const style = getComputedStyle(input);
  return [input.getBoundingClientRect().right - parseFloat(style.paddingRight), arrow.getBoundingClientRect().left,
          style.textOverflow];
}"""


def test_a_dropdowns_value_stops_short_of_its_arrow(sized_page):
    """On a phone the Model box read "fashion-product-i" with its arrow over the last letters (QA, session 33)."""
    size, page = sized_page
    text_end, arrow_start, overflow = page.locator("#model").evaluate(ARROW_CLEARANCE)
    assert text_end <= arrow_start and overflow == "ellipsis", (size, text_end, arrow_start, overflow)


def test_a_corruptions_name_reads_whole(sized_page):
    """On a phone the Robustness tab's boxes read "word_m…" and the Model box "fashion-…" (QA, session 36):
    each takes the whole width there, and the longest names fit."""
    size, page = sized_page
    open_tab(page, "robustness")
    for box, longest in (("#image-noise", "brightness_contrast"), ("#text-noise", "word_shuffle")):
        field = page.locator(f"{box} input")
        field.click()
        page.get_by_role("option", name=longest, exact=True).click()
        expect(field).to_have_value(longest)
        shown, needed = field.evaluate("f => [f.clientWidth, f.scrollWidth]")
        assert needed <= shown, (size, box, shown, needed)


def test_a_save_without_annotator_shows_on_the_annotator_box_in_view(sized_page):
    size, page = sized_page
    predict_example(page)
    page.locator("#save").scroll_into_view_if_needed()
    page.locator("#save").click()
    message = page.get_by_text("Enter your name here to save")
    try:
        expect(message).to_have_count(1, timeout=90_000)  # 2 CPU cores shared with the browser in CI
    except AssertionError as missing:  # what the page showed instead, for whoever reads the CI log
        shown = (page.locator("#save-status").inner_text(), page.locator("#annotator input, #annotator "
                 "textarea").first.input_value(), page.locator(".validation-error, .error").all_inner_texts())
        raise AssertionError(f"no annotator message; save status, annotator box, errors: {shown}") from missing
    expect(message).to_be_in_viewport()  # brought into view, not left above the fold
    expect(page.locator("#annotator input, #annotator textarea").first).to_be_focused()  # to type the name at once
    box, shown = page.locator("#annotator").bounding_box(), message.bounding_box()
    assert box["y"] <= shown["y"] <= box["y"] + box["height"]  # on the Annotator box itself
    expect(page.locator("#save-status")).not_to_contain_text("Error")
    page.screenshot(path=str(ARTIFACTS / f"layout-{size}-annotator-error.png"))
    # a name of each size's own: the other size's save of the same labels by the same name stores nothing new
    page.locator("#annotator input, #annotator textarea").first.fill(f"ana-{size}")
    page.locator("#save").click()
    expect(page.locator("#save-status")).to_contain_text("Saved", timeout=60_000)
    expect(page.get_by_text("Enter your name here to save")).to_have_count(0)


def test_an_example_brings_its_prediction_into_view_and_robustness_asks_for_an_item(sized_page):
    size, page = sized_page
    open_tab(page, "robustness")
    page.locator("#probe").click()  # nothing predicted yet: the tab says where its item comes from
    expect(page.locator("#robustness-status")).to_contain_text("Robustness corrupts the Predict tab's item",
                                                               timeout=30_000)
    page.wait_for_timeout(6_000)  # past the toast an error would have faded with: the message stays
    expect(page.locator("#robustness-status")).to_contain_text("Robustness corrupts the Predict tab's item")
    assert page.locator(".error:visible").count() == 0  # and no "Error" badge over the outputs
    page.locator("#robustness-tab button", has_text="Sweep all severities").click()
    expect(page.locator("#robustness-status")).to_contain_text("Robustness corrupts", timeout=30_000)
    assert page.locator(".error:visible").count() == 0
    open_tab(page, "predict")
    page.locator("#predict-examples tbody tr").nth(1).click()
    expect(page.locator("#predictions")).to_contain_text("%", timeout=60_000)
    expect(page.locator("#robustness-status")).to_be_empty()  # an item now: the refusal no longer applies
    if size == "phone":  # the results sit above the examples: brought into view, not left off screen
        expect(page.locator("#predictions")).to_be_in_viewport(timeout=10_000)
    expect(page.locator("#heatmap img")).to_be_visible(timeout=60_000)
    label = page.locator("#heatmap [data-testid=block-label]").bounding_box()
    buttons = page.locator("#heatmap .icon-button-wrapper").bounding_box()
    assert label["x"] + label["width"] <= buttons["x"], (label, buttons)  # the map's label clear of its buttons
    page.screenshot(path=str(ARTIFACTS / f"layout-{size}-example.png"))


def test_severity_controls_follow_their_corruption(sized_page):
    size, page = sized_page
    open_tab(page, "robustness")
    if size == "phone":  # each slider as wide as its corruption's list (Text severity shared a row with Seed)
        for control in ("#image-severity", "#text-severity"):
            assert page.locator(control).bounding_box()["width"] == pytest.approx(
                page.locator("#image-noise").bounding_box()["width"], abs=2), control
    severity = page.locator("#image-severity input[type=range]")
    expect(severity).to_be_enabled()
    page.locator("#image-noise input").click()
    page.get_by_role("option", name="none", exact=True).click()
    expect(severity).to_be_disabled(timeout=10_000)
    page.locator("#image-noise input").click()
    page.get_by_role("option", name="blur", exact=True).click()
    expect(severity).to_be_enabled(timeout=10_000)


def test_one_items_history_shows_every_column_on_a_laptop(checkpoint_dir, tmp_path):
    """Twelve columns of an item with saves by two annotators: the checkpoint and the version were
    past a 1366-px screen's edge (a sideways scroll inside the table)."""
    item = "0816591001"
    with serving(checkpoint_dir, tmp_path / "data") as (url, studio), chromium() as browser:
        prediction, view = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", item)
        guesses = {t: p.label for t, p in prediction.tasks.items()}  # every task labelled: the model's, picked
        for annotator, colour in (("ana", "Grey"), ("ben", "Black")):  # ben overwrites ana's labels unseen
            saved = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", annotator, item,
                                     dict(guesses, colour_group_name=colour), view.shown, force=True)
            assert saved.result == "saved", saved
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(url)
        expect(page.locator("#predict")).to_be_visible(timeout=60_000)
        open_tab(page, "history")
        fill_until_it_holds(page.locator("#history-item-id input, #history-item-id textarea"), item)
        page.locator("#history-item").click()
        expect(page.locator("#item-history")).to_contain_text("overwrote ana's Grey (3)", timeout=30_000)
        assert_every_column_in_view(page, "#item-history")
        check_view(page, "laptop", "item-history")
