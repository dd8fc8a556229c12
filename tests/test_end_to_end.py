"""Train a few steps on a slice of the real H&M catalogue, then evaluate and predict with it."""
import json

from PIL import Image

from cma_clip import Predictor, evaluate, predict, train
from cma_clip.checkpoint import read_config
from conftest import HM


def test_training_writes_a_complete_checkpoint(small_checkpoint):
    config = read_config(small_checkpoint)
    assert config["backbone"] == "bundled"
    assert list(config["tasks"]) == ["product_type_name", "graphical_appearance_name", "colour_group_name",
                                     "perceived_colour_master_name", "index_group_name", "garment_group_name"]
    for spec in config["tasks"].values():
        assert spec["classes"] == sorted(spec["classes"]) and "threshold_90" in spec
    assert len(config["training"]["history"]) == 2
    assert {"val", "test"} <= set(config["metrics"])
    assert not list(small_checkpoint.glob("train_state*"))  # resume state removed once done
    assert (small_checkpoint / "eval_test.json").exists()


def test_evaluate_command_line_contract(small_checkpoint, cache_dir, tmp_path, capsys):
    # a manifest without a split column is evaluated whole
    rows = (HM / "articles.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[-1] == "split"
    manifest = tmp_path / "subset.jsonl"
    import csv
    with open(HM / "articles.csv") as handle:
        items = [r for r in csv.DictReader(handle) if r["split"] == "test"][:20]
    manifest.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "split"},
                                            "image": str(HM / r["image"])}) + "\n" for r in items))
    out = tmp_path / "report.json"
    code = evaluate.main(["--checkpoint", str(small_checkpoint), "--manifest", str(manifest),
                          "--out-json", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["items"] == 20
    for metrics in [*report["tasks"].values(), report["mean"]]:
        assert {"accuracy", "macro_f1", "recall_at_90_precision"} <= set(metrics)
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "mean" in capsys.readouterr().out


def test_evaluate_on_the_test_split_matches_the_training_report(small_checkpoint, cache_dir, tmp_path):
    # the checkpoint was trained on the first 48 rows of each split; build that manifest
    import csv
    with open(HM / "articles.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"][:48]
    manifest = tmp_path / "test48.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": str(HM / r["image"])} for r in rows)
    report = evaluate.evaluate_checkpoint(small_checkpoint, manifest, "test", cache_dir)
    expected = json.loads((small_checkpoint / "eval_test.json").read_text())
    for task, metrics in expected["tasks"].items():
        assert abs(report["tasks"][task]["accuracy"] - metrics["accuracy"]) < 1e-6


def test_predictor_on_a_real_item(small_checkpoint):
    predictor = Predictor.from_checkpoint(small_checkpoint, "cpu")
    image = Image.open(sorted((HM / "images").glob("*/*.jpg"))[0])
    result = predictor.predict(image, "Black jersey dress with short sleeves", top_k=3)
    assert set(result.tasks) == set(predictor.tasks)
    for task, p in result.tasks.items():
        assert len(p.labels) == 3 and all(label in predictor.classes[task] for label in p.labels)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and 0 < p.confidence <= 1
        assert abs(sum(p.modality_weights.values()) - 1) < 1e-5
    assert result.tokens[0] == "[CLS]" and len(result.tokens) == result.text_to_image.shape[0]
    assert result.text_to_image.shape[1] == result.grid_size ** 2 == 49
    assert result.image_cls_to_text.shape == (len(result.tokens),)
    batch = predictor.predict_batch([image, image], ["a", "b"])
    assert len(batch) == 2 and set(batch[0].tasks) == set(predictor.tasks)


def test_predict_command_over_a_manifest(small_checkpoint, tmp_path):
    import csv
    with open(HM / "articles.csv") as handle:
        rows = [r for r in csv.DictReader(handle)][:5]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["article_id", "image", "prod_name", "detail_desc"])
        writer.writeheader()
        writer.writerows({k: (str(HM / r[k]) if k == "image" else r[k]) for k in writer.fieldnames} for r in rows)
    out = tmp_path / "preds.jsonl"
    assert predict.main(["--checkpoint", str(small_checkpoint), "--manifest", str(manifest), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["article_id"] for r in rows]
    assert all("colour_group_name_confidence" in r for r in records)


def test_resume_continues_an_interrupted_run(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "resume"
    common = ["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32",
              "--align-epochs", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]
    # a run that dies after its first epoch: it never reaches `finish`
    with monkeypatch.context() as patch:
        patch.setattr(train, "finish", lambda *args, **kwargs: {})
        train.train(train.parse_args([*common, "--epochs", "1"]))
    assert json.loads((out / "train_state.json").read_text())["epoch"] == 1
    assert train.main([*common, "--epochs", "3", "--resume"]) == 0
    history = read_config(out)["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_training_with_extra_labels_learns_the_corrections(tmp_path, cache_dir):
    import csv

    from cma_clip.labels import LabelStore
    from conftest import EXAMPLE_IMAGE

    with open(HM / "articles.csv") as handle:
        first = next(r for r in csv.DictReader(handle) if r["split"] == "train")
    store = LabelStore(tmp_path / "labels.db")
    store.save_correction(image=HM / first["image"], text=first["prod_name"], item_id=first["article_id"],
                          labels={"colour_group_name": "Glitter Teal"}, annotator="ana")
    store.save_correction(image=EXAMPLE_IMAGE, text="Striped jersey tee", annotator="ana",
                          labels={"colour_group_name": "Glitter Teal", "graphical_appearance_name": "Stripe"})
    out = tmp_path / "with-labels"
    assert train.main(["--catalogue", "hm-articles", "--limit", "32", "--batch-size", "16", "--width", "32",
                       "--epochs", "1", "--align-epochs", "1", "--extra-labels", str(tmp_path / "labels.db"),
                       "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    config = read_config(out)
    assert "Glitter Teal" in config["tasks"]["colour_group_name"]["classes"]
