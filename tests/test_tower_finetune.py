"""The tower fine-tuning experiment (`cma_clip.lab.tower_finetune`): a tower's top layers over the
cached middle states are the tower itself, and a short run trains them, reports `test` and saves
them under the backbone's names."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cma_clip.backbones import shared_backbone
from cma_clip.checkpoint import TrainConfig
from cma_clip.lab.tower_finetune import TUNED_LAYERS, ImageTail, TextTop, run

TEXTS = ["Relaxed-fit T-shirt in soft cotton jersey", "Ankle-length leggings", ""]


@torch.no_grad()
def test_the_top_layers_over_the_middle_states_are_the_tower():
    backbone = shared_backbone("bundled", "cpu")
    batch = backbone.tokenize(TEXTS, 32)
    hidden = backbone.text_model(input_ids=batch.ids, attention_mask=batch.mask.long(),
                                 output_hidden_states=True).hidden_states
    tokens, pooled = TextTop(backbone, 2).eval()(hidden[-3], batch.mask)
    torch.testing.assert_close(tokens[batch.mask], hidden[-1][batch.mask])
    torch.testing.assert_close(pooled, backbone.encode_text(batch)[1])


@torch.no_grad()
def test_the_last_image_blocks_over_the_middle_states_are_the_tower():
    backbone = shared_backbone("bundled", "cpu")
    pixels = backbone.preprocess([Image.new("RGB", (60, 80), (200, 30, 30)), Image.new("RGB", (90, 40), (20, 90, 160))])
    cnn = backbone.cnn
    states = cnn._swish(cnn._bn0(cnn._conv_stem(pixels)))
    for block in cnn._blocks[:-2]:
        states = block(states)
    tokens, pooled = ImageTail(backbone, 2).train()(states)  # batch norm keeps the tower's statistics in training
    expected_tokens, expected_pooled = backbone.encode_image(pixels)
    torch.testing.assert_close(tokens, expected_tokens)
    torch.testing.assert_close(pooled, expected_pooled)


@pytest.mark.parametrize("tower", ["text", "image"])
def test_a_short_run_trains_the_tower_layers_reports_test_and_saves_them(tmp_path, cache_dir, tower):
    cfg = TrainConfig(catalogue="hm-articles", out=str(tmp_path / "run"), limit=48, epochs=2, batch_size=16,
                      width=64, colour=True, words_buckets=512, lexical_buckets=0, ema=0.5, cache_dir=str(cache_dir))
    report = run(cfg, tower, layers=1, lr_scale=0.05)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert {"val", "test"} <= set(report) and any(t["n"] > 0 for t in report["test"]["tasks"].values())
    assert report["weight_change"] > 0  # the tower's top layer trained
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["tower"] == tower
    states = list((cache_dir / f"{tower}-states").glob("*-top1.npy"))
    assert len(states) == 1 and np.load(states[0]).shape[0] == 3 * 48  # train, val and test items, 48 each
    tuned = load_file(str(tmp_path / "run" / TUNED_LAYERS))
    backbone = shared_backbone("bundled", "cpu").state_dict()
    assert tuned and all(tuned[k].shape == backbone[k].shape for k in tuned)  # the backbone's own names
    assert any(not torch.equal(tuned[k], backbone[k].float()) for k in tuned)
