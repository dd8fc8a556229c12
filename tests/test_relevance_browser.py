"""A real browser (Debian's chromium, driven by Playwright): the Predict tab shows each task's relevance map
with its colour bar, the attention view and the opacity control; the Robustness tab shows relevance clean
against noisy. Screenshots go to artifacts/."""
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ARTIFACTS, EXAMPLE_IMAGE, EXAMPLE_TEXT
from test_browser import launch


@pytest.fixture()
def page(running_app):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1500})
        page.goto(running_app[0])
        yield page
        browser.close()


def heatmap_source(page) -> str:
    image = page.locator("#heatmap img")
    expect(image).to_be_visible(timeout=30_000)
    return image.get_attribute("src")


def changed_from(page, before: str, selector: str = "#heatmap img") -> str:
    page.wait_for_function("([sel, src]) => { const i = document.querySelector(sel); return i && i.src !== src; }",
                           arg=[selector, before], timeout=30_000)
    return page.locator(selector).get_attribute("src")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_each_task_gets_its_own_relevance_map(running_app, page):
    _, studio = running_app
    tasks, names = studio.predictor("hm-articles").tasks, studio.predictor("hm-articles").names
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#input-text textarea").fill(EXAMPLE_TEXT)
    page.locator("#predict").click()
    expect(page.locator("#predictions")).to_contain_text("Perceived colour", timeout=60_000)
    expect(page.locator("#map-note")).to_contain_text("estimates", timeout=30_000)
    expect(page.locator("#map-note")).to_contain_text(names[tasks[0]])  # tasks by the names people read
    expect(page.locator("#word-relevance")).to_contain_text("T-shirt")  # whole words, not word pieces
    expect(page.locator("#word-relevance")).not_to_contain_text("##")
    sources = {tasks[0]: heatmap_source(page)}
    page.locator("#heatmap").screenshot(path=str(ARTIFACTS / f"relevance-{tasks[0]}.png"))
    for task in tasks[1:]:
        choose(page, "explain-task", names[task])
        expect(page.locator("#map-note")).to_contain_text(names[task], timeout=30_000)
        sources[task] = changed_from(page, sources[list(sources)[-1]])
        page.locator("#heatmap").screenshot(path=str(ARTIFACTS / f"relevance-{task}.png"))
    assert len(set(sources.values())) == len(tasks)  # a different map for every task
    page.screenshot(path=str(ARTIFACTS / "relevance-predict.png"), full_page=True)

    before = sources[tasks[-1]]
    page.locator("#map-kind").get_by_text("Attention (raw, last layer)").click()
    attention = changed_from(page, before)
    page.locator("#heatmap").screenshot(path=str(ARTIFACTS / "relevance-attention-view.png"))
    page.locator("#map-opacity input[type=range]").fill("0.9")  # dragged
    dragged = changed_from(page, attention)
    typed = page.locator("#map-opacity input[type=number]")
    typed.fill("0.4")  # typed in the slider's box
    typed.press("Enter")
    changed_from(page, dragged)


def test_robustness_shows_relevance_clean_and_noisy(running_app, page):
    _, studio = running_app
    tasks, names = studio.predictor("hm-articles").tasks, studio.predictor("hm-articles").names
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#input-text textarea").fill(EXAMPLE_TEXT)
    page.get_by_role("tab", name="Robustness").click()
    page.locator("#probe").click()
    expect(page.locator("#probe-table")).to_contain_text("Perceived colour", timeout=60_000)
    expect(page.locator("#probe-shift")).to_contain_text("moved", timeout=30_000)
    expect(page.locator("#clean-heatmap img")).to_be_visible()
    before = page.locator("#noisy-heatmap img").get_attribute("src")
    choose(page, "probe-task", names[tasks[2]])
    expect(page.locator("#probe-shift")).to_contain_text(names[tasks[2]], timeout=30_000)
    changed_from(page, before, "#noisy-heatmap img")
    page.screenshot(path=str(ARTIFACTS / "relevance-robustness.png"), full_page=True)


def test_a_right_to_left_text_reads_from_the_right(running_app, page):
    """QA, session 37: an Arabic text's words were laid out from the left, its first word at the far left,
    so a reader of Arabic read the sentence backwards."""
    arabic = "قميص قطني أزرق للرجال"
    page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    page.locator("#input-text textarea").fill(arabic)
    page.locator("#predict").click()
    words = page.locator("#word-relevance .token")
    expect(words.first).to_contain_text("قميص", timeout=60_000)
    first, second = (words.nth(i).bounding_box() for i in (0, 1))
    assert first["x"] > second["x"]  # the first word on the right
    page.locator("#word-relevance").screenshot(path=str(ARTIFACTS / "relevance-right-to-left.png"))
    page.locator("#input-text textarea").fill(EXAMPLE_TEXT)  # the next text, left to right again
    page.locator("#predict").click()
    expect(words.first).to_contain_text("Dingo", timeout=60_000)
    first, second = (words.nth(i).bounding_box() for i in (0, 1))
    assert first["x"] < second["x"]
