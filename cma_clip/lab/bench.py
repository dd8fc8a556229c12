"""Benchmarks: latency, the app's /predict, feature-cache and training throughput, batch prediction,
and how fast the studio answers (start-up, concurrent clients, review queues: `studio_speed`).

    python -m cma_clip.bench                        # the full run (about 5 minutes on 2 CPU cores)
    python -m cma_clip.bench --quick --out-json /tmp/bench.json   # a smoke run on tiny sizes

Every figure is the median of repeated runs after a warm-up; the repeats are in the JSON
(`settings`) and in the printed table. Results and how to read them: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..backbones import DualEncoder, create_backbone
from ..checkpoint import read_config
from ..data import REPO_ROOT, Catalogue, CatalogueConfig, load_image, read_manifest, write_table
from ..features import extract_features, image_batches
from ..model import CMAClip
from ..predict import Predictor
from ..runtime import autocast, bf16_supported, decode_threads, resolve_device, loader_workers
from ..train import TrainConfig, train
from . import studio_speed
from .studio_speed import CHECKPOINTS, EXAMPLE_IMAGE, EXAMPLE_TEXT, MODEL, interleaved, p50, p95, timed

OPEN_CLIP = "open_clip:ViT-B-32"

# targets from issues 7 and 17: (figure path, comparison, bound)
TARGETS = {
    "fusion_overhead": ("latency_bundled.fusion_ratio", "<=", 1.15),
    "app_predict_p50": ("app_predict.p50_s", "<=", 0.5),
    "app_vs_predictor": ("app_predict.ratio", "<=", 2.5),
    "first_vs_warm": ("startup.ratio", "<=", 2.0),
    "concurrent_vs_sequential": ("concurrency.ratio", ">=", 1.5),
    "review_open_seconds": ("review.open_s", "<=", 5.0),
    "cache_vs_backbone": ("feature_cache.ratio", ">=", 0.9),
    "train_epoch_seconds": ("training.epoch_seconds", "<=", 60.0),
    # issue 17: batch prediction hides the decoding behind the model, in one process and on Ray
    "batch_prediction_vs_backbone": ("batch_prediction.ratio", ">=", 0.9),
    "ray_steady_vs_backbone": ("batch_prediction.ray_ratio", ">=", 0.9),
}


@dataclass
class Sizes:
    """How much each figure measures; `warmup` runs are discarded before `repeats` timed ones."""

    warmup: int = 3
    latency_repeats: int = 30
    app_calls: int = 30
    cache_items: int = 1024  # 16 batches: the decode worker's start and the first batch weigh little
    cache_repeats: int = 3
    cache_added: int = 16  # items a second catalogue adds to the first (uploads given to `train --extra-labels`)
    manifest_items: int = 256
    manifest_batch: int = 32
    manifest_repeats: int = 5
    ray_runs: int = 3  # each after a one-batch warm-up run, with the backbone alone timed right before and after it
    train_limit: int | None = None  # items per split; None: the whole fashion catalogue
    train_epochs: int = 2  # the first is the warm-up
    batch_size: int = 256
    start_calls: int = 10  # warm /predict calls after the first
    clients: int = 16
    client_rounds: int = 2  # calls per concurrent client; as many in a row
    client_repeats: int = 3  # the two ways timed alternately this many times
    review_items: int = 2000
    review_limit: int | None = None  # items per split of the catalogue; None: all of it
    live_items: int = 48  # a queue predicted the old way, for scale


FULL = Sizes()
QUICK = Sizes(warmup=1, latency_repeats=3, app_calls=2, cache_items=8, cache_repeats=1, cache_added=2,
              manifest_items=16, manifest_batch=4, manifest_repeats=1, ray_runs=1, train_limit=24, train_epochs=2,
              start_calls=2, clients=4, client_rounds=1, client_repeats=1, review_items=16, review_limit=24,
              live_items=4)


# ----------------------------------------------------------------------------- timing helpers

# ----------------------------------------------------------------------------- 1. latency at batch 1

def latency(predictor: Predictor, image: Image.Image, text: str, sizes: Sizes, explained: bool = True) -> dict[str, float]:
    """Batch-1 latency of `predict_batch` (and of `predict`, with attention maps and token
    relevance), and the fusion's cost: (backbone + CMA-CLIP) over backbone alone."""
    backbone, model, tokens = predictor.backbone, predictor.model, predictor.max_tokens
    colour = model.cfg.colour  # the encoding of a model that reads the colour descriptor includes it

    @torch.no_grad()
    def backbone_only():
        return backbone.encode([image], [text], tokens, colour)

    @torch.no_grad()
    def full_forward():
        feats = backbone.encode([image], [text], tokens, colour)
        with autocast(predictor.device, batch_size=1):  # as Predictor.predict_batch runs one item
            return model(feats)

    fns = {"predict": lambda: predictor.predict_batch([image], [text]), "backbone": backbone_only,
           "forward": full_forward}
    if explained:
        fns["explained"] = lambda: predictor.predict(image, text)
    times = interleaved(fns, sizes.latency_repeats, sizes.warmup)
    result = {"p50_s": p50(times["predict"]), "p95_s": p95(times["predict"]),
              "backbone_p50_s": p50(times["backbone"]), "forward_p50_s": p50(times["forward"]),
              "fusion_ratio": p50(times["forward"]) / p50(times["backbone"])}
    if explained:
        result.update(explained_p50_s=p50(times["explained"]), explained_p95_s=p95(times["explained"]))
    return result


def random_predictor(backbone_name: str, like: Predictor) -> Predictor:
    """A CMA-CLIP with random weights on another backbone, with `like`'s tasks (speed only)."""
    device = like.device
    backbone = create_backbone(backbone_name, device)
    model_cfg = replace(like.config.model, image_token_dim=backbone.image_token_dim,
                        image_pooled_dim=backbone.image_pooled_dim, text_token_dim=backbone.text_token_dim,
                        text_pooled_dim=backbone.text_pooled_dim, num_patches=backbone.num_patches)
    model = CMAClip(model_cfg).to(device).eval()
    return Predictor(model, replace(like.config, backbone=backbone_name, model=model_cfg), backbone)


# ----------------------------------------------------------------------------- 3. feature-cache build

def cache_throughput(backbone: DualEncoder, sizes: Sizes) -> dict[str, float]:
    """`extract_features` into a fresh cache folder vs. the backbone alone on pre-decoded
    tensors of the same batches (the extraction's default batch size and decode workers); and
    the entry of a catalogue with `sizes.cache_added` items more, built beside the first one's
    (it copies the shared rows), vs. built alone."""
    config = CatalogueConfig.load("hm-articles")
    catalogue = Catalogue.open(config, limit=sizes.cache_items)
    whole = Catalogue.open(config)
    more = replace(catalogue, rows=[*catalogue.rows, *whole.rows[len(whole.rows) - sizes.cache_added:]])
    tokens, batch, device = catalogue.config.max_text_tokens, 64, backbone.device
    paths, texts = catalogue.image_paths(), catalogue.texts()
    batches = []
    for start in range(0, len(paths), batch):
        pixels = backbone.preprocess([load_image(p) for p in paths[start:start + batch]]).to(device)
        text = backbone.tokenize(texts[start:start + batch], tokens)
        batches.append((pixels, text.to(device)))

    @torch.no_grad()
    def backbone_only():
        for pixels, text in batches:
            backbone(pixels, text)

    def build(items: Catalogue = catalogue):
        with tempfile.TemporaryDirectory(prefix="cma-bench-cache-") as folder:
            extract_features(backbone, items, folder, batch_size=batch, progress=False)

    times = interleaved({"build": build, "backbone": backbone_only, "more_alone": lambda: build(more)},
                        sizes.cache_repeats, 1)
    with tempfile.TemporaryDirectory(prefix="cma-bench-cache-") as folder:
        extract_features(backbone, catalogue, folder, batch_size=batch, progress=False)
        first = next((Path(folder) / "features").iterdir())
        times["more_beside"] = []
        for _ in range(1 + sizes.cache_repeats):  # the first run is the warm-up
            for entry in (Path(folder) / "features").iterdir():
                if entry != first:
                    shutil.rmtree(entry)
            times["more_beside"].append(timed(lambda: extract_features(backbone, more, folder, batch_size=batch,
                                                                       progress=False)))
        del times["more_beside"][0]
    n = len(catalogue)
    build_rate, backbone_rate = n / p50(times["build"]), n / p50(times["backbone"])
    beside = p50(times["more_beside"])
    return {"items": n, "build_items_per_s": build_rate, "backbone_items_per_s": backbone_rate,
            "ratio": build_rate / backbone_rate, "decode_workers": loader_workers(device) or decode_threads(),
            "decode_in_threads": int(loader_workers(device) == 0), "added_items": sizes.cache_added,
            "more_alone_s": p50(times["more_alone"]), "more_beside_s": beside,
            "reuse_speedup": p50(times["more_alone"]) / beside}


# ----------------------------------------------------------------------------- 4. training

def training(sizes: Sizes) -> dict[str, float]:
    """CMA-CLIP epochs on the fashion catalogue's cached features via `cma_clip.train`:
    epoch seconds (median over the epochs after the first) and train items per second."""
    with tempfile.TemporaryDirectory(prefix="cma-bench-train-") as tmp:
        config = TrainConfig(catalogue="fashion-product-images", epochs=sizes.train_epochs, align_epochs=1,
                             batch_size=sizes.batch_size, out=str(Path(tmp) / "ckpt"), quiet=True)
        if sizes.train_limit:  # a small catalogue: its own features, in a throwaway cache
            config = replace(config, limit=sizes.train_limit, cache_dir=str(Path(tmp) / "cache"))
        log = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            train(config)
        run_seconds = time.perf_counter() - started
        history = read_config(config.out).training["history"]
    catalogue = Catalogue.open(CatalogueConfig.load("fashion-product-images"), split="train", limit=sizes.train_limit)
    n_train = len(catalogue)
    items = min(n_train, max(1, n_train // sizes.batch_size) * sizes.batch_size)  # full batches, as train does
    seconds = [h["seconds"] for h in history]
    timed_epochs = seconds[1:] or seconds
    epoch = p50(timed_epochs)
    return {"epoch_seconds": epoch, "items_per_s": items / epoch, "train_items": n_train, "items_per_epoch": items,
            "batch_size": sizes.batch_size, "first_epoch_seconds": seconds[0], "epochs_timed": len(timed_epochs),
            "run_seconds": run_seconds}


# ----------------------------------------------------------------------------- 5. batch prediction

def manifest_throughput(predictor: Predictor, sizes: Sizes) -> dict[str, float]:
    """Batch prediction over a CSV of H&M items (images copied beside it) in one process
    (`Predictor.predict_manifest`) and on a local Ray (`--engine ray`), against the backbone
    alone on the same batches pre-decoded to tensors (what the decoding must hide behind)."""
    config = CatalogueConfig.load("hm-articles")
    source = Path(config.manifest).parent
    rows = read_manifest(config.manifest)[:sizes.manifest_items]
    columns = [config.id_column, config.image_column, *config.text_columns]
    batch, backbone, n = sizes.manifest_batch, predictor.backbone, len(rows)
    with tempfile.TemporaryDirectory(prefix="cma-bench-manifest-") as tmp:
        folder = Path(tmp)
        for row in rows:
            target = folder / row[config.image_column]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / row[config.image_column], target)
        manifest = write_table(folder / "items.csv", [{c: row[c] for c in columns} for row in rows])
        catalogue = Catalogue.open(replace(predictor.config.catalogue_on(manifest), tasks=[]))
        paths, texts = catalogue.image_paths(), catalogue.texts()
        batches = [(backbone.preprocess([load_image(p) for p in paths[i:i + batch]]),
                    backbone.tokenize(texts[i:i + batch], predictor.max_tokens)) for i in range(0, n, batch)]

        @torch.no_grad()
        def backbone_only():
            for pixels, text in batches:  # with the colour descriptor when the model reads it, as prediction does
                backbone.encode_prepared(pixels, text, predictor.model.cfg.colour)

        times = interleaved({"manifest": lambda: predictor.predict_manifest(manifest, folder / "out.jsonl", batch),
                             "backbone": backbone_only}, sizes.manifest_repeats, 1)
        figures = {"items": n, "batch_size": batch, "items_per_s": n / p50(times["manifest"]),
                   "seconds": p50(times["manifest"]), "backbone_items_per_s": n / p50(times["backbone"])}
        figures["ratio"] = figures["items_per_s"] / figures["backbone_items_per_s"]
        if predictor.device.type == "cpu":
            figures.update(cpu_bound(predictor, paths, batches, backbone_only, p50(times["backbone"]), sizes))
        warmup = write_table(folder / "warmup.csv", [{c: row[c] for c in columns} for row in rows[:batch]])
        ray_runs = []
        for _ in range(sizes.ray_runs):
            # each run's own reference, timed right before and right after it (a shared machine's
            # load drifts in minutes; drift in either direction weighs on both sides alike)
            before = timed(backbone_only)
            run_figures = _ray_throughput(manifest, warmup, folder / "out.parquet", batch)
            after = timed(backbone_only)
            run_figures["backbone_around_ray_items_per_s"] = 2 * n / (before + after)
            run_figures["ray_ratio"] = run_figures["ray_steady_items_per_s"] / run_figures["backbone_around_ray_items_per_s"]
            ray_runs.append(run_figures)
    median_run = sorted(ray_runs, key=lambda r: r["ray_ratio"])[len(ray_runs) // 2]
    figures.update(median_run)  # the run with the median ratio, and every run's ratio
    figures["ray_ratios"] = [r["ray_ratio"] for r in ray_runs]
    return figures


def cpu_bound(predictor: Predictor, paths: list[Path], batches: list, backbone_only: Callable[[], Any],
              backbone_seconds: float, sizes: Sizes) -> dict[str, Any]:
    """The highest batch-prediction ratio these cores allow: on a CPU, decoding and the fusion run
    on the cores the backbone uses, so at best every core is busy and the run takes the CPU time of
    backbone, decoding and model together over the cores. Each part's process CPU time (all its
    threads) is measured alone, median of `manifest_repeats` after one warm-up."""
    backbone, model = predictor.backbone, predictor.model
    with torch.no_grad():
        encoded = [backbone.encode_prepared(pixels, text, model.cfg.colour) for pixels, text in batches]

    @torch.no_grad()
    def model_only():
        for feats in encoded:
            with autocast(predictor.device, batch_size=len(feats.text_mask)):  # as `Predictor.score_prepared`
                model(feats)

    def cpu_seconds(fn: Callable[[], Any]) -> float:
        fn()
        spent = []
        for _ in range(sizes.manifest_repeats):
            started = time.process_time()
            fn()
            spent.append(time.process_time() - started)
        return p50(spent)

    spent = {"backbone_cpu_s": cpu_seconds(backbone_only),
             "decoding_cpu_s": cpu_seconds(lambda: list(image_batches(paths, backbone, sizes.manifest_batch))),
             "model_cpu_s": cpu_seconds(model_only)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shortest = sum(spent.values()) / cores  # the least wall time that CPU work can take
    return {**spent, "cores_available": cores, "bound_ratio": backbone_seconds / max(backbone_seconds, shortest)}


def _ray_throughput(manifest: Path, warmup: Path, out: Path, batch: int) -> dict[str, float]:
    """One `--engine ray` run on a local Ray with this machine's cores, after a one-batch run of
    `warmup` that starts Ray Data's own actors (statistics, autoscaling coordinator, actor
    locations: about 6 s of CPU at their start, measured on 2 cores, then under 0.1 core; a
    catalogue of millions pays it once). Figures: end to end (starting the model actor and
    loading the model in it included) and steady: the inference stage's rows over its wall
    time, from its first batch's start to its last one's end (Ray Data's operator throughput;
    decoding that failed to keep up shows in it, the actors' start does not)."""
    import ray

    from ..ray_predict import RayOptions, predict_manifest_ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        stages: dict[str, float] = {}

        def inference_rate(dataset) -> None:
            for stage in dataset._get_stats_summary().operators_stats:  # pinned ray 2.60.0
                stages[stage.operator_name] = stage.num_rows_per_s

        predict_manifest_ray(CHECKPOINTS / MODEL, warmup, out, RayOptions(batch_size=batch))
        started = time.perf_counter()
        n = predict_manifest_ray(CHECKPOINTS / MODEL, manifest, out, RayOptions(batch_size=batch),
                                 on_finish=inference_rate)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    steady = next(rate for name, rate in stages.items() if "_Infer" in name)
    return {"ray_items_per_s": n / seconds, "ray_seconds": seconds, "ray_steady_items_per_s": steady}


# ----------------------------------------------------------------------------- the run

def hardware() -> dict[str, Any]:
    """CPU model, cores, torch version and whether bf16 autocast is on."""
    model = platform.processor() or "unknown"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    device = resolve_device()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "bf16_autocast": bf16_supported(device),
            "load_average_1m": os.getloadavg()[0]}  # other processes sharing the cores skew every figure


def lookup(figures: dict, path: str) -> float:
    section, key = path.split(".")
    return figures[section][key]


SECTIONS = ("latency", "app", "startup", "concurrency", "review", "cache", "manifest", "training")


def run(sizes: Sizes, log: Callable[[str], None] = print, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """The figures of `sections`; returns the JSON document."""
    device = resolve_device()
    load_before = os.getloadavg()[0]
    image = load_image(EXAMPLE_IMAGE)
    figures: dict[str, dict] = {}
    predictor = Predictor.from_checkpoint(CHECKPOINTS / MODEL, device)
    if "latency" in sections:
        log("latency: bundled backbone (checkpoints/hm-articles)")
        figures["latency_bundled"] = latency(predictor, image, EXAMPLE_TEXT, sizes)
        log(f"latency: {OPEN_CLIP} (random weights)")
        other = random_predictor(OPEN_CLIP, predictor)
        figures["latency_open_clip"] = latency(other, image, EXAMPLE_TEXT, sizes, explained=False)
        del other
    if "app" in sections:
        log("app: /predict end to end against Predictor.predict")
        figures["app_predict"] = studio_speed.app_latency(predictor, sizes.app_calls, sizes.warmup)
    if "startup" in sections:
        log("start-up: the first /predict after the server runs, in a fresh process")
        figures["startup"] = studio_speed.startup(sizes.start_calls)
    if "concurrency" in sections:
        log(f"concurrency: {sizes.clients} clients at once against calls in a row")
        figures["concurrency"] = studio_speed.concurrency(sizes.clients, sizes.client_rounds, sizes.client_repeats)
    if "review" in sections:
        log(f"review: a queue of {sizes.review_items} catalogue items from kept predictions")
        figures["review"] = studio_speed.review_queue(sizes.review_items, limit=sizes.review_limit,
                                                      live_items=sizes.live_items)
    if "cache" in sections:
        log("feature cache build vs backbone")
        figures["feature_cache"] = cache_throughput(predictor.backbone, sizes)
    if "manifest" in sections:
        log("batch prediction over a manifest")
        figures["batch_prediction"] = manifest_throughput(predictor, sizes)
    if "training" in sections:
        log("training on cached features (fashion-product-images)")
        figures["training"] = training(sizes)
    targets = {}
    for name, (path, op, bound) in TARGETS.items():
        if path.split(".")[0] not in figures:
            continue
        value = lookup(figures, path)
        targets[name] = {"figure": path, "value": value, "target": f"{op} {bound}",
                         "met": value <= bound if op == "<=" else value >= bound}
    machine = {**hardware(), "load_average_1m_before": load_before}
    return {"hardware": machine, "settings": asdict(sizes), "figures": figures, "targets": targets}


def _latency_rows(section: dict, name: str, repeats: int) -> list[tuple[str, str, str]]:
    rows = [(f"predict_batch, batch 1, {name}: p50 / p95",
             f"{section['p50_s'] * 1e3:.1f} / {section['p95_s'] * 1e3:.1f} ms", f"{repeats} runs")]
    if "explained_p50_s" in section:
        rows.append((f"predict (attention + relevance), {name}: p50 / p95",
                     f"{section['explained_p50_s'] * 1e3:.1f} / {section['explained_p95_s'] * 1e3:.1f} ms",
                     f"{repeats} runs"))
    rows += [("  backbone alone / backbone + CMA-CLIP, p50",
              f"{section['backbone_p50_s'] * 1e3:.1f} / {section['forward_p50_s'] * 1e3:.1f} ms", ""),
             ("  fusion ratio" + (" (target <= 1.15)" if name == "bundled" else ""), f"{section['fusion_ratio']:.3f}",
              "")]
    return rows


def format_table(doc: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    f, s = doc["figures"], doc["settings"]
    rows: list[tuple[str, str, str]] = []
    if "latency_bundled" in f:
        rows += _latency_rows(f["latency_bundled"], "bundled", s["latency_repeats"])
        rows += _latency_rows(f["latency_open_clip"], "ViT-B-32 random", s["latency_repeats"])
    rows += studio_speed.table_rows(f)
    if "feature_cache" in f:
        cache = f["feature_cache"]
        rows += [("feature cache build / backbone alone",
                  f"{cache['build_items_per_s']:.1f} / {cache['backbone_items_per_s']:.1f} items/s",
                  f"{cache['items']} items, {s['cache_repeats']} runs, {cache['decode_workers']} decode "
                  f"{'threads between batches' if cache['decode_in_threads'] else 'worker processes'}"),
                 ("  ratio (target >= 0.9)", f"{cache['ratio']:.3f}", ""),
                 (f"  {cache['items']} + {cache['added_items']} items: built alone / beside the first "
                  f"{cache['items']}'s", f"{cache['more_alone_s']:.2f} / {cache['more_beside_s']:.2f} s",
                  f"{cache['reuse_speedup']:.1f}x faster")]
    if "training" in f:
        train = f["training"]
        rows += [("training on cached features, batch 256", f"{train['items_per_s']:.0f} items/s",
                  f"{train['items_per_epoch']} items/epoch"),
                 (f"  one epoch of {train['train_items']} fashion train items (target <= 60 s for 32000)",
                  f"{train['epoch_seconds']:.1f} s", f"median of {train['epochs_timed']} epochs")]
    if "batch_prediction" in f:
        batch = f["batch_prediction"]
        rows += [("batch prediction over a manifest / backbone alone",
                  f"{batch['items_per_s']:.1f} / {batch['backbone_items_per_s']:.1f} items/s",
                  f"{batch['items']} items, batch {batch['batch_size']}, {s['manifest_repeats']} runs"),
                 ("  ratio (target >= 0.9)", f"{batch['ratio']:.3f}", ""),
                 *([("  at most, every core busy: (backbone + decoding + model CPU time) / cores",
                     f"{batch['bound_ratio']:.3f}",
                     f"{batch['backbone_cpu_s']:.2f} + {batch['decoding_cpu_s']:.2f} + {batch['model_cpu_s']:.2f} s "
                     f"over {batch['cores_available']} cores")]
                   if "bound_ratio" in batch else []),
                 ("  on Ray: end to end / inference stage / backbone alone around it",
                  f"{batch['ray_items_per_s']:.1f} / {batch['ray_steady_items_per_s']:.1f} / "
                  f"{batch['backbone_around_ray_items_per_s']:.1f} items/s",
                  f"the median run of {s['ray_runs']} (model actor's start-up in the first)"),
                 ("  Ray inference stage / backbone alone (target >= 0.9)", f"{batch['ray_ratio']:.3f}",
                  "runs: " + ", ".join(f"{r:.3f}" for r in batch["ray_ratios"]))]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'figure':<{width}}  {'value':>{vwidth}}  repeats", "-" * (width + vwidth + 20)]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows]
    h = doc["hardware"]
    lines.append("")
    lines.append(f"{h['cpu']}, {h['cores']} cores, torch {h['torch']} ({h['torch_threads']} threads), "
                 f"device {h['device']}" + (f" ({h['gpu']})" if h["gpu"] else "")
                 + f", bf16 autocast {'on' if h['bf16_autocast'] else 'off'}; "
                 f"warm-up {s['warmup']} runs; load average {h['load_average_1m_before']:.2f} before, "
                 f"{h['load_average_1m']:.2f} after")
    lines += [f"target {name}: {t['value']:.3f} {t['target']} -> {'met' if t['met'] else 'MISSED'}"
              for name, t in doc["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.bench",
                                     description="Benchmark CMA-CLIP: latency, app, feature cache, training.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not figures to report")
    parser.add_argument("--out-json", help="where to write the figures (default: docs/bench.json for a full run; "
                                           "a --quick or partial run writes JSON only when given this)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which figures to measure (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    doc = run(QUICK if args.quick else FULL, log=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
              sections=tuple(args.sections))
    doc["total_seconds"] = time.perf_counter() - started
    doc["command"] = "python -m cma_clip.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(doc))
    full = not args.quick and set(args.sections) == set(SECTIONS)
    out = Path(args.out_json) if args.out_json else (REPO_ROOT / "docs" / "bench.json" if full else None)
    if out is not None:  # a smoke or partial run never replaces the reported figures unasked
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{doc['total_seconds']:.0f} s in all; " + (f"JSON written to {out}" if out else "no JSON (give --out-json)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
