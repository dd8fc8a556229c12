"""torchrun with 2 processes (gloo, CPU): DDP training and sharded prediction match one process.

Tolerance: with dropout off and full precision (CMA_CLIP_FP32=1), a 2-process run computes
the same loss as one process (each rank's share is divided by the global batch's labelled
counts), so it differs only by float summation order: weights within 1e-3 (observed
1.8e-5 after 4 steps, on the attention's key bias whose true gradient is 0 and which Adam
normalises), epoch losses within 1e-4. Sharded prediction is exact up to the 4-decimal rounding.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cma_clip import distributed
from cma_clip.checkpoint import read_config
from cma_clip.features import row_keys
from cma_clip.predict import Predictor, open_for_prediction
from conftest import hm_rows, write_hm_manifest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--catalogue", "hm-articles", "--limit", "32", "--width", "32", "--batch-size", "16", "--epochs", "2",
         "--align-epochs", "1", "--dropout", "0", "--quiet"]


def run(args: list[str], processes: int = 1, succeeds: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMA_CLIP_FP32": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run([*launcher, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == succeeds, done.stderr[-3000:]
    return done


def same(a: dict, b: dict) -> bool:
    """The same prediction row: confidences within 1e-4 (they are rounded to 4 decimals)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 if k.endswith("_confidence") else a[k] == b[k]
                                        for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(single-process checkpoint, 2-process checkpoint), same options."""
    tmp = tmp_path_factory.mktemp("ddp")
    cache = ["--cache-dir", str(tmp / "cache")]
    run(["cma_clip.train", *TRAIN, *cache, "--out", str(tmp / "single")])
    run(["cma_clip.train", *TRAIN, *cache, "--out", str(tmp / "ddp")], processes=2)
    return tmp / "single", tmp / "ddp"


def test_shard_splits_contiguously_and_completely():
    items = list(range(10))
    shards = [distributed.shard(items, r, 3) for r in range(3)]
    assert sum(shards, []) == items and [len(s) for s in shards] == [3, 3, 4]
    assert distributed.setup()[:3] == (0, 1, 0)  # no torchrun: one process, no process group


def test_ddp_training_matches_a_single_process(trained):
    single, ddp = trained
    one, two = read_config(single), read_config(ddp)
    assert one.tasks.keys() == two.tasks.keys()
    assert all(one.tasks[t].classes == two.tasks[t].classes for t in one.tasks)
    h1, h2 = one.training["history"], two.training["history"]
    assert len(h1) == len(h2) == 2  # the same global batches: the same number of steps
    for a, b in zip(h1, h2):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["val"]["accuracy"] - b["val"]["accuracy"]) < 0.011  # at most 2 of 192 labels
    w1, w2 = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) < 1e-3
    assert not list(ddp.glob("train_state*")) and (ddp / "eval_test.json").exists()


def test_sharded_prediction_matches_and_resumes(trained, tmp_path):
    checkpoint = trained[1]
    rows = hm_rows("test", 13)
    manifest = write_hm_manifest(tmp_path, rows, "m.csv", ["article_id", "image", "prod_name", "detail_desc"])
    base = ["cma_clip.predict", "--checkpoint", str(checkpoint), "--manifest", str(manifest)]
    run([*base, "--out", str(tmp_path / "one.jsonl")])
    run([*base, "--out", str(tmp_path / "two.jsonl")], processes=2)
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in two] == [r["id"] for r in one] == [r["article_id"] for r in rows]
    assert all(same(a, b) for a, b in zip(one, two))
    assert not (tmp_path / "two.jsonl.shards").exists()  # merged and removed

    # a crashed run: rank 1 had written three rows (marked, to see which are kept, not recomputed)
    # and half a line; rank 0 nothing. The third row's text was fixed since: predicted again.
    shards = tmp_path / "resumed.jsonl.shards"
    shards.mkdir()
    first = 13 // 2  # rank 1's first row
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    keys = [key.hex() for key in row_keys(open_for_prediction(predictor.config, manifest))]
    kept = {"_row": first, "_key": keys[first], **one[first], "colour_group_name": "FROM-THE-CRASHED-RUN"}
    stale = {"_row": first + 2, "_key": "0" * 32, **one[first + 2], "colour_group_name": "FROM-THE-OLD-TEXT"}
    run_id = predictor.shard_run(skip_unreadable=False)
    (shards / "rank0-of-2-another0run.jsonl").write_text(  # another checkpoint's or options' rows: never reused
        json.dumps({"_row": 0, "_key": keys[0], **one[0], "colour_group_name": "FROM-ANOTHER-RUN"}) + "\n")
    (shards / f"rank1-of-2-{run_id}.jsonl").write_text(
        json.dumps(kept) + "\n" + json.dumps({"_row": first + 1, "_key": keys[first + 1], **one[first + 1]}) + "\n"
        + json.dumps(stale) + "\n" + '{"_row": 8, "id"')
    done = run([*base, "--out", str(tmp_path / "resumed.jsonl")], processes=2)
    assert "rank 1: 2 of 7 rows kept from an interrupted run" in done.stderr
    resumed = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in one]  # complete, in order, no duplicates
    assert resumed[first]["colour_group_name"] == "FROM-THE-CRASHED-RUN"
    assert resumed[0]["colour_group_name"] != "FROM-ANOTHER-RUN"
    assert resumed[first + 2]["colour_group_name"] != "FROM-THE-OLD-TEXT"
    assert all("_row" not in r and "_key" not in r for r in resumed)
    assert all(same(a, b) for i, (a, b) in enumerate(zip(one, resumed)) if i != first)


def test_a_rank_that_fails_stops_the_run_with_its_message(tmp_path):
    """Rank 0 meets an unreadable image while building the feature cache: it exits with the
    message, and torchrun stops rank 1 (waiting at the cache barrier) instead of hanging."""
    rows = hm_rows("train", 16) + hm_rows("val", 8)
    manifest = write_hm_manifest(tmp_path, rows, columns=["image", "prod_name", "colour_group_name", "split"])
    (tmp_path / rows[3]["image"]).write_bytes(b"not an image")
    done = run(["cma_clip.train", "--manifest", str(manifest), "--text-columns", "prod_name", "--tasks",
                "colour_group_name", "--epochs", "1", "--align-epochs", "1", "--batch-size", "8", "--width", "32",
                "--quiet", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
               processes=2, succeeds=False)
    assert "is not a readable image" in done.stderr
