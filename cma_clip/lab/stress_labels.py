"""Concurrent labelers and crashes against the label store (figures in docs/RELIABILITY.md).

    python -m cma_clip.lab.stress_labels                      # 8 threads, then 8 processes, 500 saves each; 8 kills
    python -m cma_clip.lab.stress_labels --writers 8 --saves 500 --kills 8

Each writer saves `saves` corrections of its own 25 items (so items are edited many times),
every request with its own request id, and sends every 10th request twice (a client retry).
Checks: every save is stored exactly once; exports taken while the writers run are each a
consistent snapshot (exactly the labels after some commit, nothing half-applied); and a
writer killed with SIGKILL in the middle of its writes leaves a database that passes
`PRAGMA integrity_check` and holds every save it acknowledged. tests/test_labels.py runs
the same checks at a smaller size.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from cma_clip.data import read_manifest
from cma_clip.labels import LabelStore

ITEMS_PER_WRITER = 25
RETRY_EVERY = 10
IMAGES = 50


def image(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def save(store: LabelStore, writer: int, step: int) -> int:
    """One writer's `step`-th save: its own item (edited again every 25 steps), its own request id."""
    return store.save_correction(image=image((writer * 7 + step) % IMAGES), text=f"writer {writer} step {step}",
                                 labels={"colour": f"w{writer}-s{step}"}, annotator=f"writer-{writer}",
                                 item_id=f"w{writer}-item{step % ITEMS_PER_WRITER}",
                                 request_id=f"w{writer}-s{step}")


def write(path: Path, writer: int, saves: int, store: LabelStore | None = None, ack=None) -> None:
    """Save `saves` corrections, sending every RETRY_EVERY-th request twice; `ack(row_id)` after each."""
    store = store or LabelStore(path)
    for step in range(saves):
        row_id = save(store, writer, step)
        if step % RETRY_EVERY == 0:
            assert save(store, writer, step) == row_id  # the retry stores nothing new
        if ack:
            ack(row_id)


def _process_writer(path: str, writer: int, saves: int) -> None:
    write(Path(path), writer, saves)


class Exporter(threading.Thread):
    """Exports the store as CSV every `interval` seconds until stopped; keeps every export read back."""

    def __init__(self, store: LabelStore, folder: Path, interval: float = 0.05):
        super().__init__(daemon=True)
        self.store, self.folder, self.interval = store, folder, interval
        self.snapshots: list[dict[str, str]] = []
        self.stop, self.error = threading.Event(), None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                path = self.folder / "export.csv"
                self.store.export(path)
                self.snapshots.append({row["id"]: row["colour"] for row in read_manifest(path)})
                time.sleep(self.interval)
        except Exception as exc:  # noqa: BLE001 - reported by check_snapshots
            self.error = exc


def run_writers(path: Path, writers: int, saves: int, mode: str) -> tuple[float, list[dict[str, str]]]:
    """`writers` threads (one shared store, as in the app) or processes, with an exporter
    running meanwhile; returns the seconds taken and the exports."""
    store = LabelStore(path)
    exporter = Exporter(store, path.parent)
    start = time.perf_counter()
    if mode == "threads":
        errors = []

        def guarded(writer: int) -> None:
            try:
                write(path, writer, saves, store)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        workers = [threading.Thread(target=guarded, args=(w,)) for w in range(writers)]
    else:
        context = multiprocessing.get_context("fork")
        workers = [context.Process(target=_process_writer, args=(str(path), w, saves)) for w in range(writers)]
    for worker in workers:
        worker.start()
    exporter.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    exporter.stop.set()
    exporter.join()
    if mode == "threads":
        assert not errors, errors
    else:
        assert [w.exitcode for w in workers] == [0] * writers, [w.exitcode for w in workers]
    assert exporter.error is None, exporter.error
    return seconds, exporter.snapshots


def check_every_save_once(path: Path, writers: int, saves: int) -> int:
    """Every (writer, step) stored exactly once, and each item's current label is its last save."""
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT request_id, labels FROM corrections").fetchall()
    expected = {f"w{w}-s{s}" for w in range(writers) for s in range(saves)}
    request_ids = [r for r, _ in stored]
    assert len(request_ids) == len(set(request_ids)) == len(expected) and set(request_ids) == expected
    current = LabelStore(path).current_labels()
    for w in range(writers):
        for item in range(min(ITEMS_PER_WRITER, saves)):
            last = max(s for s in range(saves) if s % ITEMS_PER_WRITER == item)
            assert current[f"w{w}-item{item}"]["labels"] == {"colour": f"w{w}-s{last}"}
    return len(request_ids)


def check_snapshots(path: Path, snapshots: list[dict[str, str]]) -> int:
    """Each export equals the current labels after exactly the commits up to some row id.

    Saves commit one at a time in row-id order, so a consistent snapshot is "every row
    with id <= M" for M the newest row it shows; anything else (a missing earlier edit, an
    item ahead of its neighbours) is a torn read. Returns the number of snapshots checked."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT id, item_id, request_id FROM corrections ORDER BY id").fetchall()
    row_of = {request_id: row_id for row_id, _, request_id in rows}
    for snapshot in snapshots:
        newest = max((row_of[label] for label in snapshot.values()), default=0)
        expected: dict[str, str] = {}
        for row_id, item_id, request_id in rows:
            if row_id > newest:
                break
            expected[item_id] = request_id  # the colour label is the request id: w{writer}-s{step}
        assert snapshot == expected, f"export is not a snapshot at row {newest}"
    return len(snapshots)


def _killable_writer(path: str, writer: int, connection) -> None:
    write(Path(path), writer, 10**9, ack=connection.send)


def kill_mid_writes(path: Path, writer: int, after_acks: int, delay: float = 0.0) -> dict:
    """Start a writer process, SIGKILL it `delay` seconds after it has acknowledged `after_acks`
    saves (it is then in the middle of a later one: different delays land in different phases
    of a save), and check what it left behind."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_killable_writer, args=(str(path), writer, sender))
    process.start()
    sender.close()
    acknowledged = [receiver.recv() for _ in range(after_acks)]
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    try:
        while receiver.poll():  # acks already in the pipe when the kill landed
            acknowledged.append(receiver.recv())
    except EOFError:  # the pipe is drained and its writer is gone
        pass
    assert process.exitcode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        stored = {row[0] for row in conn.execute("SELECT id FROM corrections WHERE annotator = ?",
                                                 (f"writer-{writer}",))}
    assert integrity == "ok", integrity
    missing = set(acknowledged) - stored
    assert not missing, f"acknowledged saves lost: {sorted(missing)[:5]}"
    assert len(stored) - len(acknowledged) in (0, 1)  # at most the save in flight, committed but not acked
    LabelStore(path).save_correction(image=image(1), text="after the crash", labels={"colour": "ok"})  # still usable
    return {"acknowledged": len(acknowledged), "stored": len(stored), "integrity": integrity}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.stress_labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers per mode (threads, processes)")
    parser.add_argument("--saves", type=int, default=500, help="saves per writer")
    parser.add_argument("--kills", type=int, default=8,
                        help="processes SIGKILLed mid-write, after ack 40, 77, ... (each writes until killed)")
    parser.add_argument("--folder", help="where to put the databases (default: a temporary folder)")
    args = parser.parse_args(argv)
    for name, least in (("writers", 1), ("saves", 1), ("kills", 0)):
        if getattr(args, name) < least:  # -1 writers "passed", storing nothing
            parser.error(f"--{name} must be at least {least}, not {getattr(args, name)}")
    folder = Path(args.folder or tempfile.mkdtemp(prefix="stress-labels-"))
    for mode in ("threads", "processes"):
        path = folder / mode / "labels.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds, snapshots = run_writers(path, args.writers, args.saves, mode)
        stored = check_every_save_once(path, args.writers, args.saves)
        checked = check_snapshots(path, snapshots)
        retries = args.writers * len(range(0, args.saves, RETRY_EVERY))
        print(f"{mode:9s}: {args.writers} writers x {args.saves} saves (+{retries} retried requests) in "
              f"{seconds:.1f} s -> {stored} rows, each save once; {checked} exports taken during the writes, "
              f"each a consistent snapshot")
    path = folder / "killed" / "labels.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    for kill in range(args.kills):
        delay = kill % 4 * 0.0015
        result = kill_mid_writes(path, writer=100 + kill, after_acks=40 + 37 * kill, delay=delay)
        print(f"SIGKILL #{kill + 1} ({delay * 1000:.1f} ms after ack {40 + 37 * kill}): {result['acknowledged']} "
              f"acknowledged, {result['stored']} stored, integrity_check {result['integrity']}")
    print(f"databases in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
