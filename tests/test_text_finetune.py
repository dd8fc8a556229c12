"""The text-tower fine-tuning experiment (`cma_clip.lab.text_finetune`): its top layers over the
cached middle states are the tower itself, and a short run trains them and reports `test`."""
from __future__ import annotations

import json

import numpy as np
import torch

from cma_clip.backbones import shared_backbone
from cma_clip.checkpoint import TrainConfig
from cma_clip.lab.text_finetune import TextTop, run

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


def test_a_short_run_trains_the_text_layers_and_reports_test(tmp_path, cache_dir):
    cfg = TrainConfig(catalogue="hm-articles", out=str(tmp_path / "run"), limit=48, epochs=2, batch_size=16,
                      width=64, colour=True, words_buckets=512, lexical_buckets=0, ema=0.5, cache_dir=str(cache_dir))
    report = run(cfg, layers=1, text_lr_scale=0.05)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert {"val", "test"} <= set(report) and any(t["n"] > 0 for t in report["test"]["tasks"].values())
    assert report["text_weight_change"] > 0  # the tower's top layer trained
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["layers"] == 1
    states = list((cache_dir / "text-states").glob("*-top1.npy"))
    assert len(states) == 1 and np.load(states[0]).shape[0] == 3 * 48  # train, val and test items, 48 each
