"""The feature cache: frozen-backbone outputs of a catalogue, computed once and kept on disk.

    python -m cma_clip.features list                       # the entries, their size and last use
    python -m cma_clip.features prune --unused-days 14     # remove those unused for two weeks

With a frozen backbone, CMA-CLIP trains and evaluates on cached features (patch tokens,
text token states, pooled embeddings) in seconds per epoch. `encode_items` is the one loop
that runs the backbone over a catalogue's images and texts; the cache, the study's noisy
encodings and the benchmarks use it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import mobilenet
from .backbones import BackboneError, DualEncoder, EncoderOutput
from .colour import DESCRIPTOR_DIM
from .data import Catalogue, ImageError, load_image
from .runtime import bf16_supported, decode_threads, loader_workers, lower_thread_priority


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMA_CLIP_CACHE", Path.home() / ".cache" / "cma_clip"))


FEATURE_FIELDS = ("image_tokens", "image_pooled", "text_tokens", "text_mask", "text_pooled")
MOBILENET_FIELDS = ("mobilenet_tokens", "mobilenet_pooled")  # the second image tower's, where the backbone has it


@dataclass
class Features:
    """Frozen-backbone outputs for every item of a catalogue, as float16 arrays in memory."""

    image_tokens: np.ndarray  # [N, P, Ci]
    image_pooled: np.ndarray  # [N, Di]
    text_tokens: np.ndarray  # [N, L, Ct]
    text_mask: np.ndarray  # [N, L] bool
    text_pooled: np.ndarray  # [N, Dt]
    text_ids: np.ndarray  # [N, L] int32 token ids
    colour: np.ndarray | None = None  # [N, colour.DESCRIPTOR_DIM] float16 foreground colour descriptors
    mobilenet_tokens: np.ndarray | None = None  # [N, P, 320] the second image tower's (`mobilenet.py`)
    mobilenet_pooled: np.ndarray | None = None  # [N, 1280]

    def __len__(self) -> int:
        return len(self.image_pooled)

    def take(self, index: np.ndarray) -> "Features":
        """The items `index`, in that order."""
        return Features(**{name: getattr(self, name)[index] for name in (*FEATURE_FIELDS, "text_ids")},
                        **{name: None if getattr(self, name) is None else getattr(self, name)[index]
                           for name in ("colour", *MOBILENET_FIELDS)})

    def pooled_image(self, tower: str) -> np.ndarray:
        """The pooled image embeddings of `tower` (`backbones.IMAGE_TOWERS`): what a model's alignment reads."""
        pooled = self.image_pooled if tower == "main" else self.mobilenet_pooled
        if pooled is None:
            raise BackboneError("these features have no MobileNetV2 tower: extract them with bundled+mobilenet_v2")
        return pooled

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu") -> EncoderOutput:
        """A float32 batch, text trimmed to the longest sequence in it."""
        mask = self.text_mask[index]
        length = max(1, int(mask.sum(1).max()))

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device).float()

        return EncoderOutput(
            image_tokens=tensor(self.image_tokens[index]),
            image_pooled=tensor(self.image_pooled[index]),
            text_tokens=tensor(self.text_tokens[index, :length]),
            text_mask=torch.from_numpy(np.ascontiguousarray(mask[:, :length])).to(device),
            text_pooled=tensor(self.text_pooled[index]),
            text_ids=torch.from_numpy(self.text_ids[index, :length].astype(np.int64)).to(device),
            colour=None if self.colour is None else tensor(self.colour[index]),
            **{name: None if getattr(self, name) is None else tensor(getattr(self, name)[index])
               for name in MOBILENET_FIELDS},
        )


class _ImageDataset(torch.utils.data.Dataset):
    """Decodes and letterboxes images (to uint8 pixels: a quarter of the float tensor's bytes)."""

    def __init__(self, paths: list[Path], backbone: DualEncoder,
                 transform: Callable[[Image.Image, int], Image.Image] | None = None):
        self.paths, self.backbone, self.transform = paths, backbone, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        """`decoded_pixels` of image i: the reason an image cannot be used is raised in the main
        process, as an ImageError without the worker's traceback."""
        transform = self.transform
        return decoded_pixels(self.backbone, self.paths[i], None if transform is None else lambda im: transform(im, i))


def decoded_pixels(backbone: DualEncoder, path: Path | str,
                   transform: Callable[[Image.Image], Image.Image] | None = None) -> tuple[np.ndarray, str]:
    """An image's letterboxed uint8 pixels (changed by `transform` first) and "", or blank pixels
    and why the image cannot be used."""
    try:
        image = load_image(path)
    except ImageError as exc:
        size = backbone.image_size
        return np.zeros((size, size, 3), np.uint8), str(exc)
    if transform is not None:
        image = transform(image)
    return backbone.letterbox_pixels([image])[0], ""


def image_batches(paths: list[Path], backbone: DualEncoder, batch_size: int = 64, num_workers: int | None = None,
                  transform: Callable[[Image.Image, int], Image.Image] | None = None,
                  unreadable: dict[int, str] | None = None) -> Iterator[torch.Tensor]:
    """Preprocessed pixels of `paths` in order, `batch_size` at a time, decoded (and changed by
    `transform(image, index)`, if given) in `num_workers` DataLoader workers (default:
    `runtime.loader_workers`) while the model runs, or, with none (a CPU), by a pool of
    `runtime.decode_threads` low-priority threads, a batch ahead (`runtime.lower_thread_priority`); normalised
    here, a batch at a time. An unusable image raises `ImageError`; given an `unreadable` dict, it
    gets blank pixels instead, and its index and message go into the dict."""
    workers = loader_workers(backbone.device) if num_workers is None else num_workers
    dataset = _ImageDataset(paths, backbone, transform)
    if workers == 0:
        with ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode", initializer=lower_thread_priority) as pool:
            def decode(start: int) -> list[Future]:
                return [pool.submit(dataset.__getitem__, i) for i in range(start, min(start + batch_size, len(paths)))]

            ahead = decode(0)
            for start in range(0, len(paths), batch_size):
                current, ahead = ahead, decode(start + batch_size)  # the next batch, in the model's idle moments
                pixels, errors = _collate([future.result() for future in current])
                yield backbone.normalise(_checked(pixels, errors, start, unreadable))
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         collate_fn=_collate)
    yield from (backbone.normalise(_checked(pixels, errors, start, unreadable))
                for start, (pixels, errors) in zip(range(0, len(paths), batch_size), loader))


def _collate(items: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
    return np.stack([pixels for pixels, _ in items]), [error for _, error in items]


def _checked(pixels: np.ndarray, errors: list[str], start: int, unreadable: dict[int, str] | None) -> np.ndarray:
    """A batch's pixels (its first item at index `start`); the first image that could not be used
    raises its `ImageError` here, in the main process (a worker's exception would arrive wrapped in
    its traceback), unless `unreadable` takes the batch's failures."""
    if any(errors):
        if unreadable is None:
            raise ImageError(next(e for e in errors if e))
        unreadable.update({start + i: error for i, error in enumerate(errors) if error})
    return pixels


@torch.no_grad()
def encode_items(backbone: DualEncoder, paths: list[Path], texts: list[str], max_tokens: int, batch_size: int = 64,
                 num_workers: int | None = None, transform: Callable[[Image.Image, int], Image.Image] | None = None,
                 colour: bool = False) -> Iterator[tuple[int, EncoderOutput]]:
    """The backbone's outputs for items (image path, text), `batch_size` at a time, as (index of
    the batch's first item, outputs); images are decoded (and changed by `transform`) in
    DataLoader workers while the backbone runs (see `image_batches`). `colour`: with the
    foreground colour descriptors."""
    device = backbone.device
    for start, pixels in zip(range(0, len(texts), batch_size),
                             image_batches(paths, backbone, batch_size, num_workers, transform)):
        text = backbone.tokenize(texts[start:start + len(pixels)], max_tokens)
        yield start, backbone(pixels.to(device), text.to(device), colour)


def _encoder_key(backbone: DualEncoder, max_tokens: int) -> str:
    """What an item's features depend on besides its photo and text."""
    precision = "bf16" if bf16_supported(backbone.device) else "fp32"
    return f"{backbone.cache_key()}|{precision}|{max_tokens}"


def feature_key(backbone: DualEncoder, catalogue: Catalogue) -> str:
    raw = f"{_encoder_key(backbone, catalogue.config.max_text_tokens)}|{catalogue.fingerprint()}"
    return f"{catalogue.config.name}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def row_keys(catalogue: Catalogue) -> np.ndarray:
    """One key per item: its photo (resolved path, size and modification time) and its text. Rows
    of another cache entry with the same key and encoder are copied instead of encoded again; a
    resumed sharded prediction keeps only the rows whose key is unchanged (`predict`)."""
    keys = []
    for path, text in zip(catalogue.image_paths(), catalogue.texts()):
        try:
            stat = path.stat()
            photo = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # a missing photo: encoding names it
            photo = str(path)
        keys.append(hashlib.blake2b(f"{photo}\0{text}".encode(), digest_size=16).digest())
    return np.array(keys, dtype="S16")


def _cache_folder(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "features" / feature_key(backbone, catalogue)


def has_cached_features(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None = None) -> bool:
    """Whether `extract_features` would read the catalogue's features from the cache."""
    return (_cache_folder(backbone, catalogue, cache_dir) / "meta.json").exists()


def extract_features(backbone: DualEncoder, catalogue: Catalogue, cache_dir: str | Path | None = None,
                     batch_size: int = 64, num_workers: int | None = None,
                     progress: bool | Callable[[float, str], None] = True, memory_map: bool = False,
                     colour: bool = False) -> Features:
    """Backbone features of every item, computed once and cached on disk as float16 .npy files.

    The cache entry is keyed by the backbone's weights and preprocessing, the precision,
    the text length and the manifest's images and texts; any change builds a new entry. A new
    entry copies the rows of items another entry of the same encoder already holds (same photo
    file, size and modification time, same text) and encodes only the others: a catalogue with
    a few rows added or changed (`train --extra-labels` with uploads) costs those rows.
    Entries are written to a temporary folder and renamed when complete, so an
    interrupted build never leaves a half-written cache behind. Images are decoded in
    `num_workers` DataLoader workers (default: `runtime.loader_workers`). `progress`: a tqdm bar,
    or none, or a callback (fraction done, what) for a UI, which a first build keeps waiting for
    minutes (the app's suspected mislabels). With `memory_map`,
    the arrays stay on disk and only the rows read are loaded (for taking a few rows).
    """
    folder = _cache_folder(backbone, catalogue, cache_dir)
    encoder = _encoder_key(backbone, catalogue.config.max_text_tokens)
    if (folder / "meta.json").exists():
        _index_rows(folder, catalogue, encoder)
        with contextlib.suppress(OSError):  # when it was last read: what `prune` goes by (a read-only cache: never)
            os.utime(folder / "meta.json")
    else:
        _build_cache(backbone, catalogue, folder, encoder, batch_size, num_workers, progress)
    fields = FEATURE_FIELDS + MOBILENET_FIELDS * backbone.has_mobilenet
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if memory_map else None) for name in fields}
    return Features(**arrays, text_ids=_token_ids(backbone, catalogue, folder),
                    colour=_colour(backbone, catalogue, folder, encoder, batch_size, num_workers, progress)
                    if colour else None)


def _token_ids(backbone: DualEncoder, catalogue: Catalogue, folder: Path) -> np.ndarray:
    """Token ids of the texts: tokenizer output only (seconds), so computed on first use and kept."""
    return _kept(folder / "text_ids.npy", lambda: backbone.tokenize(
        catalogue.texts(), catalogue.config.max_text_tokens).ids.numpy().astype(np.int32))


def _colour(backbone: DualEncoder, catalogue: Catalogue, folder: Path, encoder: str, batch_size: int,
            num_workers: int | None, progress: bool | Callable[[float, str], None]) -> np.ndarray:
    """Foreground colour descriptors of the images (`colour.py`): computed on first use and kept,
    copied for the items another entry of the encoder has them for."""
    def compute() -> np.ndarray:
        # filled in place: a list of per-batch results, concatenated at the end, kept the freed
        # decoding buffers between them from going back to the system (40,000 photos: 1.9 GB more at the peak)
        out = np.empty((len(catalogue), DESCRIPTOR_DIM), np.float16)
        keys = folder / "row_keys.npy"  # kept by the entry (not in a cache we may only read: made afresh)
        todo = _reuse_rows(folder, encoder, np.load(keys) if keys.exists() else row_keys(catalogue), {"colour": out})
        paths = catalogue.image_paths()
        batches = image_batches([paths[i] for i in todo], backbone, batch_size, num_workers)
        start = 0
        for pixels in tqdm(batches, total=math.ceil(len(todo) / batch_size),
                           desc=f"colour {catalogue.config.name}", disable=progress is not True):
            out[todo[start:start + len(pixels)]] = backbone.describe_colour(pixels).numpy()
            start += len(pixels)
        return out
    return _kept(folder / "colour.npy", compute)


def _kept(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The array at `path`, computed and written (atomically) first if it is not there."""
    if not path.exists():
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, compute())
        tmp.rename(path)
    return np.load(path)


def _index_rows(folder: Path, catalogue: Catalogue, encoder: str) -> None:
    """Give an entry built before entries kept their row keys those keys, and its encoder, so
    later entries can copy its rows (the folder's name says these are the catalogue's rows)."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("encoder") == encoder and (folder / "row_keys.npy").exists():
        return
    try:
        _kept(folder / "row_keys.npy", lambda: row_keys(catalogue))
        tmp = folder / f"meta.tmp{os.getpid()}.json"
        tmp.write_text(json.dumps({**meta, "encoder": encoder}))
        tmp.rename(folder / "meta.json")
    except OSError:  # a cache we may only read (shared, read-only) is read as it is: the keys only save time
        pass


def _reuse_rows(folder: Path, encoder: str, keys: np.ndarray, arrays: dict[str, np.ndarray],
                chunk: int = 1024) -> np.ndarray:
    """Fill `arrays` (by field name) with the rows of `keys` that another complete entry of
    `encoder` beside `folder` holds in every one of those fields (the entry holding most of them);
    returns the indices of the rows left to compute."""
    best: tuple[Path, np.ndarray, np.ndarray] | None = None
    for other in folder.parent.iterdir():
        if other == folder or ".tmp" in other.name or not (other / "row_keys.npy").exists():
            continue
        try:
            meta = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("encoder") != encoder or not all((other / f"{name}.npy").exists() for name in arrays):
            continue
        at = {key: i for i, key in enumerate(np.load(other / "row_keys.npy").tolist())}
        pairs = [(i, at[key]) for i, key in enumerate(keys.tolist()) if key in at]
        if pairs and (best is None or len(pairs) > len(best[1])):
            new, old = np.array(pairs).T
            best = other, new, old
    if best is None:
        return np.arange(len(keys))
    other, new, old = best
    for name, array in arrays.items():
        source = np.load(other / f"{name}.npy", mmap_mode="r")
        for start in range(0, len(new), chunk):  # a chunk at a time: a whole field may not fit in memory
            array[new[start:start + chunk]] = source[old[start:start + chunk]]
    return np.setdiff1d(np.arange(len(keys)), new)


def _build_cache(backbone: DualEncoder, catalogue: Catalogue, folder: Path, encoder: str, batch_size: int,
                 num_workers: int | None, progress: bool | Callable[[float, str], None]) -> None:
    n, tokens = len(catalogue), catalogue.config.max_text_tokens
    texts = catalogue.texts()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = {
        "image_tokens": (n, backbone.num_patches, backbone.image_token_dim),
        "image_pooled": (n, backbone.image_pooled_dim),
        "text_tokens": (n, tokens, backbone.text_token_dim),
        "text_mask": (n, tokens),
        "text_pooled": (n, backbone.text_pooled_dim),
    }
    if backbone.has_mobilenet:
        shapes.update(mobilenet_tokens=(n, backbone.num_patches, mobilenet.TOKEN_DIM),
                      mobilenet_pooled=(n, mobilenet.POOLED_DIM))
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", shape=shape,
                                              dtype=np.bool_ if name == "text_mask" else np.float16)
              for name, shape in shapes.items()}
    try:
        keys = row_keys(catalogue)
        np.save(tmp / "row_keys.npy", keys)
        todo = _reuse_rows(folder, encoder, keys, arrays)
        if len(todo) < n:  # said even without progress bars (train --quiet): which rows were encoded
            print(f"features {catalogue.config.name}: {n - len(todo)} of {n} items copied from the cache, "
                  f"{len(todo)} to encode", file=sys.stderr)
        paths = catalogue.image_paths()
        batches = encode_items(backbone, [paths[i] for i in todo], [texts[i] for i in todo], tokens, batch_size,
                               num_workers)
        for start, out in tqdm(batches, total=math.ceil(len(todo) / batch_size),
                               desc=f"features {catalogue.config.name}", disable=progress is not True):
            rows = todo[start:start + len(out.image_pooled)]
            if callable(progress):
                progress((start + len(rows)) / len(todo), f"computing the features of {catalogue.config.name}")
            for name in shapes:
                with np.errstate(over="ignore"):  # checked below, with a clearer message
                    arrays[name][rows] = getattr(out, name).cpu().numpy()
                if name != "text_mask" and not np.isfinite(arrays[name][rows]).all():
                    raise BackboneError(f"the backbone's {name} exceed float16's range (65504) or are not "
                                        "finite, so its features cannot be cached")
    except BaseException:  # an unusable image, Ctrl-C, out of memory: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for array in arrays.values():
        array.flush()
    (tmp / "meta.json").write_text(json.dumps({"items": n, "backbone": backbone.cache_key(),
                                               "catalogue": catalogue.config.name, "encoder": encoder}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# ----------------------------------------------------------------------------- the cache's entries

@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache (a catalogue's features for one encoder), or a build left unfinished
    (`unfinished`: a run killed before it could clean up)."""

    path: Path
    items: int
    bytes: int  # on disk (an unfinished build's arrays are sparse until written)
    last_used: datetime
    unfinished: bool = False
    building: bool = False  # unfinished, and the process building it still runs (on this machine)


def cache_entries(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """The entries under `cache_dir` (default `default_cache_dir()`), least recently used first."""
    root = Path(cache_dir or default_cache_dir()) / "features"
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            files = [f for f in folder.iterdir() if f.is_file()]
            used = (meta_path.stat().st_mtime if meta  # an unfinished build: its last write
                    else max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime))
        except (OSError, ValueError):
            continue
        entries.append(CacheEntry(folder, meta.get("items", 0), sum(_disk_bytes(f) for f in files),
                                  datetime.fromtimestamp(used, timezone.utc), unfinished=not meta,
                                  building=not meta and _builder_runs(folder)))
    return sorted(entries, key=lambda e: e.last_used)


def _disk_bytes(path: Path) -> int:
    stat = path.stat()
    return stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size


def _builder_runs(folder: Path) -> bool:
    """Whether the process named by an unfinished build's folder (`<key>.tmp<pid>`) still runs."""
    pid = folder.name.rpartition(".tmp")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it runs, as another user
        return True
    return True


def prune(cache_dir: str | Path | None, unused_days: float, dry_run: bool = False) -> list[CacheEntry]:
    """Remove the entries not read for `unused_days` (and builds a killed run left, not those
    running); returns them. A run that needs one again rebuilds it, copying what the others hold."""
    cutoff = datetime.now(timezone.utc).timestamp() - unused_days * 86400
    gone = [e for e in cache_entries(cache_dir) if e.last_used.timestamp() < cutoff and not e.building]
    if not dry_run:
        for entry in gone:
            shutil.rmtree(entry.path, ignore_errors=True)
    return gone


def _line(e: CacheEntry) -> str:
    state = ("  (unfinished: being built)" if e.building else "  (unfinished: a build that was killed)"
             if e.unfinished else "")
    return f"{e.last_used:%Y-%m-%d %H:%M}  {_size(e.bytes):>9}  {e.items:>7}  {e.path.name}{state}"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.features",
                                     description="List or prune the feature cache ($CMA_CLIP_CACHE/features).")
    parser.add_argument("command", choices=["list", "prune"])
    parser.add_argument("--cache-dir", help=f"the cache's folder (default {default_cache_dir()})")
    parser.add_argument("--unused-days", type=float, help="prune: remove the entries no run read for this many days")
    parser.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    args = parser.parse_args(argv)
    root = Path(args.cache_dir or default_cache_dir()) / "features"
    if not root.is_dir() and not args.cache_dir:  # the default folder: nothing encoded on this machine yet
        print(f"no feature cache yet at {root}: nothing has been encoded on this machine")
        return 0
    if not root.is_dir():  # a folder given: a typo, or the features/ folder itself
        parser.error(f"no feature cache at {root}: --cache-dir takes the folder that holds features/")
    if args.command == "list":
        if args.unused_days is not None or args.dry_run:
            parser.error("--unused-days and --dry-run go with prune")
        entries = cache_entries(args.cache_dir)
        print(f"{'last used (UTC)':<16}  {'size':>9}  {'items':>7}  entry")
        for e in entries:
            print(_line(e))
        print(f"{len(entries)} entries, {_size(sum(e.bytes for e in entries))}")
        return 0
    if args.unused_days is None or not 0 <= args.unused_days < math.inf:
        parser.error("prune takes --unused-days N (0 or more)")
    gone = prune(args.cache_dir, args.unused_days, args.dry_run)
    print(f"{'would remove' if args.dry_run else 'removed'} {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} "
          f"({_size(sum(e.bytes for e in gone))}) unused for {args.unused_days:g} days")
    for e in gone:
        print(_line(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
