import json

import numpy as np
import pytest

from cma_clip.data import IGNORE, UNKNOWN, Catalogue, CatalogueConfig, CatalogueError, LabelVocab, read_manifest
from cma_clip.features import extract_features
from conftest import HM


def write_catalogue(folder, rows, name="items.csv"):
    """A small manifest whose images are real H&M photos, copied next to it."""
    import shutil

    source = sorted((HM / "images").glob("*/*.jpg"))
    (folder / "img").mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        if "image" not in row:
            shutil.copy(source[i], folder / "img" / f"{i}.jpg")
            row["image"] = f"img/{i}.jpg"
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


def test_csv_and_jsonl_manifests_read_the_same(tmp_path):
    rows = [{"title": "red dress", "colour": "Red"}, {"title": "blue shirt", "colour": "NA"}]
    csv_rows = read_manifest(write_catalogue(tmp_path, [dict(r) for r in rows]))
    jsonl_rows = read_manifest(write_catalogue(tmp_path, [dict(r) for r in rows], "items.jsonl"))
    assert csv_rows == jsonl_rows


def test_missing_and_unknown_labels(tmp_path):
    path = write_catalogue(tmp_path, [{"t": "a", "colour": "Red"}, {"t": "b", "colour": ""},
                                      {"t": "c", "colour": "NA"}, {"t": "d", "colour": "Teal"}])
    cat = Catalogue.open(CatalogueConfig("x", str(path), text_columns=["t"], tasks=["colour"]))
    labels = cat.labels("colour")
    assert labels == ["Red", None, None, "Teal"]
    vocab = LabelVocab.build(labels[:1])
    assert vocab.encode(labels).tolist() == [0, IGNORE, IGNORE, UNKNOWN]


def test_manifest_errors_are_clear(tmp_path):
    path = write_catalogue(tmp_path, [{"t": "a", "colour": "Red"}])
    with pytest.raises(CatalogueError, match="lacks columns"):
        Catalogue.open(CatalogueConfig("x", str(path), text_columns=["title"], tasks=["colour"]))
    with pytest.raises(CatalogueError, match="not found"):
        Catalogue.open(CatalogueConfig("x", str(tmp_path / "nope.csv")))
    escaping = write_catalogue(tmp_path, [{"image": "../../etc/passwd", "t": "a"}], "bad.csv")
    with pytest.raises(CatalogueError, match="leaves the catalogue folder"):
        Catalogue.open(CatalogueConfig("x", str(escaping), text_columns=["t"])).image_paths()


def test_bundled_configs_point_at_the_shared_data():
    for name in ("fashion-product-images", "hm-articles"):
        cat = Catalogue.open(CatalogueConfig.load(name), split="val", limit=3)
        assert len(cat) == 3 and all(p.exists() for p in cat.image_paths())
        assert all(cat.texts())


def test_feature_cache_is_reused_and_rebuilt_on_change(tmp_path, backbone):
    path = write_catalogue(tmp_path, [{"t": "red dress", "c": "Red"}, {"t": "blue shirt", "c": "Blue"}])
    config = CatalogueConfig("x", str(path), text_columns=["t"], tasks=["c"], max_text_tokens=8)
    cache = tmp_path / "cache"
    first = extract_features(backbone, Catalogue.open(config), cache, progress=False)
    assert first.image_tokens.shape == (2, 49, 320) and first.image_tokens.dtype == np.float16
    assert first.text_tokens.shape == (2, 8, 384)
    assert first.text_mask.sum(1).tolist() == [4, 4]  # [CLS] word word [SEP]
    assert len(list((cache / "features").iterdir())) == 1
    extract_features(backbone, Catalogue.open(config), cache, progress=False)
    assert len(list((cache / "features").iterdir())) == 1  # reused
    path.write_text(path.read_text().replace("red dress", "green dress"))
    second = extract_features(backbone, Catalogue.open(config), cache, progress=False)
    assert len(list((cache / "features").iterdir())) == 2  # text changed: rebuilt
    assert np.array_equal(first.image_tokens, second.image_tokens)
    assert not np.array_equal(first.text_pooled[0], second.text_pooled[0])


def test_features_beyond_float16_are_refused_and_leave_no_cache(tmp_path, backbone, monkeypatch):
    from dataclasses import replace

    from cma_clip.backbones import BackboneError

    path = write_catalogue(tmp_path, [{"t": "red dress", "c": "Red"}])
    config = CatalogueConfig("x", str(path), text_columns=["t"], tasks=["c"], max_text_tokens=8)
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda pixels, text: replace(real(pixels, text), image_pooled=(
        real(pixels, text).image_pooled * 1e6)))  # a backbone whose outputs float16 cannot hold
    with pytest.raises(BackboneError, match="image_pooled exceed float16's range"):
        extract_features(backbone, Catalogue.open(config), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "features").iterdir())
