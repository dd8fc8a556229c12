"""Weights stored as int8, each slice with its own float32 scale (symmetric, max abs / 127).

Every weight comes back within half a step of its slice's largest / 127; the file is a quarter of
float32's. On the shipped ensembles val R@90P and operating recall stay within 0.001 of float32
(docs/RESULTS.md, "Members stored smaller").
The scale keeps the reduced dimensions (size 1), so `value * scale` reads it back along any axis:
per output channel for a convolution, per row for a weight matrix, per bucket for the words table.
"""
from __future__ import annotations

import torch

SCALE_SUFFIX = ".int8_scale"  # the name of a weight's scale: the weight's name + this


def to_int8(value: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`value` as int8 and its float32 scale, one per slice left after reducing `dims`."""
    value = value.detach().float().cpu()
    scale = (value.abs().amax(dim=dims, keepdim=True) / 127).clamp(min=1e-12)
    return (value / scale).round().clamp(-127, 127).to(torch.int8), scale


def from_int8(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`to_int8`'s weight back in float32."""
    return value.float() * scale
