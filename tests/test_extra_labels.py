"""`train --extra-labels`: the labelers' corrections, from the label store or its export, merged
into a catalogue by split (cma_clip/extra_labels.py)."""
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from cma_clip.data import Catalogue, CatalogueConfig, CatalogueError, read_manifest, split_indices, write_table
from cma_clip.extra_labels import merge, read_corrections
from cma_clip.labels import LabelStore
from conftest import HM

PHOTOS = sorted((HM / "images").glob("*/*.jpg"))[:3]


def tiny_png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 9, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def three_items(tmp_path, split_column: bool = True) -> Catalogue:
    """a1 (train) and a3 (test) share PHOTOS[0]; a2 (val) has PHOTOS[1]."""
    folder = tmp_path / "catalogue"
    (folder / "img").mkdir(parents=True)
    for name, photo in zip(("a1", "a2"), PHOTOS):
        shutil.copy(photo, folder / "img" / f"{name}.jpg")
    rows = [("a1", "img/a1.jpg", "Stockings", "Nylon", "Black", "Tights", "train"),
            ("a2", "img/a2.jpg", "Shape up", "Support", "Black", "Leggings", "val"),
            ("a3", "img/a1.jpg", "Held out", "Nylon", "Black", "Tights", "test")]
    columns = ["id", "image", "name", "desc", "colour", "type", "split"][:7 if split_column else 6]
    lines = [",".join(columns)] + [",".join(row[:len(columns)]) for row in rows]
    (folder / "items.csv").write_text("\n".join(lines) + "\n")
    config = CatalogueConfig(name="items", manifest=str(folder / "items.csv"), text_columns=["name", "desc"],
                             tasks=["colour", "type"], id_column="id")
    return Catalogue.open(config)


def test_a_store_overrides_train_and_val_keeps_test_and_adds_uploads(tmp_path):
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "store" / "labels.db")
    store.save_correction(image=PHOTOS[0], text="Stockings", labels={"colour": "White", "pattern": "Dots"},
                          item_id="a1")
    store.save_correction(image=PHOTOS[1], text="Shape up", labels={"type": "Tights"}, item_id="a2")
    store.save_correction(image=PHOTOS[2], text="new upload", labels={"colour": "Blue"}, item_id="up-1")
    store.save_correction(image=tiny_png(5), text="another task only", labels={"pattern": "Solid"}, item_id="up-2")
    store.save_correction(image=PHOTOS[0], text="Held out", labels={"colour": "Red"}, item_id="a3")

    merged = merge(catalogue, read_corrections(store.path))
    result = merged.catalogue
    assert result.item_ids() == ["a1", "a2", "a3", "up-1"]
    assert result.labels("colour") == ["White", "Black", "Black", "Blue"]  # the test row keeps its label
    assert result.labels("type") == ["Tights", "Tights", "Tights", None]
    assert "pattern" not in result.rows[0]  # only the catalogue's tasks
    new = result.rows[3]
    assert (new["split"], new["name"], new["desc"]) == ("train", "new upload", "")
    assert os.path.isabs(new["image"]) and result.rows[1]["split"] == "val"
    paths = result.image_paths()
    assert all(p.is_file() for p in paths) and paths[3].read_bytes() == PHOTOS[2].read_bytes()
    assert store.image_dir in result.extra_roots
    assert {k: merged.counts[k] for k in ("corrections", "train", "val", "test", "added", "other_tasks")} == {
        "corrections": 5, "train": 1, "val": 1, "test": 1, "added": 1, "other_tasks": 1}
    summary = merged.summary()
    assert "1 train items relabelled" in summary and "1 test items kept their catalogue labels" in summary
    report = merged.report()
    assert report["source"] == str(store.path) and report["newest_label"] and report["added"] == 1
    # each class the run gains is named (QA, session 36: a formula pasted in became a class unsaid); a val
    # item's label is validated on, no class of the model
    assert report["new_classes"] == {"colour": ["Blue", "White"]}
    assert "new classes (labels no catalogue item of this run had): colour 'Blue', 'White'" in summary
    # another catalogue's task is said, with its count of labels left out
    assert report["not_tasks"] == {"pattern": 2} and report["respelled"] == {}
    assert "labels of columns that are none of this catalogue's tasks (another catalogue's, or a column renamed), " \
           "left out: 'pattern' (2) (tasks: colour, type)" in summary

    # the original is untouched
    assert catalogue.labels("colour") == ["Black"] * 3 and len(catalogue) == 3 and catalogue.extra_roots == ()
    # an item of the manifest left out of this run is not appended as a training row
    train = merge(catalogue.split("train"), read_corrections(store.path))
    assert train.catalogue.item_ids() == ["a1", "up-1"] and [r["split"] for r in train.catalogue.rows] == ["train"] * 2
    assert train.counts["left_out"] == 2 and "2 items outside this run" in train.summary()


def test_an_export_of_another_catalogue_is_refused(tmp_path):
    """QA, session 36: the labels of another catalogue's tasks only trained a checkpoint as if nothing were
    wrong ("1 with labels for other tasks only", exit 0)."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "store" / "labels.db")
    store.save_correction(image=PHOTOS[0], text="Men Watch", labels={"baseColour": "Black", "gender": "Men"},
                          item_id="4665")
    with pytest.raises(CatalogueError, match=r"none of its 1 labelled items has a label for this catalogue's tasks "
                                             r"\(colour, type\): labels of another catalogue\?"):
        merge(catalogue, read_corrections(store.path))


def test_an_upload_of_a_catalogue_photo_counts_as_that_item_never_as_a_new_train_row(tmp_path):
    """A test item's photo, uploaded without its id (a content id), must not leak into training."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=PHOTOS[1], text="typed anew", labels={"colour": "Grey"})  # a2's photo (val)
    store.save_correction(image=PHOTOS[0], text="typed again", labels={"type": "Socks"})  # a1 (train), a3 (test)
    merged = merge(catalogue, read_corrections(store.path))
    assert merged.catalogue.item_ids() == ["a1", "a2", "a3"]  # nothing added
    assert merged.catalogue.labels("colour") == ["Black", "Grey", "Black"]
    assert merged.catalogue.labels("type") == ["Socks", "Leggings", "Tights"]  # the test item keeps its label
    assert (merged.counts["same_photo"], merged.counts["added"], merged.counts["test"]) == (2, 0, 1)
    # an item's own correction wins over an upload of its photo, and the item counts once
    store.save_correction(image=PHOTOS[0], text="Stockings", labels={"type": "Tights"}, item_id="a1")
    merged = merge(catalogue, read_corrections(store.path))
    assert merged.catalogue.labels("type")[0] == "Tights"
    assert (merged.counts["train"], merged.counts["val"], merged.counts["test"]) == (1, 1, 1)
    assert "1 train items relabelled" in merged.summary()


def test_an_export_trains_like_its_store_and_a_download_without_photos_says_what_it_left_out(tmp_path):
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "studio" / "labels.db")
    store.save_correction(image=PHOTOS[0], text="Stockings", labels={"colour": "=White"}, item_id="a1")
    store.save_correction(image=PHOTOS[2], text="new, \"quoted\"", labels={"colour": "Blue"}, item_id="up-1")
    store.save_correction(image=PHOTOS[1], text="typed anew", labels={"colour": "Grey"})  # a2's photo, no id
    from_store = merge(catalogue, read_corrections(store.path)).catalogue
    for suffix in ("csv", "jsonl"):
        export = tmp_path / "studio" / f"labels_export.{suffix}"
        store.export(export)
        merged = merge(catalogue, read_corrections(export))
        assert merged.catalogue.rows == from_store.rows and merged.counts["added"] == 1
        downloaded = tmp_path / "downloads" / export.name  # the browser's copy: no labels_images/ beside it
        downloaded.parent.mkdir(exist_ok=True)
        shutil.copy(export, downloaded)
        merged = merge(catalogue, read_corrections(downloaded))
        # the formula quote is off again; a2's photo, uploaded without its id, is known by the sha256
        # its file is named by
        assert merged.catalogue.labels("colour") == ["=White", "Grey", "Black"]
        assert (merged.counts["same_photo"], merged.counts["val"]) == (1, 1)
        assert merged.counts["no_image"] == 1 and "1 new items not added: their photos are missing" in merged.summary()
    (tmp_path / "not-an-export.csv").write_text("article_id,colour\n1,Red\n")
    with pytest.raises(CatalogueError, match=r"not an export of the label store: it lacks the columns .* \(a table of "
                                             r"labels of your own is a catalogue: train on it with --manifest\)"):
        read_corrections(tmp_path / "not-an-export.csv")


def test_a_file_that_is_no_label_store_is_refused_and_left_as_it_was(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(CatalogueError, match="not a label store"):
        read_corrections(empty)
    assert empty.stat().st_size == 0  # no schema written into the user's file
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all " * 100)
    for path in (other, garbage):
        with pytest.raises(CatalogueError, match="not a label store"):
            read_corrections(path)
    with pytest.raises(CatalogueError, match="it holds no labels"):
        read_corrections(LabelStore(tmp_path / "new.db").path)
    with pytest.raises(CatalogueError, match="no such file"):
        read_corrections(tmp_path / "typo.db")


def test_a_label_store_in_a_folder_that_cannot_be_written_is_named_as_such(tmp_path, monkeypatch):
    """SQLite opens a WAL store for writing even to read it, and said only "unable to open database
    file", which read as "not a label store". The folder is made unwritable as os.access sees it (a
    read-only mount, or permissions: root, who runs CI, passes the latter)."""
    store = LabelStore(tmp_path / "ro" / "labels.db")
    store.save_correction(image=tiny_png(1), text="x", labels={"colour": "Red"}, item_id="a")
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (mode != os.W_OK or Path(path) != store.path.parent)
                        and writable(path, mode, **kw))
    with pytest.raises(CatalogueError, match=r"labels.db is in a folder this process cannot write \(read-only\?\)"
                                             ".*copy labels.db and its labels_images folder somewhere writable"):
        read_corrections(store.path)
    monkeypatch.undo()
    assert read_corrections(store.path).items.keys() == {"a"}


def test_added_rows_do_not_reshuffle_the_split_of_a_catalogue_without_a_split_column(tmp_path):
    catalogue = three_items(tmp_path, split_column=False)
    store = LabelStore(tmp_path / "labels.db")
    for i in range(4):
        store.save_correction(image=tiny_png(i), text=f"upload {i}", labels={"colour": "Blue"})
    before = split_indices(catalogue, seed=3)
    merged = merge(catalogue, read_corrections(store.path), split_seed=3).catalogue
    after = split_indices(merged, seed=3)
    for split in ("train", "val", "test"):
        assert set(after[split]) & {0, 1, 2} == set(before[split])
    assert set(after["train"]) >= {3, 4, 5, 6}


def test_auto_accepted_labels_count_unless_left_out_and_the_summary_says_how_many(tmp_path):
    """An auto-accept fills a label the catalogue lacks (an upload's); over a catalogue item's own label, a label
    someone chose, it is left out (it replaced "Black" with the model's "Grey": review s41)."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "labels.db")
    bulk = [{"item_id": item, "image": photo, "text": text, "labels": {"colour": "Grey"},
             "predictions": {"colour": {"label": "Grey", "confidence": 0.97}}}
            for item, photo, text in (("a1", PHOTOS[0], "Stockings"), ("up-9", PHOTOS[2], "An upload"))]
    store.save_many(bulk, "bulk-1", annotator="ana")
    store.save_correction(image=PHOTOS[1], text="Shape up", labels={"type": "Tights"}, item_id="a2")
    for source in (store.path, tmp_path / "labels_export.csv"):  # the export keeps each label's source
        store.export(tmp_path / "labels_export.csv")
        merged = merge(catalogue, read_corrections(source))
        assert merged.catalogue.labels("colour") == ["Black"] * 3 + ["Grey"]  # the upload's row added
        assert (merged.counts["auto_labels"], merged.counts["auto_under_catalogue"]) == (1, 1)
        assert "1 of the labels used were auto-accepted by a model" in merged.summary()
        assert ("1 auto-accepted labels that differ from the catalogue's own label of their item left out"
                in merged.summary())
        human = merge(catalogue, read_corrections(source), auto_labels=False)
        assert human.catalogue.labels("colour") == ["Black"] * 3 and human.catalogue.labels("type")[1] == "Tights"
        assert (human.counts["auto_left_out"], human.counts["auto_labels"], human.counts["other_tasks"]) == (2, 0, 0)
        assert "2 auto-accepted labels left out (--no-auto-labels)" in human.summary()


def test_open_disagreements_are_marked_in_the_export_and_left_out_of_training(tmp_path):
    """Annotators who differ (or a label since that went against the ruling) give no label yet: the
    export names who said what, training leaves it out (QA, session 32: ben's label after rita's
    ruling was trained on, without a word)."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "labels.db")

    def label(who: str, item: str, colour: str, ruling: bool = False) -> None:
        store.save(image=PHOTOS[0 if item == "a1" else 1], text="t", labels={"colour": colour}, item_id=item,
                   annotator=who, adjudicated=ruling)

    label("ana", "a1", "White")
    label("ben", "a1", "Beige")
    label("ana", "a2", "Red")
    label("ben", "a2", "Green")
    label("rita", "a2", "Pink", ruling=True)  # a2 settled; a1 open
    export = tmp_path / "labels_export.csv"
    store.export(export)
    rows = {row["id"]: row for row in read_manifest(export)}
    assert rows["a1"]["colour__disputed"] == "ana: White; ben: Beige" and rows["a2"]["colour__disputed"] == ""
    for source in (store.path, export):
        merged = merge(catalogue, read_corrections(source))
        # a1's colour is in dispute: neither annotator's label is trained on, nor the catalogue's, which both
        # annotators may have rejected (QA, session 35: a1 trained on the catalogue's Black)
        assert merged.catalogue.labels("colour")[:2] == [None, "Pink"]
        assert merged.catalogue.labels("type")[:2] == ["Tights", "Leggings"]  # their other tasks as they were
        assert merged.counts["disputed_left_out"] == 1 and "1 labels of open disagreements left out" in merged.summary()

    label("ben", "a2", "Grey")  # against the ruling: open again
    store.export(export)
    assert read_manifest(export)[1]["colour__disputed"] == "ana: Red; ben: Grey; rita's ruling: Pink"
    for source in (store.path, export):
        with pytest.raises(CatalogueError, match="holds no labels settled .its 2 labels are open disagreements"):
            read_corrections(source)


def test_a_dispute_leaves_the_task_out_and_a_confirmation_is_not_counted_as_a_change(tmp_path):
    """QA, session 35: an item whose colour was in dispute trained on the catalogue's colour, which both annotators
    had rejected, and was counted among the "relabelled" though nothing of it changed."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "labels.db")
    store.save(image=PHOTOS[0], text="t", labels={"colour": "White", "type": "Tights"}, item_id="a1", annotator="ana")
    store.save(image=PHOTOS[0], text="t", labels={"colour": "Beige"}, item_id="a1", annotator="ben")
    merged = merge(catalogue, read_corrections(store.path))
    row = merged.catalogue.rows[0]
    assert (row["colour"], row["type"]) == ("", "Tights") and merged.catalogue.labels("colour")[0] is None
    assert (merged.counts["train"], merged.counts["confirmed"], merged.counts["disputed_left_out"]) == (1, 0, 1)
    assert "1 labels of open disagreements left out, the catalogue's of those tasks too" in merged.summary()
    store.save(image=PHOTOS[0], text="t", labels={"colour": "Black"}, item_id="a1", annotator="ana")
    store.save(image=PHOTOS[0], text="t", labels={"colour": "Black"}, item_id="a1", annotator="ben")  # they agree
    merged = merge(catalogue, read_corrections(store.path))
    assert merged.catalogue.rows[0] == catalogue.rows[0] | {"split": "train"}  # the catalogue's labels, confirmed
    assert (merged.counts["train"], merged.counts["confirmed"], merged.counts["disputed_left_out"]) == (1, 1, 0)
    assert "1 train items relabelled (1 of them as the catalogue had them)" in merged.summary()
    assert merged.report()["confirmed"] == 1


def test_labels_stored_before_they_were_tidied_train_as_the_class_they_spell(tmp_path):
    """Review, session 37: a label saved with a zero-width space or decomposed before labels were tidied (an
    auto-accept keeps a model's labels as they are: the way such a label reaches a store now) trained as a class of
    its own beside the one it looks like."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "store" / "labels.db")
    for item, photo, label in (("a1", PHOTOS[0], "Black\u200b"), ("up-1", PHOTOS[2], "Cre\u0300me")):
        store.save(image=photo, text="old", labels={"colour": label}, item_id=item, source="auto",
                   predictions={"colour": {"label": label, "confidence": 0.99}})
    merged = merge(catalogue, read_corrections(store.path))
    assert merged.catalogue.labels("colour") == ["Black", "Black", "Black", "Cr\u00e8me"]
    assert merged.report()["new_classes"] == {"colour": ["Cr\u00e8me"]}  # not 'Black\u200b' beside Black


def test_an_export_edited_by_hand_says_a_renamed_column_and_trains_a_respelled_class_as_that_class(tmp_path):
    """QA, session 40: in an export edited in a spreadsheet, a task's column renamed ("colour_group_name" to
    "colour") lost all its labels unsaid (exit 0), and "grey" for the class "Grey" trained as a second class
    (the app refuses that spelling: two spellings would train as two classes)."""
    catalogue = three_items(tmp_path)
    store = LabelStore(tmp_path / "studio" / "labels.db")
    store.save_correction(image=PHOTOS[0], text="Stockings", labels={"colour": "White", "type": "Tights"}, item_id="a1")
    store.save_correction(image=PHOTOS[1], text="Shape up", labels={"colour": "Red", "type": "Leggings"}, item_id="a2")
    export = tmp_path / "studio" / "labels_export.csv"
    store.export(export)
    rows = read_manifest(export)
    edited = [{("kind" if column == "type" else column): value for column, value in row.items()} for row in rows]
    edited[0]["colour"] = "black"  # the catalogue's class "Black", typed in lower case
    write_table(export, edited, list(edited[0]))
    merged = merge(catalogue, read_corrections(export))
    assert merged.catalogue.labels("colour") == ["Black", "Red", "Black"]
    assert merged.catalogue.labels("type") == ["Tights", "Leggings", "Tights"]  # the catalogue's: "kind" is no task
    assert merged.respelled == {"colour": {"black": "Black"}} and merged.not_tasks == {"kind": 2}
    assert merged.new_classes == {}  # "black" is no class of its own (a2's Red is validated on: no class either)
    summary = merged.summary()
    assert "labels spelling a class otherwise, read as that class: colour 'black' as 'Black'" in summary
    assert "or a column renamed), left out: 'kind' (2)" in summary


def test_exports_joined_together_keep_each_tasks_newest_label_and_say_so(tmp_path):
    """Exports pasted into one file: an item's rows give, task by task, the label saved last (not the row
    that comes last); two annotators ending on different labels are a disagreement, left out as in one store;
    the summary counts the repeated rows and the differing labels."""
    catalogue = three_items(tmp_path)
    exports = []
    for name, labels in (("ana", {"colour": "Green", "type": "Tights"}), ("ben", {"colour": "Red"})):
        store = LabelStore(tmp_path / name / "labels.db")
        store.save_correction(image=PHOTOS[0], text="Stockings", labels=labels, item_id="a1", annotator=name)
        exports.append(tmp_path / name / "labels_export.csv")
        store.export(exports[-1])
    ana, ben = (read_manifest(path) for path in exports)
    later = dict(ana[0], colour="Blue", colour__at="2027-01-01T00:00:00.000+00:00")  # ana's own, newer: it wins
    joined = tmp_path / "ana" / "joined.csv"
    write_table(joined, [later, *ana], list(ana[0]))
    corrections = read_corrections(joined)
    assert corrections.items["a1"].labels == {"colour": "Blue", "type": "Tights"} and not corrections.disputed
    assert (corrections.repeated, corrections.conflicts) == (1, 1)

    write_table(joined, [*ana, *ben], list(ana[0]))  # ana's Green and ben's Red: a disagreement
    corrections = read_corrections(joined)
    assert corrections.items["a1"].labels == {"type": "Tights"} and corrections.items["a1"].disputed == {"colour"}
    merged = merge(catalogue, corrections)
    assert merged.counts["disputed_left_out"] == 1 and merged.catalogue.labels("type")[0] == "Tights"
    assert "1 row repeats an item of an earlier row (exports joined): of each task the newest label kept (1 label " \
           "differed between the rows; where annotators differ, it is left out as a disagreement)" in merged.summary()
