"""A real browser (Debian's chromium, driven by Playwright) through the predict-correct-save flow."""
import shutil

from playwright.sync_api import expect, sync_playwright

from conftest import ARTIFACTS, EXAMPLE_IMAGE, EXAMPLE_TEXT

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(playwright):
    executable = shutil.which("chromium")
    assert executable, "chromium is not installed: .ci/run installs it with apt-get install chromium"
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)


def test_upload_predict_correct_save_and_see_history(running_app):
    url, studio = running_app
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(url)
        page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
        page.locator("#input-text textarea").fill(EXAMPLE_TEXT)
        page.locator("#predict").click()
        expect(page.locator("#predictions")).to_contain_text("colour_group_name", timeout=60_000)
        expect(page.locator("#heatmap img")).to_be_visible(timeout=30_000)
        slot = page.locator("#slot-0 input")
        expect(slot).to_be_visible()
        slot.fill("Browser-corrected top")
        slot.press("Enter")
        page.locator("#annotator input, #annotator textarea").first.fill("browser-tester")
        page.screenshot(path=str(ARTIFACTS / "browser-predict.png"), full_page=True)
        page.locator("#save").click()
        expect(page.locator("#save-status")).to_contain_text("Saved correction", timeout=30_000)
        page.get_by_role("tab", name="History & export").click()
        expect(page.locator("#history")).to_contain_text("Browser-corrected top", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "browser-history.png"), full_page=True)
        browser.close()
    saved = [entry["labels"] for entry in studio.store.history(limit=5) if entry["annotator"] == "browser-tester"]
    assert saved and saved[0]["product_type_name"] == "Browser-corrected top"


def test_review_queue_with_keyboard_shortcuts(running_app):
    url, studio = running_app
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(url)
        page.locator("#annotator input, #annotator textarea").first.fill("keyboard-reviewer")
        page.get_by_role("tab", name="Review queue").click()
        page.locator("#review-size input").fill("5")
        page.locator("#review-load").click()
        progress = page.locator("#review-progress")
        expect(progress).to_contain_text("0 reviewed of 5", timeout=60_000)
        page.locator("body").click(position={"x": 5, "y": 5})  # focus outside any text field
        page.keyboard.press("n")  # skip
        expect(progress).to_contain_text("1 reviewed of 5", timeout=30_000)
        page.keyboard.press("a")  # accept the prediction as is
        expect(progress).to_contain_text("2 reviewed of 5", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "browser-review.png"), full_page=True)
        browser.close()
    assert [e["annotator"] for e in studio.store.history(limit=1)] == ["keyboard-reviewer"]


def test_robustness_view_shows_clean_and_noisy(running_app):
    url, _ = running_app
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(url)
        page.locator("#input-image input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
        page.locator("#input-text textarea").fill(EXAMPLE_TEXT)
        page.get_by_role("tab", name="Robustness").click()
        page.locator("#probe").click()
        expect(page.locator("#probe-table")).to_contain_text("colour_group_name", timeout=60_000)
        expect(page.locator("#noisy-heatmap img")).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "browser-robustness.png"), full_page=True)
        browser.close()
