"""The app's logic, without a browser, on a checkpoint trained on real data."""
import ast
import csv
from pathlib import Path

import pytest

from cma_clip.data import Catalogue, read_manifest
from cma_clip.studio import StudioError, clean_text
from cma_clip.studio.views import (heatmap, history_rows, modality_figure, prediction_rows, review_progress,
                                   text_shading, token_choices)
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT, HM, hm_rows


def test_predict_and_explain(studio):
    result = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    rows = prediction_rows(result)
    assert [r[0] for r in rows] == studio.predictor("hm-articles").tasks
    assert all(0 < r[2] <= 1 for r in rows)
    choices, best = token_choices(result, "colour_group_name")
    assert best is not None and best in [index for _, index in choices]
    assert all(not label.startswith("[") for label, _ in choices)  # [CLS]/[SEP] are not offered
    relevance = result.token_relevance["colour_group_name"]
    assert best == max((i for _, i in choices), key=lambda i: relevance[i])
    picture = heatmap(result, best)
    assert picture.size == (224, 224)
    assert heatmap(result, choices[0][1]).tobytes() != heatmap(result, choices[-1][1]).tobytes()
    shading = text_shading(result)
    assert shading and all(word.strip() in EXAMPLE_TEXT.lower() for word, _ in shading)
    assert max(score for _, score in shading) == 1.0
    assert len(modality_figure(result).axes[0].patches) == 2 * len(rows)


@pytest.mark.parametrize("image, message", [(None, "Upload a product image"), ("missing.jpg", "not found")])
def test_predict_refuses_bad_images_with_a_message(studio, image, message):
    with pytest.raises(StudioError, match=message):
        studio.predict(image, "text", "hm-articles")


def test_predict_refuses_a_text_file_named_jpg(studio, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not an image")
    with pytest.raises(StudioError, match="not a readable image"):
        studio.predict(str(fake), "text", "hm-articles")


def test_unknown_model(studio):
    with pytest.raises(StudioError, match="Unknown model"):
        studio.predict(str(EXAMPLE_IMAGE), "text", "nope")


def test_save_correction_history_and_export(studio):
    result = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    labels = {t: p.label for t, p in result.tasks.items()}
    labels["colour_group_name"] = "Turquoise glitter"  # a new label, not in the vocabulary
    with pytest.raises(StudioError, match="annotator"):
        studio.save_correction(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", " ", "0816591001", labels, result)
    assert studio.store.count() == 0
    studio.save_correction(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ana", "0816591001", labels, result)
    rows = history_rows(studio.history())
    assert rows[0][1] == "ana" and rows[0][2] == "0816591001" and "Turquoise glitter" in rows[0][3]
    for fmt in ("CSV", "JSONL"):
        exported = read_manifest(studio.export(fmt))
        assert exported[0]["colour_group_name"] == "Turquoise glitter"
        assert exported[0]["id"] == "0816591001"


def test_a_correction_saved_without_a_prediction_stores_the_models(studio):
    """The Predict tab saves without passing its prediction: the store must still hold the
    model's prediction for these inputs, so `corrected` tells where the labeler disagreed."""
    expected = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    labels = {t: p.label for t, p in expected.tasks.items()}
    labels["colour_group_name"] = "Turquoise glitter"
    studio.save_correction(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ana", "0816591001", labels)
    entry = studio.store.history()[0]
    assert {t: p["label"] for t, p in entry["predictions"].items()} == {t: p.label for t, p in expected.tasks.items()}
    assert entry["corrected"] == ["colour_group_name"]


def test_review_queue_on_an_empty_split_says_so(studio, monkeypatch):
    real_open = Catalogue.open
    monkeypatch.setattr(Catalogue, "open",
                        lambda config, split=None: real_open(config, split=split).split("no-such-split"))
    with pytest.raises(StudioError, match="no items"):
        studio.review_catalogue("hm-articles", "test", 5)


def test_review_queue_on_a_catalogue_split(studio):
    queue = studio.review_catalogue("hm-articles", "test", 12)
    confidences = [item.confidence for item in queue.items]
    assert len(queue.items) == 12 and confidences == sorted(confidences)
    assert review_progress(queue) == "**0 reviewed of 12**"
    first = queue.current
    labels = {t: p.label for t, p in first.predictions.items()}
    studio.review_save(queue, "ben", labels)
    assert first.status == "accepted" and queue.current is not first
    studio.review_skip(queue)
    assert queue.reviewed == 2
    assert studio.store.current_labels()[first.item_id]["labels"] == labels


def test_bulk_accept_takes_only_items_above_every_threshold(studio):
    queue = studio.review_catalogue("hm-articles", "val", 10)
    for item in queue.items[5:]:  # the five most confident clear every task's threshold
        for p in item.predictions.values():
            p.auto_accept = True
    assert studio.bulk_accept(queue, "cem") == 5 and studio.store.count() == 5
    assert [item.status for item in queue.items] == ["pending"] * 5 + ["accepted"] * 5


def test_review_upload_matches_images_by_name(studio, tmp_path):
    rows = hm_rows("test", 3)
    manifest = tmp_path / "upload.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["article_id", "image", "prod_name", "detail_desc"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    uploaded = [str(HM / r["image"]) for r in rows[:2]]  # the third image is not uploaded
    queue = studio.review_upload("hm-articles", str(manifest), uploaded)
    assert sorted(item.item_id for item in queue.items) == sorted(r["article_id"] for r in rows[:2])
    assert len(queue.notes) == 1 and "not uploaded" in queue.notes[0]
    with pytest.raises(StudioError, match="needs the columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("x,y\n1,2\n")
        studio.review_upload("hm-articles", str(bad), uploaded)


def test_probe_and_sweeps_through_the_studio(studio):
    result = studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 4, "none", 0, seed=1)
    assert result.noisy_text == clean_text(EXAMPLE_TEXT) and result.noisy_image.size != (0, 0)
    with pytest.raises(StudioError, match="Severities go from 0"):
        studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 9, "none", 0)
    with pytest.raises(StudioError, match="Unknown text corruption"):
        studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 1, "leet", 1)
    with pytest.raises(StudioError, match="Choose an image or a text corruption"):
        studio.item_sweep(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "none", "none")
    sweep = studio.item_sweep(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "jpeg", "none")
    assert list(sweep) == ["image"] and all(len(v) == 6 for v in sweep["image"].values())
    rows, path = studio.catalogue_sweep("hm-articles", 4, "none", "truncation", seed=0)
    assert {r["mode"] for r in rows} == {"text"} and path.exists()
    assert read_manifest(path)[0].keys() >= {"mode", "severity", "task", "accuracy", "n"}



STUDIO = Path(__file__).resolve().parent.parent / "cma_clip" / "studio"
NOT_IN_THE_STUDIO = ("app", "gradio", "gradio_client", "cma_clip.bench", "cma_clip.experiments")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a file of cma_clip/studio imports (`from ..x import y`: cma_clip.x, cma_clip.x.y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = ["cma_clip", "studio"][:3 - node.level] if node.level else []
            base = ".".join(package + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def forbidden(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == f or m.startswith(f + ".") for f in NOT_IN_THE_STUDIO)}


@pytest.mark.parametrize("name", ["__init__.py", "service.py", "views.py"])
def test_the_studio_imports_neither_the_app_nor_gradio(name):
    modules = imported_modules(STUDIO / name)
    assert "cma_clip.studio.service" in modules or "cma_clip.predict" in modules  # the check reads the imports
    assert forbidden(modules) == set()
    assert forbidden(imported_modules(STUDIO.parent.parent / "app.py")) >= {"gradio"}  # ... and would see them
