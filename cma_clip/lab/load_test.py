"""Load on the app's /predict endpoint through the Gradio queue (figures in docs/RELIABILITY.md).

    python -m cma_clip.lab.load_test                          # starts `python app.py`, 50 concurrent, then 500 in a row
    python -m cma_clip.lab.load_test --concurrent 10 --sequential 30
    python -m cma_clip.lab.load_test --sequential 0           # the burst only
    python -m cma_clip.lab.load_test --url http://127.0.0.1:7860/ --pid 1234   # an app already running

Reports the errors, the p50/p95/max latency of the concurrent burst (each call timed from
its submission, so queueing counts; each call downloads its output files, as a browser
does), and the server's resident memory (VmRSS) before, during and after the sequential run. tests/test_load.py runs a small version.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file

from ..data import REPO_ROOT

REPO = REPO_ROOT
IMAGE = REPO / "assets" / "hm-0816591001.jpg"
TEXT = "Dingo tee TVP. T-shirt in soft cotton jersey with a round, rib-trimmed neckline."
MODEL = "hm-articles"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def predict_once(client: Client, text: str = TEXT) -> float:
    """Seconds for one /predict call; raises when the prediction is not a full result."""
    start = time.perf_counter()
    prediction = client.predict(handle_file(str(IMAGE)), text, MODEL, api_name="/predict")[0]
    seconds = time.perf_counter() - start
    if not prediction or not all(0 < task["confidence"] <= 1 for task in prediction.values()):
        raise RuntimeError(f"bad prediction: {prediction!r}")
    return seconds


HTTP_TIMEOUT = 120  # s, each upload, queue join and download (httpx's default of 5 s is shorter than a burst's queue)


def concurrent(url: str, n: int) -> tuple[list[float], list[str]]:
    """`n` /predict calls at once, each from its own client (its own session, as n users);
    returns the latencies of the successful calls and the errors."""
    clients = [Client(url, verbose=False, httpx_kwargs={"timeout": HTTP_TIMEOUT}) for _ in range(n)]

    def one(i: int) -> float | str:
        try:
            return predict_once(clients[i], f"{TEXT} #{i}")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            return f"{exc.__class__.__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    return [r for r in results if isinstance(r, float)], [r for r in results if isinstance(r, str)]


def sequential(url: str, n: int, pid: int | None, every: int = 50, probe=None) -> dict:
    """`n` /predict calls in a row from one client; the server's RSS (and `probe()`, if given)
    sampled before the first and every `every` calls."""
    client = Client(url, verbose=False)
    for _ in range(3):  # warm-up: first-call allocations are not growth
        predict_once(client)
    samples, probes, latencies = [], [], []
    for i in range(n + 1):
        if i:
            latencies.append(predict_once(client, f"{TEXT} #{i % 7}"))
        if i % every == 0 or i == n:
            if pid:
                samples.append((i, rss_mb(pid)))
            if probe:
                probes.append((i, probe()))
    return {"latencies": latencies, "rss": samples, "probes": probes}


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies)
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "max": float(values.max()), "mean": float(values.mean())}


def start_app(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`python app.py` (the checkpoints in checkpoints/) on a free port with its own data folder;
    returns (process, url) once it answers."""
    from app import free_port  # the lab sits on top of the app (run from the repository's root)

    port = free_port("127.0.0.1")
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "CMA_CLIP_STUDIO_DIR": str(data_dir), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = open(data_dir / "app.log", "w")  # noqa: SIM115 - the app's output, kept for inspection
    process = subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}; see {data_dir / 'app.log'}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not answer within 180 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--url", help="an app already running (default: start `python app.py`)")
    parser.add_argument("--pid", type=int, help="the running app's process id, for its memory")
    args = parser.parse_args(argv)
    process = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="load-test-"))
        process, url = start_app(data_dir)
        pid = process.pid
        print(f"app: {url} (pid {pid}, data in {data_dir})")
    try:
        client = Client(url, verbose=False)
        predict_once(client)  # loads the model
        print(f"server RSS after start and one prediction: {rss_mb(pid):.0f} MB" if pid else "")
        start = time.perf_counter()
        latencies, errors = concurrent(url, args.concurrent)
        wall = time.perf_counter() - start
        stats = percentiles(latencies) if latencies else {}
        print(f"{args.concurrent} concurrent /predict: {len(latencies)} ok, {len(errors)} errors in {wall:.1f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in stats.items()))
        for error in errors[:5]:
            print("  error:", error)
        if not args.sequential:
            return 1 if errors else 0
        result = sequential(url, args.sequential, pid)
        stats = percentiles(result["latencies"])
        print(f"{args.sequential} sequential /predict: " + ", ".join(f"{k} {v:.2f} s" for k, v in stats.items()))
        if result["rss"]:
            print("server RSS (MB) after N requests: " + ", ".join(f"{n}: {mb:.0f}" for n, mb in result["rss"]))
            first, last = result["rss"][0][1], result["rss"][-1][1]
            print(f"memory: {first:.0f} MB before, {last:.0f} MB after {args.sequential} requests "
                  f"({last - first:+.0f} MB), peak {max(mb for _, mb in result['rss']):.0f} MB")
        return 1 if errors else 0
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
