"""The images of an uploaded manifest: kept per upload, matched to the rows by relative path,
bounded in size, and removed after a while.

A browser uploads files without their folders, so rows `red/1.jpg` and `blue/1.jpg` cannot be
told apart by separately uploaded files: a `.zip` of the images keeps their folders and is
matched by path; a separately uploaded file is matched only when its name is unambiguous
(one row names it and one upload carries it). Everything matched is copied into a folder of
its own, `<root>/<upload id>/<the row's relative path>`, which the review queue's items point
to (Gradio's own upload cache is emptied on a restart, the queue is not). `prune` removes the
folders unused for `max_age_s`, and the least recently used ones idle for an hour while they
exceed the storage cap, at each upload; `make_room` refuses an upload that does not fit beside
the uploads in use (a queue opened minutes ago lost its images to a stranger's upload).
"""
from __future__ import annotations

import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..data import file_sha256
from ..errors import CMAClipError
from ..runtime import env_number

MAX_UPLOAD_FILES = 10_000  # images in one upload (the manifest's row cap)
MAX_UPLOAD_BYTES = 1_000_000_000  # one upload, a .zip's members counted unpacked (a zip bomb stops here)
IN_USE_S = 3600  # an upload used this recently is not removed to make room: someone is reviewing it
MAX_IMAGE_FILE_BYTES = 100_000_000  # one image file: a 40-megapixel photo is a few MB (a zip of zeros is not one)


class UploadError(CMAClipError, ValueError):
    """An upload that cannot be taken, worded for the user."""


@dataclass
class UploadedImages:
    """One upload's images in its own folder: by relative path (from a .zip) and by file name
    (separate files, whose folders the browser dropped)."""

    folder: Path
    by_path: dict[str, Path] = field(default_factory=dict)
    by_name: dict[str, list[Path]] = field(default_factory=dict)
    size: int = 0

    def count(self, size: int) -> None:
        self.size += size
        if self.size > MAX_UPLOAD_BYTES:
            raise UploadError(f"The images add up to more than {MAX_UPLOAD_BYTES // 1_000_000:,} MB; the limit is "
                              f"{MAX_UPLOAD_BYTES // 1_000_000:,} MB per upload (split the manifest).")


def relative_path(value: str) -> str | None:
    """A manifest's image path as a clean relative POSIX path (`./a\\b.jpg` -> `a/b.jpg`);
    None for one leaving its folder (absolute, `..`, a drive) or empty."""
    text = str(value or "").strip().replace("\\", "/")
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ":" in path.parts[0] or ".." in path.parts or text.startswith("~"):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return "/".join(parts) or None


def receive(root: Path, upload_id: str, files: list[str] | None) -> UploadedImages:
    """Unpack the `.zip` files and gather the other files of one upload under `root/upload_id`."""
    images = UploadedImages(root / upload_id)
    images.folder.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files or []]
    if len(files) > MAX_UPLOAD_FILES:
        raise UploadError(f"{len(files):,} files were uploaded; the limit is {MAX_UPLOAD_FILES:,} per upload.")
    for path in files:
        if path.suffix.lower() == ".zip":
            _unzip(path, images)
        else:
            images.count(path.stat().st_size)
            images.by_name.setdefault(path.name, []).append(path)
    return images


def _unzip(archive: Path, images: UploadedImages) -> None:
    """Each member of the archive under its relative path; members leaving the folder, links
    and folders are passed over. The sizes its directory declares count against the cap
    before anything is unpacked, and `zipfile` never unpacks a member past its declared size."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            if len(members) + len(images.by_path) > MAX_UPLOAD_FILES:
                raise UploadError(f"{archive.name} holds more than {MAX_UPLOAD_FILES:,} files; the limit is "
                                  f"{MAX_UPLOAD_FILES:,} per upload.")
            declared = sum(m.file_size for m in members)
            if images.size + declared > MAX_UPLOAD_BYTES:
                raise UploadError(f"{archive.name} unpacks to {declared / 1e6:,.0f} MB; the limit is "
                                  f"{MAX_UPLOAD_BYTES // 1_000_000:,} MB per upload.")
            if huge := next((m for m in members if m.file_size > MAX_IMAGE_FILE_BYTES), None):
                raise UploadError(f"{archive.name}: {huge.filename} unpacks to {huge.file_size / 1e6:,.0f} MB; an "
                                  f"image file has at most {MAX_IMAGE_FILE_BYTES // 1_000_000} MB.")
            images.count(declared)
            for member in members:
                inside = relative_path(member.filename)
                if inside is None or (member.external_attr >> 16) & 0o170000 == 0o120000:  # leaves, or a link
                    continue
                target = images.folder / "zip" / inside
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                images.by_path[inside] = target
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise UploadError(f"{archive.name} is not a readable .zip archive ({exc.__class__.__name__}: {exc}).") \
            from None


def match(images: UploadedImages, paths: list[str]) -> tuple[dict[int, Path], dict[int, str]]:
    """Each row's image (`paths[i]`, relative to the manifest): the `.zip` member at that path
    (or the one member whose path ends with it, for a zip of the folder above), else the one
    separately uploaded file of that name when no other row names a file of that name.
    Returns {row index: file} and {row index: why it has none}."""
    relative = [relative_path(p) for p in paths]
    names: dict[str, set[str]] = {}
    for rel in relative:
        if rel:
            names.setdefault(PurePosixPath(rel).name, set()).add(rel)
    members: dict[str, list[str]] = {}  # file name -> the zip members of that name (a suffix search stays short)
    for key in images.by_path:
        members.setdefault(PurePosixPath(key).name, []).append(key)
    found, missing = {}, {}
    for i, (raw, rel) in enumerate(zip(paths, relative)):
        if rel is None:
            missing[i] = f"image {raw!r} leaves the manifest's folder"
            continue
        name = PurePosixPath(rel).name
        if rel in images.by_path:
            found[i] = images.by_path[rel]
            continue
        ends = [key for key in members.get(name, []) if key.endswith("/" + rel)]
        if len(ends) == 1:
            found[i] = images.by_path[ends[0]]
            continue
        loose = images.by_name.get(name, [])
        if not loose:
            missing[i] = f"image {rel!r} was not uploaded"
        elif len(names[name]) > 1:
            others = ", ".join(repr(r) for r in sorted(names[name] - {rel})[:3])
            missing[i] = (f"image {rel!r} shares its file name with {others}; separately uploaded files lose "
                          "their folders, so which is which is unknown: upload the images as a .zip")
        elif len({_digest(p) for p in loose}) > 1:
            missing[i] = (f"{len(loose)} different uploaded files are named {name!r}; upload the images as "
                          "a .zip, which keeps their folders")
        else:
            found[i] = loose[0]
    return found, missing


def keep(images: UploadedImages, rel: str, path: Path) -> Path:
    """A matched file inside the upload's folder: an unpacked member where it is, a separately
    uploaded file copied to `<folder>/files/<rel>` (out of Gradio's cache, emptied on a restart)."""
    if images.folder in path.parents:
        return path
    target = images.folder / "files" / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def discard_unused(images: UploadedImages, used: set[Path]) -> None:
    """Remove the unpacked members no row uses: they would only take room until the upload expires."""
    for path in images.by_path.values():
        if path not in used:
            path.unlink(missing_ok=True)


def _digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, file_sha256(path)


def touch(folder: Path) -> None:
    """Mark an upload as used now: retention counts from its last use."""
    try:
        os.utime(folder)
    except OSError:
        pass


def upload_hours() -> float:
    """How long an upload unused is kept: $CMA_CLIP_UPLOAD_HOURS, else 72."""
    return env_number("CMA_CLIP_UPLOAD_HOURS", 72)


def upload_storage_bytes() -> float:
    """What all uploads may take together (the oldest go first): $CMA_CLIP_UPLOAD_MB, else 2,000 MB."""
    return env_number("CMA_CLIP_UPLOAD_MB", 2000) * 1e6


def prune(root: Path, keep_ids: set[str] = frozenset(), max_age_s: float | None = None,
          max_bytes: float | None = None, now: float | None = None) -> list[str]:
    """Remove the upload folders under `root` unused for `max_age_s` (default `upload_hours`), then the
    least recently used ones idle for `IN_USE_S` until the rest fit in `max_bytes` (default
    `upload_storage_bytes`; `keep_ids` are kept whatever their age). Returns the ids removed."""
    max_age_s = upload_hours() * 3600 if max_age_s is None else max_age_s
    max_bytes = upload_storage_bytes() if max_bytes is None else max_bytes
    return _prune(root, keep_ids, max_age_s, max_bytes, now)[0]


def make_room(root: Path, upload_id: str, max_bytes: float | None = None) -> None:
    """After upload `upload_id` was received: `prune` the others, and refuse it (its folder removed)
    when the uploads still exceed `max_bytes` (default $CMA_CLIP_UPLOAD_MB), the rest being in use."""
    max_bytes = upload_storage_bytes() if max_bytes is None else max_bytes
    _, total = _prune(root, {upload_id}, upload_hours() * 3600, max_bytes)
    if total > max_bytes:
        shutil.rmtree(root / upload_id, ignore_errors=True)
        raise UploadError(f"the uploads' storage is full ({total / 1e6:,.0f} MB with this upload, the cap is "
                          f"{max_bytes / 1e6:,.0f} MB, $CMA_CLIP_UPLOAD_MB) and the others were used in the last "
                          f"{IN_USE_S // 60} minutes: nothing was taken; upload fewer images, or try again later.")


def _prune(root: Path, keep_ids: set[str], max_age_s: float, max_bytes: float,
           now: float | None = None) -> tuple[list[str], int]:
    """`prune`, in one walk of the uploads: the ids removed and the bytes the rest hold."""
    now = time.time() if now is None else now
    folders = []  # (last use, bytes, folder), the least recently used first
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.is_dir() and not folder.is_symlink():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            folders.append((folder.stat().st_mtime, size, folder))
    removed, total = [], sum(size for _, size, _ in folders)
    for used, size, folder in sorted(folders):
        if folder.name in keep_ids:
            continue
        if now - used > max_age_s or (total > max_bytes and now - used > IN_USE_S):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
            total -= size
    return removed, total
