"""How fast the studio answers (issue 17): the app's /predict against `Predictor.predict` in the
same run, the first prediction after start-up against a warm one, concurrent clients against
sequential calls, and a review queue of 2,000 catalogue items from kept predictions.

`python -m cma_clip.bench --sections app startup concurrency review` runs them; the figures and
how to read them are in docs/PERFORMANCE.md.

Clients talk to the app as a browser does, over Gradio's HTTP API (`AppClient`: upload, call,
server-sent events, download of the map). `gradio_client` is also timed (`app_predict.client_*`):
it polls its message queue every 50 ms, which adds up to that to each call.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from ..catalogue_predictions import catalogue_predictions
from ..data import REPO_ROOT, load_image
from ..predict import Predictor
from ..studio import Studio

EXAMPLE_IMAGE = REPO_ROOT / "assets" / "hm-0816591001.jpg"
EXAMPLE_TEXT = "Dingo tee TVP. T-shirt in soft cotton jersey with a round, rib-trimmed neckline."
MODEL = "hm-articles"
CHECKPOINTS = REPO_ROOT / "checkpoints"


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def p50(times: list[float]) -> float:
    return float(np.median(times))


def p95(times: list[float]) -> float:
    return float(np.percentile(times, 95))


class AppClient:
    """/predict over Gradio's HTTP API, as the page calls it: upload the image, join the queue, read
    the server-sent events to the result, and download the map it links to. One client is one
    session, as one browser tab is (a new session costs the server its state's set-up)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=120)
        self.session = uuid.uuid4().hex

    def predict(self, image: Path, text: str, model: str = MODEL, item_id: str = "") -> list:
        with open(image, "rb") as handle:
            uploaded = self.http.post("/gradio_api/upload", files={"files": (image.name, handle)})
        uploaded.raise_for_status()
        data = [{"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}}, text, model, item_id]
        event = self.http.post("/gradio_api/call/predict", json={"data": data, "session_hash": self.session})
        event.raise_for_status()
        kind, outputs = "", None
        with self.http.stream("GET", f"/gradio_api/call/predict/{event.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    outputs = json.loads(line.split(":", 1)[1])
                    break
        if kind != "complete" or not outputs:
            raise RuntimeError(f"/predict failed: {kind} {outputs!r}")
        for value in outputs:  # the map is a file the page then loads
            if isinstance(value, dict) and value.get("url"):
                self.http.get(value["url"]).raise_for_status()
        return outputs

    def close(self) -> None:
        self.http.close()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time several functions alternately (so drifting load hits them alike), after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = timed(fn)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def serving(studio: Studio):
    """The app as `app.serve` runs it, on a free local port (the lab may use the UI: run from the repository's root)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import app

    return app.serve(studio, host="127.0.0.1", block=False)


# ----------------------------------------------------------------------------- /predict against the model

def app_latency(predictor: Predictor, calls: int, warmup: int, checkpoint_dir: Path = CHECKPOINTS) -> dict[str, float]:
    """Sequential /predict calls end to end (upload, prediction with attention and relevance for every
    task, map, chart, shading, tables), timed alternately with `predictor.predict` on the same item
    and with a gradio_client call: p50s and their ratios."""
    from gradio_client import Client, handle_file

    image = load_image(EXAMPLE_IMAGE)
    with tempfile.TemporaryDirectory(prefix="cma-bench-app-") as data_dir:
        served = serving(Studio(checkpoint_dir, data_dir=data_dir, device=str(predictor.device)))
        client, legacy = AppClient(served.url), Client(served.url, verbose=False)
        try:
            times = interleaved({
                "predict": lambda: predictor.predict(image, EXAMPLE_TEXT),
                "app": lambda: client.predict(EXAMPLE_IMAGE, EXAMPLE_TEXT),
                "client": lambda: legacy.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL,
                                                 api_name="/predict"),
            }, calls, warmup)
        finally:
            client.close()
            served.close()
    model, app_p50, client_p50 = p50(times["predict"]), p50(times["app"]), p50(times["client"])
    return {"p50_s": app_p50, "p95_s": p95(times["app"]), "calls": len(times["app"]),
            "predictor_p50_s": model, "ratio": app_p50 / model,
            "client_p50_s": client_p50, "client_p95_s": p95(times["client"]), "client_ratio": client_p50 / model}


# ----------------------------------------------------------------------------- the first prediction

def startup(calls: int) -> dict[str, float]:
    """In a fresh process: seconds until `app.serve` reports the server running, the first /predict
    right after, and warm ones (p50)."""
    code = f"from cma_clip.lab.studio_speed import _startup_child; _startup_child({calls})"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the start-up run failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["ratio"] = figures["first_s"] / figures["warm_p50_s"]
    return figures


def _startup_child(calls: int) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cma-bench-start-") as data_dir:
        served = serving(Studio(CHECKPOINTS, data_dir=data_dir))
        ready = time.perf_counter() - started
        client = AppClient(served.url)
        try:
            first = time.perf_counter()
            client.predict(EXAMPLE_IMAGE, EXAMPLE_TEXT)
            first = time.perf_counter() - first
            warm = interleaved({"warm": lambda: client.predict(EXAMPLE_IMAGE, EXAMPLE_TEXT)}, calls, 0)["warm"]
        finally:
            client.close()
            served.close()
    print(json.dumps({"ready_s": ready, "first_s": first, "warm_p50_s": p50(warm), "warm_calls": len(warm)}))


# ----------------------------------------------------------------------------- concurrent clients

def concurrency(clients: int, rounds: int, repeats: int = 1, checkpoint_dir: Path = CHECKPOINTS) -> dict[str, float]:
    """Throughput of `clients` clients calling /predict at once (`rounds` calls each, different texts)
    against the same number of calls made one after another, on one app, the two timed alternately
    `repeats` times (load that drifts hits both alike); and the batches the concurrent calls ran.
    The clients run in a process of their own, as a browser does: in the server's process their
    threads would hold its interpreter lock while they read the answers. Every client makes one
    untimed call first, so both ways are timed on open sessions (before, the concurrent side paid
    for 14 sessions' set-up and the sequential side for none)."""
    with tempfile.TemporaryDirectory(prefix="cma-bench-conc-") as data_dir:
        studio = Studio(checkpoint_dir, data_dir=data_dir)
        served = serving(studio)
        sequential, together, batches, per_repeat = 0.0, 0.0, Counter(), []
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client_process:
                drive = partial(_drive_clients, served.url, clients, rounds)
                client_process.submit(drive, "warm-up").result()  # every client's session opened
                for _ in range(repeats):
                    one_by_one = client_process.submit(drive, "sequential").result()
                    before = Counter(studio._batcher(MODEL).batch_sizes)
                    at_once = client_process.submit(drive, "concurrent").result()
                    batches += Counter(studio._batcher(MODEL).batch_sizes) - before
                    sequential, together = sequential + one_by_one, together + at_once
                    per_repeat.append(one_by_one / at_once)
        finally:
            served.close()
    calls = clients * rounds * repeats
    mean_batch = sum(s * c for s, c in batches.items()) / max(1, sum(batches.values()))
    return {"clients": clients, "calls": calls, "sequential_per_s": calls / sequential,
            "concurrent_per_s": calls / together, "ratio": sequential / together, "mean_batch": mean_batch,
            "lowest_repeat_ratio": min(per_repeat)}


_CLIENTS: list[AppClient] = []  # in the client process: kept across the phases, with their sessions


def _drive_clients(url: str, clients: int, rounds: int, how: str) -> float:
    """In the client process: seconds for `clients * rounds` /predict calls, made by one client in a
    row ("sequential") or by `clients` clients at once ("concurrent"). "warm-up": every client's
    first call, untimed: it opens the client's session on the server (about 65 ms of building the
    session's state from the page's components), as a browser tab does when the page loads."""
    if not _CLIENTS:
        _CLIENTS.extend(AppClient(url) for _ in range(clients))

    calls = 1 if how == "warm-up" else rounds

    def one_client(i: int) -> None:
        for r in range(calls):
            _CLIENTS[i].predict(EXAMPLE_IMAGE, f"{EXAMPLE_TEXT} #{i}-{r}")

    started = time.perf_counter()
    if how == "sequential":
        for n in range(clients * rounds):
            _CLIENTS[0].predict(EXAMPLE_IMAGE, f"{EXAMPLE_TEXT} #{n}")
    else:
        with ThreadPoolExecutor(clients) as threads:
            list(threads.map(one_client, range(clients)))
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- review queue

def review_queue(items: int, split: str = "train", checkpoint_dir: Path = CHECKPOINTS, limit: int | None = None,
                 live_items: int = 48) -> dict[str, float]:
    """A queue of `items` catalogue items: the seconds to compute the split's kept predictions (nearly
    0 when kept before; the catalogue's features are built first if they are not cached), to open it
    in a fresh studio from them (the model loaded), to re-sort and re-filter the open queue
    (`Studio.arrange_queue`), to move on in it (`review_next`: what every save and skip adds), and,
    for scale, to open a `live_items` queue predicted the old way (every image decoded and encoded).
    `limit`: the first items of each split of the catalogue only."""
    with tempfile.TemporaryDirectory(prefix="cma-bench-review-") as data_dir:
        first = Studio(checkpoint_dir, data_dir=data_dir, catalogue_limit=limit)
        predictor = first.predictor(MODEL)
        started = time.perf_counter()
        catalogue_predictions(predictor, first.catalogue(predictor.config.catalogue.name), split, build_features=True)
        build = time.perf_counter() - started
        studio = Studio(checkpoint_dir, data_dir=data_dir, catalogue_limit=limit)  # nothing in memory
        studio.predictor(MODEL)
        started = time.perf_counter()
        queue = studio.review_catalogue(MODEL, split, items)
        cold = time.perf_counter() - started
        if len(queue.items) != items:
            raise RuntimeError(f"the queue holds {len(queue.items)} items, not {items}")
        views = [dict(strategy="margin"), dict(strategy="entropy"), dict(min_conf=0.2, max_conf=0.8),
                 dict(strategy="margin", task=studio.predictor(MODEL).tasks[0]), dict()]
        times, moves = [], []
        for options in views:
            started = time.perf_counter()
            studio.arrange_queue(queue, "bench", **options)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            studio.review_next(queue, "bench")
            moves.append(time.perf_counter() - started)
        live = Studio(checkpoint_dir, data_dir=data_dir, cache_dir=Path(data_dir) / "no-cache", catalogue_limit=limit)
        live.predictor(MODEL)
        started = time.perf_counter()
        live.review_catalogue(MODEL, split, live_items)
        live_seconds = time.perf_counter() - started
    return {"items": items, "build_s": build, "open_s": cold, "resort_p50_s": p50(times), "resort_max_s": max(times),
            "move_p50_s": p50(moves),
            "live_items": live_items, "live_s": live_seconds, "live_items_per_s": live_items / live_seconds,
            "open_items_per_s": items / cold}


def table_rows(figures: dict) -> list[tuple[str, str, str]]:
    """The printed rows of these figures (bench's table)."""
    rows = []
    if "app_predict" in figures:
        app = figures["app_predict"]
        rows += [("app /predict end to end (HTTP): p50 / p95 (target p50 <= 0.5 s)",
                  f"{app['p50_s']:.3f} / {app['p95_s']:.3f} s", f"{app['calls']} calls"),
                 ("  Predictor.predict (attention + relevance) p50, same run", f"{app['predictor_p50_s']:.3f} s", ""),
                 ("  app / Predictor.predict (target <= 2.5)", f"{app['ratio']:.2f}", ""),
                 ("  through gradio_client (50 ms polling): p50, ratio", f"{app['client_p50_s']:.3f} s, "
                  f"{app['client_ratio']:.2f}", "")]
    if "startup" in figures:
        start = figures["startup"]
        rows += [("start-up: server running after", f"{start['ready_s']:.1f} s", "fresh process"),
                 ("  first /predict / warm p50 (target ratio <= 2)",
                  f"{start['first_s']:.3f} / {start['warm_p50_s']:.3f} s", f"{start['warm_calls']} warm calls"),
                 ("  first / warm", f"{start['ratio']:.2f}", "")]
    if "concurrency" in figures:
        conc = figures["concurrency"]
        rows += [(f"/predict, {conc['clients']} clients at once / in a row",
                  f"{conc['concurrent_per_s']:.2f} / {conc['sequential_per_s']:.2f} calls/s",
                  f"{conc['calls']} calls each way, mean batch {conc['mean_batch']:.1f}"),
                 ("  ratio (target >= 1.5)", f"{conc['ratio']:.2f}",
                  f"lowest of the alternations {conc['lowest_repeat_ratio']:.2f}")]
    if "review" in figures:
        rev = figures["review"]
        rows += [(f"review queue of {rev['items']} items from kept predictions: open (target <= 5 s)",
                  f"{rev['open_s']:.2f} s", f"predictions computed in {rev['build_s']:.1f} s"),
                 ("  re-sort / re-filter the open queue: p50 / max",
                  f"{rev['resort_p50_s'] * 1e3:.0f} / {rev['resort_max_s'] * 1e3:.0f} ms", "5 orders and filters"),
                 ("  move on to the next item (kept in the store): p50", f"{rev['move_p50_s'] * 1e3:.0f} ms", ""),
                 (f"  old way, {rev['live_items']} items predicted on opening", f"{rev['live_s']:.1f} s",
                  f"{rev['live_items_per_s']:.1f} items/s")]
    return rows
