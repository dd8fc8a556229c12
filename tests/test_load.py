"""The small version of `python -m cma_clip.lab.load_test` (50 concurrent, then 500 in a row; figures in
docs/RELIABILITY.md): /predict through the Gradio queue of the running app."""
import gc
import os

import torch
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT
from matplotlib.figure import Figure
from PIL import Image

from gradio_client import Client, handle_file

from cma_clip.predict import Prediction
from cma_clip.lab.load_test import concurrent, percentiles, sequential

KINDS = {"Prediction": Prediction, "Figure": Figure, "PIL image": Image.Image, "tensor": torch.Tensor}


def live_objects() -> dict[str, int]:
    """How many predictions, figures, images and tensors are alive: what a leak per request would pile up."""
    gc.collect()
    counts = dict.fromkeys(KINDS, 0)
    for obj in gc.get_objects():
        for name, kind in KINDS.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


def test_fifty_concurrent_predicts_through_the_queue_all_succeed(running_app):
    url, _ = running_app
    latencies, errors = concurrent(url, 50)
    assert errors == [] and len(latencies) == 50
    stats = percentiles(latencies)
    print(f"50 concurrent /predict: p50 {stats['p50']:.2f} s, p95 {stats['p95']:.2f} s")
    assert stats["p95"] < 300


def test_each_call_gets_image_files_of_its_own(running_app):
    """The same item predicted twice (and redrawn after each) shows the same map, but each in a
    file of its own: a file shared by calls was rewritten while another client downloaded it."""
    url, _ = running_app
    client = Client(url, verbose=False, download_files=False)
    paths = []
    for _ in range(2):
        outputs = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles", "",
                                 api_name="/predict")
        paths.append(outputs[4]["path"])  # the image map
    assert paths[0] != paths[1] and all("/outputs/" in p for p in paths), paths


def test_thirty_predicts_in_a_row_keep_memory_flat(running_app):
    url, _ = running_app
    result = sequential(url, 30, os.getpid(), every=10, probe=live_objects)  # the app runs in this process
    rss = [mb for _, mb in result["rss"]]
    objects = [counts for _, counts in result["probes"]]
    print("RSS (MB) after 0, 10, 20, 30 requests:", [round(mb) for mb in rss], "live objects:", objects)
    assert len(result["latencies"]) == 30
    for name in KINDS:  # nothing accumulates per request (a few per live session are fine)
        assert objects[-1][name] - objects[1][name] <= 3, (name, objects)
    assert rss[-1] - rss[1] < 100  # no large leak: under 5 MB a request between the 10th and the 30th
