import json
import sys

import numpy as np
import pytest
import torch

from cma_clip.data import (IGNORE, MAX_FIELD_CHARS, UNKNOWN, Catalogue, CatalogueConfig, CatalogueError, ImageError,
                           LabelVocab, load_image, read_manifest, write_table)
from cma_clip.features import extract_features, image_batches
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


def test_parquet_manifests_read_as_csv_ones_and_tables_round_trip(tmp_path):
    rows = [{"title": "red dress", "colour": "Red", "year": "2019"},
            {"title": "blue shirt", "colour": "NA", "year": ""}]
    csv_rows = read_manifest(write_catalogue(tmp_path, [dict(r) for r in rows]))
    assert read_manifest(write_table(tmp_path / "items.parquet", csv_rows)) == csv_rows
    records = [{"id": "a", "confidence": 0.5, "auto_accept": True},
               {"id": "b", "confidence": 0.25, "auto_accept": False}]
    import pyarrow.parquet as pq

    assert pq.read_table(write_table(tmp_path / "out.parquet", records)).to_pylist() == records  # types kept


def test_parquet_errors_are_clear(tmp_path, monkeypatch):
    (tmp_path / "broken.parquet").write_text("id,title\n1,shirt\n")
    with pytest.raises(CatalogueError, match="broken.parquet is not a readable Parquet file"):
        read_manifest(tmp_path / "broken.parquet")
    many = write_table(tmp_path / "many.parquet", [{"id": str(i)} for i in range(5)])
    with pytest.raises(CatalogueError, match="more than 4 rows"):
        read_manifest(many, max_rows=4)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an install without the optional extra
    with pytest.raises(CatalogueError, match="pip install -r requirements-ray.txt"):
        read_manifest(many)


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


def test_a_new_cache_entry_copies_the_rows_it_shares_and_encodes_only_the_others(tmp_path, backbone, monkeypatch,
                                                                                 capsys):
    """A catalogue with rows added or changed (`train --extra-labels` with uploads) costs those rows,
    also when the entry it copies from was built before entries kept their row keys."""
    import shutil

    rows = [{"t": f"item {i}", "c": "Red"} for i in range(4)]
    config = CatalogueConfig("x", str(write_catalogue(tmp_path, rows)), text_columns=["t"], tasks=["c"],
                             max_text_tokens=8)
    cache = tmp_path / "cache"
    first = extract_features(backbone, Catalogue.open(config), cache, batch_size=2, progress=False, colour=True)
    (entry,) = (cache / "features").iterdir()
    (entry / "row_keys.npy").unlink()  # as an entry built before they were kept
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "encoder"}))
    extract_features(backbone, Catalogue.open(config), cache, progress=False)  # reading it indexes its rows

    source = sorted((HM / "images").glob("*/*.jpg"))
    shutil.copy(source[10], tmp_path / "img" / "4.jpg")
    shutil.copy(source[11], tmp_path / "img" / "2.jpg")  # a photo replaced under the same name
    rows[1]["t"] = "item 1 in navy"  # a text changed
    changed = CatalogueConfig("x", str(write_catalogue(tmp_path, [*rows, {"t": "new", "c": "Red",
                                                                          "image": "img/4.jpg"}], "more.csv")),
                              text_columns=["t"], tasks=["c"], max_text_tokens=8)
    encoded, described = [], []
    forward, describe = backbone.forward, backbone.describe_colour
    monkeypatch.setattr(backbone, "forward", lambda pixels, text, colour=False: (
        encoded.append(len(pixels)), forward(pixels, text, colour))[1])
    monkeypatch.setattr(backbone, "describe_colour", lambda pixels: (described.append(len(pixels)),
                                                                     describe(pixels))[1])
    second = extract_features(backbone, Catalogue.open(changed), cache, batch_size=2, progress=False, colour=True)
    assert sum(encoded) == sum(described) == 3  # rows 1, 2 and 4
    assert "features x: 2 of 5 items copied from the cache, 3 to encode" in capsys.readouterr().err  # no progress
    for name in ("image_tokens", "text_tokens", "text_mask", "text_pooled", "colour"):
        assert np.array_equal(getattr(second, name)[[0, 3]], getattr(first, name)[[0, 3]]), name
    monkeypatch.undo()
    fresh = extract_features(backbone, Catalogue.open(changed), tmp_path / "fresh", batch_size=2, progress=False,
                             colour=True)
    for name in ("image_pooled", "text_pooled", "colour"):
        np.testing.assert_allclose(getattr(second, name).astype(np.float32), getattr(fresh, name).astype(np.float32),
                                   atol=2e-2, rtol=2e-2, err_msg=name)
    assert not np.allclose(second.image_pooled[2], first.image_pooled[2])
    assert not np.allclose(second.text_pooled[1], first.text_pooled[1])


def test_an_entry_that_cannot_be_given_row_keys_is_read_as_it_is(tmp_path, backbone, monkeypatch):
    """A cache on a read-only disk (a shared one) serves features as before; the row keys only save time."""
    import cma_clip.features as features

    path = write_catalogue(tmp_path, [{"t": "red dress", "c": "Red"}])
    config = CatalogueConfig("x", str(path), text_columns=["t"], tasks=["c"], max_text_tokens=8)
    first = extract_features(backbone, Catalogue.open(config), tmp_path / "cache", progress=False)
    (entry,) = (tmp_path / "cache" / "features").iterdir()
    (entry / "row_keys.npy").unlink()

    def read_only(path, array):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(features.np, "save", read_only)
    again = extract_features(backbone, Catalogue.open(config), tmp_path / "cache", progress=False)
    assert np.array_equal(again.image_tokens, first.image_tokens) and not (entry / "row_keys.npy").exists()


def test_prune_removes_the_entries_no_run_read_lately_and_killed_builds(tmp_path, backbone, capsys, monkeypatch):
    import os
    import time

    from cma_clip import features

    cache = tmp_path / "cache"
    configs = [CatalogueConfig("x", str(write_catalogue(tmp_path, [{"t": text, "c": "Red"}], f"{text}.csv")),
                               text_columns=["t"], tasks=["c"], max_text_tokens=8) for text in ("old", "new")]
    for config in configs:
        extract_features(backbone, Catalogue.open(config), cache, progress=False)
    old, new = (features._cache_folder(backbone, Catalogue.open(c), cache) for c in configs)
    month_ago = time.time() - 30 * 86400
    os.utime(old / "meta.json", (month_ago, month_ago))
    killed = cache / "features" / f"x-0123456789abcdef.tmp{2**22 + 1}"  # a build killed before it could clean up
    building = cache / "features" / f"x-fedcba9876543210.tmp{os.getpid()}"  # one whose process still runs
    for unfinished in (killed, building):
        unfinished.mkdir()
        (unfinished / "image_tokens.npy").write_bytes(b"0" * 10)
        os.utime(unfinished / "image_tokens.npy", (month_ago, month_ago))
    assert features.main(["list", "--cache-dir", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert listed.index(killed.name) < listed.index(old.name) < listed.index(new.name)  # least recently used first
    assert f"{killed.name}  (unfinished: a build that was killed)" in listed
    assert f"{building.name}  (unfinished: being built)" in listed and "4 entries" in listed
    assert features.main(["prune", "--cache-dir", str(cache), "--unused-days", "14", "--dry-run"]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out and old.exists() and killed.exists()
    extract_features(backbone, Catalogue.open(configs[0]), cache, progress=False)  # read again: used today
    assert features.main(["prune", "--cache-dir", str(cache), "--unused-days", "14"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert old.exists() and new.exists() and not killed.exists() and building.exists()
    for args, message in ((["prune", "--cache-dir", str(cache)], "prune takes --unused-days"),
                          (["prune", "--cache-dir", str(cache), "--unused-days", "nan"], "prune takes --unused-days"),
                          (["list", "--cache-dir", str(cache), "--dry-run"], "go with prune"),
                          (["list", "--cache-dir", str(cache / "features")], "no feature cache at")):
        with pytest.raises(SystemExit):
            features.main(args)
        assert message in capsys.readouterr().err
    monkeypatch.setenv("CMA_CLIP_CACHE", str(tmp_path / "fresh-machine"))  # the default folder, nothing encoded yet
    assert features.main(["list"]) == 0
    assert "no feature cache yet at" in capsys.readouterr().out


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_training_run_stopped_by_a_signal_leaves_no_unfinished_cache_build_and_no_traceback(tmp_path, stop):
    """`kill`, torchrun and Kubernetes stop a run with SIGTERM, a person with Ctrl-C (SIGINT): it
    unwinds quietly with the shell's code, and the feature cache it was building is removed instead
    of staying behind full size (SIGTERM), without a KeyboardInterrupt traceback (Ctrl-C)."""
    import os
    import signal
    import subprocess
    import time

    from cma_clip.data import REPO_ROOT

    cache = tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-m", "cma_clip.train", "--catalogue", "hm-articles", "--limit", "300",
                            "--epochs", "1", "--quiet", "--cache-dir", str(cache), "--out", str(tmp_path / "run")],
                           cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("features/*.tmp*")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert list(cache.glob("features/*.tmp*")), "the run never started building its cache"
    os.kill(run.pid, getattr(signal, stop))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + getattr(signal, stop) and "Traceback" not in err, err[-800:]
    assert not list(cache.glob("features/*"))


def test_a_catalogue_prediction_stopped_by_ctrl_c_exits_quietly_and_writes_nothing(tmp_path):
    """QA, session 36: Ctrl-C during `predict --manifest` printed a 72-line KeyboardInterrupt traceback (the
    other commands exit 130 quietly)."""
    import os
    import signal
    import subprocess
    import time

    from cma_clip.data import REPO_ROOT

    out = tmp_path / "predictions.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "cma_clip.predict", "--checkpoint", "checkpoints/hm-articles",
                            "--manifest", str(HM / "articles.csv"), "--out", str(out)],
                           cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "CMA_CLIP_CACHE": str(tmp_path / "cache")})
    time.sleep(20)  # the model loaded, the catalogue's 10,000 rows on their way (minutes on 2 cores)
    assert run.poll() is None, "the run ended before it could be stopped"
    os.kill(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err[-800:]
    assert not out.exists() and not list(tmp_path.glob(".predictions*"))


def test_cached_colour_descriptors_are_each_photos_own_in_catalogue_order(tmp_path, backbone):
    rows = [{"t": f"item {i}", "c": "Red"} for i in range(5)]
    config = CatalogueConfig("x", str(write_catalogue(tmp_path, rows)), text_columns=["t"], tasks=["c"],
                             max_text_tokens=8)
    catalogue = Catalogue.open(config)
    cached = extract_features(backbone, catalogue, tmp_path / "cache", batch_size=2, progress=False, colour=True).colour
    own = [backbone.describe_colour(backbone.preprocess([load_image(p)]))[0].numpy() for p in catalogue.image_paths()]
    assert cached.shape == (5, len(own[0])) and cached.dtype == np.float16  # three batches, the last one short
    np.testing.assert_allclose(cached.astype(np.float32), np.stack(own), atol=2e-3, rtol=2e-3)
    assert not np.allclose(cached[0], cached[1])


def test_features_beyond_float16_are_refused_and_leave_no_cache(tmp_path, backbone, monkeypatch):
    from dataclasses import replace

    from cma_clip.backbones import BackboneError

    path = write_catalogue(tmp_path, [{"t": "red dress", "c": "Red"}])
    config = CatalogueConfig("x", str(path), text_columns=["t"], tasks=["c"], max_text_tokens=8)
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda pixels, text, colour=False: replace(
        real(pixels, text, colour), image_pooled=real(pixels, text).image_pooled * 1e6))  # float16 cannot hold these
    with pytest.raises(BackboneError, match="image_pooled exceed float16's range"):
        extract_features(backbone, Catalogue.open(config), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "features").iterdir())


# ---------------------------------------------------------------------------- manifests from users
def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark: without care the id column is
    read as '\\ufeffid', and items are silently keyed by their file names."""
    csv_path = tmp_path / "items.csv"
    csv_path.write_bytes("\ufeffid,image,title\r\nsku-1,a.jpg,red dress\r\n".encode("utf-8"))
    jsonl_path = tmp_path / "items.jsonl"
    jsonl_path.write_bytes('\ufeff{"id": "sku-1", "image": "a.jpg", "title": "red dress"}\n'.encode("utf-8"))
    for path in (csv_path, jsonl_path):
        assert read_manifest(path) == [{"id": "sku-1", "image": "a.jpg", "title": "red dress"}]
    config = CatalogueConfig("x", str(csv_path), text_columns=["title"], id_column="id")
    assert Catalogue.open(config).item_ids() == ["sku-1"]


def test_a_spreadsheet_csv_separated_by_semicolons_or_tabs_reads_as_with_commas(tmp_path):
    """Where the decimal mark is a comma, a spreadsheet saves "CSV" with semicolons: read as one
    column, every row was refused ("2 fields where the header has 1")."""
    expected = [{"id": "sku-1", "image": "a.jpg", "title": "red dress, long"}, {"id": "sku-2", "image": "b.jpg",
                                                                                "title": "x;y"}]
    semicolons = '\ufeffid;image;title\r\nsku-1;a.jpg;red dress, long\r\nsku-2;b.jpg;"x;y"\r\n'
    tabs = "id\timage\ttitle\nsku-1\ta.jpg\tred dress, long\nsku-2\tb.jpg\tx;y\n"
    for name, text in (("semicolons.csv", semicolons), ("tabs.csv", tabs)):
        (tmp_path / name).write_bytes(text.encode("utf-8"))
        assert read_manifest(tmp_path / name) == expected
    (tmp_path / "commas.csv").write_text("id,image,title\nsku-1,a.jpg,a;b\tc\n")  # a comma in the header: commas
    assert read_manifest(tmp_path / "commas.csv") == [{"id": "sku-1", "image": "a.jpg", "title": "a;b\tc"}]


def test_a_cell_at_the_length_limit_that_write_table_guards_as_a_formula_reads_back(tmp_path):
    """The guard's leading quote made it one character longer than the limit, and the whole file refused."""
    path = write_table(tmp_path / "long.csv", [{"id": "a", "text": "=" + "x" * (MAX_FIELD_CHARS - 1)}],
                       spreadsheet=True)
    assert read_manifest(path)[0]["text"] == "=" + "x" * (MAX_FIELD_CHARS - 1)
    write_table(path, [{"id": "a", "text": "=" + "x" * MAX_FIELD_CHARS}], spreadsheet=True)
    with pytest.raises(CatalogueError, match=f"holds {MAX_FIELD_CHARS + 1:,} characters"):
        read_manifest(path)


@pytest.mark.parametrize("text,message", [
    ("id,image,title,id\n1,a.jpg,t,2\n", r"items.csv: the header repeats the column 'id'; each column needs its own"),
    ("id,title,image,title,image\n1,t,a,u,b\n", r"repeats the columns 'title', 'image'"),
    ("id,,title\n1,a.jpg,t\n", r"items.csv: column 2 of the header has no name"),
    ("id,image,title,\n1,a.jpg,t,\n", r"column 4 of the header has no name"),
], ids=["repeated", "two-repeated", "unnamed", "trailing-comma"])
def test_repeated_or_unnamed_columns_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "items.csv"
    path.write_text(text)
    with pytest.raises(CatalogueError, match=message):
        read_manifest(path)


def test_a_repeated_jsonl_key_is_refused(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "1", "image": "a.jpg"}\n{"id": "2", "image": "b.jpg", "id": "3"}\n')
    with pytest.raises(CatalogueError, match=r"items.jsonl, line 2: the key 'id' appears more than once"):
        read_manifest(path)


def test_oversized_fields_are_refused_naming_row_and_column(tmp_path):
    from cma_clip.data import MAX_FIELD_CHARS

    path = tmp_path / "items.csv"
    path.write_text(f'id,image,title\n1,a.jpg,short\n2,b.jpg,"{"x" * (MAX_FIELD_CHARS + 1)}"\n')
    with pytest.raises(CatalogueError, match=r"items.csv, row 3: column 'title' holds 20,001 characters; "
                                             r"the limit is 20,000"):
        read_manifest(path)
    assert len(read_manifest(path, max_field_chars=None)[1]["title"]) == MAX_FIELD_CHARS + 1
    path.write_text(f'id,image,title\n1,a.jpg,"{"x" * 200_000}"\n')  # over the csv module's own limit
    with pytest.raises(CatalogueError, match=r"items.csv, line 2: not readable as CSV: a field is longer than 131,072 characters; "
                                             r"the limit is 20,000"):
        read_manifest(path)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"id": "1", "text": "y" * 30_000}) + "\n")
    with pytest.raises(CatalogueError, match=r"items.jsonl, line 1: column 'text' holds 30,000 characters"):
        read_manifest(jsonl)


def test_row_cap_applies_only_when_asked(tmp_path):
    from cma_clip.data import MAX_MANIFEST_ROWS

    path = tmp_path / "items.csv"
    path.write_text("id,image\n" + "".join(f"{i},{i}.jpg\n" for i in range(11)))
    assert len(read_manifest(path, max_rows=11)) == 11
    with pytest.raises(CatalogueError, match=r"items.csv has more than 10 rows; the limit is 10"):
        read_manifest(path, max_rows=10)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps({"id": str(i)}) + "\n" for i in range(11)))
    with pytest.raises(CatalogueError, match=r"items.jsonl has more than 10 rows"):
        read_manifest(jsonl, max_rows=10)
    # training catalogues are read whole: 40,000 rows, four times the cap meant for uploads
    assert MAX_MANIFEST_ROWS == 10_000
    assert len(Catalogue.open(CatalogueConfig.load("fashion-product-images"))) == 40_000


def test_images_decode_alike_in_threads_and_in_a_worker_process(tmp_path, backbone):
    """On a CPU the images of a batch are decoded by threads between batches; on a GPU by DataLoader
    workers beside the model: the same pixels in the same order, and an unusable image refused by name."""
    paths = Catalogue.open(CatalogueConfig.load("hm-articles")).image_paths()[:10]
    threads = list(image_batches(paths, backbone, batch_size=4, num_workers=0))
    worker = list(image_batches(paths, backbone, batch_size=4, num_workers=1))
    assert [len(b) for b in threads] == [len(b) for b in worker] == [4, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(threads, worker))
    assert torch.equal(threads[1][0], backbone.preprocess([load_image(paths[4])])[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    for workers in (0, 1):
        with pytest.raises(ImageError, match="broken.jpg"):
            list(image_batches([*paths[:3], broken], backbone, batch_size=2, num_workers=workers))
