"""What hostile images cost: `python -m cma_clip.lab.hostile_images [--out-json FILE] [--cases a,b]`.

Builds a named set of hostile images in a temporary folder (small files that decode to
megapixels, strips, 16-bit and palette PNGs, big JPEGs, many-frame GIFs, run-length BMPs,
bombs, truncated files, ...), then runs each through what a `/predict` does to an image
before the network: `load_image`, `letterbox` (the image the app shows) and the bundled
backbone's preprocessing (`images_to_tensor` with its size, mean and std). Each case runs in
a fresh process, so no case hides another's memory: its peak resident set (VmHWM, reset
through /proc/self/clear_refs after the imports and a warm-up) above the resident set
before the case, its wall and CPU time, and whether it was accepted (with the decoded
size) or refused (with the message). The budget for an accepted image: 500 MB and 2 s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

BUDGET_MB = 500
BUDGET_S = 2.0


# ---------------------------------------------------------------------------- builders
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows, extra: bytes = b"",
         idat_size: int | None = None) -> bytes:
    """A PNG from an iterable of raw rows (filter byte included), compressed as they come:
    gigapixel-sized streams are written without ever holding the pixels."""
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for row in rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    step = idat_size or len(data) or 1
    idat = b"".join(_chunk(b"IDAT", data[i:i + step]) for i in range(0, len(data), step))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + idat + _chunk(b"IEND", b"")


def zero_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, extra: bytes = b"") -> bytes:
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)
    if height > 1 and len(row) < 4096:  # many short rows: compress them in blocks
        block = 4096 // len(row) + 1
        rows = [row * block] * (height // block) + [row * (height % block)]
    else:
        rows = [row] * height
    return _png(width, height, bit_depth, colour_type, rows, extra)


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random picture (compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC).convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sixteen_bit_png(side: int) -> bytes:
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // max(1, side - 1)).astype(">u2").tobytes()
    return _png(side, side, 16, 0, [b"\0" + ramp] * side)


def rgb16_png(side: int) -> bytes:
    row = b"\0" + np.tile(np.array([65535, 0, 32768], dtype=">u2"), side).tobytes()
    return _png(side, side, 16, 2, [row] * side)


def palette_png(side: int) -> bytes:
    palette = bytes([255, 0, 0, 0, 0, 255] + [0] * 762)
    row = b"\0" + bytes([1]) * side
    return _png(side, side, 8, 3, [row] * side, _chunk(b"PLTE", palette) + _chunk(b"tRNS", b"\xff\x00"))


def noise_png(width: int, height: int, idat_size: int | None = None) -> bytes:
    """Grey noise (incompressible), its data split into IDAT chunks of `idat_size` bytes."""
    rng = np.random.default_rng(0)
    rows = [b"\0" + rng.integers(0, 256, width, dtype=np.uint8).tobytes() for _ in range(height)]
    return _png(width, height, 8, 0, rows, idat_size=idat_size)


def ztxt_png(count: int = 100) -> bytes:
    """A 64x64 PNG carrying `count` zTXt chunks of 1 MB of text each (1 KB compressed)."""
    text = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"x" * 1_000_000, 9)) for i in range(count))
    return zero_png(64, 64, extra=text)


def gif_frames(side: int = 1000, frames: int = 200) -> bytes:
    images = []
    for i in range(frames):
        frame = Image.new("P", (side, side), 0)
        frame.putpalette([(i * 37 + c * 91) % 256 for i in range(256) for c in range(3)])
        frame.paste(1 + i % 254, (i * 3 % side, 0, min(side, i * 3 % side + 40), side))
        images.append(frame)
    return encoded(images[0], "GIF", save_all=True, append_images=images[1:], duration=40, loop=0)


def rle_bmp(width: int, height: int, rle4: bool, eol_only: bool) -> bytes:
    """A run-length BMP: one pixel and an end of line per row (Pillow pads the row byte by byte
    in Python), or full rows of maximal runs (RLE4: Pillow writes every pixel in a Python loop)."""
    if eol_only:
        body = b"\x01\x01\x00\x00" * height + b"\x00\x01"
    else:
        runs = b"".join(bytes([min(255, width - x), 0x12 if rle4 else 1]) for x in range(0, width, 255))
        body = (runs + b"\x00\x00") * height + b"\x00\x01"
    colours = 16 if rle4 else 256
    palette = b"".join(bytes([i % 256, 0, 255 - i % 256, 0]) for i in range(colours))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 4 if rle4 else 8, 2 if rle4 else 1, len(body),
                       2835, 2835, colours, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def jpeg_markers(count: int = 5_000_000) -> bytes:
    """A 64x64 JPEG preceded by `count` empty APP1 segments: 4 bytes each, parsed one by one in Python."""
    data = encoded(photo(64, 64), "JPEG")
    return data[:2] + b"\xff\xe1\x00\x02" * count + data[2:]


def gif_comments(count: int = 1_000_000) -> bytes:
    """A 64x64 GIF preceded by `count` empty comment extensions (3 bytes each)."""
    data = encoded(Image.new("P", (64, 64)), "GIF")
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global palette
    return data[:start] + b"\x21\xfe\x00" * count + data[start:]


def scan_bomb(side: int = 6000, repeats: int = 1000) -> bytes:
    """A flat progressive JPEG whose last scan (a few bytes) is repeated: libjpeg decodes every
    block of the image again in each copy."""
    data = encoded(Image.new("RGB", (side, side), (128, 128, 128)), "JPEG", progressive=True, quality=90)
    start = data.rfind(b"\xff\xda")
    end = data.index(b"\xff\xd9", start)
    return data[:end] + data[start:end] * repeats + data[end:]


def truncated_jpeg() -> bytes:
    data = encoded(photo(7000, 5714), "JPEG", quality=85)
    return data[: len(data) // 2]


def tiff() -> bytes:
    return encoded(photo(64, 64), "TIFF")


# name -> (file name, builder, what it is)
CASES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "strip-1x39999999-grey-png": ("strip-tall.png", lambda: zero_png(1, 39_999_999),
                                  "a 1 x 39,999,999 grey PNG (under 40 MP)"),
    "strip-39999999x1-grey-png": ("strip-wide.png", lambda: zero_png(39_999_999, 1), "39,999,999 x 1"),
    "strip-10000x500-png-20to1": ("strip-20.png", lambda: zero_png(10_000, 500), "at the aspect ratio limit"),
    "strip-10000x400-png-25to1": ("strip-25.png", lambda: zero_png(10_000, 400), "over the aspect ratio limit"),
    "side-12000x3000-png": ("wide.png", lambda: zero_png(12_000, 3_000), "36 MP, 4:1, a side over 10,000"),
    "png16-6000x6000-grey": ("ramp16.png", lambda: sixteen_bit_png(6000), "16-bit grey ramp"),
    "png16-6000x6000-rgb": ("rgb16.png", lambda: rgb16_png(6000), "48-bit RGB"),
    "png-rgba-6000x6000": ("rgba.png", lambda: zero_png(6000, 6000, colour_type=6), "transparent RGBA"),
    "png-rgba-6324x6324-40mp": ("rgba40.png", lambda: zero_png(6324, 6324, colour_type=6),
                                "RGBA at the pixel limit"),
    "png-palette-transparent-6000x6000": ("palette.png", lambda: palette_png(6000), "palette with tRNS"),
    "png-1.4m-idat-chunks": ("chunks.png", lambda: noise_png(1200, 1200, idat_size=1),
                             "1,200x1,200 in one-byte IDAT chunks, 19 MB"),
    "png-ztxt-100x1mb": ("ztxt.png", ztxt_png, "100 zTXt chunks of 1 MB each"),
    "jpeg-progressive-8000x5000": ("progressive.jpg", lambda: encoded(photo(8000, 5000), "JPEG", quality=85,
                                                                      progressive=True), "progressive"),
    "jpeg-40mp-7000x5714": ("big.jpg", lambda: encoded(photo(7000, 5714), "JPEG", quality=85), "baseline, 40 MP"),
    "jpeg-cmyk-6000x6000": ("cmyk.jpg", lambda: encoded(photo(6000, 6000, "CMYK"), "JPEG", quality=85), "CMYK"),
    "jpeg-scan-bomb-6000x6000-1000-scans": ("scans.jpg", scan_bomb, "a flat progressive JPEG, last scan x1000"),
    "jpeg-5m-app1-markers": ("markers.jpg", jpeg_markers, "64x64 after 5 million empty APP1 segments, 20 MB"),
    "gif-1m-comment-blocks": ("comments.gif", gif_comments, "64x64 after a million empty comments, 3 MB"),
    "jpeg-truncated-40mp": ("half.jpg", truncated_jpeg, "first half of a 40 MP JPEG"),
    "gif-1000x1000-200-frames": ("anim.gif", gif_frames, "palette GIF, 200 frames"),
    "webp-4000x4000": ("photo.webp", lambda: encoded(photo(4000, 4000), "WEBP", quality=80), "lossy WebP"),
    "bmp-2500x2500-24bit": ("photo.bmp", lambda: encoded(photo(2500, 2500), "BMP"), "18.75 MB, under the upload limit"),
    "bmp-rle8-6000x6000-eol-only": ("rle8.bmp", lambda: rle_bmp(6000, 6000, rle4=False, eol_only=True),
                                    "RLE8: a pixel and an end of line per row, 24 KB"),
    "bmp-rle4-6000x6000": ("rle4.bmp", lambda: rle_bmp(6000, 6000, rle4=True, eol_only=False), "RLE4, 300 KB"),
    "tiny-1x1-png": ("dot.png", lambda: encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), "1x1"),
    "bomb-10000x10000-1bit-png": ("bomb.png", lambda: zero_png(10_000, 10_000, bit_depth=1), "100 MP in 15 KB"),
    "bomb-16000x16000-png": ("giant.png", lambda: zero_png(16_000, 16_000, bit_depth=1),
                             "over Pillow's own limit"),
    "tiff-64x64": ("photo.tif", tiff, "a format outside JPEG, PNG, WebP, GIF, BMP"),
}


# ---------------------------------------------------------------------------- one case, in a child process
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def measure(path: str) -> dict:
    """Run one file through load_image, letterbox and the bundled preprocessing; report its cost."""
    import torch

    from cma_clip.backbones import BundledBackbone, images_to_tensor, letterbox
    from cma_clip.data import load_image

    torch.set_num_threads(1)
    size, mean, std = BundledBackbone.image_size, BundledBackbone.mean, BundledBackbone.std
    warm = Image.new("RGB", (64, 48), (200, 10, 10))
    images_to_tensor([letterbox(warm, size)], size, mean, std)  # lazy imports and first allocations
    baseline = _status()["VmRSS"]
    result: dict = {"phases": {}}
    started, cpu = time.perf_counter(), time.process_time()
    peak = baseline
    try:
        for phase in ("load_image", "letterbox", "preprocess"):
            _reset_peak()
            t0 = time.perf_counter()
            if phase == "load_image":
                image = load_image(path)
                result["decoded"] = f"{image.width}x{image.height} {image.mode}"
            elif phase == "letterbox":
                shown = letterbox(image, size)
                assert shown.size == (size, size)
            else:
                pixels = images_to_tensor([image], size, mean, std)
                assert tuple(pixels.shape) == (1, 3, size, size)
            phase_peak = _status()["VmHWM"]
            peak = max(peak, phase_peak)
            result["phases"][phase] = {"s": round(time.perf_counter() - t0, 3),
                                       "peak_mb": round((phase_peak - baseline) / 2**20, 1)}
        result["outcome"] = "accepted"
    except Exception as exc:  # noqa: BLE001 - what a hostile file raises is the measurement
        peak = max(peak, _status()["VmHWM"])
        result["outcome"] = "refused" if exc.__class__.__name__ == "ImageError" else "crashed"
        result["message"] = f"{exc}" if result["outcome"] == "refused" else f"{exc.__class__.__name__}: {exc}"
    result.update(wall_s=round(time.perf_counter() - started, 3), cpu_s=round(time.process_time() - cpu, 3),
                  peak_mb=round((peak - baseline) / 2**20, 1), baseline_mb=round(baseline / 2**20, 1))
    return result


# ---------------------------------------------------------------------------- the run
def run_case(name: str, folder: Path, timeout: float) -> dict:
    file_name, build, about = CASES[name]
    path = folder / file_name
    path.write_bytes(build())
    record = {"case": name, "about": about, "file_bytes": path.stat().st_size}
    command = [sys.executable, "-m", "cma_clip.lab.hostile_images", "--measure", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record.update(outcome="timeout", message=f"still running after {timeout:.0f} s")
    else:
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            record.update(outcome="crashed", message=(done.stderr.strip().splitlines() or ["?"])[-1][:300])
        else:
            record.update(json.loads(lines[-1]))
            if "message" in record:
                record["message"] = record["message"].replace(str(folder) + os.sep, "")
    path.unlink()
    within = record["outcome"] == "refused" or (
        record["outcome"] == "accepted" and record["peak_mb"] <= BUDGET_MB and record["cpu_s"] <= BUDGET_S)
    record["within_budget"] = within
    return record


def table(records: list[dict]) -> str:
    def size(n: int) -> str:
        return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB" if n >= 2**10 else f"{n} B"

    lines = ["| case | file | outcome | decoded | wall s | CPU s | peak MB | within |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        outcome = r["outcome"] if r["outcome"] == "accepted" else f"{r['outcome']}: {r.get('message', '')}"
        numbers = [f"{r[k]:.2f}" if k in r else "-" for k in ("wall_s", "cpu_s")] + [
            f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"]
        lines.append(f"| {r['case']} | {size(r['file_bytes'])} | {outcome.replace('|', '/')} | "
                     f"{r.get('decoded', '-')} | {' | '.join(numbers)} | {'yes' if r['within_budget'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.hostile_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all); --list shows them")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out-json", help="also write the records as JSON here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a case may run (default 120)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: one file
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.list:
        print("\n".join(f"{name}: {about}" for name, (_, _, about) in CASES.items()))
        return 0
    names = args.cases.split(",") if args.cases else list(CASES)
    if unknown := [n for n in names if n not in CASES]:
        parser.error(f"unknown cases {unknown}; --list shows them")
    records = []
    with tempfile.TemporaryDirectory(prefix="hostile-images-") as folder:
        for name in names:
            records.append(run_case(name, Path(folder), args.timeout))
            r = records[-1]
            print(f"{name}: {r['outcome']} {r.get('wall_s', '-')} s, {r.get('peak_mb', '-')} MB", file=sys.stderr)
    print(table(records))
    print(f"\nbudget per accepted image: {BUDGET_MB} MB above the process before it, {BUDGET_S} s of CPU; "
          f"{sum(not r['within_budget'] for r in records)} case(s) over")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(records, indent=2))
    return 0 if all(r["within_budget"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
