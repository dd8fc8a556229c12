"""Shared fixtures: the real bundled backbone and a small checkpoint trained on real data."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from cma_clip.data import default_data_root  # noqa: E402

if TYPE_CHECKING:
    from cma_clip.studio import Studio

DATA = default_data_root()
HM = DATA / "hm-articles"


def pytest_configure(config):
    if not (HM / "articles.csv").exists():
        raise pytest.UsageError(f"the shared catalogues are missing at {DATA}: set CMA_CLIP_DATA")
    _own_temp_folder(config)


def _own_temp_folder(config) -> None:
    """Everything the run writes to the temporary folder goes into one folder of its own, removed
    when every test passed: pytest's tmp_path folders, Gradio's uploads and cache (GRADIO_TEMP_DIR,
    read when gradio is imported, so set before any test module is), Ray's session files and
    whatever subprocesses (torchrun, chromium, Ray's workers) put in $TMPDIR. After a failure it
    stays, with pytest's folders of the failed tests only (tmp_path_retention_policy)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cma-clip-tests-"))
    config.stash[TEMP_ROOT] = (root, {name: os.environ.get(name) for name in ("TMPDIR", "GRADIO_TEMP_DIR")},
                               tempfile.tempdir)
    os.environ["TMPDIR"] = str(root)
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    tempfile.tempdir = str(root)


def pytest_unconfigure(config):
    import shutil
    import tempfile

    if TEMP_ROOT not in config.stash:
        return
    root, environ, tempdir = config.stash[TEMP_ROOT]
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = tempdir
    if config.stash.get(FAILED, False):
        print(f"\nthe tests' temporary files are kept in {root} (a test failed)")
    else:
        shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[FAILED] = exitstatus != 0


TEMP_ROOT = pytest.StashKey[tuple]()
FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def backbone():
    from cma_clip.backbones import shared_backbone

    return shared_backbone("bundled", "cpu")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A CMA-CLIP checkpoint trained for a few steps on 48 items per split of hm-articles."""
    from cma_clip import train

    out = tmp_path_factory.mktemp("ckpt") / "hm-small"
    code = train.main(["--catalogue", "hm-articles", "--limit", "48", "--epochs", "2", "--align-epochs", "1",
                       "--batch-size", "16", "--width", "64", "--out", str(out), "--cache-dir", str(cache_dir),
                       "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def colour_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """Like `small_checkpoint`, with the shipped H&M recipe's inputs: colour and words tokens, weights averaged."""
    from cma_clip import train

    out = tmp_path_factory.mktemp("ckpt") / "hm-small-colour"
    code = train.main(["--catalogue", "hm-articles", "--limit", "48", "--epochs", "2", "--align-epochs", "1",
                       "--batch-size", "16", "--width", "64", "--colour", "--words-buckets", "256",
                       "--lexical-buckets", "0", "--ema", "0.5", "--out", str(out), "--cache-dir", str(cache_dir),
                       "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, small_checkpoint) -> Path:
    """A checkpoints folder like the repo's, holding the small checkpoint as 'hm-articles'."""
    import shutil

    folder = tmp_path_factory.mktemp("checkpoints")
    shutil.copytree(small_checkpoint, folder / "hm-articles")
    return folder


@pytest.fixture()
def studio(checkpoint_dir, tmp_path):
    from cma_clip.studio import Studio

    return Studio(checkpoint_dir, data_dir=tmp_path / "studio", device="cpu")


EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "hm-0816591001.jpg"
EXAMPLE_TEXT = "Dingo tee TVP. T-shirt in soft cotton jersey with a round, rib-trimmed neckline."


@contextmanager
def serving(checkpoint_dir: Path, data_dir: Path) -> Iterator[tuple[str, "Studio"]]:
    """The real app (as `app.serve` runs it) on a free local port over `data_dir`: (url, studio)."""
    import app
    from cma_clip.studio import Studio

    studio = Studio(checkpoint_dir, data_dir=data_dir, device="cpu")
    served = app.serve(studio, host="127.0.0.1", block=False)
    try:
        yield served.url, studio
    finally:
        served.close()


@pytest.fixture(scope="session")
def running_app(checkpoint_dir, tmp_path_factory):
    """The app shared by the API tests, with its own data folder; yields (url, studio)."""
    with serving(checkpoint_dir, tmp_path_factory.mktemp("app-data")) as app_and_studio:
        yield app_and_studio


ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def hm_rows(split: str, n: int) -> list[dict]:
    import csv

    with open(HM / "articles.csv", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["split"] == split][:n]


def write_hm_manifest(folder: Path, rows: list[dict], name: str = "items.csv", columns: list[str] | None = None) -> Path:
    """A manifest of real H&M items in `folder`, with their images copied beside it
    (manifests may not point outside their own folder)."""
    import csv
    import json
    import shutil

    columns = columns or [c for c in rows[0] if c != "split"]
    records = []
    for row in rows:
        target = folder / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(HM / row["image"], target)
        records.append({c: row[c] for c in columns})
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    return path
