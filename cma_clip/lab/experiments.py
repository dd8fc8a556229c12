"""Reproduce the paper's three kinds of evidence on our catalogues: CMA-CLIP against
baselines, its ablations, and its robustness to noisy images and texts.

    python -m cma_clip.experiments                  # both catalogues, seeds 0 1 2 -> docs/results
    python -m cma_clip.experiments --catalogues hm-articles --seeds 0 --epochs 2 --report /tmp/study

Every method is trained by `cma_clip.train` with one recipe on the same frozen features,
splits and tasks; options this command does not know go to `cma_clip.train` unchanged
(`-- --width 64`). Per seed the CLIP-style alignment is trained once, with CMA-CLIP, and
every other method starts from it (`--align-from`), so all of them see the same aligned
embeddings; zero-shot ("raw CLIP") classifies by label prompts in that space. Runs are kept
under --runs and skipped when complete: an interrupted study goes on where it stopped, and a
second call only re-reports.

Noise: a seeded sample of `test` is encoded clean and with image and text corruptions at
severities 1-5 (item i gets corruption i mod 5 of each kind, with seed i), and every model is
scored with noisy images, noisy texts and both.

Writes to --report: results.json (every figure), TABLES.md, noise-<catalogue>.png and
modality-<catalogue>.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from .. import train
from ..backbones import DualEncoder
from ..checkpoint import TRAIN_STATE, CheckpointConfig, load_backbone, load_checkpoint, read_config, unfinished
from ..data import Catalogue, CatalogueConfig
from ..errors import CMAClipError
from ..evaluate import (evaluate_checkpoint, predict_probabilities, rescore, score, task_targets,
                        zero_shot_probabilities_for)
from ..features import FEATURE_FIELDS, Features, encode_items
from ..metrics import METRIC_NAMES
from ..model import IMAGE_SIDE, Classifier, CMAOutput
from ..noise import IMAGE_CORRUPTIONS, SEVERITIES, TEXT_CORRUPTIONS, corrupt_image, corrupt_text
from ..robustness import MODES
from ..runtime import resolve_device
from ..viz import modality_weight_curves_figure, noise_curves_figure
from .bench import hardware as machine

# table row -> run (a folder per seed); None: zero-shot with the seed's CMA-CLIP alignment
METHODS = {
    "zero-shot (raw CLIP)": None,
    "text only": "text_only",
    "image only": "image_only",
    "text tokens only (sequence-wise attention)": "text_tokens",
    "image tokens only (sequence-wise attention)": "image_tokens",
    "late fusion (heads on frozen embeddings)": "late_fusion",
    "w/o both attentions": "no_attention",
    "w/o sequence-wise attention": "no_sequence_attention",
    "w/o modality-wise attention": "no_modality_attention",
    "CMA-CLIP w/o lexical channel": "cma_no_lexical",
    "CMA-CLIP": "cma",
}
# the training settings of a run; by default its name is the fusion (cma_clip.model.FUSIONS)
RUN_SETTINGS = {"cma_no_lexical": {"fusion": "cma", "lexical_buckets": 0}}
CATALOGUES = ("fashion-product-images", "hm-articles")
# Training epochs of every method, per catalogue: fashion has four times H&M's items, so 6 epochs
# are 750 optimiser steps (H&M: 10 epochs, 310 steps); the shipped fashion run's validation
# recall@90%P was 0.912 at epoch 6 and 0.916 at its best (epoch 13 of 15).
EPOCHS = {"fashion-product-images": 6, "hm-articles": 10}
IMAGE_NOISES, TEXT_NOISES = list(IMAGE_CORRUPTIONS), list(TEXT_CORRUPTIONS)


@dataclass
class Study:
    catalogues: list[str]
    seeds: list[int]
    epochs: int | None  # None: EPOCHS, or 10 for other catalogues
    runs: Path
    report: Path
    noise_items: int
    data_root: str | None = None
    cache_dir: str | None = None
    train_args: tuple[str, ...] = ()
    rescore: bool = False  # recompute every stored report and the noise sample (after a metrics or noise change)

    def epochs_for(self, catalogue: str) -> int:
        return self.epochs or EPOCHS.get(catalogue, 10)

    def run_dir(self, catalogue: str, seed: int, run: str) -> Path:
        return self.runs / catalogue / f"seed-{seed}" / run


def is_complete(run: Path) -> bool:
    """A finished training run: its test report is written and no resumable state is left."""
    return (run / "eval_test.json").exists() and not unfinished(run)


def train_run(study: Study, catalogue: str, seed: int, name: str) -> None:
    run = study.run_dir(catalogue, seed, name)
    if is_complete(run):
        return
    config = replace(train.parse_config(["--out", str(run), *study.train_args]), catalogue=catalogue, seed=seed,
                     epochs=study.epochs_for(catalogue), quiet=True, data_root=study.data_root,
                     cache_dir=study.cache_dir, resume=(run / TRAIN_STATE).exists(),
                     **RUN_SETTINGS.get(name, {"fusion": name}))
    if name != "cma":
        config = replace(config, align_from=str(study.run_dir(catalogue, seed, "cma")))
    print(f"[study] train {catalogue} seed {seed} {name}", file=sys.stderr, flush=True)
    train.train(config)


def train_seconds(run: Path) -> float:
    """A run's training time from its checkpoint: its epochs' and its alignment's, so a run
    that was stopped and resumed counts every epoch once."""
    training = read_config(run).training
    return round(sum(epoch["seconds"] for epoch in training["history"]) + training.get("align_seconds", 0.0), 2)


def forget_scores(study: Study, catalogue: str, runs: list[str]) -> None:
    """Rescore every run's test report from its checkpoint and drop the stored zero-shot and
    noise scores and noise features, which the report then computes anew."""
    for seed in study.seeds:
        for name in runs:
            run = study.run_dir(catalogue, seed, name)
            print(f"[study] rescore {catalogue} seed {seed} {name}", file=sys.stderr, flush=True)
            rescore(run, study.data_root, study.cache_dir)
            for stored in [*run.glob("noise-*.json"), run / "zero_shot_test.json"]:
                stored.unlink(missing_ok=True)
    for folder in (study.runs / catalogue).glob("noise-*"):
        shutil.rmtree(folder)


def test_report(study: Study, catalogue: str, seed: int, name: str | None) -> dict:
    """The test report of one method and seed (zero-shot: computed once and kept)."""
    run = study.run_dir(catalogue, seed, name or "cma")
    if name is not None:
        return json.loads((run / "eval_test.json").read_text())
    path = run / "zero_shot_test.json"
    if not path.exists():
        config = CatalogueConfig.load(catalogue, study.data_root)
        report = evaluate_checkpoint(run, config.manifest, "test", study.cache_dir, zero_shot=True)
        path.write_text(json.dumps(report, indent=2))
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- noise


def noise_sample(catalogue: Catalogue, items: int, seed: int = 0) -> Catalogue:
    """A seeded sample of at most `items` rows, in manifest order."""
    chosen = np.random.default_rng(seed).choice(len(catalogue), min(items, len(catalogue)), replace=False)
    return catalogue.take(sorted(chosen))


def _corrupt_item(image: Image.Image, index: int, severity: int) -> Image.Image:
    """Item `index`'s image noise: corruption `index` mod 5, seeded by the index."""
    return corrupt_image(image, IMAGE_NOISES[index % len(IMAGE_NOISES)], severity, index)


STORED_DTYPES = {"text_mask": np.bool_, "text_ids": np.int32}  # the other fields are kept as float16


def encode_noisy(backbone: DualEncoder, sample: Catalogue, severity: int,
                 batch_size: int = 32) -> dict[str, np.ndarray]:
    """Backbone features of the sample with images and texts corrupted at `severity` (0: clean)."""
    fields = (*FEATURE_FIELDS, "text_ids", "colour")
    texts = [corrupt_text(text, TEXT_NOISES[i % len(TEXT_NOISES)], severity, i)
             for i, text in enumerate(sample.texts())]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    for _, out in encode_items(backbone, sample.image_paths(), texts, sample.config.max_text_tokens, batch_size,
                               transform=partial(_corrupt_item, severity=severity), colour=True):
        for name in fields:
            parts[name].append(getattr(out, name).cpu().numpy())
    return {name: np.concatenate(chunks).astype(STORED_DTYPES.get(name, np.float16))
            for name, chunks in parts.items()}


def noisy_features(study: Study, backbone: DualEncoder, sample: Catalogue) -> dict[int, dict[str, np.ndarray]]:
    """Severity -> features of the noise sample, cached under the runs folder."""
    folder = study.runs / sample.config.name / f"noise-{len(sample)}"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for severity in SEVERITIES:
        path = folder / f"severity-{severity}.npz"
        if not path.exists():
            print(f"[study] encode {sample.config.name} noise severity {severity}", file=sys.stderr, flush=True)
            arrays = encode_noisy(backbone, sample, severity)
            np.savez(folder / "partial.npz", **arrays)
            (folder / "partial.npz").rename(path)
        with np.load(path) as stored:
            out[severity] = dict(stored)
    return out


def condition(features: dict[int, dict[str, np.ndarray]], image_severity: int, text_severity: int) -> Features:
    """The sample's images at one severity and its texts at another (0: clean)."""
    image, text = features[image_severity], features[text_severity]
    return Features(image_tokens=image["image_tokens"], image_pooled=image["image_pooled"],
                    text_tokens=text["text_tokens"], text_mask=text["text_mask"],
                    text_pooled=text["text_pooled"], text_ids=text["text_ids"])


def noise_scores(model: Classifier, config: CheckpointConfig, sample: Catalogue, features: dict[int, dict[str, np.ndarray]],
                 backbone: DualEncoder | None = None) -> dict:
    """mode -> severity -> {"mean": metrics, "image_weight": task -> mean image weight,
    "image_weight_item_std": task -> its standard deviation over items, "cross_attention": mean
    share of the image [CLS]'s last-layer attention on the text part ("image_cls_on_text") and
    of the text [CLS]'s on the image part ("text_cls_on_image")}.
    With `backbone`, the zero-shot classifier of the model's alignment is scored instead."""
    targets = task_targets(config, sample)
    classes = config.classes
    scored: dict[tuple[int, int], dict] = {}  # (image, text) severity -> scores; severity 0 is shared by the modes
    out: dict[str, dict[int, dict]] = {}
    for mode in MODES:
        out[mode] = {}
        for severity in SEVERITIES:
            key = (severity if mode in ("image", "both") else 0, severity if mode in ("text", "both") else 0)
            if key not in scored:
                scored[key] = _score_inputs(model, classes, targets, condition(features, *key), backbone)
            out[mode][severity] = scored[key]
    return out


def _score_inputs(model: Classifier, classes: dict[str, list[str]], targets: dict[str, np.ndarray],
                  inputs: Features, backbone: DualEncoder | None) -> dict:
    """One condition's entry of `noise_scores`."""
    weights: dict[str, list[np.ndarray]] = {task: [] for task in classes}
    image_side = [m for m, name in enumerate(model.modalities) if name in IMAGE_SIDE]
    cross: dict[str, list[np.ndarray]] = {"image_cls_on_text": [], "text_cls_on_image": []}

    def gather(output: CMAOutput) -> None:
        for task in classes:
            weights[task].append(output.modality_weights[task][:, image_side].sum(-1).float().cpu().numpy())
        if output.attention is not None:  # sequence [text CLS, L tokens, image CLS, patches]
            maps, text_end = output.attention, output.attention.text_length + 1
            cross["image_cls_on_text"].append(maps.image_cls[:, :text_end].sum(-1).float().cpu().numpy())
            cross["text_cls_on_image"].append(maps.text_cls[:, text_end:].sum(-1).float().cpu().numpy())

    if backbone is not None:
        probabilities = zero_shot_probabilities_for(model, backbone, classes, inputs)
    else:
        probabilities = predict_probabilities(model, inputs, return_attention=model.sequence is not None,
                                              on_output=gather)
    return {"mean": score(probabilities, targets)["mean"], "image_weight": _means(weights),
            "image_weight_item_std": _means(weights, np.std), "cross_attention": _means(cross)}


def _means(parts: dict[str, list[np.ndarray]], statistic=np.mean) -> dict[str, float]:
    """`statistic` (the mean, by default) over the items of each key's batches."""
    return {key: float(statistic(np.concatenate(chunks))) for key, chunks in parts.items() if chunks}


def run_noise(study: Study, catalogue: str, seed: int, name: str | None, sample: Catalogue,
              features: dict[int, dict[str, np.ndarray]], backbone: DualEncoder) -> dict:
    """Noise scores of one method and seed, computed once and kept in its run folder."""
    run = study.run_dir(catalogue, seed, name or "cma")
    path = run / f"noise-{len(sample)}{'-zero-shot' if name is None else ''}.json"
    if not path.exists():
        model, config = load_checkpoint(run, backbone.device)
        scores = noise_scores(model, config, sample, features, backbone if name is None else None)
        path.write_text(json.dumps(scores))
    return {mode: {int(s): v for s, v in by_severity.items()}
            for mode, by_severity in json.loads(path.read_text()).items()}


# ----------------------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": len(array)}


def hardware() -> str:
    h = machine()
    device = h["gpu"] or f"{h['cpu']}, {h['cores']} cores, {h['torch_threads']} torch threads"
    return f"{device}, {'bf16 autocast' if h['bf16_autocast'] else 'float32'}, torch {h['torch']}"


def summarise(catalogue_results: dict) -> dict:
    """Means and spreads over seeds: test metrics per task and mean, noise curves, modality weights."""
    summary: dict = {"test": {}, "noise": {}, "image_weight": {}, "image_weight_item_std": {},
                     "cross_attention": {}}
    for method, seeds in catalogue_results["test"].items():
        reports = list(seeds.values())
        tasks = list(reports[0]["tasks"])
        summary["test"][method] = {
            "mean": {m: spread([r["mean"][m] for r in reports]) for m in METRIC_NAMES},
            "tasks": {t: {m: spread([r["tasks"][t][m] for r in reports]) for m in METRIC_NAMES} for t in tasks}}
    for method, seeds in catalogue_results["noise"].items():
        runs = list(seeds.values())
        summary["noise"][method] = {
            mode: {m: [spread([run[mode][s]["mean"][m] for run in runs]) for s in SEVERITIES] for m in METRIC_NAMES}
            for mode in MODES}
    cma = list(catalogue_results["noise"].get("CMA-CLIP", {}).values())
    for key in ("image_weight", "image_weight_item_std", "cross_attention") if cma else ():
        names = list(cma[0]["image"][0].get(key, {}))
        summary[key] = {mode: {name: [spread([run[mode][s][key][name] for run in cma]) for s in SEVERITIES]
                               for name in names} for mode in MODES}
    return summary


def _cell(value: dict) -> str:
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def markdown_tables(results: dict) -> str:
    """TABLES.md: every table of the study, generated from results.json."""
    lines = ["# CMA-CLIP study: generated tables", "",
             f"Generated by `{results['command']}`; values are mean ± sample standard deviation over seeds "
             f"{results['settings']['seeds']} on `test`; train time is the median over seeds of a run's epochs "
             f"and alignment. Hardware: {results['hardware']}.", ""]
    for catalogue, result in results["catalogues"].items():
        summary = result["summary"]
        lines += [f"## {catalogue}", "", "### Mean over tasks", "",
                  "| method | accuracy | macro-F1 | recall@90%P | train time (s, median) |", "|---|---|---|---|---|"]
        for method, test in summary["test"].items():
            seconds = result["seconds"].get(method)
            timing = f"{np.median(seconds):.0f}" if seconds else "-"
            lines.append(f"| {method} | " + " | ".join(_cell(test["mean"][m]) for m in METRIC_NAMES) + f" | {timing} |")
        tasks = list(next(iter(summary["test"].values()))["tasks"])
        for metric in METRIC_NAMES:
            lines += ["", f"### Per task: {metric}", "", "| method | " + " | ".join(tasks) + " |",
                      "|---|" + "---|" * len(tasks)]
            for method, test in summary["test"].items():
                lines.append(f"| {method} | " + " | ".join(_cell(test["tasks"][t][metric]) for t in tasks) + " |")
        if not summary["noise"]:
            lines.append("")
            continue
        lines += ["", f"### Under noise (mean over tasks, {result['noise_sample']} test items)", "",
                  "| method | metric | clean | " + " | ".join(f"{mode} s3 | {mode} s5" for mode in MODES) + " |",
                  "|---|---|---|" + "---|---|" * len(MODES)]
        for method, curves in summary["noise"].items():
            for metric in ("accuracy", "recall_at_90_precision"):
                cells = [f"{curves[mode][metric][s]['mean']:.3f}" for mode in MODES for s in (3, 5)]
                lines.append(f"| {method} | {metric} | {curves['image'][metric][0]['mean']:.3f} | " + " | ".join(cells)
                             + " |")
        if summary["image_weight"]:
            lines += ["", "### CMA-CLIP's image weight (modality-wise attention) under noise", "",
                      "| task | clean | std over items, clean | image noise s5 | text noise s5 | both s5 |",
                      "|---|---|---|---|---|---|"]
            for task, clean in summary["image_weight"]["image"].items():
                cells = [_cell(summary["image_weight"][mode][task][5]) for mode in MODES]
                item_std = summary["image_weight_item_std"]["image"][task][0]["mean"]
                lines.append(f"| {task} | {_cell(clean[0])} | {item_std:.3f} | " + " | ".join(cells) + " |")
        if summary["cross_attention"]:
            lines += ["", "### CMA-CLIP's cross-modal attention (last layer) under noise", "",
                      "| share of attention | clean | image noise s5 | text noise s5 | both s5 |",
                      "|---|---|---|---|---|"]
            labels = {"image_cls_on_text": "image [CLS] on the text", "text_cls_on_image": "text [CLS] on the image"}
            for key, clean in summary["cross_attention"]["image"].items():
                cells = [_cell(summary["cross_attention"][mode][key][5]) for mode in MODES]
                lines.append(f"| {labels[key]} | {_cell(clean[0])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_study(study: Study, command: str) -> dict:
    device = resolve_device()
    backbone = None
    results = {"command": command, "hardware": hardware(),
               "settings": {"seeds": study.seeds, "epochs": {c: study.epochs_for(c) for c in study.catalogues},
                            "noise_items": study.noise_items,
                            "train_args": list(study.train_args)},
               "catalogues": {}}
    # cma first: the other runs of a seed reuse its alignment
    runs = ["cma"] + [name for name in METHODS.values() if name not in (None, "cma")]
    for catalogue in study.catalogues:
        for seed in study.seeds:
            for name in runs:
                train_run(study, catalogue, seed, name)
        if study.rescore:
            forget_scores(study, catalogue, runs)
        result = {"test": {}, "noise": {}, "seconds": {}}
        for method, name in METHODS.items():
            result["test"][method] = {seed: test_report(study, catalogue, seed, name) for seed in study.seeds}
            if name is not None:
                result["seconds"][method] = [train_seconds(study.run_dir(catalogue, s, name)) for s in study.seeds]
        if study.noise_items:
            config = read_config(study.run_dir(catalogue, study.seeds[0], "cma"))
            backbone = backbone or load_backbone(study.run_dir(catalogue, study.seeds[0], "cma"), config, device)
            test = Catalogue.open(CatalogueConfig.load(catalogue, study.data_root), split="test")
            sample = noise_sample(test, study.noise_items)
            features = noisy_features(study, backbone, sample)
            result["noise_sample"] = len(sample)
            for method, name in METHODS.items():
                result["noise"][method] = {seed: run_noise(study, catalogue, seed, name, sample, features, backbone)
                                           for seed in study.seeds}
        result["summary"] = summarise(result)
        results["catalogues"][catalogue] = result
    write_report(study.report, results)
    return results


def write_report(folder: Path, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    (folder / "TABLES.md").write_text(markdown_tables(results))
    for catalogue, result in results["catalogues"].items():
        summary = result["summary"]
        if summary["noise"]:
            figure = noise_curves_figure(summary["noise"], catalogue, emphasis="CMA-CLIP")
            figure.savefig(folder / f"noise-{catalogue}.png", dpi=110)
        if summary["image_weight"]:
            figure = modality_weight_curves_figure(summary["image_weight"], catalogue)
            figure.savefig(folder / f"modality-{catalogue}.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.experiments", description=__doc__.split("\n\n")[0],
                                     epilog="Other options are passed to python -m cma_clip.train.")
    parser.add_argument("--catalogues", nargs="+", default=list(CATALOGUES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help=f"training epochs of every method (default: {EPOCHS})")
    parser.add_argument("--noise-items", type=int, default=1000, help="test items in the noise sample (0: no noise)")
    parser.add_argument("--runs", default="runs/study", help="folder of the training runs (kept; reruns skip them)")
    parser.add_argument("--report", default="docs/results", help="folder for results.json, TABLES.md and plots")
    parser.add_argument("--data-root",
                        help="folder of the bundled catalogues (default $CMA_CLIP_DATA, else ../shared/data)")
    parser.add_argument("--cache-dir", help="feature cache (default ~/.cache/cma_clip or $CMA_CLIP_CACHE)")
    parser.add_argument("--rescore", action="store_true",
                        help="after a change to the metrics or the corruptions: recompute every run's thresholds and "
                             "reports from its checkpoint, and the noise sample's features and scores (no training)")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    study = Study(catalogues=args.catalogues, seeds=args.seeds, epochs=args.epochs, runs=Path(args.runs),
                  report=Path(args.report), noise_items=args.noise_items, data_root=args.data_root,
                  cache_dir=args.cache_dir, train_args=tuple(train_args), rescore=args.rescore)
    started = time.time()
    command = "python -m cma_clip.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        results = run_study(study, command.strip())
    except CMAClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_tables(results))
    print(f"[study] done in {time.time() - started:.0f} s; report in {study.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
