"""Bad input against the package and the app (docs/RELIABILITY.md tabulates every case).

Each case gets a clear message (a StudioError / gr.Error naming the problem, never a stack
trace), nothing crashes, and nothing already saved is lost: the studio below holds one
saved correction that every case must leave intact, and the app still predicts afterwards.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import shutil
import struct
import time
import zlib
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from cma_clip import evaluate, hub
from cma_clip.checkpoint import CheckpointError, load_checkpoint
from cma_clip.data import Catalogue, CatalogueConfig, CatalogueError, read_manifest
from cma_clip.features import extract_features
from cma_clip.labels import JOINERS
from cma_clip.studio import MAX_TEXT_CHARS, Studio, StudioError, clean_text
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT, HM, hm_rows, write_hm_manifest

MODEL = "hm-articles"
SEED_ITEM = "seed-0816591001"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def seeded(checkpoint_dir, tmp_path_factory):
    """A studio holding one saved correction, which no bad input may touch."""
    studio = Studio(checkpoint_dir, data_dir=tmp_path_factory.mktemp("bad-inputs"), device="cpu")
    labels = {task: classes[0] for task, classes in studio.task_classes(MODEL).items()}
    studio.save_correction(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, MODEL, "seed", SEED_ITEM, labels)
    return studio, labels


def assert_seed_intact(studio: Studio, labels: dict) -> None:
    assert studio.store.current_labels()[SEED_ITEM]["labels"] == labels


# ---------------------------------------------------------------------------- image files
def zero_png(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> Path:
    """A valid all-black PNG of any size, written row by row: a few KB on disk for
    megapixels decoded (a decompression bomb), without ever holding the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[colour_type]
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)  # filter byte + pixels
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def saved(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def exif_rotated(path: Path) -> Path:
    """Red left half, blue right half, stored with EXIF orientation 6 (display rotated 90° clockwise)."""
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved(image, path, exif=exif, quality=95)


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return saved(frames[0], path, save_all=True, append_images=frames[1:], duration=80, loop=0)


def sixteen_bit(path: Path) -> Path:
    """A 16-bit grey ramp, black on the left to white on the right."""
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    return saved(Image.fromarray(ramp), path)


def palette(path: Path, transparent: bool) -> Path:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    return saved(image, path, **({"transparency": 1} if transparent else {}))


# case id -> (file maker, expected message)
REFUSED_IMAGES = {
    "corrupt-bytes": (lambda d: _write(d / "corrupt.jpg", bytes(range(256)) * 40), "corrupt.jpg is not a readable image"),
    "truncated-jpeg": (lambda d: _write(d / "half.jpg", EXAMPLE_IMAGE.read_bytes()[: EXAMPLE_IMAGE.stat().st_size // 2]),
                       r"half.jpg is not a readable image \(image file is truncated"),
    "text-file-named-jpg": (lambda d: _write(d / "notes.jpg", b"Striped shirt, 100% cotton\n"),
                            "notes.jpg is not a readable image"),
    "empty-file": (lambda d: _write(d / "empty.png", b""), "empty.png is not a readable image"),
    "svg-file": (lambda d: _write(d / "vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                 "vector.svg is not a readable image"),
    "huge-42-megapixels": (lambda d: zero_png(d / "huge.png", 7000, 6000),
                           "huge.png is 7000x6000 pixels; the limit is 40 megapixels"),
    "bomb-100-megapixels-in-15kb": (lambda d: zero_png(d / "bomb.png", 10_000, 10_000, bit_depth=1),
                                    "bomb.png is 10000x10000 pixels; the limit is 40 megapixels"),
    "bomb-over-pillow-limit": (lambda d: zero_png(d / "giant.png", 16_000, 16_000, bit_depth=1),
                               r"giant.png has too many pixels to decode safely \(a decompression bomb\?\)"),
    "a-folder": (lambda d: (d / "folder.jpg").mkdir() or d / "folder.jpg", "folder.jpg is not a readable image"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", REFUSED_IMAGES, ids=list(REFUSED_IMAGES))
def test_unusable_image_is_refused_with_a_message(seeded, tmp_path, case):
    studio, labels = seeded
    make, message = REFUSED_IMAGES[case]
    path = str(make(tmp_path))
    before = studio.store.count()
    with pytest.raises(StudioError, match=message) as error:
        studio.predict(path, "Striped shirt", MODEL)
    assert str(tmp_path) not in str(error.value)  # no server folders in the message
    assert not re.search(r"\w+(Error|Exception):", str(error.value))  # nor Python's exception names
    with pytest.raises(StudioError, match=message):
        studio.save_correction(path, "Striped shirt", MODEL, "ana", None, labels)
    with pytest.raises(StudioError, match=message):
        studio.probe(path, "Striped shirt", MODEL, "blur", 2, "none", 0)
    assert studio.store.count() == before
    assert_seed_intact(studio, labels)


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
# case id -> (file maker, check of the 224x224 image the model saw)
USABLE_IMAGES = {
    "1x1-pixel": (lambda d: saved(Image.new("RGB", (1, 1), RED), d / "dot.png"),
                  lambda im: close(im.getpixel((112, 112)), RED)),
    "big-36-megapixels": (lambda d: zero_png(d / "big.png", 6000, 6000),
                          lambda im: close(im.getpixel((112, 112)), BLACK)),
    "animated-gif-first-frame": (lambda d: animated_gif(d / "anim.gif"),
                                 lambda im: close(im.getpixel((112, 112)), RED)),
    "16-bit-png-not-clipped": (lambda d: sixteen_bit(d / "ramp16.png"),
                               lambda im: im.getpixel((8, 112))[0] < 40 and im.getpixel((216, 112))[0] > 215
                               and 90 < im.getpixel((112, 112))[0] < 165),
    "cmyk-jpeg": (lambda d: saved(Image.new("CMYK", (40, 40), (0, 255, 0, 0)), d / "cmyk.jpg"),
                  lambda im: close(im.getpixel((112, 112)), (255, 0, 255))),
    "palette-png": (lambda d: palette(d / "palette.png", transparent=False),
                    lambda im: close(im.getpixel((112, 112)), RED)),
    "palette-transparency-on-white": (lambda d: palette(d / "palette-t.png", transparent=True),
                                      lambda im: close(im.getpixel((112, 112)), WHITE)),
    "rgba-transparent-on-white": (lambda d: saved(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), d / "rgba.png"),
                                  lambda im: close(im.getpixel((112, 112)), WHITE)),
    "grey-alpha-on-white": (lambda d: saved(Image.new("LA", (40, 40), (0, 0)), d / "la.png"),
                            lambda im: close(im.getpixel((112, 112)), WHITE)),
    "exif-rotated-orientation-honoured": (lambda d: exif_rotated(d / "rotated.jpg"),  # red ends up on top
                                          lambda im: close(im.getpixel((112, 60)), RED)
                                          and close(im.getpixel((112, 164)), BLUE)),
}


@pytest.mark.parametrize("case", USABLE_IMAGES, ids=list(USABLE_IMAGES))
def test_unusual_image_is_predicted_and_saved(seeded, tmp_path, case):
    studio, labels = seeded
    make, check = USABLE_IMAGES[case]
    path = str(make(tmp_path))
    result = studio.predict(path, "Striped shirt", MODEL)
    assert set(result.tasks) == set(labels)
    assert result.model_image.size == (224, 224) and check(result.model_image.convert("RGB"))
    before = studio.store.count()
    studio.save_correction(path, "Striped shirt", MODEL, "ana", f"image-{case}", labels, result)
    stored = studio.store.current_labels()[f"image-{case}"]
    assert studio.store.count() == before + 1 and stored["image_path"].read_bytes() == Path(path).read_bytes()
    assert_seed_intact(studio, labels)


# ---------------------------------------------------------------------------- text
TEXTS = {
    "empty": "",
    "whitespace-only": " \t\n \u3000 \r\n ",
    "100k-characters": ("Striped cotton shirt with a collar. " * 3000)[:100_000],
    "control-characters": "Red\x00 shirt\x07 \x1b[31mwith\x08 stripes\x7f\u200b\x1f",
    "emoji": "Red 👗 dress 🔥🔥 with a 👨‍👩‍👧 print",
    "right-to-left": "فستان أحمر قطني — שמלה אדומה",
    "cjk": "红色条纹连衣裙 ストライプのシャツ 줄무늬 셔츠",
    "html-and-script-tags": '<script>alert(1)</script><img src=x onerror="alert(2)"><b>Striped</b> shirt',
    "lone-surrogate": "Striped \ud800 shirt",
}


BLANK = ("empty", "whitespace-only")


@pytest.mark.parametrize("case", TEXTS, ids=list(TEXTS))
def test_odd_text_is_predicted_and_saved_as_plain_text(seeded, case):
    studio, labels = seeded
    text = TEXTS[case]
    result = studio.predict(str(EXAMPLE_IMAGE), text, MODEL)
    predictor = studio.predictor(MODEL)
    assert set(result.tasks) == set(labels)
    assert len(result.tokens) <= predictor.max_tokens and all(token.isprintable() for token in result.tokens)
    cleaned = clean_text(text)
    assert len(cleaned) <= MAX_TEXT_CHARS and (cleaned == "") == (case in BLANK)
    assert all(ch.isprintable() or ch in JOINERS for ch in cleaned)  # the joiners of an emoji sequence stay
    studio.save_correction(str(EXAMPLE_IMAGE), text, MODEL, "ana", f"text-{case}", labels, result)
    assert studio.store.current_labels()[f"text-{case}"]["text"] == cleaned
    exported = {row["id"]: row for row in read_manifest(studio.export("CSV"))}
    assert exported[f"text-{case}"]["text"] == cleaned  # kept verbatim as data: "<script>" stays text
    assert_seed_intact(studio, labels)


def test_html_is_kept_as_text_not_stripped():
    assert clean_text(TEXTS["html-and-script-tags"]) == TEXTS["html-and-script-tags"]
    # a terminal escape goes whole: its ESC alone left "[31m" in the text
    assert clean_text(TEXTS["control-characters"]) == "Red shirt with stripes"


def test_invisible_characters_go_from_a_text_and_the_joiners_of_a_word_stay():
    """QA, session 37: every zero-width character became a space, so a Persian word with its
    non-joiner ("پیراهن\u200cها") and an emoji sequence ("👩\u200d🔬") were stored and shown as two;
    a soft hyphen split "Baumwolle"."""
    assert clean_text("👩\u200d🔬 lab coat پیراهن\u200cها") == "👩\u200d🔬 lab coat پیراهن\u200cها"
    assert clean_text(TEXTS["emoji"]) == "Red 👗 dress 🔥🔥 with a 👨\u200d👩\u200d👧 print"
    assert clean_text("\ufeffBaum\u00adwolle\u200e shirt\u2060") == "Baumwolle shirt"
    assert clean_text("Black\u200bcotton") == "Black cotton"  # a zero-width space is a break between words


# ---------------------------------------------------------------------------- other fields
FIELDS = {
    "blank-annotator": (dict(annotator=" \t "), "Enter your name"),
    "no-labels": (dict(labels={}), "Choose at least one label"),
    "only-missing-labels": (dict(labels={"product_type_name": "NA", "colour_group_name": "null"}), "no labels"),
    "no-image": (dict(image=None), "Upload the item's image"),
    "label-not-unicode": (dict(labels={"product_type_name": "Top \ud800"}), "labels is not valid Unicode text"),
    "annotator-not-unicode": (dict(annotator="ana \udfff"), "annotator is not valid Unicode text"),
    "unknown-model": (dict(model="../../etc/passwd"), "Unknown model"),
}


@pytest.mark.parametrize("case", FIELDS, ids=list(FIELDS))
def test_bad_correction_fields_save_nothing(seeded, case):
    studio, labels = seeded
    change, message = FIELDS[case]
    args = {**dict(image=str(EXAMPLE_IMAGE), text="shirt", model=MODEL, annotator="ana", labels=labels), **change}
    before = studio.store.count()
    with pytest.raises(StudioError, match=message):
        studio.save_correction(args["image"], args["text"], args["model"], args["annotator"], "x", args["labels"])
    assert studio.store.count() == before
    assert_seed_intact(studio, labels)


def test_bad_export_format_and_severity(seeded):
    studio, labels = seeded
    with pytest.raises(StudioError, match="Export format must be CSV or JSONL"):
        studio.export("../../labels.xlsx")
    with pytest.raises(StudioError, match="Severities go from 0"):
        studio.probe(str(EXAMPLE_IMAGE), "shirt", MODEL, "blur", "99", "none", 0)
    assert_seed_intact(studio, labels)


# ---------------------------------------------------------------------------- manifests
def upload_rows(folder: Path, n: int = 3) -> tuple[list[dict], list[str]]:
    """n real test items and their image paths as an upload would give them."""
    rows = hm_rows("test", n)
    return rows, [str(HM / r["image"]) for r in rows]


COLUMNS = ["article_id", "image", "prod_name", "detail_desc"]


def csv_text(rows: list[dict], columns=COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


MANIFESTS = {  # id -> (file name, contents from the rows, message)
    "missing-columns": ("items.csv", lambda rows: "x,y\n1,2\n", r"needs the columns \['image', 'prod_name'"),
    "header-only": ("items.csv", lambda rows: "article_id,image,prod_name,detail_desc\n", "no rows"),
    "not-utf8": ("items.csv", lambda rows: csv_text(rows).encode("utf-16"), "items.csv is not UTF-8 text"),
    "binary-file": ("items.csv", lambda rows: bytes(range(256)) * 8, "items.csv is not UTF-8 text"),
    "row-with-missing-fields": ("items.csv", lambda rows: csv_text(rows) + "42,img.jpg\n",
                                "items.csv, row 5: 2 fields where the header has 4"),
    "row-with-extra-fields": ("items.csv", lambda rows: csv_text(rows) + "42,img.jpg,name,desc,extra,more\n",
                              "items.csv, row 5: 6 fields where the header has 4"),
    "field-over-csv-limit": ("items.csv", lambda rows: csv_text(rows) + f'1,a.jpg,"{"x" * 200_000}",d\n',
                             "not readable as CSV"),
    "broken-jsonl": ("items.jsonl", lambda rows: json.dumps(rows[0]) + "\n{oops\n", "items.jsonl, line 2: not valid JSON"),
    "jsonl-not-objects": ("items.jsonl", lambda rows: "[1, 2]\n", "each line must be a JSON object"),
    "images-not-uploaded": ("items.csv", lambda rows: csv_text([{**r, "image": f"other/{i}.jpg"}
                                                               for i, r in enumerate(rows)]),
                            "None of the manifest's images were uploaded"),
    "paths-escaping-the-folder": ("items.csv", lambda rows: csv_text([{**r, "image": p} for r, p in
                                                                     zip(rows, ["../../../../etc/passwd", "/etc/hostname",
                                                                                "~/.ssh/id_rsa"])]),
                                  r"None of the manifest's images were uploaded.*'\.\./\.\./\.\./\.\./etc/passwd' leaves "
                                  "the manifest's folder"),
}


@pytest.mark.parametrize("case", MANIFESTS, ids=list(MANIFESTS))
def test_bad_uploaded_manifest_is_refused_with_a_message(seeded, tmp_path, case):
    studio, labels = seeded
    name, contents, message = MANIFESTS[case]
    rows, images = upload_rows(tmp_path)
    data = contents(rows)
    manifest = _write(tmp_path / name, data if isinstance(data, bytes) else data.encode("utf-8"))
    with pytest.raises(StudioError, match=message) as error:
        studio.review_upload(MODEL, str(manifest), images)
    assert str(tmp_path) not in str(error.value)
    assert_seed_intact(studio, labels)


def test_uploaded_manifest_with_some_missing_and_unreadable_images_loads_the_rest(seeded, tmp_path):
    studio, labels = seeded
    rows, images = upload_rows(tmp_path, 4)
    broken = _write(tmp_path / Path(rows[1]["image"]).name, b"not an image")  # uploaded, but not an image
    manifest = _write(tmp_path / "items.csv", csv_text(rows).encode())
    queue = studio.review_upload(MODEL, str(manifest), [images[0], str(broken), images[3]])  # rows[2] missing
    assert sorted(item.item_id for item in queue.items) == sorted([rows[0]["article_id"], rows[3]["article_id"]])
    assert any("was not uploaded" in note for note in queue.notes)
    assert any(rows[1]["article_id"] in note and "not a readable image" in note for note in queue.notes)
    assert_seed_intact(studio, labels)


@pytest.mark.parametrize("image", ["../../../../etc/passwd", "/etc/hostname", "img/link-out.jpg"],
                         ids=["dot-dot-path", "absolute-path", "symlink-leaving-the-folder"])
def test_catalogue_paths_leaving_the_folder_are_refused(tmp_path, image, backbone):
    rows = hm_rows("test", 2)
    manifest = write_hm_manifest(tmp_path, rows)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "link-out.jpg").symlink_to("/etc/passwd")
    text = manifest.read_text().replace(rows[1]["image"], image)
    manifest.write_text(text)
    config = CatalogueConfig("x", str(manifest), image_column="image", text_columns=["prod_name"],
                             tasks=["colour_group_name"])
    catalogue = Catalogue.open(config)
    with pytest.raises(CatalogueError, match="leaves the catalogue folder"):
        catalogue.image_paths()
    with pytest.raises(CatalogueError, match="leaves the catalogue folder"):  # a training run's feature cache
        extract_features(backbone, catalogue, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "features").iterdir())  # no half-built cache entry


def test_the_predictor_names_what_is_wrong_with_its_arguments(small_checkpoint):
    """From Python: torch's and PIL's errors named neither the argument nor the fix ("Sizes of tensors
    must match", "no attribute 'size'"), and a negative top_k sliced the labels (4 of 5)."""
    from cma_clip.predict import Predictor

    predictor = Predictor.from_checkpoint(small_checkpoint, "cpu")
    image = Image.new("RGB", (64, 64), "red")
    cases = [(lambda: predictor.predict(image, "tee", top_k=0), ValueError, "top_k .* at least 1, not 0"),
             (lambda: predictor.predict_batch([image], ["tee"], top_k=-1), ValueError, "at least 1, not -1"),
             (lambda: predictor.predict_many([image, image], ["tee"]), ValueError, "2 images and 1 texts"),
             (lambda: predictor.predict(None, "tee"), TypeError, "item 0: the image is a NoneType, not a PIL image"),
             (lambda: predictor.predict_batch([image, "a.jpg"], ["a", "b"]), TypeError, "item 1: the image is a str"),
             (lambda: predictor.predict(image, None), TypeError, "the text is a NoneType"),
             (lambda: predictor.score_batch([], []), ValueError, "no items to score")]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert predictor.predict_many([], []) == [] and predictor.predict_batch([], []) == []
    assert len(predictor.predict(image, "tee", top_k=100).tasks["colour_group_name"].labels) == len(
        predictor.classes["colour_group_name"])


def test_evaluation_counts_unknown_labels_as_wrong_and_names_missing_images(small_checkpoint, cache_dir, tmp_path,
                                                                            capsys):
    rows = hm_rows("test", 6)
    for row in rows:
        row["colour_group_name"] = "Not-a-colour"  # outside the checkpoint's vocabulary
    manifest = write_hm_manifest(tmp_path, rows, "unknown.csv")
    report = evaluate.evaluate_checkpoint(small_checkpoint, manifest, None, cache_dir)
    assert report["tasks"]["colour_group_name"]["n"] == 6 and report["tasks"]["colour_group_name"]["accuracy"] == 0
    assert report["tasks"]["product_type_name"]["n"] == 6

    (tmp_path / rows[2]["image"]).unlink()
    code = evaluate.main(["--checkpoint", str(small_checkpoint), "--manifest", str(manifest),
                          "--cache-dir", str(tmp_path / "fresh-cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: image not found" in err and Path(rows[2]["image"]).name in err
    assert not list((tmp_path / "fresh-cache" / "features").iterdir())  # no half-built cache entry


# ---------------------------------------------------------------------------- checkpoints
class Payload:
    """A pickle that creates a folder when unpickled: proof that nothing unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def damaged_checkpoints(source: Path, folder: Path, marker: Path) -> dict[str, str]:
    """Copies of a good checkpoint, each broken one way; case id -> expected message."""
    def copy(name: str) -> Path:
        shutil.copytree(source, folder / name)
        return folder / name

    cases = {}
    copy(MODEL)
    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated"] = "truncated or corrupt"
    weights = copy("corrupted") / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    cases["corrupted"] = "truncated or corrupt"
    config_path = copy("config-not-matching-weights") / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["width"] *= 2
    config_path.write_text(json.dumps(config))
    cases["config-not-matching-weights"] = "weights do not match config.json"
    config_path = copy("invalid-model-settings") / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["fusion"] = "magic"
    config_path.write_text(json.dumps(config))
    cases["invalid-model-settings"] = "invalid model settings"
    config_path = copy("unknown-backbone") / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"] = "resnet-from-nowhere"
    config_path.write_text(json.dumps(config))
    cases["unknown-backbone"] = "unknown backbone"
    pickled = copy("pickle-named-safetensors")
    (pickled / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    cases["pickle-named-safetensors"] = "truncated or corrupt"
    pickled = copy("pickle-instead-of-safetensors")
    (pickled / "model.safetensors").unlink()
    (pickled / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    cases["pickle-instead-of-safetensors"] = "model.safetensors is missing"
    (copy("config-not-json") / "config.json").write_text("{not json")  # not offered at all
    return cases


def test_damaged_checkpoints_are_refused_and_never_unpickled(small_checkpoint, tmp_path):
    marker = tmp_path / "unpickled"
    live = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload does act when unpickled ...
    assert live.is_dir()
    cases = damaged_checkpoints(small_checkpoint, tmp_path / "checkpoints", marker)
    studio = Studio(tmp_path / "checkpoints", data_dir=tmp_path / "data", device="cpu")
    left_out = {"config-not-json": "not valid JSON", "invalid-model-settings": cases.pop("invalid-model-settings")}
    assert set(studio.unusable) == set(left_out) and not set(left_out) & set(studio.model_names)  # named, not offered
    assert all(message in studio.unusable[name] for name, message in left_out.items())
    assert set(cases) < set(studio.model_names)
    for name, message in cases.items():
        with pytest.raises(StudioError, match=f"Model '{name}' cannot be loaded: .*{message}"):
            studio.predict(str(EXAMPLE_IMAGE), "shirt", name)
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        load_checkpoint(tmp_path / "checkpoints" / "pickle-instead-of-safetensors" / "model.pt")
    assert not marker.exists()  # ... and nothing unpickled it
    assert set(studio.predict(str(EXAMPLE_IMAGE), "shirt", MODEL).tasks)  # the good model still works


# ---------------------------------------------------------------------------- the hub token
def test_hub_token_is_never_shown_or_logged(tmp_path, monkeypatch, capsys, caplog):
    secret = "hf_SENTINELtoken0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    (tmp_path / "labels.db").write_bytes(b"")
    (tmp_path / "export.jsonl").write_text("{}\n")
    messages = []
    for repo in ("someone/labels", "not a valid repo id!!"):
        monkeypatch.setenv("CMA_CLIP_HUB_DATASET", repo)
        with pytest.raises(hub.HubError) as error:  # offline in the tests: the push fails
            hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl")
        messages.append(str(error.value))
    monkeypatch.setenv("CMA_CLIP_HUB_CHECKPOINT", "not a valid repo id!!")
    assert hub.checkpoint_from_env() is None  # the app starts with its local checkpoints
    out = capsys.readouterr()
    shown = "\n".join([*messages, out.out, out.err, caplog.text])
    assert all(m.startswith("could not push labels to") for m in messages)
    assert "could not download checkpoint" in out.out
    assert secret not in shown and secret[3:] not in shown


@pytest.mark.parametrize("variable,value", [("CMA_CLIP_UPLOAD_MB", "1GB"), ("CMA_CLIP_UPLOAD_HOURS", "abc"),
                                            ("CMA_CLIP_HUB_TIMEOUT", "-5")])
def test_the_app_refuses_a_number_setting_it_cannot_use_before_it_starts(studio, monkeypatch, variable, value):
    """Read at import or at first use, these died in float()'s traceback, or waited "-5 s" (QA deployer)."""
    import app

    from cma_clip.runtime import SettingError

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=variable):
        app.serve(studio, host="127.0.0.1", block=False)


def test_a_push_sends_every_save_even_those_only_the_write_ahead_log_holds(tmp_path, monkeypatch):
    """Stopped by SIGTERM (a Space, Docker, systemd), the app left labels.db a bare 4 KB and every save in
    labels.db-wal; the push uploaded labels.db alone: a database with no tables (QA deployer, session 33)."""
    import sqlite3

    import huggingface_hub

    from cma_clip.labels import LabelStore

    store = LabelStore(tmp_path / "labels.db")
    for n in range(3):
        store.save(image=EXAMPLE_IMAGE, text=f"text {n}", labels={"colour": "Red"}, annotator="ana", item_id=f"i{n}")
    assert (tmp_path / "labels.db-wal").stat().st_size > 0  # the saves sit in the log: labels.db alone lacks them
    (tmp_path / "export.jsonl").write_text("{}\n")
    uploaded = {}

    class RecordingApi:  # the Hub, as far as a push sees it
        def __init__(self, token):
            pass

        def create_repo(self, *args, **kwargs):
            pass

        def upload_file(self, path_or_fileobj, path_in_repo, **kwargs):
            if path_in_repo.endswith(".db"):
                with closing(sqlite3.connect(path_or_fileobj)) as conn:
                    uploaded[path_in_repo] = conn.execute("SELECT COUNT(*) FROM corrections").fetchone()[0]

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl", "someone/labels")
    assert uploaded == {"labels.db": 3}
    with pytest.raises(hub.HubError, match="could not read the label store to push it: no label store at"):
        hub.push_label_store(tmp_path / "nothing.db", tmp_path / "export.jsonl", "someone/labels")


def test_a_hub_that_cannot_be_reached_or_does_not_answer_fails_in_words_and_in_time(tmp_path, monkeypatch):
    """A push to an unreachable Hub raised httpx's ConnectError past the app (no message at all), and
    against a Hub that accepts connections and never answers it hung for minutes."""
    import socket

    import huggingface_hub.constants

    (tmp_path / "labels.db").write_bytes(b"")
    (tmp_path / "export.jsonl").write_text("{}\n")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match=r"could not push labels to 'someone/labels': the Hub could not be "
                                           r"reached \(offline\?\): ConnectError"):
        hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl", "someone/labels")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("CMA_CLIP_HUB_TIMEOUT", "2")
        start = time.perf_counter()
        with pytest.raises(hub.HubError, match="the Hub did not answer within 2 s"):
            hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl", "someone/labels")
        assert time.perf_counter() - start < 30
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl", "someone/labels")
    with pytest.raises(hub.HubError, match="not a repository id"):
        hub.push_label_store(tmp_path / "labels.db", tmp_path / "export.jsonl", "not a valid repo id!!")
    # a checkpoint's download said "the Hub could not be reached (offline?)" (QA operator, session 37)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(hub.HubError, match=r"could not download checkpoint 'someone/model' from the Hugging Face Hub: "
                                           "HF_HUB_OFFLINE is set, so the Hub is not asked, and its files are not in"):
        hub.download_checkpoint("someone/model")


# ---------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def client(running_app):
    url, _ = running_app
    return Client(url, verbose=False)


def api_predict(client: Client, path, text="Striped shirt"):
    return client.predict(handle_file(str(path)) if path else None, text, MODEL, api_name="/predict")


APP_REFUSED = ["corrupt-bytes", "truncated-jpeg", "text-file-named-jpg", "empty-file", "svg-file",
               "huge-42-megapixels", "bomb-100-megapixels-in-15kb", "bomb-over-pillow-limit"]


@pytest.mark.parametrize("case", APP_REFUSED, ids=APP_REFUSED)
def test_app_refuses_unusable_images_with_a_message(client, running_app, tmp_path, case):
    make, message = REFUSED_IMAGES[case]
    with pytest.raises(Exception, match=message) as error:
        api_predict(client, make(tmp_path))
    shown = str(error.value)
    assert "Traceback" not in shown and "uploads" not in shown and str(tmp_path) not in shown


APP_USABLE = ["rgba-transparent-on-white", "16-bit-png-not-clipped", "exif-rotated-orientation-honoured",
              "animated-gif-first-frame"]


@pytest.mark.parametrize("case", APP_USABLE, ids=APP_USABLE)
def test_app_predicts_unusual_images_as_the_studio_does(client, running_app, tmp_path, case):
    _, studio = running_app
    path = USABLE_IMAGES[case][0](tmp_path)
    prediction = api_predict(client, path)[0]
    expected = studio.predict(str(path), "Striped shirt", MODEL).to_dict()  # the app decodes nothing itself
    assert {t: p["label"] for t, p in prediction.items()} == {t: p["label"] for t, p in expected.items()}
    assert all(abs(p["confidence"] - expected[t]["confidence"]) < 1e-3 for t, p in prediction.items())


def test_app_takes_odd_text_and_keeps_it_as_data(client, running_app):
    _, studio = running_app
    text = TEXTS["html-and-script-tags"] + TEXTS["control-characters"] + TEXTS["100k-characters"]
    prediction, *outputs = api_predict(client, EXAMPLE_IMAGE, text)
    assert set(prediction) == set(studio.task_classes(MODEL))
    cut = "The text was cut to its first 5,000 characters"  # an API client's: the box takes no more
    assert any(isinstance(out, str) and cut in out for out in outputs)
    assert not any(isinstance(out, str) and cut in out for out in api_predict(client, EXAMPLE_IMAGE, "x" * 5000))
    tasks = list(client.predict(MODEL, api_name="/tasks")["tasks"])
    label = '<img src=x onerror="alert(3)">'
    status, history = client.predict(handle_file(str(EXAMPLE_IMAGE)), text, MODEL, "<b>mallory</b>", "html-item",
                                     label, *[None] * 7, api_name="/save_correction")
    assert status.startswith("Saved correction")
    stored = studio.store.current_labels()["html-item"]
    assert stored["labels"] == {tasks[0]: label} and stored["text"] == clean_text(text)
    assert stored["text"].startswith("<script>alert(1)</script>") and len(stored["text"]) == MAX_TEXT_CHARS
    assert any(label in cell for row in history["data"] for cell in row)  # returned as text; the browser escapes it


def raw_call(url: str, api_name: str, data: list) -> str:
    """Call an endpoint with hand-made JSON (what a hostile client can send); returns the event stream."""
    with httpx.Client(base_url=url, timeout=60) as http:
        event = http.post(f"gradio_api/call/{api_name}", json={"data": data})
        event.raise_for_status()
        return http.get(f"gradio_api/call/{api_name}/{event.json()['event_id']}").text


def test_app_refuses_files_it_did_not_receive(running_app):
    url, _ = running_app
    for path in ("/etc/passwd", str(EXAMPLE_IMAGE)):  # a server file, even an image, is not an upload
        stream = raw_call(url, "predict", [{"path": path, "meta": {"_type": "gradio.FileData"}}, "shirt", MODEL])
        assert "event: error" in stream and "root:" not in stream and "confidence" not in stream


def test_uploads_stay_in_the_data_folder_under_hashed_names(running_app):
    url, studio = running_app
    uploads = (studio.data_dir / "uploads").resolve()
    assert os.environ["GRADIO_TEMP_DIR"] == str(uploads)
    def files_outside() -> set:
        return {p for p in studio.data_dir.parent.rglob("*") if not p.resolve().is_relative_to(uploads)}

    before = files_outside()
    names = ["../../escape.jpg", "/tmp/escape.jpg", "..", "<img src=x onerror=alert(1)>.jpg"]
    with httpx.Client(base_url=url, timeout=60) as http:
        for name in names:
            response = http.post("gradio_api/upload", files={"files": (name, EXAMPLE_IMAGE.read_bytes(), "image/jpeg")})
            if response.status_code == 200:
                [stored] = response.json()
                path = Path(stored).resolve()
                assert path.is_relative_to(uploads) and path.parent.parent == uploads and path.is_file()
                assert not set("<>/\\") & set(path.name)
            else:
                assert response.status_code == 400 and "Invalid file name" in response.text
    assert files_outside() == before and not Path("/tmp/escape.jpg").exists()


def test_upload_size_limit(running_app):
    """One file up to 250 MB (a zip of a review's photos: at 20 MB, one of 100 photos was refused);
    a byte more is refused."""
    import app

    url, studio = running_app
    uploads = (studio.data_dir / "uploads").resolve()
    before = {p for p in uploads.rglob("*") if p.is_file()}
    assert app.MAX_UPLOAD == "250mb"
    with httpx.Client(base_url=url, timeout=120) as http:
        response = http.post("gradio_api/upload", files={"files": ("big.zip", b"\0" * (250 * 1024 * 1024 + 1),
                                                                   "application/zip")})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert {p for p in uploads.rglob("*") if p.is_file()} == before  # the partial file is removed


def test_app_still_works_after_bad_input(client, running_app):
    _, studio = running_app
    saved_before = studio.store.count()
    with pytest.raises(Exception, match="Upload a product image"):
        api_predict(client, None)
    with pytest.raises(Exception, match="Unknown model|not in the list of choices"):
        client.predict(handle_file(str(EXAMPLE_IMAGE)), "shirt", "no-such-model", api_name="/predict")
    prediction = api_predict(client, EXAMPLE_IMAGE, EXAMPLE_TEXT)[0]
    assert all(0 < p["confidence"] <= 1 for p in prediction.values())
    assert studio.store.count() == saved_before


def test_training_refuses_bad_options_with_a_message(tmp_path, cache_dir, capsys):
    from cma_clip import train

    common = ["--out", str(tmp_path / "out"), "--cache-dir", str(cache_dir), "--quiet", "--limit", "8"]
    cases = [
        (["--catalogue", "hm-articles", "--text-columns", "prod_name"], "--text-columns go with --manifest"),
        (["--catalogue", "hm-articles", "--extra-labels", str(tmp_path / "typo.db")],
         "typo.db: no such file (the app keeps its label store in studio_data/labels.db"),
        (["--catalogue", "hm-articles", "--backbone", "clip"], "unknown backbone 'clip'"),
    ]
    rows = hm_rows("train", 8) + [{**r, "colour_group_name": "", "product_type_name": ""} for r in hm_rows("val", 4)]
    manifest = write_hm_manifest(tmp_path, rows, columns=["image", "prod_name", "colour_group_name",
                                                          "product_type_name", "split"])
    cases.append((["--manifest", str(manifest), "--text-columns", "prod_name", "--tasks", "colour_group_name",
                   "product_type_name"], "no val item has a label"))
    for args, message in cases:
        assert train.main([*args, *common]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty checkpoint folder behind


def test_training_replaces_a_checkpoint_only_when_told_and_writes_weights_others_can_read(
        tmp_path, small_checkpoint, cache_dir, capsys):
    """A quick run copied from the README's retraining command (`--out checkpoints/hm-articles`)
    replaced the shipped weights unasked; a file as --out died in a traceback; the weights were
    written owner-only (0600), so an app run as another user could not load them (QA, session 33)."""
    import shutil

    from cma_clip import train

    shipped = tmp_path / "hm-articles"
    shutil.copytree(small_checkpoint, shipped)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    quick = ["--catalogue", "hm-articles", "--limit", "16", "--epochs", "1", "--align-epochs", "1", "--width", "64",
             "--cache-dir", str(cache_dir), "--quiet"]
    assert train.main([*quick, "--out", str(shipped)]) == 2
    assert f"{shipped} holds a checkpoint already: add --overwrite to replace it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before  # untouched
    readme = tmp_path / "README.md"
    readme.write_text("notes")
    assert train.main([*quick, "--out", str(readme)]) == 2
    assert f"--out {readme} is a file: name a folder for the checkpoint" in capsys.readouterr().err
    assert train.main([*quick, "--out", str(shipped), "--overwrite"]) == 0  # told: replaced
    assert (shipped / "model.safetensors").read_bytes() != before["model.safetensors"]
    for written in shipped.iterdir():
        assert written.stat().st_mode & 0o044 == 0o044, (written.name, oct(written.stat().st_mode))


@pytest.mark.parametrize("option,message", [
    (["--weight-decay", "nan"], "--weight-decay must be 0 or a positive number, not nan"),  # trained NaN weights
    (["--lr", "-1"], "--lr must be a positive number, not -1.0"),
    (["--dropout", "1.5"], "--dropout is a share in [0, 1), not 1.5"),
    (["--label-smoothing", "2"], "--label-smoothing is a share in [0, 1), not 2.0"),
    (["--warmup", "-3"], "--warmup is a share in [0, 1), not -3.0"),
    (["--heads", "5"], "--width 192 must be a multiple of --heads 5"),
    (["--width", "0"], "--width must be at least 1, not 0"),
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--max-text-tokens", "-2"], "--max-text-tokens must be at least 1, not -2"),
    (["--words-buckets", "-1"], "--words-buckets must be at least 0, not -1"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_training_refuses_numbers_it_cannot_use_before_it_starts(tmp_path, capsys, option, message):
    """Torch met some of these mid-run (a traceback, an empty --out left behind), and trained through
    others: a NaN weight decay wrote a checkpoint of NaN weights and exited 0."""
    from cma_clip import train

    with pytest.raises(SystemExit) as stopped:
        train.main(["--catalogue", "hm-articles", "--out", str(tmp_path / "out"), "--limit", "8", *option])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_review_endpoints_refuse_bad_input_with_messages(running_app):
    """The labeling workflow's endpoints word every refusal, and store nothing on one."""
    url, studio = running_app
    client = Client(url, verbose=False)  # a fresh session: no queue loaded
    saved_before = studio.store.count()
    cases = [
        (("ann", *[None] * 8, ""), "/review_accept", "Load a catalogue sample to review first"),
        (("ann", ""), "/review_skip", "Load a catalogue sample to review first"),
        (("",), "/review_undo", "Enter your name"),
        (("nobody-here",), "/review_undo", "nothing to undo"),
        (("ann",), "/review_overwrite", "Load a catalogue sample"),
        ((MODEL, "train", 5, "least_confidence", "every task", 0.9, 0.1, False, "ann"), "/review_catalogue",
         "range is empty"),
        ((MODEL, "train", 5, "least_confidence", "pattern", 0, 1, False, "ann"), "/review_catalogue",
         "has no task 'pattern'"),  # any model's task gets through to the studio, which checks it
        ((MODEL, None, None, "least_confidence", "every task", 0, 1, False, "ann"), "/review_upload",
         "Upload a CSV or JSONL manifest"),
        (("", MODEL), "/review_resume", "Enter your name"),
        (("  ",), "/item_history", "Enter an item id"),
        (("no-such-item",), "/item_history", "No decision on item 'no-such-item' yet"),  # was an empty table
        (("any", "", "done", "any", "", 1), "/audit", "Status: done is not in the list of choices"),
    ]
    for args, endpoint, message in cases:
        with pytest.raises(Exception, match=message) as error:
            client.predict(*args, api_name=endpoint)
        assert "Traceback" not in str(error.value), endpoint
    client.predict(MODEL, "train", 2, "least_confidence", "every task", 0, 1, False, "ann",
                   api_name="/review_catalogue")
    for bar, message in (("abc", "must be a number"), ("1.5", "from 0 to 1")):
        with pytest.raises(Exception, match=message):
            client.predict("ann", "every task", bar, api_name="/bulk_accept")
    with pytest.raises(Exception, match="Enter your name"):
        client.predict("", *[None] * 8, "", api_name="/review_accept")
    assert studio.store.count() == saved_before
