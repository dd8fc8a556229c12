"""Hostile images and oversized fields: each refused with a message, or accepted at a bounded
cost (docs/RELIABILITY.md; `python -m cma_clip.lab.hostile_images` measures the cost).

The files are built here, small on disk: strips and bombs are streamed PNGs of zeros."""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from cma_clip.backbones import letterbox, to_rgb
from cma_clip.data import (MAX_ASPECT_RATIO, MAX_DECODED_SIDE, MAX_IMAGE_SIDE, ImageError, load_image,
                           read_manifest, to_8_bits)
from cma_clip.lab import hostile_images as hostile
from cma_clip.labels import MAX_ID_CHARS, MAX_LABEL_CHARS, LabelStore, LabelStoreError

RED, BLUE, WHITE, MAGENTA = (255, 0, 0), (0, 0, 255), (255, 255, 255), (255, 0, 255)


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The sizes at which Pillow decodes pixels (every ImageFile.load that reads a file)."""
    sizes = []
    original = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


# ---------------------------------------------------------------------------- refused from the header
@pytest.mark.parametrize("width,height,message", [
    (1, 39_999_999, r"strip.png is 1x39999999 pixels, an aspect ratio of 39,999,999:1; the limit is 20:1"),
    (39_999_999, 1, r"strip.png is 39999999x1 pixels, an aspect ratio of 39,999,999:1; the limit is 20:1"),
    (10_000, 400, r"strip.png is 10000x400 pixels, an aspect ratio of 25:1; the limit is 20:1"),
    (12_000, 3_000, r"strip.png is 12000x3000 pixels; the limit is 10,000 pixels a side"),
], ids=["1x39999999", "39999999x1", "25-to-1", "side-12000"])
def test_strips_and_long_sides_are_refused_before_decoding(tmp_path, decodes, width, height, message):
    path = write(tmp_path / "strip.png", hostile.zero_png(width, height))
    assert path.stat().st_size < 200_000  # a small upload ...
    with pytest.raises(ImageError, match=message):
        load_image(path)
    assert decodes == []  # ... refused from its header: no pixel decoded


def test_the_limits_themselves_are_accepted(tmp_path):
    assert MAX_ASPECT_RATIO == 20 and MAX_IMAGE_SIDE == 10_000
    image = load_image(write(tmp_path / "edge.png", hostile.zero_png(10_000, 500)))  # 20:1, 10,000 px
    assert image.size == (MAX_DECODED_SIDE, 51) and image.mode == "L"


@pytest.mark.parametrize("rle4,eol_only", [(False, True), (True, False)], ids=["rle8-eol-only", "rle4"])
def test_run_length_bmps_are_refused(tmp_path, decodes, rle4, eol_only):
    path = write(tmp_path / "rle.bmp", hostile.rle_bmp(6000, 6000, rle4=rle4, eol_only=eol_only))
    with pytest.raises(ImageError, match="rle.bmp is a run-length-compressed BMP, which is not read"):
        load_image(path)
    assert decodes == []


def test_formats_outside_the_list_are_refused_by_name(tmp_path):
    with pytest.raises(ImageError, match=r"photo.tif is not a readable image .*only JPEG, PNG, WebP, GIF and BMP"):
        load_image(write(tmp_path / "photo.tif", hostile.tiff()))


@pytest.mark.parametrize("name,build,message", [
    ("markers.jpg", lambda: hostile.jpeg_markers(60_000),
     "markers.jpg holds more than 50,000 marker segments or stray bytes before its image data"),
    ("comments.gif", lambda: hostile.gif_comments(60_000), "comments.gif holds more than 50,000 blocks before its first"),
    ("chunks.png", lambda: hostile.noise_png(300, 200, idat_size=1), "chunks.png holds more than 50,000 PNG chunks"),
    ("scans.jpg", lambda: hostile.scan_bomb(256, 40), "scans.jpg is a JPEG in more than 32 progressive scans"),
], ids=["jpeg-markers", "gif-comments", "png-chunks", "jpeg-scans"])
def test_files_whose_structure_costs_seconds_are_refused_before_opening(tmp_path, monkeypatch, name, build, message):
    path = write(tmp_path / name, build())
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("Image.open was called"))
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_files_under_the_structure_limits_are_read(tmp_path):
    files = {"markers.jpg": (hostile.jpeg_markers(1_000), (64, 64)),
             "comments.gif": (hostile.gif_comments(1_000), (64, 64)),
             "scans.jpg": (hostile.scan_bomb(256, 20), (256, 256)),  # 10 scans + 20 copies
             "progressive.jpg": (hostile.encoded(hostile.photo(300, 200), "JPEG", progressive=True), (300, 200)),
             "chunks.png": (hostile.noise_png(300, 200, idat_size=16), (300, 200))}  # 3,800 chunks
    for name, (data, size) in files.items():
        assert load_image(write(tmp_path / name, data)).size == size


def test_png_text_chunk_bomb_is_refused(tmp_path):
    with pytest.raises(ImageError, match="ztxt.png is not a readable image"):
        load_image(write(tmp_path / "ztxt.png", hostile.ztxt_png(100)))


# ---------------------------------------------------------------------------- accepted, decoded reduced
def test_big_jpeg_is_decoded_at_a_reduced_scale(tmp_path, decodes):
    path = write(tmp_path / "big.jpg", hostile.encoded(hostile.photo(4000, 3000), "JPEG", quality=90))
    image = load_image(path)
    assert decodes == [(2000, 1500)]  # libjpeg decoded at 1/2 scale, the smallest keeping the 1024 px side
    assert image.size == (1024, 768) and image.mode == "RGB"
    full = load_image(path, max_side=None)
    assert full.size == (4000, 3000)
    # the model sees the same image as from the full decode
    difference = np.abs(np.asarray(letterbox(image, 224), np.int16) - np.asarray(letterbox(full, 224), np.int16))
    assert difference.mean() < 1.0 and difference.max() < 24


def test_big_png_is_reduced_right_after_decoding(tmp_path):
    image = load_image(write(tmp_path / "rgba.png", hostile.zero_png(3000, 2000, colour_type=6)))
    assert image.size == (1024, 683) and image.mode == "RGBA"
    assert close(letterbox(image, 224).getpixel((112, 112)), WHITE)  # transparent black stays white


def test_big_sixteen_bit_png_stays_a_ramp(tmp_path):
    image = load_image(write(tmp_path / "ramp16.png", hostile.sixteen_bit_png(3000)))
    assert image.size == (1024, 1024) and image.mode == "L"
    seen = letterbox(image, 224)
    assert seen.getpixel((4, 112))[0] < 10 and seen.getpixel((220, 112))[0] > 245
    assert 110 < seen.getpixel((112, 112))[0] < 145


def test_sixteen_and_thirty_two_bit_grey_scale_as_before():
    rng = np.random.default_rng(0)
    for array in (rng.integers(0, 65536, (300, 200), dtype=np.uint16), rng.integers(0, 4000, (300, 200), np.uint16),
                  rng.integers(0, 70_000, (300, 200), dtype=np.int32)):
        image = Image.fromarray(array)
        before = (array.astype(np.float64) * (255.0 / max(array.max(), 1.0))).astype(np.uint8)  # the old to_rgb
        assert np.array_equal(np.asarray(to_8_bits(image)), before)
        assert np.array_equal(np.asarray(to_rgb(image))[..., 0], before)


def test_big_palette_with_transparency_lands_on_white(tmp_path):
    image = load_image(write(tmp_path / "palette.png", hostile.palette_png(3000)))  # every pixel transparent
    assert image.size == (1024, 1024) and image.mode == "RGBA"
    assert close(letterbox(image, 224).getpixel((112, 112)), WHITE)


def test_big_half_transparent_image_keeps_its_colour(tmp_path):
    picture = Image.new("RGBA", (3000, 3000), (0, 0, 0, 0))
    picture.paste((255, 0, 0, 255), (0, 0, 3000, 1500))  # red top half, transparent black below
    image = load_image(write(tmp_path / "half.png", hostile.encoded(picture, "PNG")))
    seen = letterbox(image, 224)
    assert close(seen.getpixel((112, 40)), RED, 10) and close(seen.getpixel((112, 190)), WHITE, 10)
    assert close(seen.getpixel((112, 111)), RED, 60)  # no dark seam where red meets transparent black


def test_big_exif_rotated_jpeg_is_still_upright(tmp_path):
    picture = Image.new("RGB", (3200, 1600), RED)
    picture.paste(BLUE, (1600, 0, 3200, 1600))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red ends up on top
    image = load_image(write(tmp_path / "rotated.jpg", hostile.encoded(picture, "JPEG", exif=exif)))
    assert image.size == (1024, 512)  # decoded as stored ...
    seen = letterbox(image, 224)  # ... and turned upright by to_rgb
    assert close(seen.getpixel((112, 60)), RED) and close(seen.getpixel((112, 164)), BLUE)


def test_big_cmyk_jpeg_keeps_its_colours(tmp_path):
    image = load_image(write(tmp_path / "cmyk.jpg", hostile.encoded(Image.new("CMYK", (3000, 3000), (0, 255, 0, 0)),
                                                                     "JPEG")))
    assert max(image.size) <= MAX_DECODED_SIDE and image.mode == "CMYK"
    assert close(letterbox(image, 224).getpixel((112, 112)), MAGENTA)


def test_big_one_bit_png_and_many_frame_gif(tmp_path):
    image = load_image(write(tmp_path / "bits.png", hostile.zero_png(4000, 4000, bit_depth=1)))
    assert image.size == (1024, 1024) and image.mode == "L"
    frames = [Image.new("RGB", (400, 300), colour) for colour in (RED, BLUE) * 25]
    gif = write(tmp_path / "anim.gif", hostile.encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert close(letterbox(load_image(gif), 224).getpixel((112, 112)), RED)  # the first of 50 frames


def test_sixteen_bit_conversion_makes_no_float64_copy():
    image = Image.fromarray(np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (1000, 1)))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc (Pillow's own are not counted)
    try:
        to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2_000_000  # Pillow's bytes, a uint16 copy, the uint8 result: 5 bytes a pixel (float64: 18)


def test_letterbox_reduces_a_big_image_before_converting_it(monkeypatch):
    import cma_clip.backbones as backbones

    converted = []
    real = backbones._upright_rgb  # what letterbox converts with (to_rgb without its copy)
    monkeypatch.setattr(backbones, "_upright_rgb", lambda image: converted.append(image.size) or real(image))
    picture = Image.new("LA", (6000, 3000), (0, 0))  # transparent: on white
    assert close(letterbox(picture, 224).getpixel((112, 112)), WHITE)
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 6000).astype(np.uint16), (3000, 1)))
    seen = letterbox(sixteen, 224)
    assert seen.getpixel((4, 112))[0] < 10 and seen.getpixel((220, 112))[0] > 245
    assert converted == [(1024, 512), (1024, 512)]  # converted at 1024 px, not at 6000


def test_decoding_cost_of_the_issues_images_is_bounded(tmp_path):
    """The issue's 6000x6000 16-bit PNG cost 0.7 GB: measured in a fresh process, as the lab does."""
    path = write(tmp_path / "ramp16.png", hostile.sixteen_bit_png(6000))
    done = subprocess.run([sys.executable, "-m", "cma_clip.lab.hostile_images", "--measure", str(path)],
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["outcome"] == "accepted" and result["decoded"] == "1024x1024 L"
    assert result["peak_mb"] < hostile.BUDGET_MB and result["cpu_s"] < 2 * hostile.BUDGET_S


def test_jpeg_draft_asks_for_the_decoded_side_only_when_needed(tmp_path, monkeypatch):
    """The reduced decode asks libjpeg for 1024 px on the longer side, and only for bigger images."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append(size) or original(self, mode, size))
    load_image(write(tmp_path / "small.jpg", hostile.encoded(hostile.photo(800, 600), "JPEG")))
    assert calls == []  # small enough: decoded as it is
    load_image(write(tmp_path / "big.jpg", hostile.encoded(hostile.photo(5000, 2500), "JPEG")))
    assert calls == [(1024, 512)]


# ---------------------------------------------------------------------------- label store sizes
MEGABYTE = "x" * 1_000_000


def tiny_png() -> bytes:
    return hostile.encoded(Image.new("RGB", (4, 4), RED), "PNG")


@pytest.mark.parametrize("change,message", [
    (dict(item_id=MEGABYTE), "item_id is 1,000,000 characters long; the limit is 200"),
    (dict(labels={"colour": MEGABYTE}), r"the 'colour' label in labels is 1,000,000 characters long; the limit is 200"),
    (dict(labels={MEGABYTE: "Red"}), "a task name in labels is 1,000,000 characters long"),
    (dict(catalogue_labels={"colour": MEGABYTE}), "label in catalogue labels is 1,000,000 characters long"),
    (dict(request_id=MEGABYTE), "request_id is 1,000,000 characters long"),
    (dict(item_id="i" * (MAX_ID_CHARS + 1)), "item_id is 201 characters long; the limit is 200"),
], ids=["1mb-item-id", "1mb-label", "1mb-task", "1mb-catalogue-label", "1mb-request-id", "201-char-id"])
def test_label_store_refuses_oversized_ids_and_labels(tmp_path, change, message):
    store = LabelStore(tmp_path / "labels.db")
    store.save(image=tiny_png(), text="shirt", labels={"colour": "Red"}, annotator="ana", item_id="kept")
    args = {**dict(image=tiny_png(), text="shirt", labels={"colour": "Red"}, annotator="ana", item_id="x"), **change}
    with pytest.raises(LabelStoreError, match=message):
        store.save(**args)
    assert store.count() == 1 and set(store.current_labels()) == {"kept"}


def test_label_store_limits_are_inclusive_and_names_are_cut(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    item, label = "i" * MAX_ID_CHARS, "l" * MAX_LABEL_CHARS
    store.save(image=tiny_png(), text="t" * 30_000, labels={"colour": label}, annotator="a" * 1_000_000,
               checkpoint="c" * 1_000_000, item_id=item)
    with pytest.raises(LabelStoreError, match="a task name is 1,000,000 characters long"):
        store.skip(item, [MEGABYTE], "ana")
    with pytest.raises(LabelStoreError, match="queue_id is 1,000,000 characters long"):
        store.save_queue(MEGABYTE, "ana", "m", {}, 0)
    [entry] = store.history()
    assert entry["item_id"] == item and entry["labels"] == {"colour": label}
    assert len(entry["annotator"]) == len(entry["checkpoint"]) == 100 and len(entry["text"]) == 20_000
    store.export(tmp_path / "labels.csv")
    rows = read_manifest(tmp_path / "labels.csv")  # the export reads back under the field limit
    assert rows[0]["id"] == item and rows[0]["colour"] == label
