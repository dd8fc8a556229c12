import hashlib
import io
import os
import signal
import sqlite3
import threading
import traceback
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
from PIL import Image

from cma_clip.data import Catalogue, CatalogueConfig, read_manifest
from cma_clip.labels import MIGRATIONS, LabelStore, LabelStoreError, content_item_id
from conftest import HM

PHOTOS = sorted((HM / "images").glob("*/*.jpg"))[:3]


def tiny_png(i: int) -> bytes:
    """A distinct 4x4 PNG per `i`."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, i // 256 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_files(store: LabelStore) -> list:
    return sorted(p for p in store.image_dir.rglob("*") if p.is_file()) if store.image_dir.exists() else []


def test_save_and_read_back_with_who_what_when(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    with Image.open(PHOTOS[0]) as photo:
        photo.load()
    predictions = {"colour": {"label": "Black", "confidence": 0.61}, "type": {"label": "Tights", "confidence": 0.9}}
    row_id = store.save_correction(image=photo, text="20 den stockings", labels={"colour": "White", "type": "Tights",
                                   "pattern": "NA"}, predictions=predictions, annotator="  alice  ", checkpoint="ck-1")
    assert isinstance(row_id, int) and store.count() == 1
    assert store.image_dir == tmp_path / "labels_images"

    [entry] = store.history()
    assert entry["id"] == row_id and entry["annotator"] == "alice" and entry["checkpoint"] == "ck-1"
    assert entry["labels"] == {"colour": "White", "type": "Tights"}  # the missing "NA" label is dropped
    assert entry["predictions"] == predictions and entry["text"] == "20 den stockings"
    # a first save changed only what differs from the model's prediction, where the labeler's control started
    assert entry["changed"] == ["colour"] and entry["previous_labels"] is None
    assert entry["corrected"] == ["colour"] and entry["source"] == "human"
    assert datetime.fromisoformat(entry["created_at"]).utcoffset() == timedelta(0)

    stored = entry["image_path"]
    sha = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert entry["image_sha256"] == sha and store.image_path(sha) == stored
    assert stored == store.image_dir / sha[:2] / f"{sha}.png"
    with Image.open(stored) as back:
        assert back.size == photo.size
    assert entry["item_id"] == content_item_id(photo, "20 den stockings") == content_item_id(stored, " 20 den  stockings")
    assert entry["item_id"] != content_item_id(photo, "30 den stockings")  # same image, another item
    current = store.current_labels()[entry["item_id"]]
    assert current["labels"] == entry["labels"] and current["image_path"] == stored
    assert current["annotator"] == "alice" and current["updated_at"] == entry["created_at"]

    store.save_correction(image=PHOTOS[1], text="x" * 30_000, labels={"colour": "Red"}, annotator="b" * 300)
    assert len(store.history()[0]["text"]) == 20_000 and store.history()[0]["annotator"] == "b" * 100
    with pytest.raises(LabelStoreError, match="no image"):
        store.image_path("0" * 64)


def test_edits_keep_history(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    first = store.save_correction(image=PHOTOS[0], text="tights", labels={"colour": "Black", "type": "Tights"},
                                  predictions={"colour": {"label": "Grey", "confidence": 0.4}},
                                  annotator="alice", item_id="0111565001")
    second = store.save_correction(image=PHOTOS[0], text="tights", labels={"colour": "Dark Grey", "type": "Tights"},
                                   annotator="bob", item_id="0111565001")
    store.save_correction(image=PHOTOS[1], text="other", labels={"colour": "Red"}, item_id="other")
    assert store.count() == 3 and second > first

    current = store.current_labels()
    assert set(current) == {"0111565001", "other"}
    assert current["0111565001"]["labels"] == {"colour": "Dark Grey", "type": "Tights"}
    assert current["0111565001"]["annotator"] == "bob"

    newest, oldest = store.history(item_id="0111565001")
    assert (newest["id"], newest["annotator"], oldest["id"], oldest["annotator"]) == (second, "bob", first, "alice")
    assert newest["changed"] == ["colour"] and newest["previous_labels"] == oldest["labels"]
    assert oldest["changed"] == ["colour", "type"] and oldest["corrected"] == ["colour"]
    assert [e["item_id"] for e in store.history()] == ["other", "0111565001", "0111565001"]
    assert [e["id"] for e in store.history(limit=1)] == [store.history()[0]["id"]]


def test_images_are_stored_once(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=PHOTOS[0], text="a", labels={"colour": "Black"}, item_id="a")
    store.save_correction(image=PHOTOS[0].read_bytes(), text="b", labels={"colour": "Black"}, item_id="b")
    store.save_correction(image=str(PHOTOS[0]), text="c", labels={"colour": "Grey"}, item_id="a")
    [stored] = image_files(store)
    sha = hashlib.sha256(PHOTOS[0].read_bytes()).hexdigest()
    assert stored == store.image_path(sha) and stored.name == f"{sha}.jpg"
    assert stored.read_bytes() == PHOTOS[0].read_bytes()  # the original bytes, not re-encoded
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT sha256, bytes FROM images").fetchall() == [(sha, PHOTOS[0].stat().st_size)]


def test_request_id_makes_a_save_idempotent(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    first = store.save_correction(image=tiny_png(1), text="a", labels={"colour": "Red"}, request_id="req-1")
    again = store.save_correction(image=tiny_png(1), text="a", labels={"colour": "Blue"}, request_id="req-1")
    other = store.save_correction(image=tiny_png(1), text="a", labels={"colour": "Blue"}, request_id="req-2")
    assert first == again != other and store.count() == 2


def test_wal_mode_and_schema_version(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 6
    assert LabelStore(store.path).count() == 0  # reopening an existing store


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_is_a_manifest_the_trainer_reads(tmp_path, suffix):
    store = LabelStore(tmp_path / "store" / "labels.db")
    store.save_correction(image=PHOTOS[0], text="stockings", labels={"colour": "Black"}, item_id="a")
    store.save_correction(image=PHOTOS[0], text="stockings", labels={"colour": "White", "type": "Tights"},
                          annotator="bob", item_id="a")
    store.save_correction(image=PHOTOS[1], text="shape up, 30 den", labels={"type": "Leggings"}, item_id="b")
    path = tmp_path / "store" / f"export{suffix}"
    assert store.export(path) == 2
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    rows = read_manifest(path)
    provenance = [f"{task}__{field}" for task in ("colour", "type") for field in ("source", "annotator", "checkpoint",
                                                                                    "at", "disputed")]
    assert [list(r) for r in rows] == [["id", "image", "text", "colour", "type", "annotator", "updated_at",
                                        *provenance]] * 2
    assert [(r["id"], r["colour"], r["type"], r["annotator"]) for r in rows] == [("a", "White", "Tights", "bob"),
                                                                               ("b", "", "Leggings", "")]
    assert rows[1]["text"] == "shape up, 30 den" and not os.path.isabs(rows[0]["image"])
    assert (rows[0]["colour__source"], rows[0]["colour__annotator"], rows[1]["colour__source"]) == ("human", "bob", "")
    catalogue = Catalogue.open(CatalogueConfig(name="export", manifest=str(path), image_column="image",
                                               text_columns=["text"], tasks=["colour", "type"], id_column="id"))
    paths = catalogue.image_paths()
    assert all(p.is_file() for p in paths) and paths[0].read_bytes() == PHOTOS[0].read_bytes()
    assert catalogue.item_ids() == ["a", "b"] and catalogue.labels("colour") == ["White", None]
    with pytest.raises(LabelStoreError, match="csv or .jsonl"):
        store.export(tmp_path / "export.txt")


def test_a_failed_commit_leaves_the_store_usable(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    real = store._connection()

    class CommitFailsOnce:  # the thread's connection, whose next COMMIT fails (a full disk, an I/O error)
        failed = False

        def execute(self, sql, *args):
            if sql == "COMMIT" and not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real, name)

    store._local.conn = CommitFailsOnce()
    with pytest.raises(LabelStoreError, match="could not be used .disk I/O error.; nothing was saved"):
        store.save_correction(image=tiny_png(1), text="lost", labels={"colour": "Red"}, item_id="a")
    assert not real.in_transaction and store.count() == 0
    store.save_correction(image=tiny_png(2), text="kept", labels={"colour": "Blue"}, item_id="b")
    assert store.count() == 1


def test_a_store_another_process_holds_locked_refuses_with_a_message_and_keeps_nothing(tmp_path, monkeypatch):
    """A lock held past the busy timeout (a copy, a backup tool, a stuck writer) raised SQLite's bare
    "database is locked", which the app showed as an unexplained error."""
    monkeypatch.setattr("cma_clip.labels.BUSY_TIMEOUT_S", 0.2)
    store = LabelStore(tmp_path / "labels.db")
    holder = sqlite3.connect(tmp_path / "labels.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(LabelStoreError, match=r"the label store is busy: another process has held it for over "
                                                  r"0.2 s; nothing was saved, try again"):
            store.save_correction(image=tiny_png(1), text="x", labels={"colour": "Red"}, item_id="a")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.count() == 0
    store.save_correction(image=tiny_png(1), text="x", labels={"colour": "Red"}, item_id="a")
    assert store.count() == 1


def test_concurrent_threads_store_every_save_once(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    errors, ids = [], {}

    def writer(t: int) -> None:
        try:
            for i in range(50):
                n = t * 50 + i
                ids[n] = store.save_correction(image=tiny_png(n % 120), text=f"item {n}", labels={"colour": str(n)},
                                               annotator=f"thread-{t}", item_id=f"item-{n}", request_id=f"req-{n}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and store.count() == 200 and len(set(ids.values())) == 200

    first_ids = dict(ids)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]  # every client retries every save
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and ids == first_ids and store.count() == 200
    current = store.current_labels()
    assert len(current) == 200 and all(current[f"item-{n}"]["labels"] == {"colour": str(n)} for n in range(200))
    assert len(image_files(store)) == 120


def test_concurrent_processes_store_every_save_once(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.count()  # the parent's connection, inherited by the children
    pids = []
    for p in range(4):
        pid = os.fork()
        if pid == 0:  # each request is sent by two processes at about the same time
            code = 1
            try:
                for i in range(25):
                    for n in (p * 25 + i, (p + 1) % 4 * 25 + i):
                        store.save_correction(image=tiny_png(n), text=f"item {n}", labels={"colour": str(n)},
                                              item_id=f"item-{n}", request_id=f"req-{n}")
                code = 0
            except Exception:  # noqa: BLE001 - shown in the test output, failed by the exit code
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0] * 4
    current = store.current_labels()
    assert store.count() == 100 and len(current) == 100 and len(image_files(store)) == 100
    assert all(current[f"item-{n}"]["labels"] == {"colour": str(n)} for n in range(100))


def test_a_returned_save_survives_a_killed_forked_writer(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=tiny_png(1), text="parent", labels={"colour": "Red"})  # the parent's connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child saves on its own connection, acknowledges, and is killed
        try:
            row_id = store.save_correction(image=tiny_png(2), text="child", labels={"colour": "Blue"})
            os.write(write, str(row_id).encode())
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(write)
    acknowledged = int(os.read(read, 64))
    os.close(read)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    reopened = LabelStore(tmp_path / "labels.db")
    assert reopened.count() == 2 and reopened.history()[0]["id"] == acknowledged
    assert reopened.history()[0]["image_path"].is_file() and store.count() == 2


def test_bad_input_is_refused_and_saves_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    huge = Image.new("1", (8000, 6000))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    huge_png = buffer.getvalue()
    bad = [(dict(image=b"not an image", labels={"colour": "Red"}), "not a readable image"),
           (dict(image=PHOTOS[0].read_bytes()[:200], labels={"colour": "Red"}), "not a readable image"),  # truncated
           (dict(image=tmp_path / "missing.jpg", labels={"colour": "Red"}), "cannot read image"),
           (dict(image=tiny_png(1), labels={}), "no labels"),
           (dict(image=tiny_png(1), labels={"colour": "NA", "type": " "}), "no labels"),
           (dict(image=tiny_png(1), labels={"colour": 3}), "must be strings"),
           (dict(image=huge, labels={"colour": "Red"}), "megapixels"),  # over the trainer's pixel limit
           (dict(image=huge_png, labels={"colour": "Red"}), "megapixels")]
    for kwargs, message in bad:
        with pytest.raises(LabelStoreError, match=message):
            store.save_correction(text="x", **kwargs)
    assert store.count() == 0 and image_files(store) == [] and store.history() == []
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LabelStoreError, match="not a usable label store"):
        LabelStore(tmp_path / "junk.db")


def test_eight_writers_in_threads_and_processes_with_exports_during_the_writes(tmp_path):
    """The small version of `python -m cma_clip.lab.stress_labels` (8 writers x 500 saves, figures in
    docs/RELIABILITY.md): every save stored once, each export a consistent snapshot."""
    from cma_clip.lab.stress_labels import check_every_save_once, check_snapshots, run_writers

    for mode in ("threads", "processes"):
        path = tmp_path / mode / "labels.db"
        path.parent.mkdir()
        _, snapshots = run_writers(path, writers=8, saves=40, mode=mode)
        assert check_every_save_once(path, 8, 40) == 320
        assert check_snapshots(path, snapshots) == len(snapshots)
        assert any(0 < len(s) < 8 * 25 for s in snapshots)  # some exports were taken mid-way
    store = LabelStore(path)
    final = {item: entry["labels"]["colour"] for item, entry in store.current_labels().items()}
    assert check_snapshots(path, [final]) == 1
    newest = store.history(limit=1)[0]["item_id"]
    item, label = next((i, c) for i, c in final.items() if i != newest and int(c.split("-s")[1]) >= 25)
    torn = {**final, item: label.replace(f"-s{label.split('-s')[1]}", f"-s{int(label.split('-s')[1]) - 25}")}
    with pytest.raises(AssertionError, match="not a snapshot"):  # one item still at its previous edit
        check_snapshots(path, [torn])


def test_sigkill_in_the_middle_of_writes_keeps_every_acknowledged_save(tmp_path):
    from cma_clip.lab.stress_labels import kill_mid_writes

    for kill, (after, delay) in enumerate([(30, 0.0), (61, 0.003)]):
        result = kill_mid_writes(tmp_path / "labels.db", writer=kill, after_acks=after, delay=delay)
        assert result["integrity"] == "ok" and result["acknowledged"] >= after
        assert result["stored"] - result["acknowledged"] in (0, 1)
    assert LabelStore(tmp_path / "labels.db").count() >= 30 + 61 + 2


@pytest.mark.parametrize("option,message", [(["--writers", "-1"], "--writers must be at least 1, not -1"),
                                            (["--saves", "0"], "--saves must be at least 1, not 0"),
                                            (["--kills", "-2"], "--kills must be at least 0, not -2")])
def test_the_stress_command_refuses_counts_it_cannot_use(option, message, capsys):
    """`--writers -1` exited 0 having stored nothing, its figures printed as a pass (QA deployer, session 33)."""
    from cma_clip.lab import stress_labels

    with pytest.raises(SystemExit) as stopped:
        stress_labels.main(option)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_an_annotator_is_one_person_whatever_the_case_a_keyboard_gave_the_name(tmp_path):
    """QA phone labeler, session 38: the phone's keyboard wrote "Rita", the laptop "rita": two
    annotators (their own undo, queues, agreement), and the History filter found only one."""
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=PHOTOS[0], text="tights", labels={"colour": "Black"}, annotator="rita")
    store.save_correction(image=PHOTOS[1], text="socks", labels={"colour": "Red"}, annotator="Rita ")
    assert [entry["annotator"] for entry in store.history()] == ["rita", "rita"]
    assert store.undo("RITA").item_id == store.history()[0]["item_id"]  # the newest save, the phone's
    rows, total = store.audit(annotator="RITA")
    assert total == len(rows) == 3 and {row["annotator"] for row in rows} == {"rita"}
    store.save_queue("q1", "ben", "hm", {"items": []}, 0)
    assert store.latest_queue("BEN").queue_id == "q1"  # a queue opened, nothing saved yet
    store.save_correction(image=PHOTOS[2], text="cap", labels={"colour": "Blue"}, annotator="Ben")
    assert store.history()[0]["annotator"] == "ben"


def test_a_name_with_letters_beyond_ascii_is_one_annotator_in_any_case_and_form(tmp_path):
    """SQLite's NOCASE folds ASCII letters only: a phone's "Émile" and a laptop's "émile" were two
    annotators, as were "Øyvind" and "øyvind"; a decomposed "é" (typed on some keyboards) too."""
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=PHOTOS[0], text="tights", labels={"colour": "Black"}, annotator="émile")
    store.save_correction(image=PHOTOS[1], text="socks", labels={"colour": "Red"}, annotator="Émile")
    store.save_correction(image=PHOTOS[2], text="cap", labels={"colour": "Blue"}, annotator="E\u0301mile")
    assert [entry["annotator"] for entry in store.history()] == ["émile"] * 3
    rows, total = store.audit(annotator="ÉMILE")
    assert total == len(rows) == 3
    assert store.audit(search="ÉMIL")[1] == 3 and store.audit(search="E\u0301MIL")[1] == 3  # a search folds so too
    store.save_correction(image=PHOTOS[0], text="Écharpe ünïcødé", labels={"colour": "Rouge"}, annotator="ben")
    assert store.audit(search="ÜNÏ")[1] == 1 and store.audit(search="écharpe")[1] == 1
    store.save_queue("q1", "øyvind", "hm", {"items": []}, 0)
    assert store.latest_queue("Øyvind").queue_id == "q1"


def test_first_saves_of_two_spellings_at_one_instant_store_one_annotator(tmp_path):
    """The name was matched before the save took the write lock: "Rita" (a phone) and "rita" (a laptop)
    saving their first labels at one instant each found the other not held yet, and both were stored.
    Another writer holds the lock while both saves start, so both wait on it with their names read."""
    path = tmp_path / "labels.db"
    phone, laptop = LabelStore(path), LabelStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    errors = []

    def first_save(store: LabelStore, name: str, photo) -> None:
        try:
            store.save_correction(image=photo, text=name, labels={"colour": "Black"}, annotator=name)
        except Exception as exc:  # reported below: an exception in a thread would pass unseen
            errors.append(exc)

    threads = [threading.Thread(target=first_save, args=(store, name, photo))
               for store, name, photo in zip((phone, laptop), ("Rita", "rita"), PHOTOS)]
    for thread in threads:
        thread.start()
    threading.Event().wait(1.0)  # both are waiting for the lock
    holder.execute("COMMIT")
    holder.close()
    for thread in threads:
        thread.join()
    assert not errors
    names = [entry["annotator"] for entry in LabelStore(path).history()]
    assert len(names) == 2 and len(set(names)) == 1, names


@pytest.mark.parametrize("write", ["queue", "claim", "undo"])
def test_a_name_is_matched_under_the_write_lock_by_every_write(tmp_path, write):
    """Review of session 39: a queue and a claim took the spelling before the lock. The laptop's first
    save of "rita" commits just before the tablet's write of "RITA" takes the lock: it is "rita"'s."""
    laptop, tablet = LabelStore(tmp_path / "labels.db"), LabelStore(tmp_path / "labels.db")
    lock = tablet._transaction

    @contextmanager
    def laptop_saves_first(mode=""):
        laptop.save_correction(image=PHOTOS[0], text="tights", labels={"colour": "Black"}, annotator="rita")
        with lock(mode) as conn:
            yield conn

    tablet._transaction = laptop_saves_first
    if write == "queue":
        assert tablet.save_queue("q1", "RITA", "hm", {"items": []}, 0).annotator == "rita"
        assert laptop.latest_queue("rita").queue_id == "q1"
    elif write == "claim":
        tablet.claim("item-1", "RITA")
        assert laptop.claims("rita") == {} and laptop.claims("ben") == {"item-1": "rita"}
    else:  # the undo reverts rita's newest decision, the laptop's (it found "nothing to undo" for "RITA")
        assert tablet.undo("RITA").item_id == content_item_id(PHOTOS[0], "tights")


def test_names_held_in_both_spellings_before_stay_two_annotators(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    for photo, name in zip(PHOTOS[:2], ("rita", "rita-too")):
        store.save_correction(image=photo, text=name, labels={"colour": "Black"}, annotator=name)
    with sqlite3.connect(store.path) as conn:  # a store from before names were matched: both spellings
        conn.execute("UPDATE corrections SET annotator = 'Rita' WHERE annotator = 'rita-too'")
    for name in ("rita", "Rita"):
        LabelStore(store.path).save_correction(image=PHOTOS[2], text=name, labels={"colour": "Blue"}, annotator=name)
    assert [entry["annotator"] for entry in store.history()] == ["Rita", "rita", "Rita", "rita"]
