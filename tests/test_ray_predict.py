"""Batch prediction on Ray Data (`--engine ray`) against the single-process path, on 40 real H&M
items and the shipped checkpoint: one local Ray with 2 CPUs for the module."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from cma_clip.data import ImageError, read_manifest, write_table
from cma_clip.predict import Predictor, main
from cma_clip.ray_predict import RayEngineError, RayOptions, import_ray, predict_manifest_ray, prediction_dataset
from conftest import hm_rows, write_hm_manifest

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "hm-articles"
ITEMS = 40
OPTIONS = RayOptions(batch_size=16)  # 40 items: 3 batches, the last one short; on CPUs: decoded by the model actors
STAGED = RayOptions(batch_size=16, decode_workers=1)  # a decode stage of its own, as beside GPUs


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # its files go to $TMPDIR/ray (conftest)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    """The same 40 test items as a CSV manifest and as a Parquet one (ids in the manifest's order)."""
    folder = tmp_path_factory.mktemp("ray-items")
    csv_path = write_hm_manifest(folder, hm_rows("test", ITEMS))
    parquet_path = write_table(folder / "items.parquet", read_manifest(csv_path))
    return {"csv": csv_path, "parquet": parquet_path}


@pytest.fixture(scope="module")
def single_process(manifests, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "preds.jsonl"
    Predictor.from_checkpoint(CHECKPOINT, "cpu").predict_manifest(manifests["csv"], out, batch_size=16)
    return read_jsonl(out)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    """Same ids in the same order, same labels and auto-accepts, confidences within rounding."""
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for mine, theirs in zip(got, expected):
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            if key.endswith("_confidence"):
                assert mine[key] == pytest.approx(value, abs=2e-4), (mine["id"], key)
            else:
                assert mine[key] == value, (mine["id"], key)


@pytest.mark.parametrize("options", [OPTIONS, STAGED], ids=["decoded-by-model-actors", "decode-stage"])
def test_ray_gives_the_single_process_predictions_in_the_manifest_order(local_ray, manifests, single_process,
                                                                        tmp_path, options):
    out = tmp_path / "preds.parquet"
    assert predict_manifest_ray(CHECKPOINT, manifests["parquet"], out, options) == ITEMS
    got = read_parquet(out)
    assert [r["id"] for r in got] == [r["article_id"] for r in read_manifest(manifests["csv"])]
    assert_same_predictions(got, single_process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.parquet"]  # no temporary file left


@pytest.mark.parametrize("options", [OPTIONS, STAGED], ids=["decoded-by-model-actors", "decode-stage"])
def test_a_crashed_model_actor_has_its_batches_retried(local_ray, manifests, single_process, tmp_path, options):
    """Decoding in the model actors, two batches are in flight in the actor that dies: both are redone."""
    marker = tmp_path / "crashed"
    out = tmp_path / "preds.jsonl"
    predict_manifest_ray(CHECKPOINT, manifests["csv"], out, replace(options, crash_once=str(marker)))
    assert marker.exists()  # the first model actor died (os._exit) in its first batch
    assert_same_predictions(read_jsonl(out), single_process)


def test_items_without_text_or_with_a_blank_photo_are_not_auto_accepted_as_in_one_process(local_ray, manifests,
                                                                                          tmp_path):
    """The model is told which items lack a text (its `text_absent`), and neither their predictions
    nor those of items whose photo is one flat colour (a placeholder) are ever auto-accepted, each
    row saying why: the same rows as the single-process path, in both layouts."""
    folder = tmp_path / "items"
    shutil.copytree(manifests["csv"].parent, folder)
    rows = read_manifest(folder / "items.csv")
    for row in rows[:3] + rows[17:20]:
        row.update(prod_name="", detail_desc="")  # the checkpoint's text columns
    for row in rows[8:10]:
        Image.new("RGB", (180, 240), (240, 240, 240)).save(folder / row["image"], "JPEG")
    manifest = write_table(folder / "blank.csv", rows)
    expected_path = tmp_path / "local.jsonl"
    Predictor.from_checkpoint(CHECKPOINT, "cpu").predict_manifest(manifest, expected_path, batch_size=16)
    expected = read_jsonl(expected_path)
    why = {r["article_id"]: "no text" for r in rows[:3] + rows[17:20]}
    why |= {r["article_id"]: "blank photo" for r in rows[8:10]}
    assert {r["id"]: r["withheld"] for r in expected if r["withheld"]} == why
    assert not any(v for r in expected if r["id"] in why for k, v in r.items() if k.endswith("_auto_accept"))
    assert any(v for r in expected for k, v in r.items() if k.endswith("_auto_accept"))
    for options in (OPTIONS, STAGED):
        predict_manifest_ray(CHECKPOINT, manifest, tmp_path / "preds.jsonl", options)
        assert_same_predictions(read_jsonl(tmp_path / "preds.jsonl"), expected)


def test_decoding_and_inference_are_separate_stages(local_ray, manifests, capsys):
    """With decode actors, two actor pools (a cluster gives each its resources); on CPUs by default,
    one: the model actors decode their own batches between them."""
    from cma_clip.predict import open_for_prediction
    from cma_clip.checkpoint import read_config

    catalogue = open_for_prediction(read_config(CHECKPOINT), manifests["csv"])
    prediction_dataset(local_ray, str(CHECKPOINT), catalogue, STAGED).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(_Infer)]" in optimized  # not fused with the decoding
    assert "ActorPoolMapOperator[MapBatches(_Decode)]" in optimized
    prediction_dataset(local_ray, str(CHECKPOINT), catalogue, OPTIONS).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "MapBatches(_Infer)" in optimized and "_Decode" not in optimized


def broken_manifest(manifests: dict[str, Path], tmp_path: Path) -> Path:
    """The 40 items with row 20's photo (in the second batch of 16) an unreadable file."""
    folder = tmp_path / "items"
    shutil.copytree(manifests["csv"].parent, folder)
    rows = read_manifest(folder / "items.csv")
    (folder / "broken.jpg").write_bytes(b"not an image")
    rows[20]["image"] = "broken.jpg"
    return write_table(folder / "broken.csv", rows)


@pytest.mark.parametrize("layout", [OPTIONS, STAGED], ids=["model-actors-decode", "decode-stage"])
def test_an_unreadable_image_stops_the_run_with_its_message_alone(local_ray, manifests, tmp_path, capfd, layout):
    """The message as one process gives it, and nothing of Ray's: no traceback of its own, no
    advice on its retries (a worker's exception came wrapped in both, some 190 lines)."""
    manifest = broken_manifest(manifests, tmp_path)
    with pytest.raises(ImageError) as caught:
        predict_manifest_ray(CHECKPOINT, manifest, tmp_path / "preds.parquet", layout)
    with pytest.raises(ImageError) as alone:
        Predictor.from_checkpoint(CHECKPOINT, "cpu").predict_manifest(manifest, tmp_path / "one.jsonl")
    assert str(caught.value) == str(alone.value) and "broken.jpg" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items"]  # nothing half-written
    assert not ray_tracebacks("".join(capfd.readouterr()))


def ray_tracebacks(output: str) -> list[str]:
    """Ray's report of a failed task in `output`: its exception type and its advice on retries.
    (Not any "Traceback": in the whole suite, Ray's console log handler may hold a stream an
    earlier test's capture closed, and logging prints its own traceback for that.)"""
    return [marker for marker in ("RayTaskError", "Failed to apply UDF", "Full stack trace") if marker in output]


def test_the_command_line_stops_at_an_unreadable_image_in_two_lines(local_ray, manifests, tmp_path, capfd):
    manifest = broken_manifest(manifests, tmp_path)
    code = main(["--checkpoint", str(CHECKPOINT), "--manifest", str(manifest), "--out", str(tmp_path / "p.jsonl"),
                 "--engine", "ray", "--batch-size", "16"])
    out, err = capfd.readouterr()
    assert code == 2 and not ray_tracebacks(out + err)
    assert err.splitlines()[-2:] == [
        "error: broken.jpg is not a readable image (its content is not a known image format); only JPEG, PNG, "
        "WebP, GIF and BMP are read",
        "--skip-unreadable scores the other rows and names each unreadable image in an 'error' column"]


def test_the_command_line_names_ids_on_several_rows_as_the_one_process_engine_does(local_ray, manifests, tmp_path,
                                                                                    capfd):
    """The note on repeated ids was the one-process engine's alone (it re-read the manifest for it)."""
    lines = manifests["csv"].read_text().splitlines()
    twice = manifests["csv"].with_name("twice.csv")  # beside the photos the manifest names
    twice.write_text("\n".join([*lines, lines[1]]) + "\n")
    first_id = read_manifest(twice)[0]["article_id"]
    code = main(["--checkpoint", str(CHECKPOINT), "--manifest", str(twice), "--out", str(tmp_path / "p.jsonl"),
                 "--engine", "ray", "--batch-size", "16"])
    out, err = capfd.readouterr()
    assert code == 0 and f"note: 1 id is on several rows (e.g. '{first_id}')" in err
    assert f"{ITEMS + 1} predictions written to {tmp_path / 'p.jsonl'} by Ray" in out


@pytest.mark.parametrize("layout", [OPTIONS, STAGED], ids=["model-actors-decode", "decode-stage"])
def test_an_unreadable_image_skipped_gets_its_row_as_in_one_process(local_ray, manifests, tmp_path, layout):
    manifest = broken_manifest(manifests, tmp_path)
    out = tmp_path / "preds.parquet"
    predict_manifest_ray(CHECKPOINT, manifest, out, replace(layout, skip_unreadable=True))
    got = read_parquet(out)
    expected_path = tmp_path / "one.jsonl"
    Predictor.from_checkpoint(CHECKPOINT, "cpu").predict_manifest(manifest, expected_path, batch_size=16,
                                                                  skip_unreadable=True)
    expected = read_jsonl(expected_path)
    assert [bool(r["error"]) for r in got] == [i == 20 for i in range(ITEMS)] and "broken.jpg" in got[20]["error"]
    assert_same_predictions(got, expected)


def test_the_command_line_refuses_an_output_ray_does_not_write(manifests, tmp_path, capsys):
    code = main(["--checkpoint", str(CHECKPOINT), "--manifest", str(manifests["csv"]),
                 "--out", str(tmp_path / "preds.csv"), "--engine", "ray"])
    assert code == 2
    assert "--engine ray writes .parquet or .jsonl files, not preds.csv" in capsys.readouterr().err


def test_without_ray_installed_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayEngineError, match="pip install -r requirements-ray.txt"):
        import_ray()
