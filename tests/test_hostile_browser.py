"""Issue 16 in a real browser (Debian's chromium, driven by Playwright): Markdown and HTML in
item ids, annotators and column names make the browser fetch nothing, and the optional login
(login page, wrong password refused, saves under the signed-in name). Screenshots go to
artifacts/hostile-*.png."""
from __future__ import annotations

import csv

import pytest
from gradio_client import Client, handle_file
from playwright.sync_api import expect

from cma_clip.studio import Studio
from cma_clip.studio.accounts import Login, Users
from conftest import ARTIFACTS, EXAMPLE_IMAGE, EXAMPLE_TEXT
from test_browser import chromium, enter_item

MODEL = "hm-articles"
WAIT = 90_000  # ms: predictions on 2 shared CPU cores
HOST = "beacon.invalid"
ITEM_ID = f"a`![b](http://{HOST}/item.png)<img src=http://{HOST}/item-html.png>"
ANNOTATOR = f"<img src=http://{HOST}/annotator.png>![a](http://{HOST}/annotator-md.png)"
COLUMN = f"<img src=http://{HOST}/column.png>"


@pytest.fixture()
def browser():
    with chromium() as launched:
        yield launched


def watched_page(browser, url: str):
    """A page on `url`, and the list of every URL it requests (filled as it goes)."""
    page = browser.new_context(viewport={"width": 1500, "height": 1400}).new_page()  # room for a second tab
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url)
    return page, requested


def test_markdown_and_html_from_data_make_the_browser_fetch_nothing(running_app, browser, tmp_path):
    url, _ = running_app
    good = tmp_path / "items.csv"
    with open(good, "w", newline="") as handle:
        csv.writer(handle).writerows([["article_id", "image", "prod_name", "detail_desc"],
                                      [ITEM_ID, EXAMPLE_IMAGE.name, "Tee", EXAMPLE_TEXT]])
    bad = tmp_path / "bad.csv"  # a column name in HTML: it comes back in the error toast
    bad.write_text(f'"{COLUMN}",prod_name\n1,2\n')
    page, requested = watched_page(browser, url)
    name = page.locator("#annotator textarea, #annotator input").first
    expect(name).to_be_visible(timeout=WAIT)
    name.fill(ANNOTATOR)
    name.press("Tab")
    page.get_by_role("tab", name="Review").click()
    page.locator("#review-manifest input[type=file]").set_input_files(str(good))
    page.locator("#review-images input[type=file]").set_input_files(str(EXAMPLE_IMAGE))
    # (by the cell's name: Gradio's file table splits a long name's stem and extension into two spans)
    expect(page.locator("#review-images").get_by_role("cell", name=EXAMPLE_IMAGE.name)).to_be_visible(timeout=30_000)
    page.locator("#review-load-upload").click()
    progress = page.locator("#review-progress")
    expect(progress).to_contain_text("0 reviewed of 1", timeout=WAIT)
    expect(progress).to_contain_text(f"a'![b](http://{HOST}/item.png)<img src=http://{HOST}/item-html.png>")
    page.locator("#review-skip").click()  # the skip message names the item; the table names the annotator
    expect(page.locator("#review-status")).to_contain_text("Skipped item", timeout=30_000)
    page.locator("#review-previous").click()  # the skipped item: its info lines name the annotator
    info = page.locator("#review-slot-0 .info-text")
    expect(info).to_contain_text(f"skipped (<img src=http://{HOST}/annotator.png>![a]", timeout=30_000)
    expect(info).not_to_contain_text("&lt;")  # Gradio escapes the HTML itself: shown once, as typed
    assert info.locator("a, img, code").count() == 0  # and its Markdown made no link, image or code
    page.get_by_text("Queue: source, order and filters").click()
    page.locator("#review-manifest button[aria-label*='Clear'], #review-manifest button[aria-label*='clear']") \
        .first.click()
    page.locator("#review-manifest input[type=file]").set_input_files(str(bad))
    page.locator("#review-load-upload").click()
    expect(page.get_by_text("lacks the column").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text(COLUMN).first).to_be_visible()  # the toast shows the name as text
    page.get_by_role("tab", name="History").click()
    expect(page.locator("#audit")).to_contain_text(ANNOTATOR, timeout=30_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "hostile-no-beacon.png"), full_page=True)
    assert not [u for u in requested if HOST in u], [u for u in requested if HOST in u]
    page.evaluate("html => document.body.insertAdjacentHTML('beforeend', html)", f"<img src=http://{HOST}/control.png>")
    page.wait_for_timeout(1000)
    assert any(u.endswith("/control.png") for u in requested)  # the watch sees a fetch when there is one


@pytest.fixture()
def login_app(checkpoint_dir, tmp_path):
    import app

    studio = Studio(checkpoint_dir, data_dir=tmp_path / "login-app", device="cpu")
    served = app.serve(studio, host="127.0.0.1", block=False,
                       login=Login(Users.from_pairs("ana:ana-secret-1,ben:ben-secret-2")))
    yield served.url, studio
    served.close()


def test_login_page_refuses_a_wrong_password_and_saves_under_the_signed_in_name(login_app, browser):
    url, studio = login_app
    page, _ = watched_page(browser, url)
    user, password = page.locator("input[type=text]").first, page.locator("input[type=password]").first
    expect(password).to_be_visible(timeout=WAIT)
    expect(page.locator("#annotator")).to_have_count(0)  # nothing of the app before signing in
    user.fill("ana")
    password.fill("wrong-password")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("Incorrect Credentials").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "hostile-login-refused.png"), full_page=True)
    user.fill("ana")  # the login form clears itself after a refusal
    password.fill("ana-secret-1")
    page.get_by_role("button", name="Login").click()
    name = page.locator("#annotator textarea, #annotator input").first
    expect(name).to_have_value("ana", timeout=WAIT)  # the signed-in name, not a free-text box
    expect(name).to_be_disabled()
    enter_item(page)
    page.locator("#predict").click()
    expect(page.locator("#predictions")).to_contain_text("Pattern", timeout=WAIT)  # tasks by their display names
    page.locator("#save").click()
    expect(page.locator("#save-status")).to_contain_text("Saved correction", timeout=WAIT)
    expect(page.locator("#save-status")).to_contain_text("by ana")  # the message names whose save it is
    page.screenshot(path=str(ARTIFACTS / "hostile-login-saved.png"), full_page=True)
    assert studio.store.history(limit=1)[0]["annotator"] == "ana"
    client = Client(url, verbose=False, auth=("ben", "ben-secret-2"))  # a client naming someone else
    client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "ana", "ben-item", "Black", *[None] * 7,
                   "", api_name="/save_correction")
    entry = studio.store.history(limit=1)[0]
    assert entry["item_id"] == "ben-item" and entry["annotator"] == "ben"
    # a logout in another tab: this page's next save did nothing without a word; a banner says so
    expect(page.locator("#signed-out")).to_have_count(0)
    other = page.context.new_page()
    other.goto(url)
    other.locator("#logout").click()
    expect(other.locator("input[type=password]").first).to_be_visible(timeout=WAIT)
    saves = studio.store.count()
    page.locator("#save").click()
    expect(page.locator("#signed-out")).to_contain_text("You are signed out", timeout=WAIT)
    expect(page.locator("#signed-out")).to_contain_text("last action did nothing")
    page.screenshot(path=str(ARTIFACTS / "hostile-login-signed-out.png"))
    assert studio.store.count() == saves
