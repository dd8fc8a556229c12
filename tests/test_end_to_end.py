"""Train a few steps on a slice of the real H&M catalogue, then evaluate and predict with it."""
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from cma_clip import Predictor, evaluate, predict, train
from cma_clip.checkpoint import TRAIN_STATE, CheckpointError, is_checkpoint, read_config, train_state_counters
from cma_clip.data import read_manifest
from cma_clip.model import multitask_loss
from cma_clip.studio.service import available_checkpoints
from conftest import EXAMPLE_IMAGE, HM, hm_rows, write_hm_manifest


def test_training_writes_a_complete_checkpoint(small_checkpoint):
    config = read_config(small_checkpoint)
    assert config.backbone == "bundled"
    assert list(config.tasks) == ["product_type_name", "graphical_appearance_name", "colour_group_name",
                                  "perceived_colour_master_name", "index_group_name", "garment_group_name"]
    raw = json.loads((small_checkpoint / "config.json").read_text())
    for spec in raw["tasks"].values():
        assert spec["classes"] == sorted(spec["classes"]) and "threshold_90" in spec
    assert len(config.training["history"]) == 2
    assert {"val", "test"} <= set(config.metrics)
    assert not list(small_checkpoint.glob("train_state*"))  # resume state removed once done
    assert (small_checkpoint / "eval_test.json").exists()


def test_evaluate_command_line_contract(small_checkpoint, cache_dir, tmp_path, capsys):
    # a manifest without a split column is evaluated whole
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 20), "subset.jsonl")
    out = tmp_path / "report.json"
    code = evaluate.main(["--checkpoint", str(small_checkpoint), "--manifest", str(manifest),
                          "--out-json", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["items"] == 20
    for metrics in [*report["tasks"].values(), report["mean"]]:
        assert {"accuracy", "macro_f1", "recall_at_90_precision"} <= set(metrics)
        assert 0.0 <= metrics["accuracy"] <= 1.0
    said = capsys.readouterr()
    assert "mean" in said.out
    assert f"note: {manifest} has no split column: all its 20 rows were evaluated (--split test applies to a " \
           "manifest with one)" in said.err  # QA, session 38: --split test was dropped without a word

    common = ["--checkpoint", str(small_checkpoint), "--manifest", str(manifest), "--cache-dir", str(cache_dir)]
    with pytest.raises(SystemExit) as refused:  # a folder as the report: said before evaluating (a traceback after)
        evaluate.main([*common, "--out-json", str(tmp_path)])
    assert refused.value.code == 2
    assert f"--out-json {tmp_path} is a folder: give a file, e.g. {tmp_path / 'report.json'}" in capsys.readouterr().err
    under_a_file = out / "sub" / "report.json"  # under the report written above: said before evaluating too
    with pytest.raises(SystemExit) as refused:  # (it said "File exists", after the evaluation: QA, session 36)
        evaluate.main([*common, "--out-json", str(under_a_file)])
    printed = capsys.readouterr()
    assert refused.value.code == 2 and "mean" not in printed.out
    assert f"--out-json {under_a_file}: {out.absolute()} is a file, not a folder" in printed.err
    unwritable = "/proc/cma-clip-report.json"  # a folder no one writes in (root neither): the table stands
    assert evaluate.main([*common, "--out-json", unwritable]) == 2
    printed = capsys.readouterr()
    assert "mean" in printed.out and f"error: cannot write --out-json {unwritable}" in printed.err
    assert "Traceback" not in printed.err


def test_commands_name_a_folder_or_a_file_given_for_the_other_and_the_splits_there_are(
        small_checkpoint, cache_dir, tmp_path, capsys):
    """A folder as --manifest or --extra-labels read "not found", an image as --checkpoint "checkpoint
    not found", and a split name that is not there named none that are (QA, session 33)."""
    rows = hm_rows("test", 4) + hm_rows("val", 4)
    manifest = write_hm_manifest(tmp_path, rows, "mixed.csv", list(rows[0]))  # the split column kept
    checkpoint = ["--checkpoint", str(small_checkpoint), "--cache-dir", str(cache_dir)]
    cases = [
        (evaluate.main, [*checkpoint, "--manifest", str(tmp_path)], f"{tmp_path} is a folder: give the manifest file"),
        (evaluate.main, ["--checkpoint", str(EXAMPLE_IMAGE), "--manifest", str(manifest)],
         f"{EXAMPLE_IMAGE} is a file: give the checkpoint's folder (model.safetensors + config.json)"),
        (evaluate.main, [*checkpoint, "--manifest", str(manifest), "--split", "tset"],
         "no rows in split 'tset' of"),
        (train.main, ["--catalogue", "hm-articles", "--extra-labels", str(tmp_path), "--limit", "8", "--quiet",
                      "--cache-dir", str(cache_dir), "--out", str(tmp_path / "run")],
         f"--extra-labels {tmp_path.resolve()} is a folder: give the label store in it"),
    ]
    for command, args, message in cases:
        assert command(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert evaluate.main([*checkpoint, "--manifest", str(manifest), "--split", "tset"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(": its splits are test, val")


def test_evaluate_on_the_test_split_matches_the_training_report(small_checkpoint, cache_dir, tmp_path):
    # the checkpoint was trained on the first 48 rows of each split: the same test items
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 48), "test48.csv")
    report = evaluate.evaluate_checkpoint(small_checkpoint, manifest, "test", cache_dir)
    expected = json.loads((small_checkpoint / "eval_test.json").read_text())
    for task, metrics in expected["tasks"].items():
        assert abs(report["tasks"][task]["accuracy"] - metrics["accuracy"]) < 1e-6


def test_evaluating_the_training_manifest_without_a_split_column_scores_only_its_test_split(tmp_path, cache_dir):
    """Training made a seeded 80/10/10 split of this manifest: evaluation must not score
    the training rows as test, and reads the features training cached."""
    manifest = write_hm_manifest(tmp_path, hm_rows("train", 40), "nosplit.csv",
                                 columns=["article_id", "image", "prod_name", "colour_group_name"])
    out = tmp_path / "nosplit"
    assert train.main(["--manifest", str(manifest), "--text-columns", "prod_name", "--tasks", "colour_group_name",
                       "--id-column", "article_id", "--batch-size", "8", "--width", "32", "--epochs", "1",
                       "--align-epochs", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    cached = sorted((cache_dir / "features").iterdir())
    report = evaluate.evaluate_checkpoint(out, manifest, "test", cache_dir)
    assert (report["items"], report["split"]) == (4, "test")
    assert report["tasks"] == json.loads((out / "eval_test.json").read_text())["tasks"]
    assert sorted((cache_dir / "features").iterdir()) == cached  # nothing new was encoded
    other = write_hm_manifest(tmp_path / "other", hm_rows("train", 40), "copy.csv",
                              columns=["article_id", "image", "prod_name", "colour_group_name"])
    whole = evaluate.evaluate_checkpoint(out, other, "test", cache_dir)  # a manifest it was not trained on
    assert (whole["items"], whole["split"]) == (40, None)


def test_predictor_on_a_real_item(small_checkpoint):
    predictor = Predictor.from_checkpoint(small_checkpoint, "cpu")
    image = Image.open(sorted((HM / "images").glob("*/*.jpg"))[0])
    result = predictor.predict(image, "Black jersey dress with short sleeves", top_k=3)
    assert set(result.tasks) == set(predictor.tasks)
    for task, p in result.tasks.items():
        assert len(p.labels) == min(3, len(predictor.classes[task]))
        assert all(label in predictor.classes[task] for label in p.labels)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and 0 < p.confidence <= 1
        assert abs(sum(p.modality_weights.values()) - 1) < 1e-5
    assert result.tokens[0] == "[CLS]" and len(result.tokens) == result.text_to_image.shape[0]
    assert result.text_to_image.shape[1] == result.grid_size ** 2 == 49
    assert result.image_cls_to_text.shape == (len(result.tokens),)
    for task, relevance in result.token_relevance.items():
        assert relevance.shape == (len(result.tokens),) and abs(relevance.sum() - 1) < 1e-4
    batch = predictor.predict_batch([image, image], ["a", "b"])
    assert len(batch) == 2 and set(batch[0].tasks) == set(predictor.tasks)


def test_predict_command_over_a_manifest(small_checkpoint, tmp_path):
    rows = hm_rows("test", 5)
    manifest = write_hm_manifest(tmp_path, rows, "m.csv", ["article_id", "image", "prod_name", "detail_desc"])
    out = tmp_path / "preds.jsonl"
    assert predict.main(["--checkpoint", str(small_checkpoint), "--manifest", str(manifest), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["article_id"] for r in rows]
    assert all("colour_group_name_confidence" in r for r in records)


def test_predict_command_skips_unreadable_images_when_asked(small_checkpoint, tmp_path, capsys):
    """A catalogue-scale run is not stopped by one bad file: --skip-unreadable writes its row with
    the reason and no labels; without it the run stops with the message and writes nothing."""
    rows = hm_rows("test", 5)
    columns = ["article_id", "image", "prod_name", "detail_desc"]
    good = write_hm_manifest(tmp_path, rows, "good.csv", columns)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    broken = tmp_path / "broken.csv"
    broken.write_text(good.read_text().replace(rows[3]["image"], "broken.jpg"))
    checkpoint = ["--checkpoint", str(small_checkpoint), "--batch-size", "2"]
    assert predict.main([*checkpoint, "--manifest", str(broken), "--out", str(tmp_path / "stopped.csv")]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-unreadable scores the other rows" in err
    assert not (tmp_path / "stopped.csv").exists()
    (tmp_path / "folder.jsonl").mkdir()
    for args, refusal in ((["--out", str(broken)], "is the manifest itself"),  # the items were replaced
                          (["--out", str(tmp_path / "x.csv"), "--image", str(tmp_path / "broken.jpg")], "not both"),
                          # said before the catalogue is predicted ("Is a directory", "File exists" after: QA, s36)
                          (["--out", str(tmp_path / "folder.jsonl")], "is a folder: give a file, e.g. "),
                          (["--out", str(good / "x.jsonl")], f"{good} is a file, not a folder")):
        with pytest.raises(SystemExit):
            predict.main([*checkpoint, "--manifest", str(broken), *args])
        assert refusal in capsys.readouterr().err
    assert broken.read_text().startswith("article_id,image")
    with pytest.raises(SystemExit):  # an output of no known kind was written as JSONL under its name
        predict.main([*checkpoint, "--manifest", str(broken), "--out", str(tmp_path / "x.txt")])
    assert "give a .jsonl, .csv or .parquet file" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()
    out = tmp_path / "skipped.csv"
    assert predict.main([*checkpoint, "--manifest", str(broken), "--skip-unreadable", "--out", str(out)]) == 0
    assert f"5 predictions written to {out}; 1 unreadable images" in capsys.readouterr().out
    records = read_manifest(out)
    assert [r["id"] for r in records] == [r["article_id"] for r in rows]
    assert [bool(r["error"]) for r in records] == [False, False, False, True, False]
    assert "broken.jpg" in records[3]["error"] and records[3]["colour_group_name"] == ""
    assert records[3]["colour_group_name_auto_accept"] == "False" and records[3]["withheld"] == "unreadable image"
    assert predict.main([*checkpoint, "--manifest", str(good), "--out", str(tmp_path / "good.jsonl")]) == 0
    readable = [json.loads(line) for line in (tmp_path / "good.jsonl").read_text().splitlines()]
    for i in (0, 1, 2, 4):  # the other rows as a run without the bad file gives them
        assert records[i]["colour_group_name"] == readable[i]["colour_group_name"]


def test_predict_command_on_a_spreadsheets_manifest_says_what_is_wrong(small_checkpoint, tmp_path, capsys):
    """QA lead, session 38: a spreadsheet's blank rows (";;;") stopped the run with "m is not a readable image
    (Is a directory)", a row without a photo too; a web address was "not found" under a mangled path; repeated
    ids, --out beside --image and a Latin-1 file passed without a word or a remedy."""
    rows = hm_rows("test", 4)
    columns = ["article_id", "image", "prod_name", "detail_desc"]
    good = write_hm_manifest(tmp_path, rows, "good.csv", columns)
    checkpoint = ["--checkpoint", str(small_checkpoint)]
    blank = tmp_path / "blank.csv"
    blank.write_text(good.read_text().replace(",", ";") + ";;;\n;;;\n")
    out = tmp_path / "blank.jsonl"
    assert predict.main([*checkpoint, "--manifest", str(blank), "--out", str(out)]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["article_id"] for r in rows]
    capsys.readouterr()
    lines = good.read_text().splitlines()
    no_photo = tmp_path / "no-photo.csv"
    no_photo.write_text("\n".join([lines[0], lines[1], "42,,A tee,Soft jersey", *lines[2:]]) + "\n")
    assert predict.main([*checkpoint, "--manifest", str(no_photo), "--out", str(tmp_path / "x.csv")]) == 2
    assert "1 row without an image path (an empty 'image' cell), e.g. item 2 (id '42')" in capsys.readouterr().err
    skipped = tmp_path / "skipped.csv"  # with --skip-unreadable the row is written with its error (review, s38)
    assert predict.main([*checkpoint, "--manifest", str(no_photo), "--skip-unreadable", "--out", str(skipped)]) == 0
    assert [row["id"] for row in read_manifest(skipped)] == [rows[0]["article_id"], "42",
                                                            *[r["article_id"] for r in rows[1:]]]
    assert "is not a readable image (a folder, not a file: an empty image cell?)" in read_manifest(skipped)[1]["error"]
    web = tmp_path / "web.csv"
    web.write_text("\n".join([lines[0], "43,https://example.com/shirt.jpg,A shirt,Cotton"]) + "\n")
    assert predict.main([*checkpoint, "--manifest", str(web), "--out", str(tmp_path / "x.csv")]) == 2
    assert "(an address on the web? images are read from files" in capsys.readouterr().err
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join([*lines, lines[1]]) + "\n")
    assert predict.main([*checkpoint, "--manifest", str(twice), "--out", str(tmp_path / "twice.csv.jsonl")]) == 0
    assert f"note: 1 id is on several rows (e.g. '{rows[0]['article_id']}')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([*checkpoint, "--image", str(EXAMPLE_IMAGE), "--out", str(tmp_path / "one.csv")])
    assert "--out is for --manifest" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("\n".join([lines[0], lines[1] + " Caf\u00e9"]).encode("latin-1"))
    assert predict.main([*checkpoint, "--manifest", str(latin), "--out", str(tmp_path / "x.csv")]) == 2
    offset = len(lines[0]) + 1 + len(lines[1]) + 4  # the é, on line 2: said so (it said "byte 0", of a chunk)
    assert f"is not UTF-8 text (line 2: unexpected end of data at byte {offset})" in (err := capsys.readouterr().err)
    assert 'save it as UTF-8 (a spreadsheet\'s "CSV UTF-8")' in err


def test_resume_continues_an_interrupted_run(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "resume"
    common = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32",
              "--align-epochs", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]
    # a run that dies after its first epoch: it never reaches `finish`
    with monkeypatch.context() as patch:
        patch.setattr(train, "finish", lambda *args, **kwargs: {})
        train.train(train.parse_config([*common, "--epochs", "1"]))
    assert train_state_counters(out)["epoch"] == 1
    assert train.main([*common, "--epochs", "3", "--resume"]) == 0
    history = read_config(out).training["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_an_interrupted_run_says_so_and_resumes_only_on_the_labels_it_began_with(tmp_path, cache_dir, monkeypatch,
                                                                                 capsys):
    """QA, session 36: a run stopped mid-way looked finished ("holds a checkpoint already: add --overwrite",
    which throws its state away); labels saved after the interruption resumed unsaid (epochs 1-3 on one label
    set, 4-20 on another), a new class crashed --resume with a size mismatch; an --out that cannot be made
    was a traceback after the data had loaded."""
    from cma_clip.labels import LabelStore

    store = LabelStore(tmp_path / "studio" / "labels.db")
    first, second = hm_rows("train", 2)
    store.save_correction(image=HM / first["image"], text=first["prod_name"], item_id=first["article_id"],
                          labels={"colour_group_name": "Red"}, annotator="ana")
    out = tmp_path / "stopped"
    common = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32", "--align-epochs",
              "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", "--extra-labels", str(store.path)]
    save_state = train.save_state

    def stopped_once_saved(*args, **kwargs):  # Ctrl-C during the second epoch (runtime.exit_on_stop_signals)
        save_state(*args, **kwargs)
        raise SystemExit(130)

    capsys.readouterr()
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(train, "save_state", stopped_once_saved)
        train.main([*common, "--epochs", "3"])
    assert (f"stopped: {out} keeps the run after epoch 1 of 3: the same command with --resume goes on with it"
            in capsys.readouterr().err)  # it stopped without a word (QA, session 36)
    assert train.main([*common, "--epochs", "3"]) == 2
    assert (f"{out} holds a run interrupted after epoch 1: add --resume to go on with it, --overwrite to start "
            "again") in capsys.readouterr().err
    # nor is it served as if finished (QA, session 37): its weights have no thresholds or test report yet
    unfinished = f"{out} holds a training run that has not finished (stopped or still training, after epoch 1)"
    left_out = {}
    assert available_checkpoints(tmp_path, left_out) == {} and unfinished in left_out["stopped"]
    with pytest.raises(CheckpointError, match="a stopped run finishes with its train command and --resume"):
        Predictor.from_checkpoint(out)
    assert predict.main(["--checkpoint", str(out), "--image", str(EXAMPLE_IMAGE), "--text", "a red top"]) == 2
    assert unfinished in capsys.readouterr().err
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 2), "two.jsonl")
    assert evaluate.main(["--checkpoint", str(out), "--manifest", str(manifest), "--cache-dir", str(cache_dir)]) == 2
    assert unfinished in capsys.readouterr().err
    store.save_correction(image=HM / second["image"], text=second["prod_name"], item_id=second["article_id"],
                          labels={"graphical_appearance_name": "Houndstooth Weave"}, annotator="ana")  # a new class
    assert train.main([*common, "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {out}: its --extra-labels are not those it began with" in err and "Traceback" not in err
    assert train_state_counters(out)["epoch"] == 1  # its state kept, for a rerun on the labels it began with

    (tmp_path / "file.txt").write_text("not a folder")
    unmakeable = tmp_path / "file.txt" / "run"
    quick = ["--catalogue", "hm-articles", "--limit", "8", "--epochs", "1", "--cache-dir", str(cache_dir), "--quiet"]
    assert train.main([*quick, "--out", str(unmakeable)]) == 2
    assert f"cannot create --out {unmakeable}: Not a directory" in capsys.readouterr().err
    deeper = tmp_path / "new" / "deeper" / "run"  # made to try, then refused for another reason: none left
    assert train.main([*quick, "--out", str(deeper), "--extra-labels", str(tmp_path / "missing.db")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_run_stopped_while_it_saved_its_first_epoch_is_no_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
    """QA researcher, session 37: Ctrl-C as a run saved its first epoch (its weights written, its resumable state
    not yet) left a folder the app listed and predict served as finished, without a word; --resume then trained
    from the start unsaid."""
    out = tmp_path / "midsave"
    common = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32", "--align-epochs",
              "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", "--epochs", "1"]

    def stopped_before_saving(*args, **kwargs):  # the checkpoint written, the state not
        raise SystemExit(130)

    capsys.readouterr()
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(train, "save_state", stopped_before_saving)
        train.main(common)
    assert is_checkpoint(out) and not (out / TRAIN_STATE).exists()
    err = capsys.readouterr().err
    assert f"stopped: {out} keeps no epoch to resume from: the same command with --overwrite starts again" in err
    assert "epoch 1:" not in err  # an epoch is said once saved: its line, then a Ctrl-C, lost it (QA re-check, s37)
    left_out = {}
    assert available_checkpoints(tmp_path, left_out) == {}
    assert "not finished (stopped or still training, before an epoch was saved to resume from)" in left_out["midsave"]
    assert train.main(common) == 2
    assert (f"{out} holds a run interrupted before an epoch was saved to resume from: add --overwrite to start "
            "again") in capsys.readouterr().err
    assert train.main([*common, "--resume"]) == 0
    assert f"nothing to resume in {out} (no epoch of a run there was saved): training from the start" in \
        capsys.readouterr().err
    assert list(available_checkpoints(tmp_path)) == ["midsave"]  # finished: served
    assert train.main([*common, "--resume"]) == 2  # it trained the finished run again from the start, unsaid
    assert f"{out} holds a finished checkpoint: there is nothing to resume" in capsys.readouterr().err


def test_ema_keeps_the_moving_average_of_the_weights_and_resumes_it(tmp_path, cache_dir, monkeypatch, capsys):
    from safetensors.torch import load_file

    def run(out, *extra, interrupted=False):
        argv = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32",
                "--align-epochs", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", *extra]
        with monkeypatch.context() as patch:
            if interrupted:  # the run dies before `finish`
                patch.setattr(train, "finish", lambda *args, **kwargs: {})
            train.train(train.parse_config(argv))

    out = tmp_path / "ema"
    run(out, "--epochs", "1", "--ema", "0.5", interrupted=True)  # one epoch of 2 steps
    state = load_file(str(out / TRAIN_STATE))
    assert int(state["ema.n_averaged"]) == 2
    kept = load_file(str(out / "model.safetensors"))  # epoch 1 is the best so far: the checkpoint
    assert all(torch.equal(kept[k], state[f"ema.module.{k}"]) for k in kept)
    trained = [k for k in kept if k.startswith("heads.")]
    assert trained and any(not torch.equal(kept[k], state[f"model.{k}"]) for k in trained)

    run(out, "--epochs", "2", "--ema", "0.5", "--resume")
    assert read_config(out).train.ema == 0.5
    assert [h["epoch"] for h in read_config(out).training["history"]] == [1, 2]

    plain = tmp_path / "plain"
    run(plain, "--epochs", "1", interrupted=True)
    with pytest.raises(CheckpointError, match="no moving average"):
        run(plain, "--epochs", "2", "--ema", "0.5", "--resume")
    with pytest.raises(CheckpointError, match="this run's model is not the one it began .size mismatch"):
        run(plain, "--epochs", "2", "--width", "48", "--resume")  # a traceback, once (QA, session 36)
    for bad in (["--ema", "1.5"], ["--ema", "0.9", "--finetune-backbone"]):
        with pytest.raises(SystemExit) as exit_:
            train.parse_config(["--catalogue", "hm-articles", "--out", str(out), *bad])
        assert exit_.value.code == 2 and "--ema" in capsys.readouterr().err


def test_training_with_extra_labels_learns_the_corrections(tmp_path, cache_dir, capsys):
    from cma_clip.labels import LabelStore
    from conftest import EXAMPLE_IMAGE

    first = hm_rows("train", 1)[0]
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=HM / first["image"], text=first["prod_name"], item_id=first["article_id"],
                          labels={"colour_group_name": "Glitter Teal"}, annotator="ana")
    with Image.open(EXAMPLE_IMAGE) as photo:  # a photo the catalogue does not have: a new train row
        store.save_correction(image=photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), text="Striped jersey tee",
                              annotator="ana", labels={"colour_group_name": "Glitter Teal",
                                                       "graphical_appearance_name": "Stripe"})
    # a catalogue item's own photo, uploaded without its id: that item, which this run leaves out (--limit)
    store.save_correction(image=EXAMPLE_IMAGE, text="Striped jersey tee", annotator="ana",
                          labels={"colour_group_name": "Glitter Teal"})
    out = tmp_path / "with-labels"
    assert train.main(["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32",
                       "--epochs", "1", "--align-epochs", "1", "--extra-labels", str(tmp_path / "labels.db"),
                       "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    config = read_config(out)
    assert "Glitter Teal" in config.tasks["colour_group_name"].classes
    err = capsys.readouterr().err
    assert "--extra-labels labels.db: 3 labelled items; 1 train items relabelled" in err
    assert ("1 items under an id the catalogue lacks have a catalogue item's photo and count as that item; 1 items "
            "outside this run") in err
    kept = config.training["extra_labels"]  # which labels the run trained on
    assert (kept["train"], kept["added"], kept["same_photo"], kept["left_out"]) == (1, 1, 1, 1)
    assert kept["source"] == str((tmp_path / "labels.db").resolve()) and kept["newest_label"]


def test_auxiliary_tasks_train_beside_the_tasks_and_stay_out_of_the_checkpoint(tmp_path, cache_dir, monkeypatch):
    """--auxiliary-tasks: learned with the catalogue's tasks (in the loss, with their labels), scored
    nowhere, kept nowhere; the checkpoint loads and predicts the catalogue's tasks."""
    common = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32", "--epochs", "1",
              "--align-epochs", "1", "--cache-dir", str(cache_dir), "--quiet"]
    in_loss = []

    def recording_loss(logits, targets, *args):
        in_loss.append({t for t in logits if (targets[t] >= 0).any()})
        return multitask_loss(logits, targets, *args)

    monkeypatch.setattr(train, "multitask_loss", recording_loss)
    assert train.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "aux"), "--auxiliary-tasks", "department_name",
                       "section_name"]) == 0
    plain, aux = read_config(tmp_path / "plain"), read_config(tmp_path / "aux")
    assert {"department_name", "section_name"} <= in_loss[-1] and "department_name" not in in_loss[0]
    assert list(aux.tasks) == list(plain.tasks) and set(aux.model.tasks) == set(plain.tasks)
    assert aux.train.auxiliary_tasks == ["department_name", "section_name"]
    assert set(aux.metrics["val"]["tasks"]) == set(plain.tasks) == set(aux.metrics["test"]["tasks"])
    model = Predictor.from_checkpoint(tmp_path / "aux").model
    assert model.modality.queries.shape[0] == len(plain.tasks) and set(model.heads) == set(plain.tasks)
    prediction = Predictor.from_checkpoint(tmp_path / "aux").predict(Image.open(HM / hm_rows("test", 1)[0]["image"]),
                                                                     "Striped top")
    assert set(prediction.tasks) == set(plain.tasks)


def test_an_auxiliary_task_the_manifest_lacks_is_refused_by_name(tmp_path, cache_dir, capsys):
    assert train.main(["--catalogue", "hm-articles", "--limit", "16", "--epochs", "1", "--out", str(tmp_path / "x"),
                       "--auxiliary-tasks", "department_nmae", "--cache-dir", str(cache_dir), "--quiet"]) == 2
    assert "--auxiliary-tasks ['department_nmae']: no such column" in capsys.readouterr().err


def test_zero_shot_baseline_classifies_by_label_prompts(small_checkpoint, cache_dir, tmp_path):
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 48), "test48.csv")
    zero_shot = evaluate.evaluate_checkpoint(small_checkpoint, manifest, "test", cache_dir, zero_shot=True)
    trained = evaluate.evaluate_checkpoint(small_checkpoint, manifest, "test", cache_dir)
    assert zero_shot["method"] == "zero-shot" and trained["method"] == "cma-clip"
    assert set(zero_shot["tasks"]) == set(trained["tasks"])
    assert zero_shot["tasks"] != trained["tasks"]  # a different classifier, not the heads


def test_finetuning_the_backbone_saves_and_reloads_its_weights(tmp_path, cache_dir):
    out = tmp_path / "finetuned"
    assert train.main(["--catalogue", "hm-articles", "--limit", "8", "--batch-size", "8", "--width", "32",
                       "--epochs", "1", "--align-epochs", "1", "--finetune-backbone", "--out", str(out),
                       "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert (out / "backbone.safetensors").exists()
    from cma_clip.backbones import shared_backbone

    predictor = Predictor.from_checkpoint(out, "cpu")
    pretrained = shared_backbone("bundled", "cpu").state_dict()
    assert predictor.backbone is not shared_backbone("bundled", "cpu")
    changed = [name for name, p in predictor.backbone.state_dict().items() if not torch.equal(p, pretrained[name])]
    assert changed, "fine-tuning changed no backbone weight"
    # its features are cached apart from the pretrained backbone's, which training cached first
    assert predictor.backbone.cache_key() != shared_backbone("bundled", "cpu").cache_key()
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 8), "test8.csv")
    evaluate.evaluate_checkpoint(out, manifest, "test", tmp_path / "eval-cache")
    metas = [json.loads(p.read_text()) for p in (tmp_path / "eval-cache").glob("features/*/meta.json")]
    assert [m["backbone"] for m in metas] == [predictor.backbone.cache_key()]


def test_resuming_a_finetuning_run_restores_the_backbone(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "finetune-resume"
    common = ["--catalogue", "hm-articles", "--limit", "8", "--batch-size", "8", "--width", "32", "--align-epochs", "1",
              "--finetune-backbone", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(train, "finish", lambda *args, **kwargs: {})
        train.train(train.parse_config([*common, "--epochs", "1"]))
    from safetensors.torch import load_file

    state = load_file(str(out / TRAIN_STATE))
    after_one_epoch = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert after_one_epoch
    restored = {}
    real_load_state = train.load_state

    def spy(out_dir, model, optimizer, backbone=None, ema=None):
        counters = real_load_state(out_dir, model, optimizer, backbone, ema)
        restored.update({k: v.clone() for k, v in backbone.state_dict().items()})  # as loaded, before training
        return counters

    monkeypatch.setattr(train, "load_state", spy)
    assert train.main([*common, "--epochs", "2", "--resume"]) == 0
    assert all(torch.equal(restored[k], v) for k, v in after_one_epoch.items())
    assert [h["epoch"] for h in read_config(out).training["history"]] == [1, 2]


def test_texts_are_cut_to_the_backbones_limit(tmp_path, cache_dir, capsys):
    """hm-articles asks for 96 text tokens; CLIP's text tower takes 77."""
    out = tmp_path / "clip"
    assert train.main(["--catalogue", "hm-articles", "--backbone", "open_clip:ViT-B-32", "--limit", "8",
                       "--batch-size", "8", "--width", "32", "--epochs", "1", "--align-epochs", "1", "--out", str(out),
                       "--cache-dir", str(cache_dir), "--quiet"]) == 0
    config = read_config(out)
    assert config.catalogue.max_text_tokens == config.model.max_text_tokens == 77
    assert "texts are cut to 77 tokens" in capsys.readouterr().err


def test_rescoring_a_checkpoint_reproduces_its_reports(small_checkpoint, cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_checkpoint, copy)
    before = read_config(copy)
    (copy / "eval_test.json").unlink()
    metrics = evaluate.rescore(copy, cache_dir=str(cache_dir))
    after = read_config(copy)
    assert metrics == after.metrics == before.metrics and after.tasks == before.tasks
    assert json.loads((copy / "eval_test.json").read_text()) == before.metrics["test"]
    assert replace(after, metrics={}) == replace(before, metrics={})


def test_evaluate_reports_what_auto_accepting_with_the_checkpoints_own_thresholds_does(
        small_checkpoint, cache_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "thresholds"
    shutil.copytree(small_checkpoint, copy)
    config = read_config(copy)
    every, none, *_ = config.tasks
    config.tasks[every].threshold_90 = 0.0  # accepts every item
    config.tasks[none].threshold_90 = None  # accepts none
    config.save(copy)
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 48), "test48.csv")
    out = tmp_path / "report.json"
    assert evaluate.main(["--checkpoint", str(copy), "--manifest", str(manifest), "--split", "test",
                          "--out-json", str(out), "--cache-dir", str(cache_dir)]) == 0
    assert "operating_recall" in capsys.readouterr().out
    report = json.loads(out.read_text())
    for task, metrics in report["tasks"].items():
        assert {"accuracy", "macro_f1", "recall_at_90_precision", "n", "threshold", "auto_accepted",
                "auto_accept_precision", "auto_accept_precision_ci", "operating_recall"} <= set(metrics)
        assert metrics["threshold"] == config.tasks[task].threshold_90
        if metrics["auto_accepted"]:
            low, high = metrics["auto_accept_precision_ci"]
            assert 0.0 <= low <= metrics["auto_accept_precision"] <= high <= 1.0
            assert metrics["operating_recall"] <= metrics["auto_accept_precision"]
    assert report["tasks"][every]["auto_accepted"] == report["tasks"][every]["n"]
    assert abs(report["tasks"][every]["auto_accept_precision"] - report["tasks"][every]["accuracy"]) < 1e-9
    assert abs(report["tasks"][every]["operating_recall"] - report["tasks"][every]["accuracy"]) < 1e-9
    assert report["tasks"][none]["auto_accepted"] == 0 and report["tasks"][none]["operating_recall"] == 0.0
    assert report["tasks"][none]["auto_accept_precision"] is None
    mean = sum(m["operating_recall"] for m in report["tasks"].values()) / len(report["tasks"])
    assert abs(report["mean"]["operating_recall"] - mean) < 1e-9
    zero_shot = evaluate.evaluate_checkpoint(copy, manifest, "test", cache_dir, zero_shot=True)
    assert "operating_recall" not in zero_shot["mean"]  # the thresholds belong to the trained heads


def test_thresholds_record_their_rule_and_configs_without_one_still_load(small_checkpoint, tmp_path):
    import shutil

    from cma_clip.checkpoint import THRESHOLD_RULES

    config = read_config(small_checkpoint)
    assert {spec.threshold_rule for spec in config.tasks.values()} == {evaluate.THRESHOLD_RULE}
    assert evaluate.THRESHOLD_RULE in THRESHOLD_RULES
    for task, spec in config.tasks.items():  # calibrate's val report used the thresholds it set
        assert config.metrics["val"]["tasks"][task]["threshold"] == spec.threshold_90
    old = tmp_path / "old"
    shutil.copytree(small_checkpoint, old)
    raw = json.loads((old / "config.json").read_text())
    for spec in raw["tasks"].values():
        del spec["threshold_rule"]
        spec["threshold_90"] = 0.5
    (old / "config.json").write_text(json.dumps(raw))
    loaded = read_config(old)
    assert {spec.threshold_rule for spec in loaded.tasks.values()} == {"point"}
    predictor = Predictor.from_checkpoint(old, "cpu")
    assert set(predictor.thresholds.values()) == {0.5}
    photo = Image.new("RGB", (64, 64), "red")
    photo.paste((30, 30, 160), (16, 16, 48, 48))  # not one flat colour: a blank photo is never auto-accepted
    prediction = predictor.predict_batch([photo], ["a red dress"])[0]
    for p in prediction.tasks.values():
        assert p.threshold == 0.5 and p.auto_accept == (p.confidence >= 0.5)
