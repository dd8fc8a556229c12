"""Issue 17's fast studio, for correctness (the speed is the benchmark's, `python -m cma_clip.bench`):
kept catalogue predictions equal fresh ones and follow the checkpoint, models load in the
background, and micro-batched predictions go to their own callers."""
import threading

import numpy as np
import pytest

from cma_clip import catalogue_predictions as kept
from cma_clip.data import Catalogue, CatalogueConfig, limit_splits, load_image
from cma_clip.predict import Predictor
from cma_clip.studio import Studio
from cma_clip.studio.batching import MicroBatcher
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT

LIMIT = 48  # the small checkpoint's catalogue: its features are in the session's cache
TOLERANCE = 0.005  # features kept as float16, batches of 512 against 16: measured 5e-4 at most


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return limit_splits(Catalogue.open(CatalogueConfig.load("hm-articles")), LIMIT)


def fresh(predictor: Predictor, catalogue: Catalogue, split: str):
    """The split's items predicted from their images and texts, as a queue did before."""
    items = catalogue.split(split)
    return predictor.score_batch([load_image(p) for p in items.image_paths()], items.texts())


def assert_same_predictions(kept_probs: dict, fresh_probs: dict) -> None:
    """Probabilities within TOLERANCE, and the same label wherever the top two are further apart than
    the rounding could move them (most items: the comparison is not left empty)."""
    compared = rows = 0
    for task, probs in fresh_probs.items():
        assert kept_probs[task].shape == probs.shape
        assert np.abs(kept_probs[task] - probs).max() < TOLERANCE, task
        top2 = -np.sort(-probs, axis=1)[:, :2]
        clear = top2[:, 0] - top2[:, 1] > 2 * TOLERANCE
        assert (kept_probs[task].argmax(1)[clear] == probs.argmax(1)[clear]).all(), task
        compared, rows = compared + clear.sum(), rows + len(probs)
    assert compared > rows // 2


@pytest.mark.parametrize("model", ["small_checkpoint", "colour_checkpoint"])
def test_kept_predictions_equal_fresh_ones_and_are_read_back(model, catalogue, cache_dir, monkeypatch, request):
    checkpoint = request.getfixturevalue(model)  # the colour model reads the colour descriptors of the cache
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    scores = kept.catalogue_predictions(predictor, catalogue, "test", cache_dir)
    path = kept.predictions_path(predictor, catalogue, "test", cache_dir)
    assert scores is not None and path.exists() and len(scores) == len(catalogue.split("test"))
    assert_same_predictions(scores.probabilities, fresh(predictor, catalogue, "test").probabilities)
    for weights in scores.modality_weights.values():
        assert np.allclose(weights.sum(1), 1, atol=1e-3)

    def no_model(*args, **kwargs):
        raise AssertionError("kept predictions are read, not computed again")

    monkeypatch.setattr(kept, "predict_probabilities", no_model)
    again = kept.catalogue_predictions(Predictor.from_checkpoint(checkpoint, "cpu"), catalogue, "test", cache_dir)
    for task, probs in scores.probabilities.items():
        assert np.array_equal(again.probabilities[task], probs)


def test_another_checkpoint_gets_its_own_predictions(small_checkpoint, catalogue, cache_dir):
    predictor = Predictor.from_checkpoint(small_checkpoint, "cpu")
    other = Predictor.from_checkpoint(small_checkpoint, "cpu")
    for parameter in other.model.parameters():  # other weights: another checkpoint
        parameter.data.mul_(1.5)
    assert other.fingerprint != predictor.fingerprint
    first = kept.catalogue_predictions(predictor, catalogue, "val", cache_dir)
    second = kept.catalogue_predictions(other, catalogue, "val", cache_dir)
    assert kept.predictions_path(other, catalogue, "val", cache_dir) != kept.predictions_path(
        predictor, catalogue, "val", cache_dir)
    assert any(not np.allclose(first.probabilities[t], second.probabilities[t]) for t in predictor.tasks)
    assert_same_predictions(second.probabilities, fresh(other, catalogue, "val").probabilities)
    empty = cache_dir / "empty"
    assert kept.catalogue_predictions(predictor, catalogue, "val", empty) is None
    assert not empty.exists()  # no features there: nothing computed, nothing kept


def test_kept_predictions_say_which_photos_are_blank_and_older_ones_learn_it(small_checkpoint, catalogue,
                                                                             tmp_path, monkeypatch):
    """A queue opens from kept predictions: they must carry the blank-photo flags (never auto-accepted)
    that fresh predictions get, and an entry kept before there were flags gains them once."""
    import shutil
    from dataclasses import replace

    from PIL import Image

    copy = replace(catalogue, root=tmp_path / "data")  # the catalogue with one test photo a flat placeholder
    for row, path in zip(catalogue.rows, catalogue.image_paths()):
        (copy.root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy.root / row["image"])
    test = copy.split("test")
    Image.new("RGB", (180, 240), (236, 236, 236)).save(test.image_paths()[5], "JPEG")
    predictor = Predictor.from_checkpoint(small_checkpoint, "cpu")
    cache = tmp_path / "cache"
    scores = kept.catalogue_predictions(predictor, copy, "test", cache, build_features=True)
    assert scores.blank_photo.tolist() == [i == 5 for i in range(len(test))]
    assert not any(p.auto_accept for p in predictor.predictions(scores.take([5]))[0].tasks.values())
    path = kept.predictions_path(predictor, copy, "test", cache)
    with np.load(path) as stored:  # as an entry kept before the flags
        np.savez(path, **{name: stored[name] for name in stored.files if name != "blank_photo"})
    again = kept.catalogue_predictions(predictor, copy, "test", cache)
    assert np.array_equal(again.blank_photo, scores.blank_photo)
    monkeypatch.setattr(kept, "blank_photos", None)  # kept with the entry now: the photos are not decoded again
    assert np.array_equal(kept.catalogue_predictions(predictor, copy, "test", cache).blank_photo, scores.blank_photo)


def test_a_review_queue_opens_from_kept_predictions(checkpoint_dir, cache_dir, tmp_path):
    fast = Studio(checkpoint_dir, data_dir=tmp_path / "fast", device="cpu", cache_dir=cache_dir,
                  catalogue_limit=LIMIT)
    live = Studio(checkpoint_dir, data_dir=tmp_path / "live", device="cpu", cache_dir=tmp_path / "no-cache",
                  catalogue_limit=LIMIT)
    queue = fast.review_catalogue("hm-articles", "test", 30)
    assert fast.catalogue_scores("hm-articles", "test") is not None  # read from the kept predictions
    assert live.catalogue_scores("hm-articles", "test") is None  # predicted on opening
    reference = live.review_catalogue("hm-articles", "test", 30)
    assert sorted(i.item_id for i in queue.items) == sorted(i.item_id for i in reference.items)  # the same sample
    by_id = {item.item_id: item for item in reference.items}
    for item in queue.items:
        for task, p in item.predictions.items():
            q = by_id[item.item_id].predictions[task]
            assert abs(p.confidence - q.confidence) < TOLERANCE
            assert p.label == q.label or abs(q.probabilities[0] - q.probabilities[1]) < 2 * TOLERANCE
    bar = float(np.median([item.confidence for item in queue.items]))
    margin = fast.review_catalogue("hm-articles", "test", 30, strategy="margin", min_conf=bar)
    assert 0 < len(margin.items) < len(queue.items) and all(item.confidence >= bar for item in margin.items)
    scores = [max(i.uncertainty["margin"].values()) for i in margin.items]
    assert scores == sorted(scores, reverse=True)


def test_models_load_in_the_background_and_a_prediction_waits_for_them(checkpoint_dir, tmp_path, monkeypatch):
    loads = []
    real = Predictor.from_checkpoint.__func__

    def counted(cls, folder, device=None):
        loads.append(folder)
        return real(cls, folder, device)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(counted))
    studio = Studio(checkpoint_dir, data_dir=tmp_path / "studio", device="cpu")
    thread = studio.load_models()
    result = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")  # while it loads
    assert studio.wait_loaded(timeout=300) and not thread.is_alive()
    assert len(loads) == 1  # one load, shared by the thread and the call
    assert result.tasks and all(0 < p.confidence <= 1 for p in result.tasks.values())
    assert studio.load_seconds is not None and studio.load_seconds > 0


def test_concurrent_predictions_each_get_their_own(studio):
    inputs = [(str(EXAMPLE_IMAGE), f"{text}") for text in
              (EXAMPLE_TEXT, "Black leather ankle boots", "Red floral summer dress", "Blue denim jeans, slim fit",
               "Striped wool scarf", "White cotton socks, 3-pack")]
    predictor = studio.predictor("hm-articles")
    alone = [predictor.predict(load_image(path), text) for path, text in inputs]
    start = threading.Barrier(len(inputs))
    results: list = [None] * len(inputs)

    def call(n: int) -> None:
        start.wait()
        results[n] = studio.predict(*inputs[n], "hm-articles")

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(studio._batcher("hm-articles").batch_sizes) > 1  # some of them ran as one batch
    for got, expected, (_, text) in zip(results, alone, inputs):
        assert got.words == expected.words and got.words[0].lower() == text.split()[0].lower()
        for task, p in expected.tasks.items():
            for rank, (label, alone_label) in enumerate(zip(got.tasks[task].labels, p.labels)):
                # runners-up that tie may swap places under float rounding; nothing else may differ
                assert label == alone_label or abs(got.tasks[task].probabilities[rank] - p.probabilities[rank]) < 1e-3
            assert abs(got.tasks[task].confidence - p.confidence) < 1e-2
            assert np.abs(got.relevance[task].words - expected.relevance[task].words).max() < 1e-2
        assert got.text_to_image.shape == expected.text_to_image.shape


def test_micro_batcher_batches_waiting_calls_and_hands_out_results_and_errors():
    gate, entered = threading.Event(), threading.Event()
    seen = []

    def run(items):
        seen.append(list(items))
        if items == ["first"]:
            entered.set()
            gate.wait(10)
        if "bad" in items:
            raise ValueError("a bad batch")
        return [f"{item}!" for item in items]

    batcher = MicroBatcher(run, max_batch=4)
    out = {}

    def call(item):
        try:
            out[item] = batcher.submit(item)
        except ValueError as exc:
            out[item] = exc

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert entered.wait(10)
    others = [threading.Thread(target=call, args=(f"item{n}",)) for n in range(6)]
    for thread in others:
        thread.start()
    while batcher._waiting.qsize() < 6:
        threading.Event().wait(0.01)
    gate.set()
    for thread in [first, *others]:
        thread.join(10)
    assert out == {"first": "first!", **{f"item{n}": f"item{n}!" for n in range(6)}}
    assert [len(b) for b in seen] == [1, 4, 2]  # the waiting calls, at most 4 at a time
    failing = [threading.Thread(target=call, args=(item,)) for item in ("ok", "bad")]
    for thread in failing:
        thread.start()
    for thread in failing:
        thread.join(10)
    assert isinstance(out["bad"], ValueError)
    assert isinstance(out["ok"], ValueError) or out["ok"] == "ok!"  # in the bad batch or one of its own
