"""Shared fixtures: the real bundled backbone and a small checkpoint trained on real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from cma_clip.data import default_data_root  # noqa: E402

DATA = default_data_root()
HM = DATA / "hm-articles"


def pytest_configure(config):
    if not (HM / "articles.csv").exists():
        raise pytest.UsageError(f"the shared catalogues are missing at {DATA}: set CMA_CLIP_DATA")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def backbone():
    from cma_clip.predict import shared_backbone

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
