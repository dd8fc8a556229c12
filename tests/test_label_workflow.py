"""A labeler's workflow at the label store: versions and conflicts, retries, bulk accepts
that crash, undo, typos, the queue's state, agreement, audit, export and the v1 migration."""
import csv
import json
import os
import signal
import sqlite3

import numpy as np
import pytest

from cma_clip import train
from cma_clip.data import Catalogue, read_manifest
from cma_clip.labels import (MIGRATIONS, BatchUndone, Conflict, LabelConflict, LabelStore, LabelStoreError, TaskState,
                             UnknownClass, UnknownLabel, close_classes)
from cma_clip.review import ReviewError, rank, select, uncertainty
from cma_clip.studio import views
from test_labels import PHOTOS, tiny_png

PREDICTED = {"colour": {"label": "Black", "confidence": 0.61}, "type": {"label": "Tights", "confidence": 0.93}}


@pytest.fixture()
def store(tmp_path) -> LabelStore:
    return LabelStore(tmp_path / "labels.db")


def save(store: LabelStore, item: str, annotator: str, labels: dict, **kwargs):
    """A labeler's save of `item` (its image and text derived from its id)."""
    kwargs.setdefault("predictions", PREDICTED)
    return store.save(image=tiny_png(sum(map(ord, item))), text=f"text of {item}", item_id=item, labels=labels,
                      annotator=annotator, checkpoint="ck-1", **kwargs)


def labels_of(store: LabelStore) -> dict[str, dict[str, str]]:
    return {item: entry["labels"] for item, entry in store.current_labels().items()}


# ---------------------------------------------------------------------------- no silent overwrite
def test_two_annotators_on_one_item_get_a_conflict_with_both_labels(store):
    assert store.item_state("a") == {}  # both open the pending item: no version yet
    ben = save(store, "a", "ben", {"colour": "Red"}, base_versions={"colour": None})
    with pytest.raises(LabelConflict) as caught:
        save(store, "a", "ana", {"colour": "Blue", "type": "Tights"}, base_versions={"colour": None, "type": None})
    [conflict] = caught.value.conflicts  # type was still undecided: no conflict there
    assert conflict == Conflict("a", "colour", "Blue", "Red", "ben", ben.versions["colour"], conflict.created_at,
                                "corrected")
    assert "'Red'" in str(caught.value) and "'Blue'" in str(caught.value) and "ben" in str(caught.value)
    assert store.count() == 1 and labels_of(store) == {"a": {"colour": "Red"}}  # nothing replaced, nothing added

    # the same label as theirs is no conflict
    same = save(store, "a", "ana", {"colour": "Red"}, base_versions={"colour": None})
    assert not same.duplicate and store.item_state("a")["colour"].annotator == "ana"
    # the labeler chose to keep theirs over ben's: force saves
    forced = save(store, "a", "ana", {"colour": "Blue"}, base_versions={"colour": None}, force=True)
    assert store.item_state("a")["colour"].label == "Blue"
    # ben still shows his version: refused; on the version he is shown now, his save goes through
    with pytest.raises(LabelConflict):
        save(store, "a", "ben", {"colour": "Green"}, base_versions={"colour": ben.versions["colour"]})
    save(store, "a", "ben", {"colour": "Green"}, base_versions={"colour": forced.versions["colour"]})
    # saving one task keeps the others
    save(store, "a", "ana", {"type": "Socks"}, base_versions={"type": None})
    assert labels_of(store) == {"a": {"colour": "Green", "type": "Socks"}}
    # a version of another item (a stale item id in the form) is refused, whatever the force
    save(store, "b", "ana", {"colour": "Red"})
    with pytest.raises(LabelStoreError, match="not a version of colour of item b"):
        save(store, "b", "ana", {"colour": "Blue"}, base_versions={"colour": forced.versions["colour"]}, force=True)


def test_a_retried_save_stores_one_row(store):
    first = save(store, "a", "ana", {"colour": "Red"}, base_versions={"colour": None}, request_id="req-1")
    save(store, "a", "ben", {"colour": "Blue"}, base_versions={"colour": first.versions["colour"]})
    # the retry arrives after ben's save: it is answered from the first, not checked again
    again = save(store, "a", "ana", {"colour": "Red"}, base_versions={"colour": None}, request_id="req-1")
    assert again == first._replace(duplicate=True)
    assert store.count() == 2 and store.audit()[1] == 2
    # retried after a restart, from a screen that moved on to item c: the answer names the item it was stored on,
    # not c ("Already saved ... for item c", QA operator, session 37)
    moved_on = save(store, "c", "ana", {"colour": "Green"}, request_id="req-1")
    assert moved_on == first._replace(duplicate=True) and moved_on.item_id == "a" and store.count() == 2
    with pytest.raises(LabelStoreError, match="This skip came before the answer to your last save reached the "
                                              "screen, so it was not run: press it again .* used for that save"):
        store.skip("a", ["colour"], "ana", request_id="req-1")


# ---------------------------------------------------------------------------- bulk accept
def bulk_records(items: list[str]) -> list[dict]:
    return [{"item_id": item, "image": tiny_png(100 + n), "text": f"text of {item}", "labels": {"colour": "Black"},
             "predictions": PREDICTED, "catalogue_labels": {"colour": "Grey"}} for n, item in enumerate(items)]


class FailsOnDecision:
    """The thread's connection, which fails (or kills its process) on its `n`-th insert of decisions."""

    def __init__(self, real: sqlite3.Connection, n: int, kill: bool = False) -> None:
        self.real, self.n, self.kill, self.calls = real, n, kill, 0

    def executemany(self, sql, *args):
        if sql.startswith("INSERT INTO decisions"):
            self.calls += 1
            if self.calls == self.n:
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise sqlite3.OperationalError("disk I/O error")
        return self.real.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_bulk_accept_interrupted_by_a_crash_stores_nothing_and_reruns_without_duplicates(store):
    records = bulk_records([f"item-{n}" for n in range(6)])
    pid = os.fork()
    if pid == 0:  # a writer killed in the middle of the batch's transaction
        try:
            store._local.conn = FailsOnDecision(store._connection(), 4, kill=True)  # the child's own connection
            store.save_many(records, "batch-1", annotator="ana", checkpoint="ck-1")
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    reopened = LabelStore(store.path)
    assert reopened.count() == 0 and reopened.audit()[1] == 0

    # an error inside the transaction (a full disk) rolls back the records before it too
    real = store._connection()
    store._local.conn = FailsOnDecision(real, 4)
    with pytest.raises(LabelStoreError, match="could not be used .disk I/O error.; nothing was saved"):
        store.save_many(records, "batch-1", annotator="ana")
    store._local.conn = real
    assert store.count() == 0 and not real.in_transaction

    # a record that fails validation in the middle: refused before anything is written
    broken = [*records[:3], {**records[3], "image": b"not an image"}, *records[4:]]
    with pytest.raises(LabelStoreError, match="record 4 .item-3.: not a readable image"):
        store.save_many(broken, "batch-1", annotator="ana")
    with pytest.raises(LabelStoreError, match="auto-accept takes the model's labels"):
        store.save_many([{**records[0], "labels": {"colour": "Red"}}], "batch-1", annotator="ana")
    assert store.count() == 0

    assert store.save_many(records, "batch-1", annotator="ana", checkpoint="ck-1") == (6, 0, [], 0)
    assert store.save_many(records, "batch-1", annotator="ana", checkpoint="ck-1") == (0, 6, [], 0)
    rows, total = store.audit(source="auto")
    assert total == 6 and {(r["status"], r["annotator"], r["checkpoint"], r["changed_vs_catalogue"]) for r in rows} \
        == {("accepted", "ana", "ck-1", True)}


def test_a_bulk_accept_run_in_chunks_resumes_and_never_replaces_a_label(store):
    records = bulk_records([f"item-{n}" for n in range(6)])
    assert store.save_many(records[:3], "batch-2", annotator="ana") == (3, 0, [], 0)  # the first chunk, then a crash
    late = save(store, "item-4", "ben", {"colour": "Red"})  # a labeler decided one item meanwhile
    stored, already, conflicts, decided = store.save_many(records, "batch-2", annotator="ana")
    assert (stored, already, decided) == (2, 3, 0)
    assert conflicts == [Conflict("item-4", "colour", "Black", "Red", "ben", late.versions["colour"],
                                  conflicts[0].created_at, "corrected")]
    assert store.count() == 6 and labels_of(store)["item-4"] == {"colour": "Red"}
    assert store.item_state("item-0")["colour"].source == "auto"
    with pytest.raises(LabelStoreError, match="twice"):
        store.save_many([records[0], records[0]], "batch-3", annotator="ana")



def test_two_bulk_accepts_at_the_same_moment_store_each_label_once(store):
    """QA, session 35: two labelers' bulk accepts over one sample, run together, each stored every label (78 rows
    for 40 items): both saw the items pending, and the same label decided since was no conflict."""
    records = [{**r, "base_versions": {"colour": None}} for r in bulk_records([f"item-{n}" for n in range(4)])]
    save(store, "item-3", "ben", {"colour": "Red"})  # a person labelled one otherwise meanwhile
    assert store.save_many(records, "hal:bulk", annotator="hal")[:2] == (3, 0)
    stored, already, conflicts, decided = store.save_many(records, "ida:bulk", annotator="ida")  # as queued
    assert (stored, already, decided) == (0, 0, 3) and [c.item_id for c in conflicts] == ["item-3"]
    rows, total = store.audit(source="auto")
    assert total == 3 and {r["annotator"] for r in rows} == {"hal"}


def test_undo_takes_back_a_bulk_accept_as_one_decision_not_the_labels_saved_before_it(store):
    """QA, session 35: Undo after a bulk accept reverted the labeler's hand labels saved before it, and the bulk
    accept stayed; with nothing but bulk accepts, "nothing to undo"."""
    save(store, "own", "ana", {"colour": "Blue"})
    items = [f"item-{n}" for n in range(4)]
    assert store.save_many(bulk_records(items), "ana:bulk", annotator="ana").stored == 4
    save(store, "item-2", "ben", {"colour": "Red"})  # ben decided one since: his label stays
    undone = store.undo("ana", request_id="u-1")
    assert isinstance(undone, BatchUndone) and undone.batch_id == "ana:bulk"
    assert {u.item_id: u.tasks for u in undone.items if u.tasks} == {i: {"colour": ("Black", None)}
                                                                     for i in items if i != "item-2"}
    assert [u.kept for u in undone.items if u.item_id == "item-2"] == [["colour"]]
    assert labels_of(store) == {"own": {"colour": "Blue"}, "item-2": {"colour": "Red"}}
    assert store.undo("ana", request_id="u-1") == undone  # a retry: the first's answer, nothing more undone
    assert labels_of(store) == {"own": {"colour": "Blue"}, "item-2": {"colour": "Red"}}
    assert store.undo("ana").item_id == "own" and labels_of(store) == {"item-2": {"colour": "Red"}}  # then hers
    # the same bulk accept run again after its undo stores its labels again (its saves are keyed by its id)
    again = store.fresh_batch("ana:bulk")
    assert again == "ana:bulk#2" and store.fresh_batch("other") == "other"
    assert store.save_many(bulk_records(items), again, annotator="ana")[:2] == (3, 0)
    assert store.batch_items(again) == {"item-0", "item-1", "item-3"} and store.batch_items("ana:bulk") == set()

# ---------------------------------------------------------------------------- undo
def test_undo_walks_back_more_than_ten_decisions(store):
    before = []  # the current labels before each of ana's decisions
    for step in range(12):
        save(store, "b", "ben", {"type": f"ben-{step}"})  # another annotator's work, never undone by ana
        before.append(labels_of(store))
        item = "a" if step % 3 else "c"
        if step == 7:
            store.skip(item, ["colour"], "ana")
        else:
            save(store, item, "ana", {"colour": f"colour-{step}", "type": "Tights"})
    for step in reversed(range(12)):
        undone = store.undo("ana")
        assert undone.item_id == ("a" if step % 3 else "c")
        current = labels_of(store)
        assert {i: v for i, v in current.items() if i != "b"} == {i: v for i, v in before[step].items() if i != "b"}
    assert labels_of(store) == {"b": {"type": "ben-11"}}
    assert {t: s.status for t, s in store.item_state("a").items()} == {"colour": "pending", "type": "pending"}
    with pytest.raises(LabelStoreError, match="nothing to undo"):
        store.undo("ana")
    assert store.count() == 23  # undos append; they delete nothing


def test_an_undo_that_brings_back_someones_skip_keeps_who_skipped(store):
    """QA s42: ana skipped, ben labelled, ben undid: the table read "ana, ..., skipped by ben"."""
    from cma_clip.studio import views

    save(store, "a", "cem", {"colour": "Red"})
    store.skip("a", ["colour"], "ana")  # over cem's label
    store.skip("b", ["colour"], "ana")  # over none
    for item in ("a", "b"):
        save(store, item, "ben", {"colour": "Blue"})
    for _ in range(2):
        store.undo("ben")
    over, bare = store.item_state("a")["colour"], store.item_state("b")["colour"]
    assert (over.label, over.status, over.annotator, over.skipped_by, over.decided_by) == (
        "Red", "skipped", "cem", "ana", "ben")  # the undo is ben's decision, the skip ana's
    assert views._who(over).endswith("skipped by ana") and "ben" not in views._who(over)
    assert (bare.label, bare.status, bare.skipped_by) == (None, "skipped", "ana") and "ben" not in views._who(bare)


def test_undo_restores_the_previous_label_and_who_set_it_and_refuses_to_drop_someone_elses(store):
    save(store, "a", "ben", {"colour": "Red"})
    first = save(store, "a", "ana", {"colour": "Blue"}, request_id="ana-1")
    store.skip("a", ["colour"], "ana")
    assert store.item_state("a")["colour"].status == "skipped" and store.item_state("a")["colour"].label == "Blue"
    assert store.undo("ana", request_id="undo-1").tasks == {"colour": (None, "Blue")}  # the skip
    assert store.undo("ana", request_id="undo-1").tasks == {"colour": (None, "Blue")}  # a retry: not a second undo
    state = store.item_state("a")["colour"]
    assert (state.label, state.status, state.annotator) == ("Blue", "corrected", "ana")
    assert store.undo("ana") == (first.save_id, "a", {"colour": ("Blue", "Red")}, [], [], False)
    state = store.item_state("a")["colour"]
    assert (state.label, state.annotator) == ("Red", "ben") and state.version > first.versions["colour"]

    # ana's save was overtaken by cem's: her undo would drop his label
    save(store, "a", "ana", {"colour": "Green"})
    cem = save(store, "a", "cem", {"colour": "White"})
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    assert caught.value.conflicts == [Conflict("a", "colour", "Red", "White", "cem", cem.versions["colour"],
                                               caught.value.conflicts[0].created_at, "corrected")]
    assert store.item_state("a")["colour"].label == "White"
    store.undo("ana", force=True)
    assert store.item_state("a")["colour"].label == "Red"
    history = store.item_history("a")
    assert [h["kind"] for h in history] == ["label", "label", "skip", "undo", "undo", "label", "label", "undo"]
    assert history[4]["reverts"] == first.versions["colour"] and history[4]["label"] == "Red"


def test_undo_never_erases_someone_elses_decision_even_the_same_label(store):
    save(store, "a", "ana", {"colour": "Red", "type": "Socks"})
    ben = save(store, "a", "ben", {"colour": "Red"},  # ben agrees with ana: his own decision, the same label
               base_versions={"colour": store.item_state("a")["colour"].version})
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    assert [(c.task, c.theirs, c.annotator, c.status, c.version) for c in caught.value.conflicts] == [
        ("colour", "Red", "ben", "corrected", ben.versions["colour"])]
    assert store.item_state("a")["colour"].annotator == "ben"

    undone = store.undo("ana", keep_theirs=True)  # ben's colour stays; ana's type is reverted
    assert (undone.tasks, undone.kept) == ({"type": ("Socks", None)}, ["colour"])
    state = store.item_state("a")
    assert (state["colour"].label, state["colour"].annotator, state["type"].status) == ("Red", "ben", "pending")
    with pytest.raises(LabelStoreError, match="nothing to undo"):  # that save is undone: undo is not stuck on it
        store.undo("ana")
    assert [h["annotator"] for h in store.audit(annotator="ana")[0]] == ["ana", "ana", "ana"]


def test_a_choice_on_an_undo_conflict_reverts_that_save_or_nothing_and_names_what_it_dropped(store):
    save(store, "a", "ana", {"colour": "Pink"})
    lou = save(store, "a", "lou", {"colour": "Red"})
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    target = caught.value.save_id
    save(store, "b", "ana", {"colour": "Blue"})  # ana saved again before she chose
    with pytest.raises(LabelStoreError, match=f"save #{target} is not ana's newest"):
        store.undo("ana", force=True, save_id=target)
    assert store.item_state("b")["colour"].label == "Blue" and store.item_state("a")["colour"].label == "Red"

    store.undo("ana", request_id="undo-b")  # b's save; a retry with its request id undoes nothing more
    assert store.undo("ana", request_id="undo-b").item_id == "b" and store.item_state("a")["colour"].label == "Red"
    forced = store.undo("ana", force=True, save_id=target)
    assert forced.tasks == {"colour": ("Pink", None)}  # ana's label undone; lou's, standing, dropped:
    assert [(c.task, c.theirs, c.annotator, c.status, c.version) for c in forced.dropped] == [
        ("colour", "Red", "lou", "corrected", lou.versions["colour"])]


def test_what_an_undo_took_back_reads_the_same_in_every_record(store):
    from cma_clip.studio.views import history_rows, item_history_rows

    # ana's undo keeps ben's later colour: only her type is reverted, and every record says just that
    ana = save(store, "a", "ana", {"colour": "Grey", "type": "Socks"})
    save(store, "a", "ben", {"colour": "Red"}, base_versions=ana.versions)
    assert store.undo("ana", keep_theirs=True).kept == ["colour"]
    [ben_entry, ana_entry] = store.history(item_id="a")
    assert (ana_entry["undone"], ana_entry["dropped"], ana_entry["undone_by"]) == ({"type": "ana"}, {}, "ana")
    assert ana_entry["withdrawn"] == {"colour": "ana"} and ben_entry["withdrawn"] == {}
    assert history_rows([ana_entry])[0][4] == ("Colour: Grey, Type: Socks · Type undone by ana · Colour withdrawn by "
                                               "ana (theirs kept)")
    history = store.item_history("a")
    assert [(r["task"], r["annotator"], r["kind"], r["status"], r["label"]) for r in history] == [
        ("colour", "ana", "label", "corrected", "Grey"), ("type", "ana", "label", "corrected", "Socks"),
        ("colour", "ben", "label", "corrected", "Red"), ("type", "ana", "undo", "pending", None),
        ("colour", "ana", "undo", "kept theirs", None)]  # the undo's kept task is in the item's history
    assert history[-1]["version"] is None and history[-2]["reverts"] == ana.versions["type"]
    shown = item_history_rows(history[-2:])  # as the History tab reads them (QA, session 33: "Melange" alone
    assert [(row[3], row[7]) for row in shown] == [  # read as the undoer's label, "28" said nothing)
        ("none (restored)", f"undoes {ana.versions['type']}"), ("", "left as decided since; ana's label withdrawn")]
    # ana took her Grey back (QA, session 32: it still counted, and kept a disagreement open she had withdrawn)
    # no item with two labels: ben's Red, saved from ana's Grey shown, is a review of it (QA s42)
    assert (store.agreement()["colour"]["items"], store.agreement()["colour"]["reviews"]) == (0, 1)
    assert store.open_disagreements() == {}

    # ana's forced undo of her next save drops lou's label: lou's save says so, the undo names it
    pink = save(store, "b", "ana", {"colour": "Pink", "type": "Socks"})
    lou = save(store, "b", "lou", {"colour": "White"}, base_versions=pink.versions)
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    forced = store.undo("ana", force=True, save_id=caught.value.save_id)
    [lou_entry, pink_entry] = store.history(item_id="b")
    assert (pink_entry["undone"], pink_entry["undone_by"]) == ({"colour": "ana", "type": "ana"}, "ana")
    assert (lou_entry["dropped"], lou_entry["undone_by"]) == ({"colour": "ana"}, None)
    assert [row[4] for row in history_rows([lou_entry, pink_entry])] == [
        "Colour: White · dropped by ana's undo", "Colour: Pink, Type: Socks · undone by ana"]
    undo_rows = [r for r in store.item_history("b") if r["kind"] == "undo"]
    assert [(r["task"], r["reverts"], r["dropped"]) for r in undo_rows] == [
        ("colour", pink.versions["colour"], [{"label": "White", "status": "corrected", "by": "lou",
                                             "version": lou.versions["colour"]}]),
        ("type", pink.versions["type"], [])]
    assert item_history_rows(undo_rows)[0][7] == f"undoes {pink.versions['colour']}; dropped lou's White " \
                                                  f"({lou.versions['colour']})"
    assert forced.tasks["colour"] == ("Pink", None)
    assert store.agreement()["colour"]["items"] == 0  # ana's Pink is out too (lou's White: a review of it)


def test_a_forced_undo_names_every_decision_it_drops_not_only_the_one_standing(store):
    """QA, session 32: ana's forced undo took ben's label and rita's ruling on it; only rita's was named,
    and ben's save still read as standing."""
    from cma_clip.studio.views import history_rows, item_history_rows

    ana = save(store, "a", "ana", {"colour": "Red"})
    ben = save(store, "a", "ben", {"colour": "Green"}, base_versions=ana.versions)
    rita = save(store, "a", "rita", {"colour": "Black"}, base_versions=ben.versions, adjudicated=True)
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    assert [(c.theirs, c.annotator) for c in caught.value.conflicts] == [("Green", "ben"), ("Black", "rita")]
    forced = store.undo("ana", force=True, save_id=caught.value.save_id)
    assert [(c.theirs, c.annotator, c.version) for c in forced.dropped] == [
        ("Green", "ben", ben.versions["colour"]), ("Black", "rita", rita.versions["colour"])]
    assert store.item_state("a")["colour"].label is None  # back to before ana's save: pending
    latest = {entry["annotator"]: entry for entry in store.history(item_id="a")}
    assert latest["ben"]["dropped"] == latest["rita"]["dropped"] == {"colour": "ana"}
    assert history_rows([latest["ben"]])[0][4] == "Colour: Green · dropped by ana's undo"
    [undo_row] = [r for r in store.item_history("a") if r["kind"] == "undo"]
    assert item_history_rows([undo_row])[0][7] == (f"undoes {ana.versions['colour']}; dropped ben's Green "
                                                    f"({ben.versions['colour']}), rita's Black "
                                                    f"({rita.versions['colour']})")


def test_a_label_taken_back_or_dropped_never_comes_back(store):
    """QA, session 32: a ruling a forced undo dropped still settled (or reopened) the item; a label its
    annotator withdrew ("keep theirs") became the item's label again when the other labeler undid; a
    ruling already dropped could be undone, bringing back another dropped label."""
    # ana Red, ben Green, rita rules Black; ana's forced undo drops ben's and rita's
    ana = save(store, "a", "ana", {"colour": "Red"})
    ben = save(store, "a", "ben", {"colour": "Green"}, base_versions=ana.versions)
    save(store, "a", "rita", {"colour": "Black"}, base_versions=ben.versions, adjudicated=True)
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    store.undo("ana", force=True, save_id=caught.value.save_id)
    assert store.rulings("a") == {}  # the dropped ruling settles nothing
    pink = save(store, "a", "ana", {"colour": "Pink"})  # no ruling to go against: ana Pink, ben Green, open
    assert store.open_disagreements() == {"a": {"colour": {"ana": "Pink", "ben": "Green"}}}
    save(store, "a", "ana", {"colour": "Green"}, base_versions=pink.versions)  # ana comes round to ben
    assert store.open_disagreements() == {}
    with pytest.raises(LabelStoreError, match="nothing to undo: rita"):  # her ruling is gone already
        store.undo("rita")

    # ana Red, ben Green; ana withdraws hers, keeping ben's; ben undoes his: back to pending, not ana's Red
    ana = save(store, "b", "ana", {"colour": "Red"})
    ben = save(store, "b", "ben", {"colour": "Green"}, base_versions=ana.versions)
    store.undo("ana", keep_theirs=True)
    assert store.undo("ben").tasks == {"colour": ("Green", None)}
    assert store.item_state("b")["colour"].label is None and "b" not in store.current_labels()


def test_an_undo_meets_only_decisions_still_standing(store):
    """An enumerated check of the undo contract (QA, session 32): a plain undo of ana's skip removed ben's
    later skip over the same label without a word; an undo named as dropped a decision a forced undo had
    dropped, or its author withdrawn, before."""
    def state(item: str) -> dict:
        return {t: s.version for t, s in store.item_state(item).items()}

    save(store, "a", "ana", {"colour": "X"})
    store.skip("a", ["colour"], "ana", base_versions=state("a"))
    ben = store.skip("a", ["colour"], "ben", base_versions=state("a"))
    with pytest.raises(LabelConflict) as caught:
        store.undo("ana")
    assert [(c.annotator, c.status, c.version) for c in caught.value.conflicts] == [
        ("ben", "skipped", ben.versions["colour"])]

    save(store, "b", "cem", {"colour": "Z"}, adjudicated=True)
    save(store, "b", "ben", {"colour": "X"}, base_versions=state("b"))
    save(store, "b", "cem", {"colour": "Y"}, base_versions=state("b"), adjudicated=True)
    with pytest.raises(LabelConflict) as caught:
        store.undo("ben")
    assert [c.theirs for c in store.undo("ben", force=True, save_id=caught.value.save_id).dropped] == ["Y"]
    undone = store.undo("cem")  # his ruling Y is gone already: his Z is undone, nothing more dropped
    assert undone.tasks == {"colour": ("Z", None)} and undone.dropped == []

    save(store, "c", "ben", {"colour": "X"})
    save(store, "c", "cem", {"colour": "Y"}, base_versions=state("c"))
    save(store, "c", "ana", {"colour": "Z"}, base_versions=state("c"))
    with pytest.raises(LabelConflict) as caught:
        store.undo("cem")
    store.undo("cem", keep_theirs=True, save_id=caught.value.save_id)  # cem withdraws Y
    with pytest.raises(LabelConflict) as caught:
        store.undo("ben")
    assert [(c.theirs, c.annotator) for c in caught.value.conflicts] == [("Z", "ana")]  # not cem's withdrawn Y
    forced = store.undo("ben", force=True, save_id=caught.value.save_id)
    assert [(c.theirs, c.annotator) for c in forced.dropped] == [("Z", "ana")]


def test_a_label_withdrawn_under_someones_skip_is_not_the_label_any_more(store):
    """A skip keeps the label it was made over; ana withdrew hers ("keep theirs", cem had skipped since),
    and it stayed under the skip: exported and trained on (QA, session 32)."""
    def state(item: str) -> dict:
        return {t: s.version for t, s in store.item_state(item).items()}

    for item, before in (("a", None), ("b", "Y")):
        if before:
            save(store, item, "ben", {"colour": before})
        save(store, item, "ana", {"colour": "X"}, base_versions=state(item))
        store.skip(item, ["colour"], "cem", base_versions=state(item))
        with pytest.raises(LabelConflict) as caught:
            store.undo("ana")
        store.undo("ana", keep_theirs=True, save_id=caught.value.save_id)
    skipped = store.item_state("a")["colour"]
    assert (skipped.label, skipped.status, skipped.decided_by) == (None, "skipped", "cem")
    assert store.item_state("b")["colour"].label == "Y" and store.item_state("b")["colour"].annotator == "ben"
    assert {item: entry["labels"] for item, entry in store.current_labels().items()} == {"b": {"colour": "Y"}}


def test_an_undo_conflict_names_who_decided_last_a_skip_included(store):
    save(store, "a", "ana", {"colour": "Red"})
    skipped = store.skip("a", ["colour"], "ben", base_versions={"colour": store.item_state("a")["colour"].version})
    state = store.item_state("a")["colour"]
    assert (state.label, state.annotator, state.decided_by, state.status) == ("Red", "ana", "ben", "skipped")
    with pytest.raises(LabelConflict) as caught:  # ana's undo would drop ben's skip: ben is named, not ana
        store.undo("ana")
    assert [(c.annotator, c.status, c.version) for c in caught.value.conflicts] == [
        ("ben", "skipped", skipped.versions["colour"])]
    store.undo("ben")  # once ben's skip is undone, ana's label stands as she left it: her undo goes through
    assert store.undo("ana").tasks == {"colour": ("Red", None)}


def test_a_stale_skip_is_refused_and_attributed_right_when_forced(store):
    seen = {"colour": None, "type": None}  # ana opened the pending item
    ben = save(store, "a", "ben", {"colour": "Red"})
    with pytest.raises(LabelConflict) as caught:
        store.skip("a", ["colour", "type"], "ana", base_versions=seen)
    assert [(c.task, c.theirs, c.annotator, c.status, c.version) for c in caught.value.conflicts] == [
        ("colour", "Red", "ben", "corrected", ben.versions["colour"])]
    assert store.item_state("a")["colour"].status == "corrected" and "type" not in store.item_state("a")

    store.skip("a", ["colour", "type"], "ana", base_versions=seen, force=True)  # knowingly
    state = store.item_state("a")
    assert (state["colour"].label, state["colour"].annotator, state["colour"].decided_by) == ("Red", "ben", "ana")
    assert state["type"].status == "skipped"
    # a save over it names the skip's maker, and tasks keep the order they were given in
    with pytest.raises(LabelConflict) as caught:
        save(store, "a", "fin", {"colour": "Blue"}, base_versions={"colour": ben.versions["colour"]})
    assert [(c.annotator, c.status) for c in caught.value.conflicts] == [("ana", "skipped")]
    save(store, "z", "ben", {"type": "Socks", "colour": "Red"})
    with pytest.raises(LabelConflict) as caught:
        store.skip("z", ["type", "colour"], "ana", base_versions={})
    assert [c.task for c in caught.value.conflicts] == ["type", "colour"]
    # her own decision since is no conflict, nor is a task someone's undo left pending
    save(store, "b", "ana", {"colour": "Blue"})
    store.skip("b", ["colour"], "ana", base_versions={"colour": None})
    save(store, "c", "ben", {"colour": "Blue"})
    store.undo("ben")
    store.skip("c", ["colour"], "ana", base_versions={"colour": None})
    assert store.item_state("c")["colour"].status == "skipped"


# ---------------------------------------------------------------------------- labels from the schema
def test_a_typo_is_caught_with_a_suggestion_and_a_new_class_needs_confirmation(store):
    vocabulary = {"colour": ["Navy Blue", "Black", "Off White"]}
    for typo, suggestion, same_as in (("Navy Bleu", "Navy Blue", None), ("navy  blue", "Navy Blue", "Navy Blue"),
                                      ("off-white", "Off White", "Off White")):
        with pytest.raises(UnknownLabel) as caught:
            save(store, "a", "ana", {"colour": typo, "type": "anything"}, vocabulary=vocabulary)
        # the label as it would be stored (`tidy_label`: one space between words)
        assert caught.value.unknown == [UnknownClass("colour", " ".join(typo.split()), [suggestion], same_as)]
        assert (f"is the class '{same_as}' written otherwise" if same_as else f"did you mean '{suggestion}'") \
            in str(caught.value)
    with pytest.raises(UnknownLabel) as caught:
        save(store, "a", "ana", {"colour": "Turquoise glitter"}, vocabulary=vocabulary,
             new_classes={"colour": "Turquoise"})  # confirmed another value
    assert caught.value.unknown == [UnknownClass("colour", "Turquoise glitter", [])]
    assert store.count() == 0

    save(store, "a", "ana", {"colour": "Turquoise glitter"}, vocabulary=vocabulary,
         new_classes={"colour": "Turquoise glitter"})
    save(store, "b", "ana", {"colour": "Turquoise glitter"}, vocabulary=vocabulary)  # now a known class
    with pytest.raises(UnknownLabel, match="did you mean 'Turquoise glitter'"):
        save(store, "c", "ana", {"colour": "Turquoise gliter"}, vocabulary=vocabulary)
    assert store.count() == 2


def test_a_class_written_otherwise_is_never_confirmed_as_a_class_of_its_own(store):
    """QA, session 36: "black" confirmed as a new class was stored beside "Black" (the export then held
    both: two classes for training). A spelling that differs from a class (or a confirmed new class) only
    in case, spaces, '-' or '_' is refused even when confirmed, and names the class it spells."""
    vocabulary = {"colour": ["Navy Blue", "Black"]}
    for variant, same_as in (("black", "Black"), ("BLACK", "Black"), ("navy_blue", "Navy Blue")):
        with pytest.raises(UnknownLabel) as caught:
            save(store, "a", "ana", {"colour": variant}, vocabulary=vocabulary, new_classes={"colour": variant})
        assert caught.value.unknown == [UnknownClass("colour", variant, [same_as], same_as)]
    save(store, "a", "ana", {"colour": "Turquoise glitter"}, vocabulary=vocabulary,
         new_classes={"colour": "Turquoise glitter"})
    with pytest.raises(UnknownLabel) as caught:  # a confirmed new class is a class: its spellings too
        save(store, "b", "ana", {"colour": "turquoise Glitter"}, vocabulary=vocabulary,
             new_classes={"colour": "turquoise Glitter"})
    assert caught.value.unknown[0].same_as == "Turquoise glitter"
    assert store.count() == 1 and store.current_labels()["a"]["labels"] == {"colour": "Turquoise glitter"}
    message = views.unknown_message(caught.value.unknown, {"colour": "Colour"})
    assert "`turquoise Glitter` is the class `Turquoise glitter` written otherwise" in message
    assert "Save as new class" not in message and "**Use the suggestion** to correct it." in message


def test_a_label_is_stored_composed_and_without_invisible_characters(store):
    """QA, session 37: "Black" with a zero-width space after it was confirmed as a new class that looked
    like "Black" (a second class for training); a decomposed "été" (as some keyboards type it) was stored
    so, and the composed one then refused as "written otherwise" beside a name that looked the same;
    "Indigo" was a new class beside a confirmed "İndigo"."""
    vocabulary = {"colour": ["Black", "Crème"]}
    for item, typed in (("a", "Black\u200b"), ("b", "\u200dBlack\u2060"), ("c", "Cre\u0300me"),
                        ("d", "Cr\u00e8me\u200d"), ("e", "Cr\u00ade\u0300me")):
        save(store, item, "ana", {"colour": typed}, vocabulary=vocabulary)  # no new class asked for
    assert labels_of(store) == {"a": {"colour": "Black"}, "b": {"colour": "Black"}, "c": {"colour": "Crème"},
                                "d": {"colour": "Crème"}, "e": {"colour": "Crème"}}
    save(store, "f", "ana", {"colour": "Vert e\u0301te\u0301"}, vocabulary=vocabulary,
         new_classes={"colour": "Vert e\u0301te\u0301"})
    save(store, "g", "ben", {"colour": "Vert \u00e9t\u00e9"}, vocabulary=vocabulary)  # the same class, composed
    assert labels_of(store)["f"] == labels_of(store)["g"] == {"colour": "Vert \u00e9t\u00e9"}
    save(store, "h", "ana", {"colour": "\u0130ndigo"}, vocabulary=vocabulary, new_classes={"colour": "\u0130ndigo"})
    with pytest.raises(UnknownLabel) as caught:  # a case of the dotted capital I, as "black" is of "Black"
        save(store, "i", "ana", {"colour": "Indigo"}, vocabulary=vocabulary, new_classes={"colour": "Indigo"})
    assert caught.value.unknown[0].same_as == "\u0130ndigo"
    assert store.new_classes(vocabulary) == {"colour": ["Vert \u00e9t\u00e9", "\u0130ndigo"]}
    # a model's class stays as its catalogue spells it, whatever its form: tidied, it would be a class "written
    # otherwise" and refused, or train as a class of its own
    odd = {"colour": ["Cre\u0300me", "Dark  Blue"]}
    save(store, "j", "ana", {"colour": "Cre\u0300me"}, vocabulary=odd)
    save(store, "k", "ana", {"colour": "Dark  Blue"}, vocabulary=odd)
    assert labels_of(store)["j"] == {"colour": "Cre\u0300me"} and labels_of(store)["k"] == {"colour": "Dark  Blue"}
    save(store, "l", "ana", {"colour": "Dark Blue"}, vocabulary=odd)  # typed as people do: the class, as spelled
    assert labels_of(store)["l"] == {"colour": "Dark  Blue"}
    store.save_correction(image=tiny_png(1), text="t", labels={"colour": "Dark Blue\u200b"}, item_id="m", classes=odd)
    store.save_correction(image=tiny_png(1), text="t", labels={"colour": "Cr\u00e8me"}, item_id="n")  # no classes given
    assert labels_of(store)["m"] == {"colour": "Dark  Blue"} and labels_of(store)["n"] == {"colour": "Cr\u00e8me"}


def test_a_label_held_as_spelled_before_labels_were_tidied_is_picked_again_as_it_is(store):
    """Review, session 37: a new class stored decomposed ("Vert e\u0301te\u0301") before labels were tidied, picked
    again from its control, was refused as written otherwise of itself, with no way out; a missing-label word with
    an invisible character ("NA" and a zero-width space) was stored as the label "NA"."""
    vocabulary, old = {"colour": ["Black"]}, "Vert e\u0301te\u0301"
    save(store, "a", "bot", {"colour": old}, source="auto", predictions={"colour": {"label": old, "confidence": 1}})
    save(store, "b", "ana", {"colour": old}, vocabulary=vocabulary)  # picked from the control: its held spelling
    save(store, "c", "ben", {"colour": "Vert \u00e9t\u00e9"}, vocabulary=vocabulary)  # typed composed: the same
    assert labels_of(store)["b"] == labels_of(store)["c"] == {"colour": old}
    with pytest.raises(LabelStoreError, match="no labels"):
        save(store, "d", "ana", {"colour": "NA\u200b"}, vocabulary=vocabulary, new_classes={"colour": "NA\u200b"})


def test_a_new_class_one_side_of_an_open_disagreement_stays_a_class_for_the_ruling(store):
    """QA, session 36: ana's confirmed "Turquoise glitter", replaced on its item by ben's "White", was no class
    any more while their disagreement stood, so rita's ruling for it asked her "is it a new class?"."""
    vocabulary = {"colour": ["White", "Black"]}
    save(store, "a", "ana", {"colour": "Turquoise glitter"}, vocabulary=vocabulary,
         new_classes={"colour": "Turquoise glitter"})
    ben = save(store, "a", "ben", {"colour": "White"}, vocabulary=vocabulary)
    assert store.open_disagreements(["colour"]) == {"a": {"colour": {"ana": "Turquoise glitter", "ben": "White"}}}
    save(store, "b", "cy", {"colour": "Turquoise glitter"}, vocabulary=vocabulary)  # a class while it stands there
    save(store, "b", "cy", {"colour": "Black"}, vocabulary=vocabulary)
    save(store, "a", "rita", {"colour": "Turquoise glitter"}, vocabulary=vocabulary, base_versions=ben.versions,
         adjudicated=True)
    assert store.item_state("a")["colour"].label == "Turquoise glitter" and not store.open_disagreements(["colour"])
    save(store, "a", "rita", {"colour": "White"}, vocabulary=vocabulary, adjudicated=True)  # she thinks again
    with pytest.raises(UnknownLabel):  # settled otherwise, held by no item: no class any more
        save(store, "c", "cy", {"colour": "Turquoise glitter"}, vocabulary=vocabulary)


def test_a_new_class_that_was_undone_or_replaced_is_no_class_any_more(store):
    vocabulary = {"colour": ["Navy Blue", "Black"]}
    save(store, "a", "ana", {"colour": "Nawy Blue"}, vocabulary=vocabulary, new_classes={"colour": "Nawy Blue"})
    assert store.new_classes(vocabulary) == {"colour": ["Nawy Blue"]}  # the choices beside the model's classes
    store.undo("ana")  # the typo confirmed by mistake, undone
    assert store.new_classes(vocabulary) == {"colour": []}
    with pytest.raises(UnknownLabel, match="did you mean 'Navy Blue'"):
        save(store, "b", "ana", {"colour": "Nawy Blue"}, vocabulary=vocabulary)
    save(store, "a", "ana", {"colour": "Navy Bluee"}, vocabulary=vocabulary, new_classes={"colour": "Navy Bluee"})
    assert store.new_classes(vocabulary) == {"colour": ["Navy Bluee"]}
    save(store, "a", "ana", {"colour": "Navy Blue"}, vocabulary=vocabulary)  # corrected by a later save
    assert store.new_classes(vocabulary) == {"colour": []}
    with pytest.raises(UnknownLabel):
        save(store, "b", "ana", {"colour": "Navy Bluee"}, vocabulary=vocabulary)
    store.skip("a", ["colour"], "ana")  # a skip keeps the label: still a class
    save(store, "c", "ana", {"colour": "Navy Blue"}, vocabulary={"colour": ["Black"]})


def test_close_classes():
    classes = ["Navy Blue", "Blue", "Black", "Gray", "Green", "Off White", "S", "M"]
    assert close_classes("Bleu", classes) == ["Blue"]  # a swap of neighbours is one edit
    assert close_classes("Grey", classes) == ["Gray"]  # Green is 2 edits away: too far for 4 letters
    assert close_classes("NAVYBLUE", classes) == ["Navy Blue"]
    assert close_classes("Navy Bluue", classes) == ["Navy Blue"]
    assert close_classes("Navy Blu Green", classes) == []
    assert close_classes("XS", classes) == []  # short names are all a couple of edits apart
    assert close_classes("s", classes) == ["S"]
    assert close_classes("Blue", classes) == []  # itself is no suggestion
    assert close_classes("Blak", ["Black", "Blake", "Blue"]) == ["Black", "Blake"]
    assert close_classes("ＮＡＶＹ　ＢＬＵＥ", classes) == ["Navy Blue"]  # full-width, as a CJK keyboard types it
    # the start of a class, saved before the dropdown completed it (QA, session 32: "Wint" had no suggestion)
    assert close_classes("Wint", ["Winter", "Summer", "Spring"]) == ["Winter"]
    assert close_classes("navy", classes) == ["Navy Blue"]
    assert close_classes("blue", classes) == ["Blue"]  # that class, spelled otherwise: no more
    assert close_classes("Bl", classes) == []  # under 3 characters: too many classes begin so
    assert close_classes("whi", classes) == ["Off White"]  # the start of a later word
    assert close_classes("Gre", ["Grey", "Grey Melange", "Green", "Dark Green"]) == ["Grey", "Green", "Dark Green",
                                                                                     "Grey Melange"]
    assert close_classes("Gray", ["Grey", "Grey Melange", "Light Grey"]) == ["Grey"]
    assert close_classes("Size", [f"Size {n}" for n in range(20, 0, -1)]) == [f"Size {n}" for n in range(1, 6)]


# ---------------------------------------------------------------------------- state and queue
def test_item_states_and_decided_items_feed_the_queue(store):
    a = save(store, "a", "ana", {"colour": "Black", "type": "Socks"}, catalogue_labels={"colour": "Black"})
    store.skip("b", ["colour"], "ana")
    save(store, "c", "ana", {"colour": "Black"})
    save(store, "d", "ben", {"colour": "Red"})
    store.undo("ben")
    state = store.item_state("a")
    assert state["colour"] == TaskState("Black", "accepted", a.versions["colour"], "ana", "human", "ck-1",
                                        state["colour"].created_at, "ana")
    assert state["type"].status == "corrected" and store.item_state("nowhere") == {}
    assert store.decided_items(["colour", "type"]) == {"a"}
    assert store.decided_items(["colour"]) == {"a", "b", "c"}
    assert store.decided_items() == {"a", "b", "c"}  # d was undone: pending again
    assert store.item_state("d")["colour"].status == "pending"


def test_a_review_queue_survives_a_restart(store):
    payload = {"items": [{"item_id": "a", "image": "a.jpg", "text": "tee", "predictions": PREDICTED}], "filter": None}
    store.save_queue("q1", "ana", "hm", payload, 0)
    store.save_queue("q1", "ana", "hm", payload, 3)  # she moved on
    store.save_queue("q2", "ana", "fashion", {"items": []}, 1)
    store.save_queue("q3", "ben", "hm", {"items": []}, 0)

    restarted = LabelStore(store.path)
    q1 = restarted.load_queue("q1")
    assert (q1.annotator, q1.model, q1.payload, q1.position) == ("ana", "hm", payload, 3)
    assert restarted.latest_queue("ana").queue_id == "q2"
    assert restarted.latest_queue("ana", "hm").queue_id == "q1"
    assert restarted.latest_queue("cem") is None and restarted.load_queue("nope") is None
    for bad in (-1, 1.5, "2"):
        with pytest.raises(LabelStoreError, match="position"):
            restarted.save_queue("q1", "ana", "hm", payload, bad)
    with pytest.raises(LabelStoreError, match="JSON"):
        restarted.save_queue("q1", "ana", "hm", {"items": {1, 2}}, 0)
    assert restarted.load_queue("q1").position == 3


def test_a_move_writes_the_queue_view_not_its_items(store):
    payload = {"items": [{"item_id": "a"}, {"item_id": "b"}]}
    store.save_queue("q1", "ana", "hm", payload, 0, view={"order": [0, 1]})
    with sqlite3.connect(store.path) as conn:
        written = conn.execute("SELECT payload, rowid FROM queues").fetchone()
    assert store.move_queue("q1", "ben", 1, {"order": [1, 0]})
    assert store.move_queue("q1", "ben", 0)  # the view stays when none is given
    kept = LabelStore(store.path).load_queue("q1")
    assert (kept.annotator, kept.position, kept.view, kept.payload) == ("ben", 0, {"order": [1, 0]}, payload)
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT payload, rowid FROM queues").fetchone() == written  # the same row, untouched
    assert not store.move_queue("nope", "ana", 0) and store.load_queue("nope") is None
    with pytest.raises(LabelStoreError, match="position"):
        store.move_queue("q1", "ana", -1)
    with pytest.raises(LabelStoreError, match="view must be a dict"):
        store.move_queue("q1", "ana", 0, [1, 0])


def test_a_v2_store_keeps_its_queues(tmp_path):
    """A v2 store (queues without a view column) migrates; its queues come back with no view."""
    path = tmp_path / "labels.db"
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        for migrate in MIGRATIONS[:2]:
            migrate(conn)
        conn.execute("PRAGMA user_version = 2")
        conn.execute("INSERT INTO queues VALUES (?, ?, ?, ?, ?, ?)",
                     ("q1", "ana", "hm", json.dumps({"version": 1, "items": [], "strategy": "margin"}), 2, "2026"))
    store = LabelStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    kept = store.load_queue("q1")
    assert (kept.payload["strategy"], kept.position, kept.view) == ("margin", 2, None)
    assert store.move_queue("q1", "ana", 0, {"order": []}) and store.load_queue("q1").view == {"order": []}


# ---------------------------------------------------------------------------- agreement and audit
def test_agreement_and_kappa_on_a_hand_checked_case(store, tmp_path):
    # colour: ana R R B B, ben R B B B -> raw 3/4; p_e = .5 * .25 + .5 * .75 = .5; kappa = (.75 - .5) / .5 = .5
    for item, ana, ben in (("1", "R", "R"), ("2", "R", "B"), ("3", "B", "B"), ("4", "B", "B")):
        save(store, item, "ana", {"colour": "B" if item == "1" else ana})  # ana's first try on item 1...
        save(store, item, "ben", {"colour": ben})
        if item == "1":
            save(store, item, "ana", {"colour": ana})  # ...is replaced by her latest label
    save(store, "5", "ana", {"colour": "R"})  # one annotator only: not compared
    save(store, "5", "cem", {"colour": "B"})
    store.undo("cem")  # an undone label does not count
    assert store.save_many(bulk_records(["7"]), "auto", annotator="dan").stored == 1  # an auto-accept does not count
    save(store, "7", "ana", {"colour": "Black"})  # (a bulk accept after her label would leave it: decided)
    # type: three annotators on one item -> 1 agreeing pair of 3; kappa needs two items
    for annotator, label in (("ana", "X"), ("ben", "X"), ("cem", "Y")):
        save(store, "6", annotator, {"type": label})

    agreement = store.agreement()
    assert agreement["colour"] == {"items": 4, "raw": 0.75, "kappa": pytest.approx(0.5), "annotators": ["ana", "ben"],
                                   "pairs": 1, "kappa_pairs": 1, "reviews": 0, "open_disagreements": 1}  # item 2
    assert agreement["type"] == {"items": 1, "raw": pytest.approx(1 / 3), "kappa": None,
                                 "annotators": ["ana", "ben", "cem"], "pairs": 3, "kappa_pairs": 0, "reviews": 0,
                                 "open_disagreements": 1}
    assert store.agreement(["type", "pattern"])["pattern"]["items"] == 0
    store.export(tmp_path / "labels_export.csv")
    assert json.loads((tmp_path / "labels_export.agreement.json").read_text()) == json.loads(json.dumps(agreement))


def test_a_disagreement_stays_open_until_an_adjudication_settles_it(store, tmp_path):
    """Items whose annotators' latest labels differ, until a reviewer's save (`adjudicated`) settles
    them; an undo of that save or a later label that differs opens them again; the reviewer is no voter."""
    save(store, "1", "ana", {"colour": "Red", "type": "Tights"})
    save(store, "1", "ben", {"colour": "Blue", "type": "Tights"})  # colour disputed, type agreed
    save(store, "2", "ana", {"colour": "Red"})
    save(store, "2", "ben", {"colour": "Red"})  # agreed
    save(store, "3", "ana", {"colour": "Red"})
    save(store, "3", "cem", {"colour": "Blue"})
    store.undo("cem")  # an undone label is no disagreement
    assert store.save_many(bulk_records(["4"]), "auto", annotator="dan").stored == 1  # dan auto-accepts Black
    save(store, "4", "ana", {"colour": "Red"})  # an auto-accept is no vote: no disagreement
    [found] = store.disagreements()
    assert (found.item_id, found.labels, found.text) == ("1", {"colour": {"ana": "Red", "ben": "Blue"}}, "text of 1")
    assert found.image_path.is_file() and found.since == store.item_state("1")["colour"].created_at
    assert store.open_disagreements() == {"1": {"colour": {"ana": "Red", "ben": "Blue"}}}
    assert store.disagreements(["type"]) == [] and set(store.open_disagreements(["colour"])) == {"1"}
    before = store.agreement()

    settled = save(store, "1", "eve", {"colour": "Red"}, adjudicated=True)
    store.export(tmp_path / "labels.csv")
    exported = {row["id"]: row for row in read_manifest(tmp_path / "labels.csv")}
    assert (exported["1"]["colour__source"], exported["2"]["colour__source"]) == ("adjudication", "human")
    assert store.disagreements() == [] and store.item_state("1")["colour"].label == "Red"
    after = store.agreement()  # the reviewer's label is no vote; the disagreement is settled
    assert after == {**before, "colour": {**before["colour"], "open_disagreements": 0}}
    assert before["colour"]["open_disagreements"] == 1
    row = next(r for r in store.item_history("1") if r["version"] == settled.versions["colour"])
    assert row["adjudicated"] and not store.item_history("2")[0]["adjudicated"]
    store.undo("eve")
    assert set(store.open_disagreements()) == {"1"}  # the settlement undone: open again
    save(store, "1", "eve", {"colour": "Red"}, adjudicated=True)
    save(store, "1", "dan", {"colour": "Red"})  # a later label that agrees with the ruling: still settled
    assert store.open_disagreements() == {}
    save(store, "1", "ben", {"colour": "Blue"})  # ben says Blue again, after it was settled
    assert store.open_disagreements() == {"1": {"colour": {"ana": "Red", "ben": "Blue", "dan": "Red",
                                                           "eve's ruling": "Red"}}}  # what it goes against
    save(store, "1", "ben", {"colour": "Red"})  # and then comes round
    assert store.open_disagreements() == {}
    save(store, "5", "ana", {"colour": "Red"})
    save(store, "5", "ben", {"colour": "Blue"})
    save(store, "5", "eve", {"colour": "Red"}, adjudicated=True)
    save(store, "5", "ana", {"colour": "Blue"})  # ana comes round to ben: they agree, against the ruling
    assert store.open_disagreements() == {"5": {"colour": {"ana": "Blue", "ben": "Blue", "eve's ruling": "Red"}}}
    assert store.agreement()["colour"]["open_disagreements"] == 1


def test_a_label_saved_over_anothers_it_was_shown_is_a_review_not_a_second_opinion(store):
    """QA s42: a second labeler on the Predict tab starts at the first one's label, so "Save" unchanged counted
    as agreement, and kappa rose with every review. A label saved from another's version (it was shown) is a
    review, counted apart; a blind save (a second pass hiding the others' labels) and a save that was shown
    no label (both labelers at once) are second opinions."""
    first = save(store, "1", "ana", {"colour": "R"}).versions["colour"]
    save(store, "1", "ben", {"colour": "R"}, base_versions={"colour": first})  # kept it, seeing it
    assert store.agreement() == store.agreement(["colour"])  # listed, with its review (reviewer s42)
    assert store.agreement(["colour"])["colour"] == {
        "items": 0, "raw": None, "kappa": None, "annotators": [], "pairs": 0, "kappa_pairs": 0, "reviews": 1,
        "open_disagreements": 0}
    standing = store.item_state("1")["colour"].version  # ben's
    save(store, "1", "cem", {"colour": "B"}, base_versions={"colour": standing}, blind=True)  # hidden from cem
    both = store.agreement()["colour"]
    assert (both["items"], both["raw"], both["annotators"], both["reviews"]) == (1, 0.0, ["ana", "cem"], 1)
    assert store.open_disagreements()["1"]["colour"] == {"ana": "R", "ben": "R", "cem": "B"}  # a review disputes too
    save(store, "2", "ana", {"colour": "B"}, base_versions={"colour": None})
    save(store, "2", "ben", {"colour": "B"}, base_versions={"colour": None})  # shown none: ana's came meanwhile
    assert store.agreement()["colour"]["items"] == 2
    own = store.item_state("2")["colour"].version  # a labeler's own label shown is no one else's
    save(store, "2", "ben", {"colour": "R"}, base_versions={"colour": own})
    assert store.agreement()["colour"]["items"] == 2 and store.agreement()["colour"]["reviews"] == 1


def test_who_reviewed_whom_follows_the_label_a_version_showed_not_who_wrote_its_row(store):
    """Reviewer s42: the version a save started from may be a skip's (the label under it is its author's), or an
    undo's (the label it brought back is its author's, not the undoer's); a review stays one when its labeler edits
    it; a blind save is blind only as its labeler's first decision there."""
    def standing(item: str) -> dict:
        return {"colour": store.item_state(item)["colour"].version}

    def reviews() -> int:
        return store.agreement(["colour"])["colour"]["reviews"]

    save(store, "s", "ana", {"colour": "X"})
    store.skip("s", ["colour"], "ben")
    save(store, "s", "cem", {"colour": "Y"}, base_versions=standing("s"))  # cem saw ana's X under ben's skip
    assert reviews() == 1 and store.agreement()["colour"]["items"] == 0
    save(store, "u", "ana", {"colour": "X"})
    save(store, "u", "ben", {"colour": "Y"}, base_versions=standing("u"))  # a review of ana's X
    store.undo("ben")  # ana's X back, in ben's undo row
    save(store, "u", "ana", {"colour": "W"}, base_versions=standing("u"))  # ana saw her own X: an opinion
    save(store, "u", "ben", {"colour": "Z"}, base_versions=standing("u"))  # still a review
    assert reviews() == 2 and store.agreement()["colour"]["annotators"] == []  # ben's Z a review: no pair
    assert store.open_disagreements()["u"]["colour"] == {"ana": "W", "ben": "Z"}  # yet a disagreement
    save(store, "e", "ana", {"colour": "P"})
    save(store, "e", "ben", {"colour": "P"}, base_versions=standing("e"))
    save(store, "e", "ben", {"colour": "R"}, base_versions=standing("e"))  # edits his review: still a review
    assert reviews() == 3
    save(store, "b", "ana", {"colour": "P"})
    save(store, "b", "dee", {"colour": "Q"}, base_versions=standing("b"), blind=True)  # blind: an opinion
    assert reviews() == 3 and store.agreement()["colour"]["items"] == 1
    store.undo("dee")  # the message named ana's P; dee saves again in the second pass, no longer blind
    save(store, "b", "dee", {"colour": "P"}, base_versions=standing("b"), blind=True)
    assert reviews() == 4 and store.agreement()["colour"]["items"] == 0
    # QA s42: ana labelled first, ben blind after her, ana blind again over ben's, never told it: her own opinion
    save(store, "f", "ana", {"colour": "P"})
    save(store, "f", "ben", {"colour": "Q"}, base_versions=standing("f"), blind=True)
    save(store, "f", "ana", {"colour": "R"}, base_versions=standing("f"), blind=True)
    assert reviews() == 4 and store.agreement()["colour"]["items"] == 1
    assert store.agreement()["colour"]["raw"] == 0.0  # ana's R against ben's Q


def test_a_lone_label_against_a_ruling_is_counted_where_nobody_else_labelled_the_task(store):
    """An item a reviewer ruled on and one annotator labelled against it since is an open disagreement;
    the agreement counts it for its task even when no item of that task has two annotators."""
    save(store, "1", "eve", {"type": "Tights"}, adjudicated=True)  # a ruling, nobody's label before it
    save(store, "1", "ana", {"type": "Socks"})  # ana alone goes against it
    assert store.open_disagreements() == {"1": {"type": {"ana": "Socks", "eve's ruling": "Tights"}}}
    assert store.agreement()["type"] == {"items": 0, "raw": None, "kappa": None, "annotators": [],
                                         "pairs": 0, "kappa_pairs": 0, "reviews": 0, "open_disagreements": 1}


def test_a_v4_store_gains_adjudications(tmp_path):
    path = tmp_path / "labels.db"
    with sqlite3.connect(path) as conn:
        for migrate in MIGRATIONS[:4]:
            migrate(conn)
        conn.execute("PRAGMA user_version = 4")
    store = LabelStore(path)
    save(store, "1", "ana", {"colour": "Red"})
    save(store, "1", "ben", {"colour": "Blue"})
    assert set(store.open_disagreements()) == {"1"}
    save(store, "1", "eve", {"colour": "Blue"}, adjudicated=True)
    assert store.open_disagreements() == {}


def test_the_audit_filters_searches_and_compares_with_the_model_and_the_catalogue(store):
    save(store, "tee-1", "ana", {"colour": "Black", "type": "Socks"}, catalogue_labels={"colour": "Grey"})
    save(store, "tee-2", "ben", {"colour": "White"}, predictions={})
    store.save_many(bulk_records(["dress-3"]), "b1", annotator="cem", checkpoint="ck-2")
    store.skip("dress-4", ["colour"], "ana")
    rows, total = store.audit()
    assert total == 5 and [r["item_id"] for r in rows] == ["dress-4", "dress-3", "tee-2", "tee-1", "tee-1"]
    socks, black = rows[3], rows[4]  # one save's decisions, in the order of its labels
    assert (black["status"], black["changed_vs_model"], black["changed_vs_catalogue"]) == ("accepted", False, True)
    assert (black["predicted_label"], black["predicted_confidence"], black["catalogue_label"]) \
        == ("Black", 0.61, "Grey")
    assert (socks["status"], socks["changed_vs_model"], socks["changed_vs_catalogue"]) == ("corrected", True, None)
    white = rows[2]
    assert (white["status"], white["changed_vs_model"], white["predicted_label"]) == ("corrected", None, None)
    assert rows[0]["status"] == "skipped" and rows[0]["label"] is None and rows[1]["source"] == "auto"

    def items(**filters) -> list[str]:
        return [r["item_id"] for r in store.audit(**filters)[0]]

    assert items(annotator="ana") == ["dress-4", "tee-1", "tee-1"]
    assert items(task="type") == ["tee-1"] and items(status="corrected") == ["tee-2", "tee-1"]
    assert items(source="auto") == ["dress-3"] and items(source="human", task="colour", annotator="ben") == ["tee-2"]
    assert items(search="TEE") == ["tee-2", "tee-1", "tee-1"] and items(search="socks") == ["tee-1"]
    assert items(search="text of dress") == ["dress-3"]  # the item's text (a skip has none)
    assert items(search="CEM") == ["dress-3"] and items(search="nothing like it") == []
    page, total = store.audit(limit=2, offset=2)
    assert [r["item_id"] for r in page] == ["tee-2", "tee-1"] and total == 5
    with pytest.raises(LabelStoreError, match="status must be one of"):
        store.audit(status="done")


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_carries_provenance_and_neutralises_formulas_in_csv(tmp_path, suffix):
    store = LabelStore(tmp_path / "labels.db")
    formula = '=HYPERLINK("http://evil.example","x")'
    save(store, "a", "@mallory", {"colour": "-Minus", "type": "Tights"}, predictions={"type": "Tights"})
    store.save(image=tiny_png(2), text=formula, item_id="+b", labels={"colour": "Red"}, annotator="ana")
    store.save_many(bulk_records(["c"]), "batch", annotator="ana", checkpoint="ck-2")
    store.save(image=tiny_png(3), text="'90s tee", item_id="'=d", labels={"colour": "''+Plus"}, annotator="ana")
    path = tmp_path / f"export{suffix}"
    assert store.export(path) == 4
    rows = {r["id"]: r for r in read_manifest(path)}  # read back as stored: ids match the catalogue's
    a, b, c, d = rows["a"], rows["+b"], rows["c"], rows["'=d"]
    assert (a["colour"], a["annotator"], b["text"]) == ("-Minus", "@mallory", formula)
    assert (d["colour"], d["text"]) == ("''+Plus", "'90s tee")  # quotes already there survive the round trip
    assert (a["colour__source"], a["colour__annotator"], a["colour__checkpoint"]) == ("human", "@mallory", "ck-1")
    assert a["colour__at"] == store.item_state("a")["colour"].created_at and a["type"] == "Tights"
    assert (c["colour__source"], c["colour__annotator"], c["colour__checkpoint"], c["type__source"]) \
        == ("auto", "ana", "ck-2", "")
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
        assert {"'-Minus", "'@mallory", "'" + formula, "'" + "''+Plus", "'90s tee"} <= set(cells)
    # the store itself, read by `train --extra-labels`, never has the quote
    assert labels_of(store)["a"]["colour"] == "-Minus" and store.current_labels()["+b"]["text"] == formula


def test_the_trainer_reads_an_export_with_provenance(tmp_path, cache_dir):
    store = LabelStore(tmp_path / "labels.db")
    for n, photo in enumerate(PHOTOS[:2] * 5):  # ten items, two looks
        store.save(image=photo, text=f"item {n}", item_id=f"item-{n}", annotator="ana",
                   labels={"colour": ("Black", "White")[n % 2]})
    path = tmp_path / "export.csv"
    store.export(path)
    args = ["--manifest", str(path), "--tasks", "colour", "--id-column", "id", "--out", str(tmp_path / "run")]
    catalogue = Catalogue.open(train.parse_config(args).catalogue_config())
    assert catalogue.item_ids() == [f"item-{n}" for n in range(10)]
    assert all(p.is_file() for p in catalogue.image_paths())
    assert train.main([*args, "--epochs", "1", "--align-epochs", "1", "--batch-size", "8", "--width", "32",
                       "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert (tmp_path / "run" / "config.json").is_file()


# ---------------------------------------------------------------------------- v1 -> v2
V1_SQL = (  # schema version 1 as the store wrote it, verbatim
    "CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, path TEXT, bytes INTEGER, created_at TEXT)",
    "CREATE TABLE IF NOT EXISTS corrections (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,"
    " image_sha256 TEXT, text TEXT, predictions TEXT, labels TEXT NOT NULL, annotator TEXT, checkpoint TEXT,"
    " created_at TEXT NOT NULL, request_id TEXT UNIQUE)",
    "CREATE INDEX IF NOT EXISTS corrections_item_id ON corrections (item_id)",
    "PRAGMA user_version = 1",
)
V1_INSERT = ("INSERT INTO corrections (item_id, image_sha256, text, predictions, labels, annotator, checkpoint,"
             " created_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
V1_CURRENT = ("SELECT c.*, i.path AS image_file FROM corrections c JOIN images i ON i.sha256 = c.image_sha256"
              " WHERE c.id IN (SELECT MAX(id) FROM corrections GROUP BY item_id) ORDER BY c.id")


def test_a_v1_store_migrates_keeping_every_row_and_its_current_labels(tmp_path):
    path = tmp_path / "labels.db"
    (tmp_path / "labels_images" / "ab").mkdir(parents=True)
    (tmp_path / "labels_images" / "ab" / f"{'ab' * 32}.png").write_bytes(tiny_png(1))
    v1_rows = [("a", {"colour": "Black", "type": "Tights"}, {"colour": {"label": "Grey", "confidence": 0.4}}, "alice"),
               ("b", {"colour": "Red"}, {"colour": {"label": "Red", "confidence": 0.9}}, "bob"),
               ("a", {"colour": "White"}, {}, "bob")]  # in v1 this save dropped a's type label
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in V1_SQL:
            conn.execute(statement)
        conn.execute("INSERT INTO images VALUES (?, ?, ?, ?)", ("ab" * 32, f"ab/{'ab' * 32}.png", 70, "2024"))
        for n, (item, labels, predictions, annotator) in enumerate(v1_rows):
            conn.execute(V1_INSERT, (item, "ab" * 32, f"text {item}", json.dumps(predictions), json.dumps(labels),
                                     annotator, "ck-0", f"2024-01-0{n + 1}T00:00:00.000+00:00", f"v1-{n}"))
        v1_current = {r["item_id"]: json.loads(r["labels"]) for r in conn.execute(V1_CURRENT)}
        v1_ids = [r[0] for r in conn.execute("SELECT id FROM corrections ORDER BY id")]

    store = LabelStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert store.count() == 3 and [e["id"] for e in store.history()] == v1_ids[::-1]
    assert labels_of(store) == v1_current == {"a": {"colour": "White"}, "b": {"colour": "Red"}}
    assert [(h["task"], h["label"], h["status"], h["annotator"]) for h in store.item_history("a")] == [
        ("colour", "Black", "corrected", "alice"), ("type", "Tights", "corrected", "alice"),
        ("colour", "White", "corrected", "bob"), ("type", None, "pending", "bob")]
    assert store.item_state("b")["colour"].status == "accepted"
    # a v1 request id still answers its retry; the store takes v2 saves and exports
    assert store.save_correction(image=tiny_png(1), text="text b", labels={"colour": "Blue"},
                                 request_id="v1-1") == v1_ids[1]
    state = store.item_state("a")
    save(store, "a", "ana", {"type": "Socks"}, base_versions={"type": state["type"].version})
    assert labels_of(store)["a"] == {"colour": "White", "type": "Socks"}
    assert store.export(tmp_path / "export.csv") == 2
    assert LabelStore(path).audit()[1] == 6  # reopening does not migrate again

    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(LabelStoreError, match=f"schema version {len(MIGRATIONS) + 1}"):
        LabelStore(path)


def test_a_v3_store_names_the_save_each_undo_undid(tmp_path):
    """v3 undos knew their target only through their decisions: the migration names it, so
    an undone save stays undone and the next undo goes further back."""
    path = tmp_path / "labels.db"
    with sqlite3.connect(path) as conn:
        for migrate in MIGRATIONS[:3]:
            migrate(conn)
        conn.execute("PRAGMA user_version = 3")
        save_sql = ("INSERT INTO corrections (id, item_id, labels, annotator, created_at, kind) "
                    "VALUES (?, 'a', '{}', 'ana', '2026', ?)")
        for save_id, kind, label, reverts in ((1, "label", "Red", None), (2, "label", "Blue", None),
                                              (3, "undo", "Red", 2)):
            conn.execute(save_sql, (save_id, kind))
            conn.execute("INSERT INTO decisions (id, save_id, item_id, task, label, status, reverts) "
                         "VALUES (?, ?, 'a', 'colour', ?, 'corrected', ?)", (save_id, save_id, label, reverts))
    store = LabelStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id, undoes FROM corrections ORDER BY id").fetchall() == [
            (1, None), (2, None), (3, 2)]
    assert store.undo("ana").tasks == {"colour": ("Red", None)}  # save 1: save 2 is undone already
    with pytest.raises(LabelStoreError, match="nothing to undo"):
        store.undo("ana")


def test_claims_keep_two_labelers_apart_and_lapse(store):
    assert store.claim("a", "ana") is None and store.claim("a", "ana") is None  # hers, again
    assert store.claim("d", "ben") is None and store.claim("a", "ben") == "ana"  # refused: ana is on it
    assert store.claims("ben") == {"a": "ana"} and store.claims("ana") == {}  # ben left d
    assert store.claim("b", "ana") is None  # ana moved on: her claim follows her
    assert store.claims("ben") == {"b": "ana"} and store.claim("a", "ben") is None
    store.release("ana")
    assert store.claims("ben") == {}
    assert store.claim("c", "cem", minutes=-1) is None  # a claim that lapsed holds nothing
    assert store.claims("ana") == {"a": "ben"} and store.claims("ben") == {} and store.claim("c", "ben") is None


# ---------------------------------------------------------------------------- review queue order and filters
def test_uncertainty_by_strategy_on_hand_computed_values():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    assert uncertainty(p, "least_confidence") == pytest.approx([0.3, 0.6, 0.0])
    assert uncertainty(p, "margin") == pytest.approx([0.5, 1.0, 0.0])
    # -(.7 ln .7 + .2 ln .2 + .1 ln .1) = 0.801819 and -(2 x .4 ln .4 + .2 ln .2) = 1.054920, over ln 3 = 1.098612
    assert uncertainty(p, "entropy") == pytest.approx([0.729847, 0.960230, 0.0], abs=1e-6)
    assert uncertainty(np.array([[0.5, 0.5]]), "entropy") == pytest.approx([1.0])
    top2 = np.array([[0.6, 0.3], [0.5, 0.1]])  # top-k only: fine for least confidence and margin
    assert uncertainty(top2, "margin") == pytest.approx([0.7, 0.6])
    with pytest.raises(ReviewError, match="every class"):
        uncertainty(top2, "entropy")
    for bad in (np.array([0.5, 0.5]), np.array([[0.9, 0.9]]), np.array([[np.nan, 1.0]]), np.array([[-0.1, 1.1]])):
        with pytest.raises(ReviewError):
            uncertainty(bad, "margin")
    with pytest.raises(ReviewError, match="strategy"):
        uncertainty(p, "random")


def test_rank_and_select_the_queue():
    probabilities = {"colour": np.array([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3]]),
                     "type": np.array([[0.5, 0.3, 0.2], [0.95, 0.05, 0.0], [0.8, 0.1, 0.1]])}
    assert rank(probabilities, "least_confidence").tolist() == [0, 1, 2]  # max over tasks: .5, .45, .3
    assert rank(probabilities, "margin", task="colour").tolist() == [1, 2, 0]  # .9, .6, .2
    with pytest.raises(ReviewError, match="task 'pattern'"):
        rank(probabilities, task="pattern")

    confidences = [{"colour": 0.9, "type": 0.5}, {"colour": 0.55, "type": 0.95}, {"colour": 0.7}, {}]
    assert select(confidences) == [0, 1, 2]  # every item that has a task
    assert select(confidences, task="colour", min_conf=0.7) == [0, 2]
    assert select(confidences, task="type", max_conf=0.9) == [0]
    assert select(confidences, min_conf=0.5, max_conf=0.6) == [0, 1]  # some task in the uncertain band
    thresholds = {"colour": 0.85, "type": 0.9}  # bulk accept: every task clears its own threshold
    assert select(confidences, min_conf=thresholds) == []
    assert select(confidences, task="colour", min_conf=thresholds) == [0]
    assert select(confidences, task="type", min_conf={"colour": 0.1, "type": None}) == []  # no threshold: never
