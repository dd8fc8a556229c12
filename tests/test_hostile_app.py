"""Issue 16 through the running app (gradio_client): uploaded manifests matched by relative
path, upload caps and retention, escaped status lines, a worded refusal for every bad
argument, and the optional login. The files are built at test time."""
from __future__ import annotations

import csv
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from cma_clip.data import load_image, read_manifest
from cma_clip.lab import hostile_images as hostile
from cma_clip.studio import MAX_QUEUE_ITEMS, Studio, StudioError, open_user_image, uploads
from cma_clip.studio.accounts import AccountsError, Login, Users, add_user, hash_password, login_from_env
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT

MODEL = "hm-articles"
COLUMNS = ["image", "prod_name", "detail_desc"]
FILTERS = ("least_confidence", "every task", 0, 1, False)
BEACON = "a`![b](http://beacon.invalid/beacon.png)<img src=http://beacon.invalid/i.png>"


def client_of(running_app) -> Client:
    return Client(running_app[0], verbose=False)


def write_manifest(path: Path, rows: list[list[str]], columns=COLUMNS) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([columns, *rows])
    return path


def colour_images(folder: Path) -> dict[str, Path]:
    """red/1.jpg and blue/1.jpg: one file name in two folders."""
    paths = {}
    for colour in ("red", "blue"):
        path = folder / colour / "1.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 96), colour).save(path)
        paths[colour] = path
    return paths


def queue_images(studio: Studio, annotator: str) -> dict[str, tuple[int, int, int]]:
    """Item id -> the mean colour of its image, for the annotator's latest queue."""
    saved = studio.store.latest_queue(annotator, MODEL)
    colours = {}
    for item in saved.payload["items"]:
        pixels = load_image(item["image_path"]).convert("RGB").resize((1, 1)).getpixel((0, 0))
        colours[item["item_id"]] = pixels
    return colours


def is_red(rgb) -> bool:
    return rgb[0] > 200 and rgb[2] < 60


def is_blue(rgb) -> bool:
    return rgb[2] > 200 and rgb[0] < 60


# ---------------------------------------------------------------------- cases 1 and 2: images, CSV formulas
def test_a_small_strip_image_is_refused_by_predict_in_well_under_a_second(running_app, tmp_path):
    """The issue's 78 KB PNG of 1 x 39,999,999 pixels cost 15 s and 2.4 GB per /predict."""
    strip = tmp_path / "strip.png"
    strip.write_bytes(hostile.zero_png(1, 39_999_999))
    assert strip.stat().st_size < 100_000
    client = client_of(running_app)
    start = time.perf_counter()
    with pytest.raises(Exception, match="strip.png is 1x39999999 pixels, an aspect ratio of 39,999,999:1"):
        client.predict(handle_file(str(strip)), "t", MODEL, "", api_name="/predict")
    seconds = time.perf_counter() - start
    print(f"1 x 39,999,999 PNG refused by /predict in {seconds:.2f} s (upload included)")
    assert seconds < 10  # the decode alone took 15 s


def test_csv_export_through_the_app_neutralises_formulas_and_reads_back(running_app):
    client = client_of(running_app)
    formula = '=HYPERLINK("http://evil.example","x")'
    client.predict(handle_file(IMAGE), EXAMPLE_TEXT, MODEL, "+cmd|' /C calc'!A0", "@formula-item", formula,
                   *[None] * 7, "", api_name="/save_correction")
    path = client.predict("CSV", api_name="/export_labels")
    assert Path(path).read_bytes().startswith(b"\xef\xbb\xbfid,")  # the BOM: Excel reads the text as UTF-8
    with open(path, newline="", encoding="utf-8-sig") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")]
    assert {"'@formula-item", "'" + formula} <= set(cells)
    rows = {r["id"]: r for r in read_manifest(path)}  # the project's own reader takes it back as it was
    assert rows["@formula-item"]["product_type_name"] == formula
    assert rows["@formula-item"]["annotator"] == "+cmd|' /C calc'!A0"


# ---------------------------------------------------------------------- case 3: manifests
def test_rows_with_one_file_name_in_two_folders_get_their_own_images_from_a_zip(running_app, tmp_path):
    """Before, rows red/1.jpg and blue/1.jpg were both stored with the blue image."""
    url, studio = running_app
    images = colour_images(tmp_path / "catalogue")
    manifest = write_manifest(tmp_path / "items.csv", [["red/1.jpg", "Red tee", "red"],
                                                       ["blue/1.jpg", "Blue tee", "blue"]])
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as bundle:  # the folder above the manifest's paths, as a zip of it is
        for colour, path in images.items():
            bundle.write(path, f"catalogue/{colour}/1.jpg")
    client_of(running_app).predict(MODEL, handle_file(str(manifest)), [handle_file(str(archive))], *FILTERS,
                                   "zip-tester", api_name="/review_upload")
    colours = queue_images(studio, "zip-tester")
    assert set(colours) == {"red/1.jpg", "blue/1.jpg"}  # no id column: keyed by the relative path
    assert is_red(colours["red/1.jpg"]) and is_blue(colours["blue/1.jpg"]), colours
    kept = studio.store.latest_queue("zip-tester", MODEL).payload["items"][0]["image_path"]
    assert Path(kept).is_relative_to(studio.uploads_dir)  # kept in the upload's own folder, not Gradio's cache


def test_separate_files_of_one_name_in_two_folders_are_refused_not_guessed(running_app, tmp_path):
    images = colour_images(tmp_path)
    manifest = write_manifest(tmp_path / "items.csv", [["red/1.jpg", "Red tee", "red"],
                                                       ["blue/1.jpg", "Blue tee", "blue"]])
    with pytest.raises(Exception, match=r"row 1: image 'red/1.jpg' shares its file name with 'blue/1.jpg'.*"
                                        r"upload the images as a \.zip"):
        client_of(running_app).predict(MODEL, handle_file(str(manifest)),
                                       [handle_file(str(p)) for p in images.values()], *FILTERS, "loose",
                                       api_name="/review_upload")


def test_separate_files_with_unambiguous_names_are_matched(running_app, tmp_path):
    url, studio = running_app
    images = colour_images(tmp_path)
    manifest = write_manifest(tmp_path / "items.csv", [["red/1.jpg", "Red tee", "red"]])
    client_of(running_app).predict(MODEL, handle_file(str(manifest)), [handle_file(str(images["red"]))],
                                   *FILTERS, "loose-ok", api_name="/review_upload")
    assert is_red(queue_images(studio, "loose-ok")["red/1.jpg"])


def test_missing_required_column_is_named(running_app, tmp_path):
    manifest = write_manifest(tmp_path / "items.csv", [["1.jpg", "Tee"]], columns=["image", "prod_name"])
    with pytest.raises(Exception, match=r"The manifest lacks the column 'detail_desc'"):
        client_of(running_app).predict(MODEL, handle_file(str(manifest)), [handle_file(str(EXAMPLE_IMAGE))],
                                       *FILTERS, "ann", api_name="/review_upload")


def test_zip_members_leaving_the_folder_are_passed_over(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../../escape.jpg", b"x")
        bundle.writestr("/abs/escape.jpg", b"x")
        bundle.writestr("ok/1.jpg", b"x")
    images = uploads.receive(tmp_path / "uploads", "u1", [str(archive)])
    assert list(images.by_path) == ["ok/1.jpg"]
    assert not (tmp_path / "escape.jpg").exists() and not list((tmp_path / "uploads").rglob("escape.jpg"))


def test_zip_bomb_is_refused_before_unpacking(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1_000_000)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("big.jpg", b"\0" * 5_000_000)  # 5 MB of zeros: about 5 KB packed
    assert archive.stat().st_size < 50_000
    with pytest.raises(uploads.UploadError, match="unpacks to 5 MB; the limit is 1 MB"):
        uploads.receive(tmp_path / "uploads", "u1", [str(archive)])
    assert not list((tmp_path / "uploads").rglob("big.jpg"))


def upload_folders(root: Path, ages: dict[str, tuple[float, int]]) -> None:
    """An upload folder per name, last used `age` hours ago and holding `size` bytes."""
    for name, (age_h, size) in ages.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "x.jpg").write_bytes(b"x" * size)
        os.utime(folder, (time.time() - age_h * 3600,) * 2)


def test_uploads_are_removed_when_unused_too_long_or_over_the_storage_cap(tmp_path):
    root = tmp_path / "uploads"
    upload_folders(root, {"old": (80, 10), "middle": (10, 600), "recent": (1.5, 600), "live": (0.2, 500),
                          "current": (100, 10)})
    removed = uploads.prune(root, keep_ids={"current"}, max_age_s=72 * 3600, max_bytes=1000)
    # older than 72 h; then the least recently used until 1000 bytes fit, but not one in use this last hour
    assert removed == ["old", "middle", "recent"]
    assert sorted(p.name for p in root.iterdir()) == ["current", "live"]
    assert uploads.prune(root, keep_ids={"current"}, max_bytes=100) == []  # over the cap, but in use


def test_an_upload_that_does_not_fit_beside_the_ones_in_use_is_refused_not_theirs_removed(studio, tmp_path,
                                                                                          monkeypatch):
    """Three failed uploads of a 1 MB zip holding 990 MB of zeros each stayed on disk, and the storage cap
    then removed the images of a queue opened minutes before: its labeler's resume failed."""
    upload_folders(studio.uploads_dir, {"someone-reviewing": (0.1, 6000)})
    monkeypatch.setenv("CMA_CLIP_UPLOAD_MB", "0.005")
    images = colour_images(tmp_path)
    manifest = write_manifest(tmp_path / "items.csv", [["red/1.jpg", "Red tee", "red"]])
    with pytest.raises(StudioError, match=r"the uploads' storage is full .* the others were used in the last 60 "
                                          "minutes: nothing was taken"):
        studio.review_upload(MODEL, str(manifest), [str(images["red"])], annotator="late")
    assert [p.name for p in studio.uploads_dir.iterdir()] == ["someone-reviewing"]


def test_a_failed_upload_leaves_nothing_behind_and_a_huge_member_is_refused_unpacked(studio, tmp_path,
                                                                                     monkeypatch):
    manifest = write_manifest(tmp_path / "items.csv", [["imgs/1.jpg", "Tee", "tee"]])
    archive = tmp_path / "zeros.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("imgs/1.jpg", b"\0" * 3_000_000)  # no image: the queue loads nothing
    with pytest.raises(StudioError, match="No item could be loaded"):
        studio.review_upload(MODEL, str(manifest), [str(archive)], annotator="zeros")
    assert not list(studio.uploads_dir.iterdir())  # its 3 MB went with it
    images, mixed = colour_images(tmp_path), tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed, "w") as bundle:  # one readable image, one not: the queue keeps the first's
        bundle.write(images["red"], "imgs/1.jpg")
        bundle.writestr("imgs/2.jpg", b"not an image")
    two = write_manifest(tmp_path / "two.csv", [["imgs/1.jpg", "Tee", "tee"], ["imgs/2.jpg", "Tee", "tee"]])
    queue = studio.review_upload(MODEL, str(two), [str(mixed)], annotator="zeros")
    assert len(queue.items) == 1 and "imgs/2.jpg" in "; ".join(queue.notes)
    assert [p.name for p in studio.uploads_dir.rglob("*.jpg")] == ["1.jpg"]  # the unreadable one went
    shutil.rmtree(studio.uploads_dir)
    monkeypatch.setattr(uploads, "MAX_IMAGE_FILE_BYTES", 1_000_000)
    with pytest.raises(StudioError, match=r"zeros.zip: imgs/1.jpg unpacks to 3 MB; an image file has at most 1 MB"):
        studio.review_upload(MODEL, str(manifest), [str(archive)], annotator="zeros")
    assert not list(studio.uploads_dir.iterdir())


def test_a_manifest_repeating_an_item_id_is_refused_and_its_texts_are_cleaned(studio, tmp_path):
    """Three rows of one id: the first item alone was reviewed, "3 reviewed of 3"; texts kept control
    characters (an ANSI escape, a NUL) into the label store and its CSV export."""
    images = colour_images(tmp_path)
    columns = ["article_id", *COLUMNS]
    rows = [["dupX", "red/1.jpg", "Red tee", "red"], ["dupX", "blue/1.jpg", "Blue tee", "blue"]]
    with pytest.raises(StudioError, match=r"1 row repeats an item id: row 2 repeats 'dupX' of row 1\. Items are "
                                          r"keyed by the 'article_id' column, one row per item: nothing was loaded"):
        studio.review_upload(MODEL, str(write_manifest(tmp_path / "dup.csv", rows, columns)),
                             [str(p) for p in images.values()])
    no_ids = write_manifest(tmp_path / "paths.csv", [["red/1.jpg", "a", "b"], ["./red/1.jpg", "c", "d"]])
    with pytest.raises(StudioError, match=r"row 2 repeats 'red/1.jpg' of row 1\. Items are keyed by the image path"):
        studio.review_upload(MODEL, str(no_ids), [str(images["red"])])
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(images["red"], "red/1.jpg")
    noisy = write_manifest(tmp_path / "noisy.csv", [["red/1.jpg", "Line1\nLine2\r\nEsc\x1b[31m red", "bell\x07"]])
    queue = studio.review_upload(MODEL, str(noisy), [str(archive)], annotator="clean")
    assert queue.items[0].text == "Line1 Line2 Esc red. bell"  # the whole escape sequence: no "[31m" left


def test_a_used_upload_is_kept_and_a_removed_one_is_explained(studio, tmp_path):
    images = colour_images(tmp_path)
    manifest = write_manifest(tmp_path / "items.csv", [["red/1.jpg", "Red tee", "red"]])
    queue = studio.review_upload(MODEL, str(manifest), [str(images["red"])], annotator="keeper")
    folder = Path(queue.items[0].image_path).parents[2]  # <uploads>/<upload id>/files/red/1.jpg
    assert folder.parent == studio.uploads_dir
    os.utime(folder, (time.time() - 1e6,) * 2)
    studio.keep_queue(queue, "keeper")  # using the queue marks its upload as used now
    assert time.time() - folder.stat().st_mtime < 60
    uploads.prune(studio.uploads_dir, max_age_s=0)  # everything unused now goes
    with pytest.raises(StudioError, match="was not found on the server .uploads are removed 72 hours after"):
        open_user_image(queue.items[0].image_path)


def test_a_photo_gone_says_why_by_where_it_was(studio, tmp_path):
    """A photo given to Predict lives in Gradio's upload cache, emptied after a day and at a restart; its
    message named the review uploads' 72 hours, and so did a catalogue's photo gone from its folder."""
    photo = Path(os.environ["GRADIO_TEMP_DIR"]) / "3f2a" / "tee.jpg"  # where Gradio puts an upload (conftest)
    with pytest.raises(StudioError, match=r"tee.jpg was not found on the server \(the app keeps a photo it is "
                                          r"given for a day, and none after a restart\): upload it again"):
        studio.predict(str(photo), EXAMPLE_TEXT, MODEL)
    with pytest.raises(StudioError, match=r"shoe.jpg was not found on the server \(it is no longer in its folder: "
                                          r"a catalogue's photo moved or deleted since, or a path mistyped\)\.$"):
        open_user_image(str(tmp_path / "catalogue" / "images" / "shoe.jpg"))


# ---------------------------------------------------------------------- case 4: field sizes
def test_long_annotator_is_refused(running_app):
    with pytest.raises(Exception, match="The annotator's name is 101 characters long; the limit is 100"):
        client_of(running_app).predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "a" * 101, "",
                                       "Black", *[None] * 7, "", api_name="/save_correction")


# ---------------------------------------------------------------------- case 6: escaping
def test_status_lines_keep_ids_with_markdown_in_code_spans(running_app, tmp_path):
    """An item id with a backtick and an image link stays inside its code span in the review
    progress line and the save message (as text; the browser test checks nothing is fetched)."""
    url, studio = running_app
    client = client_of(running_app)
    manifest = write_manifest(tmp_path / "items.csv", [[BEACON, EXAMPLE_IMAGE.name, "Tee", EXAMPLE_TEXT]],
                              columns=["article_id", *COLUMNS])
    outputs = client.predict(MODEL, handle_file(str(manifest)), [handle_file(str(EXAMPLE_IMAGE))], *FILTERS,
                             "escaper", api_name="/review_upload")
    shown = "`" + BEACON.replace("`", "'") + "`"
    progress = next(o for o in outputs if isinstance(o, str) and "reviewed of" in o)
    assert shown in progress and progress.count("`") == 2, progress
    message = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "escaper", BEACON,
                             "Black", *[None] * 7, "", api_name="/save_correction")[0]
    assert shown in message and message.count("`") == 2, message


# ---------------------------------------------------------------------- case 7: bad arguments
IMAGE = str(EXAMPLE_IMAGE)
BAD_ARGUMENTS = {  # id -> (endpoint, arguments (a str IMAGE becomes an upload), message)
    "probe-negative-seed": ("/probe", (IMAGE, "t", MODEL, "blur", 3, "none", 0, -1), "Seed must be from 0 to"),
    "probe-seed-text": ("/probe", (IMAGE, "t", MODEL, "blur", 3, "none", 0, "abc"), "Seed takes a number, not 'abc'"),
    "probe-huge-seed": ("/probe", (IMAGE, "t", MODEL, "blur", 3, "none", 0, 2**70), "Seed must be from 0 to"),
    "probe-severity-text": ("/probe", (IMAGE, "t", MODEL, "blur", "x", "none", 0, 0),
                            "Image severity takes a number, not 'x'"),
    "probe-severity-99": ("/probe", (IMAGE, "t", MODEL, "blur", 99, "none", 0, 0), "Image severity must be from 0 to 5"),
    "probe-severity-none": ("/probe", (IMAGE, "t", MODEL, "blur", None, "none", 0, 0),
                            "Image severity takes a number, not None"),
    "probe-severity-fraction": ("/probe", (IMAGE, "t", MODEL, "blur", 2.5, "none", 0, 0),
                                "Image severity takes a whole number, not 2.5"),
    "sweep-item-negative-seed": ("/sweep_item", (IMAGE, "t", MODEL, "blur", "none", -1), "Seed must be from 0"),
    "sweep-catalogue-negative-seed": ("/sweep_catalogue", (MODEL, 4, "blur", "none", -1), "Seed must be from 0"),
    "sweep-catalogue-size-text": ("/sweep_catalogue", (MODEL, "abc", "blur", "none", 0), "Items takes a number"),
    "sweep-catalogue-size-0": ("/sweep_catalogue", (MODEL, 0, "blur", "none", 0), "Items must be from 1 to 500"),
    "sweep-catalogue-size-fraction": ("/sweep_catalogue", (MODEL, 2.5, "blur", "none", 0),
                                      "Items takes a whole number, not 2.5"),
    "tasks-list": ("/tasks", ([MODEL],), "/tasks takes a model's name .text., not list"),
    "tasks-dict": ("/tasks", ({"model": MODEL},), "/tasks takes a model's name .text., not dict"),
    "tasks-unknown-model": ("/tasks", ("no-such-model",), "No model 'no-such-model'; the models: hm-articles"),
    "save-label-past-the-tasks": ("/save_label", (IMAGE, "t", MODEL, "ann", "", *[None] * 6, "Blue", None, ""),
                                  "hm-articles has 6 tasks .*label slot 7 .'Blue'. has no task"),
    "save-correction-past-the-tasks": ("/save_correction", (IMAGE, "t", MODEL, "ann", "", *[None] * 7, "x", ""),
                                       "label slot 8 .'x'. has no task"),
    "predict-model-list": ("/predict", (IMAGE, "t", [MODEL], ""), "Model takes one value"),
    "predict-text-list": ("/predict", (IMAGE, ["t"], MODEL, ""), "Product text takes text, not"),
    "review-size-text": ("/review_catalogue", (MODEL, "train", "abc", *FILTERS, "ann"), "Sample size takes a number"),
    "review-confidence-text": ("/review_catalogue", (MODEL, "train", 5, "least_confidence", "every task", "x", 1,
                                                     False, "ann"), "Confidence from takes a number"),
    "review-decided-text": ("/review_catalogue", (MODEL, "train", 5, "least_confidence", "every task", 0, 1, "yes",
                                                  "ann"), "Show decided items takes true or false"),
    "audit-page-text": ("/audit", ("any", "", "any", "any", "", "x"), "Page takes a number, not 'x'"),
    "audit-task-list": ("/audit", (["a"], "", "any", "any", "", 1), "Task takes one value"),
    "audit-unknown-task": ("/audit", ("bogus", "", "any", "any", "", 1), "No decision names the task 'bogus'; the "
                                                                          "tasks decided: "),
    "item-history-list": ("/item_history", (["x"],), "Item id takes text, not"),
    "export-format": ("/export_labels", ("xlsx",), r"Format \(the trainer's manifest format\): 'xlsx'.*is not in "
                                                   "the list of choices"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=list(BAD_ARGUMENTS))
def test_every_bad_argument_gets_a_specific_message(running_app, case):
    endpoint, arguments, message = BAD_ARGUMENTS[case]
    arguments = [handle_file(a) if a == IMAGE else a for a in arguments]
    with pytest.raises(Exception, match=message) as error:
        client_of(running_app).predict(*arguments, api_name=endpoint)
    assert "Traceback" not in str(error.value) and str(error.value).strip() != "Error"


def test_deeply_nested_jsonl_manifest_is_refused_with_a_message(running_app, tmp_path):
    manifest = tmp_path / "nested.jsonl"
    manifest.write_text('{"image": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(Exception, match="nested.jsonl, line 1: its values are nested too deeply"):
        client_of(running_app).predict(MODEL, handle_file(str(manifest)), [handle_file(IMAGE)], *FILTERS, "ann",
                                       api_name="/review_upload")


def test_studio_refuses_bad_numbers_itself(studio):
    """The service checks its numbers too (scripts call it without the UI's bounds)."""
    for seed in (-1, 1.5, float("nan"), "abc", 2**40, True):
        with pytest.raises(Exception, match="The seed must be a whole number from 0 to 4,294,967,295"):
            studio.item_sweep(IMAGE, "t", MODEL, "blur", "none", seed)
    with pytest.raises(Exception, match="Severities go from 0 .clean. to 5, not 'x'"):
        studio.probe(IMAGE, "t", MODEL, "blur", "x", "none", 0)
    with pytest.raises(Exception, match=f"The sample size must be a whole number from 1 to {MAX_QUEUE_ITEMS:,}, not -3"):
        studio.review_catalogue(MODEL, "train", -3)
    with pytest.raises(Exception, match="The page must be a whole number"):
        studio.audit(page="x")


# ---------------------------------------------------------------------- case 8: who may write
def test_passwords_are_stored_as_scrypt_hashes_and_checked(tmp_path, monkeypatch):
    from cma_clip.studio import accounts

    path = tmp_path / "users.txt"
    add_user(path, "ana", "correct horse")
    add_user(path, "ben", "battery staple")
    text = path.read_text()
    assert "correct horse" not in text and text.startswith("ana:scrypt$") and oct(path.stat().st_mode)[-3:] == "600"
    users = Users.from_file(path)
    assert users.check("ana", "correct horse") and users.check("ben", "battery staple")
    assert not users.check("ana", "battery staple") and not users.check("eve", "correct horse")
    assert login_from_env({"CMA_CLIP_USERS": str(path)}).users.hashes == users.hashes
    assert login_from_env({"CMA_CLIP_AUTH": "ana:pw:with:colons"}).users.check("ana", "pw:with:colons")
    space = {"CMA_CLIP_LOGIN": "huggingface", "SPACE_ID": "team/studio", "OAUTH_CLIENT_ID": "id"}
    monkeypatch.setattr(accounts.importlib.util, "find_spec", lambda name: object())  # gradio[oauth] installed
    assert login_from_env(space).oauth
    assert not login_from_env({}).on  # off by default
    path.write_text(path.read_text() * 2)
    for environ, message in (({"CMA_CLIP_AUTH": "no-password"}, "name:password"),
                             ({"CMA_CLIP_AUTH": "ana:one,ana:two"}, "names ana twice"),  # the last one won
                             ({"CMA_CLIP_USERS": str(path)}, r"line 3: ana has a line already"),
                             ({"CMA_CLIP_USERS": str(tmp_path / "none.txt")}, "cannot read the users file"),
                             ({"CMA_CLIP_LOGIN": "ldap"}, "use 'huggingface'"),
                             # off a Space, Gradio signs everyone in as the token's owner
                             ({"CMA_CLIP_LOGIN": "huggingface"}, "works on a Space only"),
                             ({**space, "OAUTH_CLIENT_ID": ""}, "add 'hf_oauth: true' to the front matter")):
        with pytest.raises(AccountsError, match=message):
            login_from_env(environ)
    monkeypatch.setattr(accounts.importlib.util, "find_spec", lambda name: None)  # a traceback at launch, before
    with pytest.raises(AccountsError, match="needs authlib and itsdangerous: add '-r requirements-oauth.txt'"):
        login_from_env(space)
    path.write_text("ana:plain-password\n")
    with pytest.raises(AccountsError, match="line 1: expected 'name:scrypt"):
        Users.from_file(path)
    # a damaged hash was taken, and its user refused at every sign-in, unsaid (QA operator, session 37)
    for damaged in ("scrypt$zz$qq", "scrypt$$", "scrypt$00$" + "ab" * 63, "scrypt$0$" + "ab" * 64):
        path.write_text(f"ben:{hash_password('pw')}\nana:{damaged}\n")
        with pytest.raises(AccountsError, match=re.escape("line 2: ana's hash is not one `python -m "
                                                          "cma_clip.studio.accounts add` makes")):
            Users.from_file(path)
    for pairs in ({"CMA_CLIP_AUTH": "ana:pw"}, {"CMA_CLIP_USERS": str(path)}):  # the login asked for was ignored
        with pytest.raises(AccountsError, match=f"CMA_CLIP_LOGIN='huggingface' and {next(iter(pairs))} are both set"):
            login_from_env({**space, **pairs})
    assert login_from_env({"CMA_CLIP_LOGIN": "off", "CMA_CLIP_AUTH": "ana:pw"}).users.check("ana", "pw")


def test_the_accounts_command_refuses_a_bad_file_or_name_before_asking_a_password(tmp_path, monkeypatch, capsys):
    from cma_clip.studio import accounts

    asked = []
    monkeypatch.setattr(accounts.getpass, "getpass", lambda prompt: asked.append(prompt) or "pass-1")
    for file, name, message in ((tmp_path / "no-folder" / "users.txt", "dee", "no folder"),
                                (tmp_path, "dee", "is a folder"),
                                (tmp_path / "users.txt", "bad:name", "user name")):
        assert accounts.main(["add", str(file), name]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not asked
    path = tmp_path / "users.txt"
    assert accounts.main(["add", str(path), "dee"]) == 0 and "dee can sign in" in capsys.readouterr().out
    assert accounts.main(["add", str(path), "dee"]) == 0 and "dee's password is replaced" in capsys.readouterr().out
    assert asked[-2].startswith("new password for dee") and oct(path.stat().st_mode)[-3:] == "600"
    assert Users.from_file(path).check("dee", "pass-1") and not list(tmp_path.glob(".users.txt.tmp*"))


def test_a_deployers_slips_are_one_line_each(tmp_path, monkeypatch, capsys, checkpoint_dir):
    """No terminal for the password (a script): getpass's EOFError traceback; both CMA_CLIP_USERS and
    CMA_CLIP_AUTH set: the second silently ignored; CMA_CLIP_STUDIO_DIR a file or under a read-only
    mount: a traceback (QA deployer, session 33)."""
    from cma_clip.studio import StudioError, accounts

    def no_terminal(prompt):
        raise EOFError

    monkeypatch.setattr(accounts.getpass, "getpass", no_terminal)
    assert accounts.main(["add", str(tmp_path / "users.txt"), "ben"]) == 2
    err = capsys.readouterr().err
    assert "error: no password given for ben: run it in a terminal, or pipe" in err and "Traceback" not in err
    users = tmp_path / "users.txt"
    users.write_text("")
    with pytest.raises(AccountsError, match="CMA_CLIP_USERS and CMA_CLIP_AUTH are both set: keep one"):
        login_from_env({"CMA_CLIP_USERS": str(users), "CMA_CLIP_AUTH": "ben:pw-ben"})
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(StudioError, match=r"cannot make the studio's folder .*notes.txt \(CMA_CLIP_STUDIO_DIR\)"):
        Studio(checkpoint_dir, data_dir=a_file, device="cpu")
    # a read-only folder was refused in the label store's words for --extra-labels ("copy labels.db and its
    # labels_images folder somewhere writable"), with no labels.db there (QA operator, session 37)
    read_only, access = tmp_path / "read-only", os.access
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != read_only)
    with pytest.raises(StudioError, match=r"studio's folder .*read-only \(CMA_CLIP_STUDIO_DIR\) cannot be written "
                                          r"\(read-only\?\): the label store and uploaded images are kept there"):
        Studio(checkpoint_dir, data_dir=read_only, device="cpu")
    monkeypatch.setattr(os, "access", access)
    # catalogues not where CMA_CLIP_DATA says: the app started without a word, and a queue named no variable
    monkeypatch.setenv("CMA_CLIP_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("CMA_CLIP_STUDIO_DIR", str(tmp_path / "studio"))
    import app

    monkeypatch.setenv("CMA_CLIP_HUB_DATASET", "team/labels")  # and a push that cannot work, said at start
    monkeypatch.delenv("HF_TOKEN", raising=False)
    capsys.readouterr()
    studio = app.default_studio()
    out = capsys.readouterr().out
    assert f"[cma-clip] no catalogues at {tmp_path / 'no-data'} (CMA_CLIP_DATA)" in out
    assert "CMA_CLIP_HUB_DATASET is set without HF_TOKEN: 'Push labels to the Hub' will refuse" in out
    with pytest.raises(StudioError, match=r"The hm-articles catalogue is not available here: .* \(catalogues are "
                                          r"read from .*no-data: CMA_CLIP_DATA\)"):
        studio.review_catalogue("hm-articles", "train", 2)


@pytest.fixture(scope="module")
def login_app(checkpoint_dir, tmp_path_factory):
    """The app with a login (users ana and ben); yields (url, studio)."""
    import app

    studio = Studio(checkpoint_dir, data_dir=tmp_path_factory.mktemp("login-app"), device="cpu")
    served = app.serve(studio, host="127.0.0.1", block=False,
                       login=Login(Users.from_pairs("ana:ana-secret-1,ben:ben-secret-2")))
    yield served.url, studio
    served.close()


def test_with_a_login_saves_go_under_the_signed_in_user_whatever_the_client_sends(login_app):
    url, studio = login_app
    with pytest.raises(Exception):
        Client(url, verbose=False)  # no credentials: not even the API's description
    with pytest.raises(Exception):
        Client(url, verbose=False, auth=("ana", "wrong"))
    client = Client(url, verbose=False, auth=("ana", "ana-secret-1"))
    client.predict(handle_file(IMAGE), EXAMPLE_TEXT, MODEL, "mallory", "login-item", "Black", *[None] * 7, "",
                   api_name="/save_correction")
    client.predict(MODEL, "train", 2, *FILTERS, "mallory", api_name="/review_catalogue")
    entry = studio.store.history(limit=1)[0]
    client.predict(MODEL, "train", 2, *FILTERS, api_name="/review_catalogue")  # the name left out: it is ana
    assert entry["item_id"] == "login-item" and entry["annotator"] == "ana"
    assert studio.store.latest_queue("ana", MODEL) is not None and studio.store.latest_queue("mallory") is None


def test_a_login_that_cannot_work_stops_the_app_at_once_in_one_line(tmp_path):
    """CMA_CLIP_LOGIN=huggingface off a Space died in Gradio's ImportError traceback and an abort,
    after the models had loaded (and after a Hub checkpoint's download, minutes on a silent Hub)."""
    import subprocess
    import sys

    env = {**os.environ, "CMA_CLIP_LOGIN": "huggingface", "CMA_CLIP_STUDIO_DIR": str(tmp_path / "studio"),
           "CMA_CLIP_HUB_CHECKPOINT": "team/never-asked"}
    env.pop("SPACE_ID", None)
    run = subprocess.run([sys.executable, "app.py"], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: CMA_CLIP_LOGIN=huggingface: Hugging Face sign-in works on a Space "
                                         "only")
    assert "never-asked" not in run.stdout + run.stderr  # refused before the studio (and the Hub) was asked


def test_a_browsers_kept_photo_is_put_back_only_from_the_upload_folder(tmp_path):
    """A reload puts back the photo path the browser kept, which the browser may have changed: only a file
    still in Gradio's upload folder is served, never the label store or a path climbing out of the folder."""
    from app import kept_upload, readable

    uploads_folder, store = tmp_path / "uploads", tmp_path / "labels.db"
    (uploads_folder / "ab12").mkdir(parents=True)
    photo = uploads_folder / "ab12" / "photo.jpg"
    shutil.copy(EXAMPLE_IMAGE, photo)
    store.write_bytes(b"SQLite format 3\0")
    assert kept_upload(str(photo), uploads_folder) == str(photo.resolve())
    (uploads_folder / "loop-a").symlink_to(uploads_folder / "loop-b")
    (uploads_folder / "loop-b").symlink_to(uploads_folder / "loop-a")
    (uploads_folder / "out").symlink_to(store)
    for forged in (str(store), str(uploads_folder / ".." / "labels.db"), str(uploads_folder / "ab12"),
                   str(uploads_folder / "gone.jpg"), "", None, 42, ["x"], "a\0b", str(uploads_folder / ("a" * 300)),
                   str(uploads_folder / "loop-a"), str(uploads_folder / "out")):  # a page load that failed on each
        assert kept_upload(forged, uploads_folder) is None, forged
    # the text and id put back: text the page can be sent, or nothing
    assert [readable(value) for value in ("Striped shirt", "\ud800 lone", 42, None)] == ["Striped shirt", "", "", ""]
