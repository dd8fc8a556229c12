"""The app's logic, without a browser, on a checkpoint trained on real data."""
import ast
import dataclasses
import csv
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from cma_clip.data import Catalogue, read_manifest
from cma_clip.studio import Studio, StudioError, clean_text, views
from cma_clip.studio.service import SweepStopped, default_reviewers
from cma_clip.studio.views import history_rows, modality_figure, prediction_rows, review_progress
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT, HM, hm_rows, write_hm_manifest
from test_viz import bar_shares


def test_predict_and_explain(studio):
    result = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    rows = prediction_rows(result)
    predictor = studio.predictor("hm-articles")
    assert [r[0] for r in rows] == [predictor.names[t] for t in predictor.tasks]
    assert predictor.names["graphical_appearance_name"] == "Pattern"  # the catalogue config's name
    for row, p in zip(rows, result.tasks.values()):  # one format: percent, the threshold beside the verdict
        assert row[2] == views.percent(p.confidence) and row[2].endswith("%")
        assert p.threshold is None or views.percent(p.threshold) in row[3]
        assert row[3].startswith("✓ auto-accept") == p.auto_accept
    choices, best = views.word_choices(result, "colour_group_name")
    assert best is not None and best in [index for _, index in choices]
    assert [label.split("  (")[0] for label, _ in choices] == result.words  # whole words, no [CLS]/[SEP]
    shares = result.relevance["colour_group_name"].words
    assert choices[best][0].endswith(f"({shares[best]:.0%})")  # as the note writes it
    first, last = (views.image_map(result, None, kind="attention", word=choices[i][1]) for i in (0, -1))
    assert first.tobytes() != last.tobytes()  # each word's attention over the patches
    shading = views.word_shading(result, "colour_group_name")
    assert shading and " ".join(word.strip() for word, _ in shading) == EXAMPLE_TEXT  # the words as typed
    assert max(score for _, score in shading) == 1.0
    shares = bar_shares(modality_figure(result))
    assert len(shares) == len(rows)
    assert all(abs(share - p.modality_weights["text"]) < 0.01 for share, p in zip(shares, result.tasks.values()))
    assert result.words_unread == 0 and views.input_note(result) == ""  # the whole text read: no note
    assert views.word_direction(result) == []
    arabic = studio.predict(str(EXAMPLE_IMAGE), "قميص قطني (Cotton) أزرق", "hm-articles")
    assert views.word_direction(arabic) == ["rtl"]  # its words laid out from the right (QA, session 37)
    labels = [label for label, _ in views.word_choices(arabic, "colour_group_name")[0]]
    assert labels[0].startswith("\u2068قميص\u2069  (") and labels[2].startswith("(Cotton)  (")  # not "(%22) قميص"


def test_a_text_past_the_token_limit_says_how_much_the_model_read(studio):
    """A long text was cut to the encoder's first tokens without a word: the maps showed 30 words of 600."""
    words = "Nike running shoe black mesh upper".split() * 100
    result = studio.predict(str(EXAMPLE_IMAGE), " ".join(words), "hm-articles")
    read = len(result.words)
    assert 0 < read < len(words) and result.words_unread == len(words) - read
    assert result.words == words[:read]  # the words it read are the text's first ones
    assert (f"**The model read the first {read} words of the text**; the other {len(words) - read:,} are past"
            in views.input_note(result))
    one_more = dataclasses.replace(result, words_unread=1)
    assert "; the other word is past its encoder's token limit" in views.input_note(one_more)


@pytest.mark.parametrize("image, message", [(None, "Upload a product image"), ("missing.jpg", "not found")])
def test_predict_refuses_bad_images_with_a_message(studio, image, message):
    with pytest.raises(StudioError, match=message):
        studio.predict(image, "text", "hm-articles")


def test_predict_refuses_a_text_file_named_jpg(studio, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not an image")
    with pytest.raises(StudioError, match="not a readable image"):
        studio.predict(str(fake), "text", "hm-articles")


def test_checkpoint_folders_that_cannot_serve_are_named_not_listed_or_served_unsaid(small_checkpoint, tmp_path):
    """A config.json that does not read as a checkpoint's was dropped from the models without a
    word (or listed, and became the default model); broken weights were found by the first user."""
    import shutil

    folder = tmp_path / "checkpoints"
    for name in ("good", "aa-badjson", "ab-tasks-text", "a-broken"):
        shutil.copytree(small_checkpoint, folder / name)
    (folder / "aa-badjson" / "config.json").write_text('{"format": ')
    config = json.loads((folder / "ab-tasks-text" / "config.json").read_text())
    (folder / "ab-tasks-text" / "config.json").write_text(json.dumps({**config, "tasks": "oops"}))
    weights = folder / "a-broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    studio = Studio(folder, data_dir=tmp_path / "studio", device="cpu")
    assert studio.default_model == "a-broken"  # not known to be broken before it loads
    assert studio.model_names == ["a-broken", "good"]
    assert sorted(studio.unusable) == ["aa-badjson", "ab-tasks-text"]
    assert "not valid JSON" in studio.unusable["aa-badjson"] and "invalid settings" in studio.unusable["ab-tasks-text"]
    studio.load_models()
    assert studio.wait_loaded(120)
    assert "Model 'a-broken' cannot be loaded" in studio.unusable["a-broken"] and "good" not in studio.unusable
    assert studio.predictor("good").tasks
    assert studio.default_model == "good"  # the first model whose weights load, not the first folder


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
    assert "T" not in rows[0][0] and "+00:00" not in rows[0][0]  # the time as the audit writes it
    for fmt in ("CSV", "JSONL"):
        exported = read_manifest(studio.export(fmt))
        assert exported[0]["colour_group_name"] == "Turquoise glitter"
        assert exported[0]["id"] == "0816591001"


def test_each_export_is_a_file_of_its_own_and_the_newest_are_kept(studio, monkeypatch):
    """QA, sessions 35-36: every export went to one name (labels_export.csv) in the studio folder, so two
    exports at once could hand one of them the other's snapshot, and the agreement was found afterwards by
    its format (another export's, meanwhile). Each export now has its own file, agreement beside it."""
    from cma_clip.studio import service

    monkeypatch.setattr(service, "EXPORTS_KEPT", 3)
    exports = [studio.export(fmt) for fmt in ("CSV", "jsonl", "csv", "JSONL", "csv")]
    assert len({e.name for e in exports}) == 5
    kept = sorted(f.name for f in studio.data_dir.iterdir() if f.name.startswith("labels_export-"))
    assert kept == sorted(n for e in exports[2:] for n in (e.name, f"{e.stem}.agreement.json"))
    copy = studio.data_dir.parent / "gradio-cache" / exports[-1].name  # the File component's copy, elsewhere
    assert studio.export_agreement(copy) == studio.data_dir / f"{exports[-1].stem}.agreement.json"
    assert studio.export_agreement(exports[0]) is None  # pruned
    assert studio.export_agreement(studio.data_dir / "labels.db") is None
    with pytest.raises(StudioError, match="CSV or JSONL"):
        studio.export("xlsx")


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


def test_a_reviewer_is_one_whatever_the_case_of_the_typed_name(checkpoint_dir, tmp_path):
    """QA phone labeler, session 38: CMA_CLIP_REVIEWERS=rita, and "Rita" (a phone's keyboard) was refused."""
    studio = Studio(checkpoint_dir, data_dir=tmp_path / "studio", device="cpu", reviewers=["rita", "émile"])
    for name in ("Rita", "Émile", "E\u0301mile"):  # a decomposed "É" too (some keyboards type it so)
        with pytest.raises(StudioError, match="No disagreement to settle"):  # let in: there is nothing to settle yet
            studio.review_disagreements("hm-articles", None, 5, annotator=name)
    with pytest.raises(StudioError, match=r"Settling disagreements is for the reviewers \(rita, émile\), and ben"):
        studio.review_disagreements("hm-articles", None, 5, annotator="ben")


def test_the_laptops_rita_and_the_phones_rita_share_one_queue(studio):
    """Review of session 38: the store took "Rita" as the "rita" it held, but the studio compared names as typed:
    the phone's "Rita" was refused the laptop's queue ("This page shows rita's review queue"), and a second
    accept of her own labels stored a copy."""
    laptop = studio.review_catalogue("hm-articles", "test", 3, annotator="rita")
    studio.keep_queue(laptop, "rita")
    phone = studio.resume_queue(None, "Rita ", "hm-articles")
    assert phone is not None and phone.queue_id == laptop.queue_id and phone.owner == "rita"
    seen = studio.current_view(phone).shown
    labels = laptop.current.predicted()
    assert studio.review_save(laptop, "rita", labels).result == "saved"
    again = studio.review_save(phone, "Rita", labels, seen)
    assert again.result == "unchanged" and studio.store.count() == 1
    studio.review_next(phone, "RITA")
    assert studio.store.history()[0]["annotator"] == "rita"


def test_review_queue_on_an_empty_split_says_so(studio, monkeypatch):
    real_open = Catalogue.open
    monkeypatch.setattr(Catalogue, "open",
                        lambda config, split=None: real_open(config, split=split).split("no-such-split"))
    with pytest.raises(StudioError, match="no items"):
        studio.review_catalogue("hm-articles", "test", 5)


def test_review_queue_on_a_catalogue_split(studio):
    queue = studio.review_catalogue("hm-articles", "test", 12)
    confidences = [item.confidence for item in queue.items]  # least confidence: the lowest top-1 over tasks
    assert len(queue.items) == 12 and confidences == sorted(confidences)
    assert review_progress(queue) == "**0 reviewed of 12**"
    first = queue.current
    labels = {t: p.label for t, p in first.predictions.items()}
    outcome = studio.review_save(queue, "ben", labels)
    assert outcome.result == "saved" and outcome.item_id == first.item_id
    assert first.status == "accepted" and queue.current is not first
    studio.review_skip(queue, "ben")
    assert queue.reviewed == 2
    assert studio.store.current_labels()[first.item_id]["labels"] == labels
    saves = studio.store.count()
    studio.review_previous(queue, "ben"), studio.review_previous(queue, "ben")  # back to the accepted item
    assert queue.current is first
    again = studio.review_save(queue, "ben", labels, request_id="r-1")  # accepted as it stands: moved on
    assert again.result == "unchanged" and studio.store.count() == saves and queue.current is not first
    assert "nothing new saved, moved on" in views.save_message(again)
    retried = studio.review_save(queue, "ben", labels, request_id="r-1")  # its answer lost: the client retries
    assert retried.result == "unchanged" and retried.item_id == first.item_id  # the first's answer, nothing
    assert studio.store.count() == saves  # saved onto the item the queue moved to
    studio.review_previous(queue, "ben")
    current = queue.current
    with pytest.raises(StudioError, match="This page shows ben's review queue, and you are now cem: nothing was done"):
        studio.review_save(queue, "cem", labels)  # ben's page, left open in a browser signed in as cem since
    with pytest.raises(StudioError, match="ben's review queue"):
        studio.review_next(queue, "cem")
    assert studio.store.count() == saves and queue.owner == "ben" and queue.current is current
    assert studio.resume_queue(queue.queue_id, "ben").owner == "ben"
    cems = studio.review_catalogue("hm-articles", "test", 12, show_decided=True)
    cems.position = cems.index_of(current.item_id)
    other = studio.review_save(cems, "cem", labels)  # another labeler's same labels are theirs: stored
    assert other.result == "saved" and studio.store.count() == saves + 1


def test_an_uncertainty_queues_catalogue_item_starts_at_the_catalogues_labels_not_the_models_guesses(studio):
    """Its controls started at the model's labels: one reflex Accept stored the unsure model's guesses as a
    person's labels over the catalogue's (the queue holds the items the model is least sure of). A control
    starts at the catalogue's label now, so Accept confirms it, one that is none of the model's classes too
    (offered, and taken as the item's own: no new class to confirm)."""
    colour = "colour_group_name"
    classes = studio.task_classes("hm-articles")[colour]
    queue = studio.review_catalogue("hm-articles", "val", 40, annotator="vic", show_decided=True)
    inside = next(i for i in queue.items if i.catalogue.get(colour, i.predictions[colour].label) in
                  {*classes} - {i.predictions[colour].label})
    outside = next(i for i in queue.items if i.catalogue.get(colour, classes[0]) not in classes)
    queue.position = queue.index_of(inside.item_id)
    view = studio.current_view(queue)
    assert view.values[colour] == inside.catalogue[colour] != inside.predictions[colour].label
    saved = studio.review_save(queue, "vic", view.values)
    assert saved.result == "saved" and studio.store.item_state(inside.item_id)[colour].label == inside.catalogue[colour]
    queue.position = queue.index_of(outside.item_id)
    view = studio.current_view(queue)
    assert view.values[colour] == outside.catalogue[colour] != outside.predictions[colour].label
    assert outside.catalogue[colour] in studio.label_choices("hm-articles", outside.catalogue)[colour]
    other = studio.review_catalogue("hm-articles", "val", 40, annotator="wes", show_decided=True)
    other.position = other.index_of(inside.item_id)  # on another item, a label the model lacks is a new class
    assert studio.review_save(other, "wes", {colour: outside.catalogue[colour]}).result == "unknown"
    saved = studio.review_save(queue, "vic", view.values)
    assert saved.result == "saved" and studio.store.item_state(outside.item_id)[colour].label == view.values[colour]


def test_an_uploads_manifest_labels_start_its_controls_as_a_save_would_store_them(studio, tmp_path):
    """A manifest's label is the item's own label too: "dark-blue" starts at the class "Dark Blue" (two spellings
    would train as two classes), "Ocean<zero-width space>  Mist" as "Ocean Mist", and a cell holding only an
    invisible character starts empty. A label no class spells is the uploader's, typos and all: Accept asks
    about it as about a typed one (review s41: "Blakc" would have been stored with one reflex Accept)."""
    colour = "colour_group_name"
    classes = studio.task_classes("hm-articles")[colour]
    rows = [r for r in hm_rows("test", 60) if r[colour] in classes][:4]
    cells = [rows[0][colour].lower().replace(" ", "-"), "Ocean\u200b  Mist", "\u200b", "Blakc"]
    rows = [{**row, colour: cell} for row, cell in zip(rows, cells)]
    manifest = write_hm_manifest(tmp_path / "upload", rows)
    queue = studio.review_upload("hm-articles", str(manifest), [str(tmp_path / "upload" / r["image"]) for r in rows],
                                 annotator="uma", show_decided=True)
    started = {}
    for item in queue.items:
        queue.position = queue.index_of(item.item_id)
        started[item.item_id] = studio.current_view(queue).values
    spelled, own, invisible, typo = (started[r["article_id"]] for r in rows)
    assert spelled[colour] == class_of(cells[0], classes) != cells[0]
    assert (own[colour], invisible[colour], typo[colour]) == ("Ocean Mist", None, "Blakc")
    queue.position = queue.index_of(rows[3]["article_id"])
    asked = studio.review_save(queue, "uma", {colour: typo[colour]})
    assert asked.result == "unknown" and "Black" in asked.unknown[0].suggestions
    queue.position = queue.index_of(rows[1]["article_id"])
    assert studio.review_save(queue, "uma", {colour: own[colour]}).result == "unknown"  # confirmed, then stored
    assert studio.review_save(queue, "uma", {colour: own[colour]}, new_classes={colour: "Ocean Mist"}).result == "saved"
    assert studio.store.item_state(rows[1]["article_id"])[colour].label == "Ocean Mist"
    queue.position = queue.index_of(rows[0]["article_id"])  # "dark-blue" confirmed: the class it spells, no change
    confirmed = studio.review_save(queue, "uma", {colour: spelled[colour]})
    assert confirmed.result == "saved" and "Not the catalogue's label" not in views.save_message(confirmed)
    row = next(r for r in studio.store.audit(annotator="uma")[0] if r["item_id"] == rows[0]["article_id"])
    assert (row["catalogue_label"], row["label"], row["changed_vs_catalogue"]) == (cells[0], spelled[colour], False)


def class_of(label: str, classes: list[str]) -> str:
    """The class a label spells, case and hyphens aside (this test's own reading, not the app's)."""
    return next(c for c in classes if c.lower() == label.replace("-", " "))


def test_a_second_annotator_starts_blind_to_the_first_annotators_label(studio):
    """A queue showing decided items is a second pass, for the agreement: its controls started at the
    first annotator's label, so a plain Accept copied it (QA, session 32). They start where a first pass
    starts now, and at the labeler's own label once they saved one."""
    colour = "colour_group_name"
    ana = studio.review_catalogue("hm-articles", "test", 3, annotator="ana")
    item, start = ana.current, studio.current_view(ana).values[colour]
    other = next(c for c in studio.task_classes("hm-articles")[colour] if c not in (item.predictions[colour].label,
                                                                                      start))
    assert studio.review_save(ana, "ana", {**item.predicted(), colour: other}).result == "saved"
    ben = studio.review_catalogue("hm-articles", "test", 3, annotator="ben", show_decided=True)
    # his second pass counts the team's decisions, and says so: he read ana's as his own (QA team lead, session 37)
    assert views.review_progress(ben) == "**1 reviewed of 3 (by anyone)**"
    assert views.review_progress(ana) == "**1 reviewed of 3**"
    ben.position = ben.index_of(item.item_id)
    view = studio.current_view(ben)
    assert view.values[colour] == start != other  # not ana's
    # nor does the table, the hint or the history show ana's labels (QA s42: they named them, so the agreement
    # measured a review of them)
    assert view.hidden == set(ben.tasks) and view.states[colour].label == other and studio.item_history(item.item_id)
    assert "· **decided** ·" in views.review_status(ben)  # not "corrected": a hidden label not the model's (QA s42)
    row = views.review_rows(ben.current, view, ben.tasks)[ben.tasks.index(colour)]
    assert row[1] == "hidden until you decide" and other not in row[1:4]
    assert other not in views.slot_info("x", 0.5, None, view.states[colour], hidden=views.hidden_label(view, colour))
    assert view.history == []
    blind = "Black" if other != "Black" else "White"
    saved = studio.review_save(ben, "ben", {colour: blind})
    assert saved.result == "saved" and saved.disputed == {colour: {"ana": other, "ben": blind}}
    # ... and says so: one Accept put ana's label aside without a word (QA s42)
    assert (f"Another labeler's label differs: Colour (ana `{other}`, ben `{blind}`). A reviewer settles it"
            in views.save_message(saved, studio.display_names("hm-articles")))
    assert studio.store.agreement([colour])[colour]["annotators"] == ["ana", "ben"]  # a second opinion, blind
    ben.position = ben.index_of(item.item_id)
    again_view = studio.current_view(ben)
    assert again_view.values[colour] == blind and again_view.hidden == set(ben.tasks) - {colour}  # his own shown
    back = studio.review_save(ben, "ben", {colour: blind})  # his label stands: nothing new, said as ever
    assert (back.result, back.own_before) == ("unchanged", False) and "already stands at your labels" in \
        views.save_message(back)
    again = studio.review_catalogue("hm-articles", "test", 3, annotator="ana", show_decided=True)
    again.position = again.index_of(item.item_id)  # ana, whose label ben replaced: at her own (QA s42: it started
    view = studio.current_view(again)  # where a first pass starts, her label hidden, and one Accept replaced it)
    assert view.values[colour] == other and view.own[colour] == other and colour in view.hidden
    assert views.hidden_label(view, colour) == f"yours: {other}; another labeler saved since: hidden (a blind " \
        "second pass)"
    assert [r["annotator"] for r in view.history if r["task"] == colour] == ["ana"]  # her rows, not ben's
    count = studio.store.count()
    kept = studio.review_save(again, "ana", dict(view.values))  # her labels as she saved them: nothing stored
    assert (kept.result, kept.own_before, studio.store.count()) == ("unchanged", True, count)
    assert "these are your labels, saved before" in views.save_message(kept)
    assert studio.store.item_state(item.item_id)[colour].label == blind  # ben's still stands, in dispute


def test_labelers_moving_at_once_are_not_given_one_item(studio, monkeypatch):
    """A queue reads the others' claims, then moves: labelers moving at the same moment were each given
    the item that looked free, and both labelled it (a QA run: 6 labelers, 60 saves on 57 items).
    A queue whose claim on the item it moved to fails moves on to the next free one."""
    ana = studio.review_catalogue("hm-articles", "test", 6, annotator="ana")
    ben = studio.review_catalogue("hm-articles", "test", 6, annotator="ben")
    assert [item.item_id for item in ana.items] == [item.item_id for item in ben.items]
    first, taken = ana.current.item_id, ben.current.item_id
    assert first != taken and ben.position == 1  # ben's queue steered past the item ana is on
    monkeypatch.setattr(studio.store, "claims", lambda annotator="": {})  # as read before ben claimed his
    assert studio.review_save(ana, "ana", ana.current.predicted()).result == "saved"
    assert ana.current.item_id not in (first, taken) and ana.position == 2
    monkeypatch.undo()
    assert studio.store.claims() == {ana.current.item_id: "ana", taken: "ben"}
    assert "is on this item too" not in views.review_status(ana)
    # many at once, each on a queue of their own: no item is labelled twice
    labelers = [f"l{i}" for i in range(4)]
    queues = {name: studio.review_catalogue("hm-articles", "test", 12, annotator=name) for name in labelers}
    start = threading.Barrier(len(labelers))

    def label(name: str) -> list[str]:
        start.wait()
        return [studio.review_save(queues[name], name, queues[name].current.predicted()).item_id for _ in range(2)]

    with ThreadPoolExecutor(len(labelers)) as pool:
        saved = [item for items in pool.map(label, labelers) for item in items]
    assert len(saved) == len(set(saved)) == 2 * len(labelers)
    # at a queue's end the items left with others stay theirs (8 labelers once gave one item 8 labels)
    eve = studio.review_catalogue("hm-articles", "val", 2, annotator="eve")
    fay = studio.review_catalogue("hm-articles", "val", 2, annotator="fay")
    assert fay.current.item_id != eve.current.item_id
    studio.review_save(fay, "fay", fay.current.predicted())
    assert fay.current is None and [item.item_id for item in fay.waiting_on] == [eve.current.item_id]
    assert "nothing left for you now: 1 item left is open with `eve`" in views.review_status(fay)
    with pytest.raises(StudioError, match="Nothing is left for you in this queue now"):  # not "finished"
        studio.review_save(fay, "fay", {"colour_group_name": "Black"})
    studio.store.release("eve")  # eve leaves it: Next finds it
    studio.review_next(fay, "fay")
    assert fay.current.item_id == eve.current.item_id and not fay.waiting_on
    # a queue that shows decided items walks every one, for a second label: it does not steer past a claim
    studio.store.claim(first, "dee")
    second = studio.review_catalogue("hm-articles", "test", 6, annotator="cem", show_decided=True)
    assert second.current.item_id == first and "`dee` is on this item too" in views.review_status(second)


def test_a_second_tab_accepting_the_same_labels_saves_nothing_twice(studio):
    """Two tabs of one labeler on one item: the second accept stored a copy, which a first undo then
    reverted into itself ("Gender: Women → Women")."""
    laptop = studio.review_catalogue("hm-articles", "test", 3)
    studio.keep_queue(laptop, "ben")
    phone = studio.resume_queue(laptop.queue_id, "ben")  # the same queue, opened before the laptop's accept
    seen = studio.current_view(phone).shown
    labels = laptop.current.predicted()
    assert studio.review_save(laptop, "ben", labels).result == "saved"
    again = studio.review_save(phone, "ben", labels, seen)
    assert again.result == "unchanged" and studio.store.count() == 1
    changed = dict(labels, colour_group_name=next(c for c in studio.task_classes("hm-articles")["colour_group_name"]
                                                  if c != labels["colour_group_name"]))
    phone.position = phone.index_of(again.item_id)
    stale = studio.review_save(phone, "ben", changed, seen)  # a change over the save it did not see: asked
    assert stale.result == "conflict" and studio.store.count() == 1
    message = views.save_message(stale)  # ben's own save, from the other tab: not "someone else"
    assert message.startswith("**Not saved: you saved this item in another tab or window since you opened it.**")
    assert " · saved `" in message and "theirs" not in message.split("\n\n")[0]  # (the buttons keep their names)
    # and Keep theirs keeps the label ben saved there, not "their label" (QA team lead, session 37)
    assert "**Keep theirs** (the label you saved there stands;" in message and "their label" not in message


def test_a_review_save_names_the_tasks_left_pending_and_a_label_too_long_by_its_task(studio):
    """A box cleared was left out without a word (the item stayed pending); a 499-character label was
    refused in the store's words ("the 'usage' label in labels")."""
    queue = studio.review_catalogue("hm-articles", "test", 3)
    names = studio.display_names("hm-articles")
    labels = queue.current.predicted()
    with pytest.raises(StudioError, match=f"The {names['colour_group_name']} label is 499 characters long; a label "
                                          "has at most 200: nothing was saved"):
        studio.review_save(queue, "ben", dict(labels, colour_group_name="x" * 499))
    saved = studio.review_save(queue, "ben", dict(labels, colour_group_name=""))
    assert saved.result == "saved" and saved.unlabelled == ["colour_group_name"] and studio.store.count() == 1
    assert (f"No label given for {names['colour_group_name']}: the item stays pending for it"
            in views.save_message(saved, names))


def test_previous_after_the_last_item_goes_back_to_it_not_to_the_first(studio):
    """Deciding the last item wraps the queue round to an item left pending earlier: Previous goes
    back to the item just decided (it said "This is the first item of the queue")."""
    queue = studio.review_catalogue("hm-articles", "test", 3)
    first, second, last = (item.item_id for item in queue.items)
    studio.review_next(queue, "ben")  # the first left pending
    for _ in range(2):
        studio.review_save(queue, "ben", queue.current.predicted())
    assert queue.current.item_id == first  # wrapped round
    assert studio.review_previous(queue, "ben") and queue.current.item_id == last
    assert studio.review_previous(queue, "ben") and queue.current.item_id == second  # then on back, as before


def test_bulk_accept_by_filter_accepts_what_clears_the_bar_as_auto_accepts(studio, monkeypatch):
    colour = "colour_group_name"
    probe = studio.review_catalogue("hm-articles", "val", 10, show_decided=True)
    confidences = sorted(item.predictions[colour].confidence for item in probe.items)
    threshold = confidences[5]  # the five most confident colours clear it
    monkeypatch.setitem(studio.predictor("hm-articles").thresholds, colour, threshold)
    queue = studio.review_catalogue("hm-articles", "val", 10)
    clear = {item.item_id for item in queue.items if item.predictions[colour].confidence >= threshold}
    assert len(clear) == 5
    opened = sorted(clear)[0]
    studio.store.claim(opened, "dee")  # another labeler has this one open: it is theirs to decide
    outcome = studio.bulk_accept(queue, "cem", task=colour)  # its 90%-precision threshold by default
    assert (outcome.selected, outcome.stored, outcome.conflicts, outcome.claimed) == (5, 4, [], {opened: "dee"})
    assert f"1 left to the labelers who have them open (`{opened}` by `dee`)" in views.bulk_message(outcome)
    assert colour not in studio.store.item_state(opened)
    studio.store.release("dee")
    outcome = studio.bulk_accept(queue, "cem", task=colour)  # the four it stored are its own, not "decided"
    assert (outcome.stored, outcome.already_there, outcome.decided, outcome.claimed) == (1, 4, 0, {})
    assert "4 stored by an earlier run of this bulk accept" in views.bulk_message(outcome)
    rows, total = studio.store.audit(source="auto")
    assert total == 5 and {(r["task"], r["annotator"], r["status"]) for r in rows} == {(colour, "cem", "accepted")}
    assert {r["item_id"] for r in rows} == clear
    assert all(item.status == "pending" for item in queue.items)  # the other tasks are still to review
    studio.store.claim(opened, "dee")  # decided already (by this bulk accept): not left to whoever has it open
    again = studio.bulk_accept(queue, "cem", task=colour)
    assert (again.stored, again.already_there, again.claimed) == (0, 5, {})
    assert studio.store.audit(source="auto")[1] == 5
    studio.store.release("dee")
    with pytest.raises(StudioError, match="no 90%-precision threshold"):
        studio.bulk_accept(queue, "cem", task="product_type_name")
    on_screen = queue.current.item_id
    numeric = studio.bulk_accept(queue, "cem", task="product_type_name", min_conf=0)
    assert numeric.stored == 10 and numeric.took_open == on_screen  # the labeler is told it took the item...
    assert queue.current.item_id == on_screen and not numeric.moved_on  # ...whose other tasks are still to review
    assert (f"It took the item you had open, `{on_screen}`: its other tasks wait for you there."
            in views.bulk_message(numeric))
    every = studio.bulk_accept(queue, "cem", min_conf=0)  # each task: the item is decided, the queue moves on
    assert every.took_open == on_screen and every.moved_on
    assert queue.current is None or queue.current.item_id != on_screen
    assert "the queue moved on." in views.bulk_message(every)



def test_undo_after_a_bulk_accept_takes_it_back_whole(studio):
    """QA, session 35: ana's two Undos after her bulk accept reverted the two labels she had saved by hand before
    it (her work lost), and the 26 auto-accepts stayed; a labeler with only a bulk accept had "nothing to undo"."""
    colour = "colour_group_name"
    queue = studio.review_catalogue("hm-articles", "val", 6)
    own = queue.current.item_id
    studio.review_save(queue, "ana", {colour: queue.current.predictions[colour].label})
    bulk = studio.bulk_accept(queue, "ana", task=colour, min_conf=0)
    assert bulk.stored == 5
    undone = studio.review_undo(queue, "ana")
    message = views.undo_message(undone, studio.display_names("hm-articles"))
    assert message == ("Undid your bulk accept (Colour): 5 auto-accepted labels on 5 items back to pending. Undo "
                       "goes on from your decision before it.")
    assert set(studio.store.current_labels()) == {own} and studio.store.audit(source="auto")[1] == 5  # audited
    states = [studio.store.item_state(item.item_id).get(colour) for item in queue.items if item.item_id != own]
    assert len(states) == 5 and all(state.status == "pending" for state in states)  # to review again
    again = studio.bulk_accept(queue, "ana", task=colour, min_conf=0)  # run again: stored again
    assert (again.stored, again.already_there, again.decided) == (5, 0, 1)
    studio.review_undo(queue, "ana")
    assert studio.review_undo(queue, "ana").item_id == own and not studio.store.current_labels()  # then hers

class ProgressLikeGradios:
    """A progress bar that, like Gradio's `gr.Progress`, is falsy (its `__len__` is 0 while it tracks
    nothing): a long step must still report to it."""

    def __init__(self) -> None:
        self.reports = []

    def __len__(self) -> int:
        return 0

    def __call__(self, fraction, desc=None, *args, **kwargs) -> None:
        self.reports.append(desc)


def test_the_long_steps_report_to_a_falsy_progress_bar(studio, monkeypatch):
    loading, accepting, sweeping = ProgressLikeGradios(), ProgressLikeGradios(), ProgressLikeGradios()
    queue = studio.review_catalogue("hm-articles", "val", 10, loading)
    assert loading.reports and all(loading.reports), loading.reports
    monkeypatch.setattr(studio, "bulk_chunk", 2)
    studio.bulk_accept(queue, "cem", task="product_type_name", min_conf=0, progress=accepting)
    assert len(accepting.reports) == 5 and "10" in accepting.reports[-1], accepting.reports
    studio.catalogue_sweep("hm-articles", 4, "none", "truncation", seed=0, progress=sweeping)
    assert sweeping.reports, sweeping.reports


def test_a_stop_during_a_sweeps_last_batch_keeps_the_finished_sweep(studio):
    """QA researcher, session 39: Stop pressed while the last batch ran threw the finished sweep away as
    "stopped at 100%"; one pressed before it stops the sweep."""
    session = "page-1"

    def stop_at(at: float):
        def progress(fraction: float, step: str) -> None:
            if fraction >= at:
                studio.stop_sweep(session)
        return progress

    # one batch of 4 items, clean then 5 severities: 6 reports; the stop comes with the fifth, before the last batch
    rows, path = studio.catalogue_sweep("hm-articles", 4, "none", "truncation", seed=0, progress=stop_at(5 / 6),
                                        session=session)
    assert path.is_file() and {row["severity"] for row in rows} == set(range(6))
    with pytest.raises(SweepStopped, match="stopped at 67%"):
        studio.catalogue_sweep("hm-articles", 4, "none", "truncation", seed=0, progress=stop_at(0.5),
                               session=session)


def test_an_open_queue_re_sorts_and_re_filters_in_memory(studio, monkeypatch):
    """Re-sorting an open queue predicts nothing and writes only its view; the order is the one a
    fresh load with those choices gives; a filter narrows and widens again over the items sampled."""
    colour = "colour_group_name"
    choices = (("margin", None), ("entropy", colour), ("least_confidence", None))
    queue = studio.review_catalogue("hm-articles", "test", 12)
    studio.review_skip(queue, "ana")
    skipped = queue.items[0].item_id
    payload = studio.store.load_queue(queue.queue_id).payload
    fresh = {choice: studio.review_catalogue("hm-articles", "test", 12, strategy=choice[0], task=choice[1],
                                             show_decided=True) for choice in choices}  # the same 12 items
    # without kept catalogue predictions (an empty feature cache) a load predicts its items; a re-sort never
    monkeypatch.setattr(studio, "_score_items", lambda *a, **k: pytest.fail("re-sorting predicted again"))
    for strategy, task in choices:
        studio.arrange_queue(queue, "ana", strategy=strategy, task=task)
        expected = fresh[strategy, task]
        assert [i.item_id for i in queue.items] == [i.item_id for i in expected.items], strategy
        assert queue.strategy == strategy and queue.tasks == expected.tasks
        assert queue.current.status == "pending" and queue.current.item_id != skipped  # the decided item is passed
    confidences = sorted(item.predictions[colour].confidence for item in queue.pool)
    low, high = round(confidences[3], 4), round(confidences[8], 4)  # about the middle half
    narrow = studio.arrange_queue(queue, "ana", task=colour, min_conf=low, max_conf=high)
    assert 3 <= len(narrow.items) < 12 and narrow.sampled == 12
    assert all(low <= item.predictions[colour].confidence <= high for item in narrow.items)
    kept = len(narrow.items)
    with pytest.raises(StudioError, match="None of the 12 items"):
        studio.arrange_queue(queue, "ana", task=colour, min_conf=min(1.0, confidences[-1] + 1e-3))
    assert len(queue.items) == kept and queue.filters["min_conf"] == low  # a refused filter changes nothing
    studio.review_next(queue, "ana")
    resumed = studio.resume_queue(queue.queue_id)
    assert [i.item_id for i in resumed.items] == [i.item_id for i in queue.items]
    assert (resumed.position, resumed.tasks, resumed.filters) == (queue.position, [colour], queue.filters)
    assert studio.arrange_queue(resumed, "ana").sampled == len(resumed.items) == 12  # widened again
    assert studio.store.load_queue(queue.queue_id).payload == payload  # the items were written once


def test_queue_strategies_filters_and_decided_items(studio, tmp_path):
    tasks = studio.predictor("hm-articles").tasks
    for strategy in ("least_confidence", "margin", "entropy"):
        queue = studio.review_catalogue("hm-articles", "test", 8, strategy=strategy)
        scores = [max(item.uncertainty[strategy][t] for t in tasks) for item in queue.items]
        assert scores == sorted(scores, reverse=True), strategy
        assert all(0 <= v <= 1 for item in queue.items for v in item.uncertainty[strategy].values())
    colour = studio.review_catalogue("hm-articles", "test", 8, task="colour_group_name", strategy="margin")
    assert colour.tasks == ["colour_group_name"]
    margins = [item.uncertainty["margin"]["colour_group_name"] for item in colour.items]
    assert margins == sorted(margins, reverse=True)
    narrow = studio.review_catalogue("hm-articles", "test", 8, task="colour_group_name", min_conf=0.1, max_conf=0.3)
    assert narrow.sampled == 8 and all(0.1 <= i.predictions["colour_group_name"].confidence <= 0.3
                                       for i in narrow.items)
    with pytest.raises(StudioError, match="range is empty"):
        studio.review_catalogue("hm-articles", "test", 8, min_conf=0.8, max_conf=0.2)
    with pytest.raises(StudioError, match="no task 'pattern'"):
        studio.review_catalogue("hm-articles", "test", 8, task="pattern")

    # decided items leave the next queue; "show decided" brings them back
    manifest = write_hm_manifest(tmp_path, hm_rows("test", 5))
    images = [str(tmp_path / r["image"]) for r in hm_rows("test", 5)]
    first = studio.review_upload("hm-articles", str(manifest), images)
    for _ in range(2):
        studio.review_skip(first, "ana")
    decided = {item.item_id for item in first.items if item.status != "pending"}
    assert len(decided) == 2 and first.reviewed == 2
    later = studio.review_upload("hm-articles", str(manifest), images)
    assert len(later.items) == 3 and not decided & {item.item_id for item in later.items}
    assert "2 decided items left out" in later.notes
    again = studio.review_upload("hm-articles", str(manifest), images, show_decided=True)
    assert len(again.items) == 5 and again.reviewed == 2


def test_review_decisions_conflicts_typos_retries_undo_and_resume(studio):
    queue = studio.review_catalogue("hm-articles", "train", 4, annotator="ana")
    item = queue.current
    seen = studio.current_view(queue).shown  # both labelers open the same pending item
    assert seen.item_id == item.item_id and set(seen.versions.values()) == {None}
    colour = "colour_group_name"
    classes = studio.task_classes("hm-articles")[colour]
    mine, theirs = classes[0], classes[1]
    saved = studio.review_save(queue, "ana", {colour: mine}, seen, request_id="ana-1")
    assert saved.result == "saved" and saved.statuses[colour] in ("accepted", "corrected")
    retry = studio.review_save(queue, "ana", {colour: mine}, seen, request_id="ana-1")
    assert retry.result == "duplicate" and retry.save_id == saved.save_id and studio.store.count() == 1
    studio._requests.clear()  # a restart: the server's answers are gone, the store still knows the request
    assert queue.current.item_id != item.item_id  # the queue moved on; the retry comes from the next item's screen
    after_restart = studio.review_save(queue, "ana", {colour: mine}, request_id="ana-1")
    assert after_restart.result == "duplicate" and after_restart.item_id == item.item_id  # it named the next item
    assert f"for item `{item.item_id}`" in views.save_message(after_restart) and studio.store.count() == 1

    other = studio.review_catalogue("hm-articles", "train", 4, show_decided=True)
    other.position = other.index_of(item.item_id)
    refused = studio.review_save(other, "ben", {colour: theirs}, seen)
    assert refused.result == "conflict" and studio.store.count() == 1
    [conflict] = refused.conflicts
    assert (conflict.yours, conflict.theirs, conflict.annotator) == (theirs, mine, "ana")
    names = studio.display_names("hm-articles")
    message = views.save_message(refused, names)
    assert "ana" in message and theirs in message
    assert f"- {names[colour]} of `{item.item_id}`" in message and colour not in message  # people's names
    forced = studio.review_save(other, "ben", {colour: theirs}, seen, force=True)
    assert forced.result == "saved" and studio.store.item_state(item.item_id)[colour].label == theirs

    typo = mine[:-2] + mine[-1] + mine[-2]  # two letters swapped
    other.position = other.index_of(item.item_id)
    caught = studio.review_save(other, "ben", {colour: typo}, studio.current_view(other).shown)
    assert caught.result == "unknown" and caught.unknown[0].suggestions[:1] == [mine]
    assert f"- {names[colour]}: `{typo}` is not one of its classes" in views.save_message(caught, names)
    assert studio.store.count() == 2
    new = studio.review_save(other, "ben", {colour: "Turquoise glitter"}, studio.current_view(other).shown,
                             new_classes={colour: "Turquoise glitter"})
    assert new.result == "saved" and studio.store.item_state(item.item_id)[colour].label == "Turquoise glitter"

    undone = studio.review_undo(other, "ben")
    assert undone.tasks == {colour: ("Turquoise glitter", theirs)} and undone.in_queue
    assert f"{names[colour]}: `Turquoise glitter` → `{theirs}`" in views.undo_message(undone, names)
    both = dataclasses.replace(undone, tasks={colour: ("Turquoise glitter", theirs), "usage": ("Casual", "Casual")})
    assert views.undo_message(both, {**names, "usage": "Usage"}).endswith(
        f"{names[colour]}: `Turquoise glitter` → `{theirs}`; as before, unchanged: Usage `Casual`.")
    same = dataclasses.replace(undone, tasks={"usage": ("Casual", "Casual")})
    assert views.undo_message(same, {"usage": "Usage"}).endswith(": Usage `Casual`, as before (unchanged).")
    assert other.current.item_id == item.item_id
    assert studio.store.item_state(item.item_id)[colour].label == theirs
    undone_row = next(r for r in history_rows(studio.history()) if "Turquoise glitter" in r[3])
    assert undone_row[4].endswith(" · undone by ben")  # the latest saves say which no longer stand
    assert not any(r[4].endswith("undone by ben") for r in history_rows(studio.history()) if theirs in r[3])
    spaced = next(c for c in classes if " " in c)  # typed with doubled spaces: the class, not a new one
    doubled = studio.review_save(other, "ben", {colour: f"  {spaced.replace(' ', '   ')} "},
                                 studio.current_view(other).shown)
    assert doubled.result == "saved" and studio.store.item_state(item.item_id)[colour].label == spaced
    # the message names the label as stored: it showed the zero-width space the store dropped (QA lead, session 37)
    pasted = studio.review_save(other, "ben", {colour: mine + "\u200b"}, studio.current_view(other).shown)
    assert pasted.result == "saved" and pasted.labels == {colour: mine} and "\u200b" not in views.save_message(pasted)
    # Save as new class on a label typed decomposed: it answered the refusal with nothing stored (QA re-check, s37)
    decomposed = studio.review_save(other, "ben", {colour: "Vert e\u0301te\u0301"}, studio.current_view(other).shown)
    assert decomposed.result == "unknown" and decomposed.unknown[0].value == "Vert \u00e9t\u00e9"
    confirmed = studio.review_save(other, "ben", {colour: "Vert e\u0301te\u0301"}, studio.current_view(other).shown,
                                   new_classes={colour: decomposed.unknown[0].value})  # as the app's button sends it
    assert confirmed.result == "saved" and confirmed.labels == {colour: "Vert \u00e9t\u00e9"}

    # the queue and the place in it survive a restart (a new studio on the same folder)
    assert studio.review_previous(queue, "ana") is True and queue.current.item_id == item.item_id
    studio.review_next(queue, "ana")
    from cma_clip.studio import Studio
    restarted = Studio(studio.checkpoints["hm-articles"].parent, data_dir=studio.data_dir, device="cpu")
    resumed = restarted.resume_queue(None, "ana", "hm-articles")
    assert resumed.queue_id == queue.queue_id and resumed.position == queue.position
    assert [i.item_id for i in resumed.items] == [i.item_id for i in queue.items]
    assert restarted.resume_queue(queue.queue_id).position == queue.position
    assert restarted.resume_queue(None, "nobody", "hm-articles") is None



def test_a_second_save_of_the_same_labels_in_the_predict_tab_stores_nothing(studio):
    """QA, session 35: a second Save of the labels the item already stood at (the labeler's own) stored a copy,
    which a later undo reverted into itself, as a second tab's accept did in a queue."""
    prediction, view = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0816591001")
    labels = dict(view.values, colour_group_name="Grey")
    first = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ana", "0816591001", labels, view.shown,
                             request_id="p-1", prediction=prediction)
    saves, shown = studio.store.count(), studio.model_view("hm-articles", "0816591001", prediction, True).shown
    again = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", " ana ", "0816591001", labels, shown,
                             request_id="p-2", prediction=prediction)
    assert (first.result, again.result, studio.store.count()) == ("saved", "unchanged", saves)
    assert views.save_message(again) == ("Item `0816591001` already stands at your labels: nothing new saved (undo "
                                         "reverts your save).")  # the Predict tab stays on the item
    ben = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ben", "0816591001", labels, shown,
                           request_id="p-3", prediction=prediction)  # the same labels, ben's judgement: stored
    assert ben.result == "saved" and studio.store.count() == saves + 1

def test_a_correction_of_one_task_keeps_the_catalogues_labels_for_the_others(studio):
    """QA, session 40: on a catalogue item, correcting one task and saving stored the model's guesses for the
    others ("Section = Baby/Children" at 31%) as human labels over the catalogue's, and training took them.
    A control with no saved label starts at the catalogue's label, one that is none of the task's classes
    too (offered and taken as the item's own: no new class to confirm)."""
    prediction, view = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0816591001")
    classes, catalogue = studio.task_classes("hm-articles"), view.catalogue
    guessed = {t: p.label for t, p in prediction.tasks.items()}
    assert any(guessed[t] != label for t, label in catalogue.items())  # the model's guesses differ from it
    outside = {t for t, label in catalogue.items() if label not in classes[t]}
    assert outside and len(outside) < len(catalogue)  # (the test model lacks some of the catalogue's classes)
    assert view.values == catalogue and set(catalogue) == set(guessed)
    colour = "colour_group_name"
    corrected = next(c for c in classes[colour] if c not in (catalogue[colour], guessed[colour]))
    saved = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ana", "0816591001",
                             {**view.values, colour: corrected}, view.shown, prediction=prediction)
    assert saved.result == "saved"
    stored = studio.store.current_labels()["0816591001"]["labels"]
    assert stored == {**catalogue, colour: corrected}
    _, fresh = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "")  # no id: no catalogue
    assert fresh.values == guessed


def test_a_catalogue_items_blank_label_starts_empty_not_at_the_models_guess(studio, monkeypatch):
    """Review, session 40: a catalogue item whose cell is blank started at the model's guess, so correcting
    another task stored the guess, and training filled the blank with it."""
    item, task, labels = "0816591001", "product_type_name", Catalogue.labels

    def blank_for_item(catalogue, column):  # the catalogue as it would read with the item's cell left blank
        values = labels(catalogue, column)
        if column == task:
            values[catalogue.item_ids().index(item)] = None
        return values

    monkeypatch.setattr(Catalogue, "labels", blank_for_item)
    prediction, view = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", item)
    assert task not in view.catalogue and prediction.tasks[task].label and view.catalogue
    assert view.values[task] is None


def test_predict_tab_items_carry_their_id_and_their_saved_labels(studio, tmp_path):
    other_image = EXAMPLE_IMAGE.parent / "hm-0619304001.jpg"
    prediction, view = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0816591001")
    assert view.item_id == "0816591001"  # (where its controls start: the test before)
    labels = {**{t: p.label for t, p in prediction.tasks.items()}, "colour_group_name": "Grey"}  # the model's picked
    saved = studio.save_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "ana", "0816591001", labels, view.shown)
    assert saved.result == "saved" and saved.item_id == "0816591001"
    message = views.save_message(saved, studio.display_names("hm-articles"))
    assert "0816591001" in message and "= `Grey` (not the model's)" in message and "_name" not in message
    assert f"= `{labels['product_type_name']}` (the model's)" in message  # a status is said against the model
    # the labels that differ from the catalogue's are named (an accept stores the model's guesses too)
    differ = [t for t, v in labels.items() if view.catalogue.get(t, v) != v]
    assert "colour_group_name" in differ and view.catalogue["colour_group_name"] == "Dark Blue"
    assert message.count("(the catalogue says") == len(differ) and "(the catalogue says `Dark Blue`)" in message
    # a catalogue photo uploaded without its id: the line names the item (its saves would count as its in training)
    _, bare = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "")
    assert bare.item_id.startswith("img-") and bare.photo_of == [("0816591001", "test")] == view.photo_of
    line = views.item_line(bare, explicit=False)
    assert "this is the photo of catalogue item `0816591001`** (a **test** item): type its id" in line
    assert "no catalogue item has this id" not in (line := views.item_line(view, explicit=True))
    assert "this is the photo of" not in line  # its own photo
    _, typo = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0816591O01")  # an O for a 0
    assert "no catalogue item has this id, and nothing is saved under it" in views.item_line(typo, explicit=True)
    # another catalogue item's id typed over this photo: said (QA s42: its save went there without a word)
    _, other = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0619304001")
    line = views.item_line(other, explicit=True)
    assert "**this is the photo of catalogue item `0816591001`** (a **test** item), not of `0619304001`: check the " \
        "id" in line
    assert "training counts it" not in line  # a test item's labels never train (QA s42: the line said both)
    flipped = tmp_path / "flipped.png"
    Image.open(EXAMPLE_IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    assert studio.predict_item(str(flipped), EXAMPLE_TEXT, "hm-articles", "")[1].photo_of == []
    # an upload without an id gets its content id, never the last item's
    upload = studio.save_item(str(other_image), EXAMPLE_TEXT, "hm-articles", "ana", "", labels, view.shown)
    assert upload.result == "saved" and upload.item_id.startswith("img-") and upload.item_id != "0816591001"
    assert studio.resolve_item_id(str(other_image), EXAMPLE_TEXT, None) == upload.item_id
    assert studio.resolve_item_id(str(other_image), EXAMPLE_TEXT + " more", None) != upload.item_id
    # predicting the item again shows its saved label
    _, again = studio.predict_item(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "0816591001")
    assert again.values["colour_group_name"] == "Grey" and again.states["colour_group_name"].annotator == "ana"
    current = studio.store.current_labels()
    assert current["0816591001"]["labels"]["colour_group_name"] == "Grey" and upload.item_id in current


def test_suspected_mislabels_queue_keeps_the_ranking_and_leaves_out_decided_items(studio, tmp_path, monkeypatch):
    """The Review tab's third source: the catalogue labels of one task that out-of-fold heads
    doubt most (cma_clip.mislabels), in that order, on the first 100 items of each H&M split."""
    from cma_clip.data import CatalogueConfig, limit_splits
    from cma_clip.mislabels import mislabel_queue
    from cma_clip.studio.service import SOURCE_ORDER, _share

    monkeypatch.setenv("CMA_CLIP_CACHE", str(tmp_path / "cache"))
    task = "garment_group_name"
    with pytest.raises(StudioError, match="Choose the task"):
        studio.review_mislabels("hm-articles", None, 10, limit=100)
    heard = []  # the features a first ranking computes take minutes on a whole catalogue: said as they go
    queue = studio.review_mislabels("hm-articles", task, 5, lambda done, what: heard.append((done, what)), limit=100)
    computing = [done for done, what in heard if what == "computing the features of hm-articles"]
    assert computing and 0 < computing[0] < 1 and computing[-1] == 1, heard  # it stayed at 0% (QA, s37)
    catalogue = limit_splits(Catalogue.open(CatalogueConfig.load("hm-articles")), 100)
    ranked = mislabel_queue(catalogue, task, studio.predictor("hm-articles").backbone)  # the cached ranking
    assert ranked.suspects, "the ranking found no suspect on 300 real items"
    expected = [s.item_id for s in ranked.suspects[:5]]
    assert [item.item_id for item in queue.items] == expected and queue.strategy == SOURCE_ORDER
    assert queue.tasks == [task] and "most suspect Garment group labels" in queue.source  # names, not columns
    shown = queue.current.predictions[task].confidence  # the line above the item: the reviewed task's confidence
    assert f"· confidence {views.percent(shown)}" in views.review_status(queue)
    assert views.order_choices(queue)[-1] == ("most suspect label", SOURCE_ORDER)  # its order is offered
    assert SOURCE_ORDER not in [value for _, value in views.order_choices()]  # (a sample has none)
    studio.arrange_queue(queue, "ana", strategy="margin", task=task)
    studio.arrange_queue(queue, "ana", strategy=SOURCE_ORDER, task=task)  # and brings the ranking back
    assert [item.item_id for item in queue.items] == expected
    first = ranked.suspects[0]  # and under it, why the item is suspect
    shown = views.review_status(queue)
    assert f"give the catalogue's {first.label} " in shown and f"and suggest {first.suggested}" in shown
    assert " 0.0% " not in shown  # the most suspect read "0.0%" (QA, session 32)
    assert [_share(p) for p in (2e-4, 0.0006, 0.5)] == ["under 0.1%", "0.1%", "50.0%"]
    first = ranked.suspects[0]
    assert queue.items[0].catalogue[task] == first.label != first.suggested  # the label under suspicion
    assert studio.current_view(queue).values == {task: first.label}  # Accept confirms it (QA, session 32)
    # key 1 picks the suggestion, however low the model puts it (it was no key at all: QA team lead, session 37)
    assert views.choice_labels(queue.current, task)[0].startswith(f"1 · {first.suggested} (suggested)")
    assert views.choice_map([task], queue.current)["labels"][task][0] == first.suggested
    assert studio.resume_queue(queue.queue_id).items[0].suggested == {task: first.suggested}  # kept with the queue
    saved = studio.review_save(queue, "ana", {task: first.suggested}, new_classes={task: first.suggested})
    assert saved.result == "saved"
    again = studio.review_mislabels("hm-articles", task, 5, limit=100)
    assert first.item_id not in [item.item_id for item in again.items]  # decided: left out
    # a label in doubt that the model lacks as a class (a rare one): Accept confirms it, no new class asked (it
    # was refused as unknown: review s41)
    label, classes = again.current.catalogue[task], studio.task_classes("hm-articles")
    lacking = {**classes, task: [c for c in classes[task] if c != label]}
    monkeypatch.setattr(studio, "task_classes", lambda model: lacking)
    view = studio.current_view(again)
    assert view.values == {task: label} and label in view.choices[task]
    assert studio.review_save(again, "ana", view.values).result == "saved"


def test_only_the_named_reviewers_settle_disagreements(studio, monkeypatch):
    colour = "colour_group_name"
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    for annotator, label in (("ana", red), ("ben", blue)):
        studio.store.save(image=EXAMPLE_IMAGE, text=EXAMPLE_TEXT, labels={colour: label}, annotator=annotator,
                          item_id="d-1")
    queue = studio.review_disagreements("hm-articles", colour, 10, annotator="ben")  # none named: anyone
    monkeypatch.setattr(studio, "reviewers", frozenset({"cem", "dee"}))
    with pytest.raises(StudioError, match=r"for the reviewers \(cem, dee\), and ben is not one of them"):
        studio.review_disagreements("hm-articles", colour, 10, annotator="ben")
    with pytest.raises(StudioError, match="an annotator without a name is not one"):
        studio.review_disagreements("hm-articles", colour, 10)
    shown = studio.current_view(queue).shown  # the queue ben opened before the reviewers were named
    for decide in (lambda: studio.review_save(queue, "ben", {colour: red}, shown),
                   lambda: studio.review_skip(queue, "ben", shown)):
        with pytest.raises(StudioError, match="for the reviewers"):
            decide()
    assert set(studio.store.open_disagreements()) == {"d-1"} and studio.store.item_state("d-1")[colour].label == blue
    studio.store.release("ben")  # refused, ben leaves the item his queue had open
    settling = studio.review_disagreements("hm-articles", colour, 10, annotator=" cem ")
    late = studio.review_disagreements("hm-articles", colour, 10, annotator="dee")  # opened before cem settles
    assert late.current is None and "nothing left for you now" in views.review_status(late)  # cem is on it
    studio.review_previous(late, "dee")  # dee opens it all the same
    late_shown = studio.current_view(late).shown
    ruled = studio.review_save(settling, "cem", {colour: red})
    assert ruled.result == "saved" and views.save_message(ruled).startswith(f"Ruling #{ruled.save_id} by `cem` on item")
    assert "It settles the disagreement" in views.save_message(ruled)  # not read as any other save (QA, session 32)
    assert not studio.store.open_disagreements()
    saves = studio.store.count()  # dee rules as cem did: one ruling stands, not two; ruling otherwise conflicts
    overruled = studio.review_save(late, "dee", {colour: blue}, late_shown)
    assert overruled.result == "conflict" and overruled.conflicts[0].theirs == red
    agreed = studio.review_save(late, "dee", {colour: red}, late_shown)
    assert (agreed.result, studio.store.count()) == ("unchanged", saves)
    assert views.save_message(agreed).startswith("Item `d-1` was settled by `cem` with these labels meanwhile")
    # ben signs in on the browser cem used: the queue id it kept opens ben's own last queue, not cem's
    assert studio.resume_queue(settling.queue_id, "ben").queue_id == queue.queue_id
    assert studio.store.load_queue(settling.queue_id).annotator == "cem"
    assert studio.resume_queue(settling.queue_id, "cem").queue_id == settling.queue_id
    assert views.reviewers_note(studio.reviewers) == "Settled by the reviewers: `cem`, `dee`."
    assert "Anyone may settle them" in views.reviewers_note(frozenset())
    monkeypatch.setenv("CMA_CLIP_REVIEWERS", " cem, dee ,,")
    assert default_reviewers() == {"cem", "dee"}
    monkeypatch.delenv("CMA_CLIP_REVIEWERS")
    assert default_reviewers() == frozenset()
    # ben labels the item again, against cem's ruling: stored, and told it reopens (QA, session 32: he was not)
    again = studio.review_items("hm-articles", [("d-1", str(EXAMPLE_IMAGE), EXAMPLE_TEXT, {})], "d-1 again",
                                annotator="ben", show_decided=True)
    reopened = studio.review_save(again, "ben", {colour: blue})
    assert reopened.result == "saved" and reopened.against[colour].label == red
    assert f"goes against `cem`'s ruling on Colour (`{red}`): the disagreement is open again" in \
        views.save_message(reopened, studio.display_names("hm-articles"))
    assert studio.store.open_disagreements()["d-1"][colour]["cem's ruling"] == red


def test_a_ruling_over_every_task_stores_the_tasks_in_dispute_not_the_models_guesses(studio):
    """rita's Accept in a Disagreements queue over every task stored the model's labels of four tasks nobody
    had labelled as her rulings, and without their catalogue labels (QA reviewer, session 33)."""
    colour, pattern = "colour_group_name", "graphical_appearance_name"
    row = hm_rows("test", 1)[0]
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    for annotator, label in (("ana", red), ("ben", blue)):  # they disagree on colour only
        studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={colour: label}, annotator=annotator,
                          item_id=row["article_id"], catalogue_labels={colour: row[colour]})
    queue = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
    assert len(queue.tasks) > 2 and queue.current.catalogue[pattern] == row[pattern]  # the catalogue's, not "—"
    view = studio.current_view(queue)
    assert view.values[colour] is None and view.values[pattern] == queue.current.predictions[pattern].label
    refused = studio.review_save(queue, "rita", view.values, view.shown)  # Accept, as the controls start: no choice
    assert refused.result == "unchosen" and refused.unchosen == {colour: {"ana": red, "ben": blue}}
    assert views.save_message(refused, studio.display_names("hm-articles")).startswith(
        f"Nothing was saved: choose a label for Colour (ana `{red}`, ben `{blue}`): a ruling is your choice")
    assert queue.current.item_id == row["article_id"]  # the item stays
    assert [label for label, _, _ in queue.current.choices(colour)][:2] == [red, blue]  # the keys 1 and 2
    assert studio.store.item_state(row["article_id"])[colour].label == blue and not studio.store.item_state(
        row["article_id"])[colour].adjudicated
    ruled = studio.review_save(queue, "rita", dict(view.values, **{colour: blue}), view.shown)  # key 2, then Accept
    assert ruled.result == "saved" and list(ruled.labels) == [colour]
    states = studio.store.item_state(row["article_id"])
    assert set(states) == {colour} and states[colour].adjudicated and states[colour].label == blue
    assert "No label given" not in views.save_message(ruled)
    again = studio.review_items("hm-articles", [(row["article_id"], str(HM / row["image"]), row["prod_name"], {})],
                                "again", annotator="ana", show_decided=True)
    studio.review_save(again, "ana", {colour: red})  # ana against the ruling: open again
    reopened = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
    view = studio.current_view(reopened)
    other = next(c for c in studio.task_classes("hm-articles")[pattern] if c != view.values[pattern])
    both = studio.review_save(reopened, "rita", dict(view.values, **{colour: red, pattern: other}), view.shown)
    assert sorted(both.labels) == sorted([colour, pattern])  # a task the reviewer changed is hers too


def test_a_reviewers_skip_undo_and_a_dispute_ended_meanwhile(studio):
    """QA reviewer, session 34: rita's skip marked the four tasks nobody labelled skipped (taking the item out of
    every labeler's queue for them) and read as ben's; undoing her ruling said "Colour Blue, as before
    (unchanged)"; a dispute that ended while it was on screen asked her to choose between labels no longer in
    dispute."""
    colour = "colour_group_name"
    rows = hm_rows("test", 2)
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    for row in rows:
        for annotator, label in (("ana", red), ("ben", blue)):
            studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={colour: label},
                              annotator=annotator, item_id=row["article_id"])
    names = studio.display_names("hm-articles")
    queue = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
    first, second = (row["article_id"] for row in rows)
    assert views.first_task(queue.tasks, queue.current.disputed) == colour  # the keys pick for the task in dispute
    skipped = studio.review_skip(queue, "rita")
    assert skipped.result == "saved" and list(skipped.statuses) == [colour]
    assert set(studio.store.item_state(first)) == {colour} and first in studio.store.open_disagreements()
    assert "skipped by rita" in views.review_rows(queue.items[0], studio.item_view(first, [colour], {}), [colour])[0][3]
    view = studio.current_view(queue)
    assert queue.current.item_id == second
    ruled = studio.review_save(queue, "rita", dict(view.values, **{colour: blue}), view.shown)
    assert ruled.result == "saved" and second not in studio.store.open_disagreements()
    undone = studio.review_undo(queue, "rita")
    assert undone.reopened == {colour: {"ana": red, "ben": blue}}
    assert f"Your ruling is withdrawn: the disagreement is open again on Colour (ana `{red}`, ben `{blue}`)" in \
        views.undo_message(undone, names)
    view = studio.current_view(queue)
    assert queue.current.item_id == second and view.values[colour] is None
    studio.store.save(image=HM / rows[1]["image"], text=rows[1]["prod_name"], labels={colour: blue},
                      annotator="ana", item_id=second)  # ana comes round to ben's label: nothing in dispute
    # rita then picks ben's label (the one both now say): that stored a "ruling" of no dispute
    ended = studio.review_save(queue, "rita", dict(view.values, **{colour: blue}), view.shown)
    assert ended.result == "settled" and "ended meanwhile" in views.save_message(ended, names)
    state = studio.store.item_state(second)[colour]
    assert state.annotator == "ana" and not state.adjudicated  # nothing of rita's stored
    # a skip of a dispute ended meanwhile: passed over too (it met a conflict offering to overwrite them)
    studio.store.save(image=HM / rows[0]["image"], text=rows[0]["prod_name"], labels={colour: blue},
                      annotator="ana", item_id=first)
    assert queue.current.item_id == first and studio.review_skip(queue, "rita").result == "settled"
    assert studio.store.item_state(first)[colour].annotator == "ana"


def test_a_disagreements_queue_holds_open_disagreements_only_and_a_resume_moves_past_settled_ones(studio):
    colour = "colour_group_name"
    with pytest.raises(StudioError, match="No disagreement to settle on Colour"):
        studio.review_disagreements("hm-articles", colour, 10)
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    for item in ("d-1", "d-2"):
        for annotator, label in (("ana", red), ("ben", blue)):  # d-2 as an upload: its manifest's label recorded
            studio.store.save(image=EXAMPLE_IMAGE, text=EXAMPLE_TEXT, labels={colour: label}, annotator=annotator,
                              item_id=item, catalogue_labels={colour: red} if item == "d-2" else None)
    # QA s42: on the other model (a new page starts on the first one) "No disagreement to settle" hid these
    studio.add_checkpoint("fashion-product-images", Path(__file__).resolve().parents[1] / "checkpoints" /
                          "fashion-product-images")
    with pytest.raises(StudioError, match="2 items of hm-articles's tasks are in dispute: choose that model"):
        studio.review_disagreements("fashion-product-images", None, 10)
    with pytest.raises(StudioError, match=r"No decision names the task 'Colour \(baseColour\)'; the tasks decided: "
                                          r"Colour \(colour_group_name\)\."):  # the name the Task list shows
        studio.audit(task="baseColour")
    queue = studio.review_disagreements("hm-articles", colour, 10, annotator="ben")
    assert [item.item_id for item in queue.items] == ["d-1", "d-2"] and queue.tasks == [colour]
    assert [item.status for item in queue.items] == ["pending", "pending"]  # every item holds labels, all open
    assert "the 2 oldest of 2 items whose annotators disagree" in queue.source
    # ben, one of the two, chooses the label standing (his own): that settles it too
    view = studio.current_view(queue)
    keys = views.choice_labels(queue.current, colour)  # the number keys: their labels first, with who said them
    assert view.values == {colour: None} and keys[0].startswith(f"1 · {red} (ana)") and keys[1].startswith(
        f"2 · {blue} (ben)")
    # a queue over the disputed task alone: Accept with its control empty gets the same answer, not "Choose at
    # least one label" (QA, session 34)
    assert studio.review_save(queue, "ben", view.values, view.shown).result == "unchosen"
    assert studio.review_save(queue, "ben", {colour: blue}, view.shown).result == "saved"
    assert set(studio.store.open_disagreements()) == {"d-2"} and queue.current.item_id == "d-2"
    assert queue.items[0].note.startswith("Settled") and queue.items[1].note.startswith("Annotators disagree")
    assert queue.items[1].catalogue == {colour: red}  # what its saves recorded
    assert "order: oldest disagreement first" in views.review_notes(queue)
    assert studio.store.item_state("d-1")[colour].adjudicated and ", adjudication, " in views.review_rows(
        queue.items[0], studio.item_view("d-1", [colour], {}), [colour])[0][3]
    skipped = studio.review_skip(queue, "ben")  # the only open item left: it comes back, and the message says why
    assert skipped.kind == "skip" and queue.current.item_id == "d-2"
    assert "so it shows again" in views.shown_again(skipped.item_id, queue)
    studio.review_next(queue, "ben")  # Next, too
    assert queue.current.item_id == "d-2" and views.shown_again("d-2", queue)
    assert views.shown_again("d-1", queue) == ""  # (an item left for another is no news)
    studio.review_previous(queue, "ben")  # back on the settled d-1: accepting it again stores nothing
    saves = studio.store.count()
    again = studio.current_view(queue)
    assert studio.review_save(queue, "ben", again.values, again.shown).result == "unchanged"
    assert studio.store.count() == saves and queue.current.item_id == "d-2"
    assert studio.review_save(queue, "ben", {colour: red}).result == "saved"
    resumed = studio.resume_queue(queue.queue_id, "ben")
    assert "pending" not in [item.status for item in resumed.items] and resumed.current is None


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
    assert queue.source == "upload upload.csv: 3 manifest rows"  # the notes say what became of the third
    fake = tmp_path / Path(rows[0]["image"]).name  # a text file under the first row's image name
    fake.write_text("Striped shirt, 100% cotton")
    queue = studio.review_upload("hm-articles", str(manifest), [str(fake), uploaded[1]])
    assert [item.item_id for item in queue.items] == [rows[1]["article_id"]]
    assert any(f"{fake.name} is not a readable image (its content is not a known image format); only JPEG" in note
               for note in queue.notes), queue.notes
    with pytest.raises(StudioError, match="needs the columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("x,y\n1,2\n")
        studio.review_upload("hm-articles", str(bad), uploaded)


def test_probe_and_sweeps_through_the_studio(studio):
    result = studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 4, "none", 0, seed=1)
    assert result.noisy_text == clean_text(EXAMPLE_TEXT) and result.noisy_image.size != (0, 0)
    same = studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 0, "none", 0)
    assert "0% of the image relevance moved" in views.probe_maps(same, "colour_group_name")[2]
    assert "the most relevant patch stayed at row " in views.probe_maps(same, "colour_group_name")[2]
    with pytest.raises(StudioError, match="Severities go from 0"):
        studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 9, "none", 0)
    with pytest.raises(StudioError, match="Unknown text corruption"):
        studio.probe(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "blur", 1, "leet", 1)
    with pytest.raises(StudioError, match="Choose an image or a text corruption"):
        studio.item_sweep(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "none", "none")
    sweep = studio.item_sweep(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles", "jpeg", "none")
    assert list(sweep.confidence) == list(sweep.image_weight) == ["image"]
    assert all(len(v) == 6 for part in (sweep.confidence, sweep.image_weight) for v in part["image"].values())
    assert all(0 <= w <= 1 for v in sweep.image_weight["image"].values() for w in v)
    rows, path = studio.catalogue_sweep("hm-articles", 4, "none", "truncation", seed=0)
    assert {r["mode"] for r in rows} == {"text"} and path.exists()
    written = read_manifest(path)
    assert written[0].keys() >= {"mode", "corruption", "severity", "task", "accuracy", "n", "seed"}
    assert {r["corruption"] for r in written} == {"truncation"}  # what was run, not only the file's name
    assert all(len(r["accuracy"].partition(".")[2]) <= 4 for r in written)  # rounded for a reader
    assert path.name == "hm-articles-none-truncation-4-items-seed-0.csv"  # another seed or size: another file


def test_a_catalogue_sweep_runs_on_a_random_sample_of_test_the_same_for_every_seed(studio, monkeypatch):
    """Not the split's first rows: a catalogue's order groups alike items (fashion's first test rows are
    sportswear, its clean accuracy there 0.79 against 0.94 on the split)."""
    from cma_clip.studio import service
    swept = []
    monkeypatch.setattr(service.robustness, "catalogue_sweep", lambda predictor, catalogue, *args: swept.append(
        catalogue.item_ids()) or [])
    for size, seed in ((8, 0), (8, 5), (16, 0)):
        studio.catalogue_sweep("hm-articles", size, "blur", "none", seed=seed)
    first = [row["article_id"] for row in hm_rows("test", 8)]
    assert swept[0] != first and swept[0] == swept[1]  # the seed draws the corruptions, not the items
    assert set(swept[0]) < set(swept[2]) and len(set(swept[2])) == 16  # more items keep the fewer's
    assert set(swept[2]) <= {row["article_id"] for row in hm_rows("test", 10_000)}



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


@pytest.mark.parametrize("name", ["__init__.py", "service.py", "views.py", "workflow.py"])
def test_the_studio_imports_neither_the_app_nor_gradio(name):
    modules = imported_modules(STUDIO / name)
    assert "cma_clip.studio.service" in modules or "cma_clip.predict" in modules  # the check reads the imports
    assert forbidden(modules) == set()
    assert forbidden(imported_modules(STUDIO.parent.parent / "app.py")) >= {"gradio"}  # ... and would see them


@pytest.mark.parametrize("checkpoint", ["hm-articles", "fashion-product-images"])
def test_label_choices_put_each_class_before_the_classes_that_contain_it(checkpoint):
    """A label dropdown filters its choices by what is typed and Enter takes the first left: typing
    a class's whole name must give that class (the browser test types one)."""
    from cma_clip.checkpoint import read_config

    assert views.typing_order(["Mixed solid/pattern", "Solid", "Dark Grey", "Grey", "Bikini top", "Top"]) == [
        "Grey", "Dark Grey", "Solid", "Mixed solid/pattern", "Top", "Bikini top"]
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / checkpoint
    for task, classes in read_config(shipped).classes.items():
        order = views.typing_order(classes)
        assert sorted(order) == sorted(set(classes))
        for typed in classes:
            first = next(c for c in order if typed.casefold() in c.casefold())
            assert first.casefold() == typed.casefold(), (task, typed, first)  # H&M has "Dog Wear" and "Dog wear"


def test_a_mislabels_queue_kept_before_the_rename_keeps_its_ranking():
    """Queues saved before 2026-12-06 name the mislabels ranking "most_suspect_label": read as SOURCE_ORDER."""
    from cma_clip.studio.workflow import SOURCE_ORDER, ReviewQueue

    kept = ReviewQueue.from_payload("q", "hm-articles", {"items": [], "split": "mislabels"}, 0,
                                    {"order": [], "tasks": ["t"], "strategy": "most_suspect_label"})
    assert kept.strategy == SOURCE_ORDER and views.order_choices(kept)[-1] == ("most suspect label", SOURCE_ORDER)


def test_percent_verdict_and_operating_figures():
    assert [views.percent(v) for v in (0.5, 0.962, 0.99290, 0.99991, 0.999996, 1.0, 0.0, 1e-6, None)] == \
        ["50%", "96%", "99.3%", "99.99%", ">99.99%", "100%", "0%", "<0.01%", "—"]
    from cma_clip.predict import TaskPrediction
    from cma_clip.studio.workflow import ReviewItem

    near = [0.999996, 3e-6, 1e-6, 0.00004]  # a saved queue, read back after a reload, writes them as before
    item = ReviewItem("x", "x.jpg", "", {"t": TaskPrediction(list("abcd"), near, {"text": 1.0}, None, False)})
    again = ReviewItem.from_payload(item.to_payload()).predictions["t"].probabilities
    assert [views.percent(v) for v in again] == [views.percent(v) for v in near] == [">99.99%", *["<0.01%"] * 3]

    p = TaskPrediction(["Sports"], [0.589], {"text": 0.5, "image": 0.5}, 0.43, True, "Usage")
    assert views.verdict(p) == "✓ auto-accept (≥\u00a043%)"
    assert views.verdict(p, "no text") == "withheld: no text (≥\u00a043%)"
    assert views.verdict(TaskPrediction(["x"], [0.3], {}, 0.87, False)) == "below 87%"
    assert views.verdict(TaskPrediction(["x"], [0.3], {}, None, False)) == "no threshold holds 90%"
    metrics = {"tasks": {"graphical_appearance_name": {
        "n": 1002, "threshold": 0.978, "auto_accepted": 396, "auto_accept_precision": 0.9268,
        "auto_accept_precision_ci": [0.8914, 0.9535], "operating_recall": 0.3663},
        "index_group_name": {"n": 1002, "threshold": None, "auto_accepted": 0}}}
    text = views.operating_figures(metrics, {"graphical_appearance_name": "Pattern"})
    assert "1,002 held-out test items" in text and "_name" not in text
    assert "**Pattern**: 92.7% precision [89.1%–95.3%] at ≥\u00a098%; labels 37% of items correctly" in text
    assert "**Index group**: no threshold holds 90%" in text
    assert views.operating_figures({}, {}) == ""
    just_below = {"tasks": {"colour_group_name": {"n": 1002, "threshold": 0.795, "auto_accepted": 464,
                                                   "auto_accept_precision": 0.8966, "auto_accept_precision_ci":
                                                   [0.8620, 0.9250], "operating_recall": 0.4152}}}
    assert "89.7% precision [86.2%–92.5%]" in views.operating_figures(just_below, {})  # not "90%"


def test_an_empty_text_rests_on_the_image_and_is_never_auto_accepted(studio):
    result = studio.predict(str(EXAMPLE_IMAGE), "   ", "hm-articles")
    assert result.text_absent and views.input_note(result) == views.NO_TEXT_NOTE
    assert all(p.modality_weights == {"text": 0.0, "image": 1.0} and not p.auto_accept for p in result.tasks.values())
    assert all(row[3].startswith(("withheld: no text", "no threshold")) for row in prediction_rows(result))
    assert "no text; relevance on the image" in views.relevance_summary(result, "colour_group_name")
    batch = studio.predictor("hm-articles").predict_batch([result.model_image], [""])[0]
    assert batch.text_absent and not any(p.auto_accept for p in batch.tasks.values())
    with_text = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    assert not with_text.text_absent and views.input_note(with_text) == ""


def test_a_blank_photo_or_no_text_is_never_auto_accepted_one_by_one_or_in_bulk(studio, tmp_path, monkeypatch):
    """A photo of one flat colour (a 1 x 1 upload, a blank placeholder) tells the model nothing: like an
    empty text, it rules auto-accept out, on the Predict tab, in batches and in a queue's bulk accept."""
    predictor = studio.predictor("hm-articles")
    for task in predictor.tasks:  # every label clears its threshold: only the inputs can hold one back
        monkeypatch.setitem(predictor.thresholds, task, 0.0)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (1, 1), (128, 128, 128)).save(blank)
    result = studio.predict(str(blank), EXAMPLE_TEXT, "hm-articles")
    assert result.photo_blank and not result.text_absent and result.withheld == "blank photo"
    assert not any(p.auto_accept for p in result.tasks.values())
    assert views.input_note(result) == views.BLANK_PHOTO_NOTE
    assert all(row[3] == "withheld: blank photo (≥\u00a00%)" for row in prediction_rows(result))
    assert {answer["withheld"] for answer in result.to_dict().values()} == {"blank photo"}  # the API's JSON says why
    both = studio.predict(str(blank), "", "hm-articles")
    assert both.withheld == "no text, blank photo" and views.input_note(both) == "  \n".join(
        [views.NO_TEXT_NOTE, views.BLANK_PHOTO_NOTE])
    photo = studio.predict(str(EXAMPLE_IMAGE), EXAMPLE_TEXT, "hm-articles")
    assert not photo.photo_blank and all(p.auto_accept for p in photo.tasks.values()) and views.input_note(photo) == ""
    batch = predictor.predict_batch([Image.open(blank), Image.open(EXAMPLE_IMAGE)], [EXAMPLE_TEXT] * 2)
    assert [(b.photo_blank, any(p.auto_accept for p in b.tasks.values())) for b in batch] == [(True, False),
                                                                                              (False, True)]

    rows = hm_rows("test", 3)  # an upload: a placeholder photo, an item without text, an item with both
    rows[1] = {**rows[1], "prod_name": "", "detail_desc": ""}
    manifest = write_hm_manifest(tmp_path / "upload", rows)
    Image.new("RGB", (200, 300), (230, 230, 230)).save(tmp_path / "upload" / rows[0]["image"])
    queue = studio.review_upload("hm-articles", str(manifest), [str(tmp_path / "upload" / r["image"]) for r in rows])
    ids = [r["article_id"] for r in rows]
    assert {item.item_id: item.withheld for item in queue.items} == dict(zip(ids, ["blank photo", "no text", ""]))
    queue.go_to(next(i for i, item in enumerate(queue.items) if item.item_id == ids[0]))
    assert "blank photo: never auto-accepted" in views.review_status(queue)
    kept = studio.resume_queue(queue.queue_id)  # as a reload reads it back
    assert {item.item_id: item.withheld for item in kept.pool} == {item.item_id: item.withheld for item in queue.pool}
    for bar in (None, 0.0):  # the thresholds, or a confidence the labeler gives
        outcome = studio.bulk_accept(queue, "cem", min_conf=bar)
        assert (outcome.selected, outcome.withheld) == (3, 2)
        assert "2 without a text or with a blank photo left to review" in views.bulk_message(outcome)
    assert studio.store.item_state(ids[0]) == studio.store.item_state(ids[1]) == {}
    assert set(studio.store.item_state(ids[2])) == set(predictor.tasks)


def test_a_bulk_accept_message_names_tasks_as_people_read_them():
    from cma_clip.labels import Conflict
    from cma_clip.studio.workflow import BulkOutcome

    conflict = Conflict("0816591001", "colour_group_name", "Black", "White", "ben", 3, "2026-12-04")
    outcome = BulkOutcome("q:bulk", ["colour_group_name", "index_group_name"], 4, stored=3, conflicts=[conflict])
    message = views.bulk_message(outcome, {"index_group_name": "Section"})
    assert message.startswith("Bulk accept (Colour group, Section): 4 items of the queue clear the bar, "
                              "3 auto-accepted now")
    assert "(stored in 0 transactions)" in message  # no "chunk(s)": words people write
    assert "Colour group = `White` by `ben`" in message and "_name" not in message
    assert "1 item of the queue clears the bar" in views.bulk_message(BulkOutcome("q:bulk", ["t"], 1))


def test_a_control_info_line_is_plain_text_that_gradio_escapes_and_never_links():
    from cma_clip.labels import TaskState

    state = TaskState("Dark Blue", "accepted", 2, "<b>ana</b> & ![x](http://beacon.invalid/a.png)", "human", "",
                      "2026-12-04T10:00:00")
    info = views.slot_info("Stripe", 0.999996, "`Solid`", state)
    assert info.startswith("model: Stripe (>99.99%) · catalogue: 'Solid' · saved: Dark Blue (accepted, ")
    assert "<b>ana</b> & ![x]" in info and "&gt;" not in info and "&amp;" not in info  # Gradio escapes HTML
    assert "](" not in info and "]\u200b(http://beacon.invalid/a.png)" in info  # its Markdown makes no link


def test_the_history_tells_apart_tasks_two_models_name_alike(tmp_path):
    """The history spans every model: fashion's baseColour and H&M's colour_group_name are both "Colour"
    to people, so the history's filter and tables name their columns too."""
    from cma_clip.studio import Studio

    shipped = Studio(Path(__file__).resolve().parents[1] / "checkpoints", data_dir=tmp_path / "studio", device="cpu")
    names = shipped.display_names()
    assert names["baseColour"] == "Colour (baseColour)" and names["colour_group_name"] == "Colour (colour_group_name)"
    assert len(set(names.values())) == len(names)
    assert shipped.display_names("hm-articles")["colour_group_name"] == "Colour"  # one model's own view is plain


def test_without_its_catalogue_an_examples_id_is_not_called_a_typo(checkpoint_dir, tmp_path):
    """A Space or a clone without ../shared/data has no catalogues: each example's click said "no catalogue
    item has this id ...: check it for a typo" (the README's first command, session 40)."""
    from cma_clip.studio import Studio

    bare = Studio(checkpoint_dir, data_dir=tmp_path / "studio", device="cpu", data_root=tmp_path / "no-data")
    view = bare.model_view("hm-articles", "0816591001", None, True)
    assert "no catalogue item has this id" not in views.item_line(view, True)
    assert "each control starts at the model's label" in views.item_line(view, True)
    assert not view.catalogue_read and view.catalogue == {}


def test_the_predict_tab_says_where_a_held_out_items_corrections_go(studio):
    """A val or test item's labels saved on the Predict tab never train the next run: its item line says so; a
    train item's line says its labels feed the next run (QA, session 40: it said nothing), and each line says
    where a control without a saved label starts: a catalogue item's at its catalogue label."""
    for split, words in (("val", "a **val** item: the next training run validates on its labels"),
                         ("test", "a **test** item: its labels never reach training")):
        item = hm_rows(split, 1)[0]["article_id"]
        view = studio.model_view("hm-articles", item, None, True)
        assert (view.split, view.catalogue["colour_group_name"]) == (split, hm_rows(split, 1)[0]["colour_group_name"])
        assert words in views.item_line(view, True)
    train = studio.model_view("hm-articles", hm_rows("train", 1)[0]["article_id"], None, True)
    line = views.item_line(train, True)
    assert train.split == "train" and "a **train** item: its labels feed the next training run" in line
    assert "nothing saved yet; each control starts at the catalogue's label" in line
    # labels another model's tasks hold are no controls here: they are not counted as saved (QA, session 40)
    studio.store.save_correction(image=EXAMPLE_IMAGE, text="t", labels={"gender": "Men", "season": "Summer"},
                                 item_id=train.item_id)
    line = views.item_line(studio.model_view("hm-articles", train.item_id, None, True), True)
    assert "nothing saved yet; each control starts at the catalogue's label" in line
    upload = studio.model_view("hm-articles", "img-upload", None, False)
    assert upload.split is None and "each control starts at the model's label" in views.item_line(upload, False)


def test_a_word_the_text_holds_twice_is_numbered_where_a_person_picks_it(studio):
    """The top words read "mesh (10%), mesh (8%), mesh (7%)": which mesh? (QA, session 33)"""
    result = studio.predict(str(EXAMPLE_IMAGE), "black mesh top, mesh sleeves and a mesh back", "hm-articles")
    assert views.word_names(result.words) == ["black", "mesh #1", "top,", "mesh #2", "sleeves", "and", "a",
                                              "mesh #3", "back"]
    choices, _ = views.word_choices(result, "colour_group_name")
    assert [label.split("  (")[0] for label, _ in choices] == views.word_names(result.words)
    tops = {views.relevance_summary(result, task).split("most relevant words: ")[1].split(".")[0]
            for task in result.tasks}  # each task's three top words
    assert any("mesh #" in top for top in tops) and not any("`mesh`" in top for top in tops)


def test_a_ruling_passes_over_a_task_whose_dispute_ended_meanwhile(studio):
    """Two tasks in dispute, the annotators came round on one while it was on screen: the reviewer's pick there
    met a conflict offering to overwrite both annotators (or stored a ruling of no dispute). Only the task still in
    dispute is ruled; the other is left as both annotators say, and the message says so (session 35)."""
    colour, pattern = "colour_group_name", "graphical_appearance_name"
    row = hm_rows("test", 1)[0]
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    dots, stripes, plain = studio.task_classes("hm-articles")[pattern][:3]
    item_id, names = row["article_id"], studio.display_names("hm-articles")
    for annotator, labels in (("ana", {colour: red, pattern: dots}), ("ben", {colour: blue, pattern: stripes})):
        studio.store.save(image=HM / row["image"], text=row["prod_name"], labels=labels, annotator=annotator,
                          item_id=item_id)
    queue = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
    view = studio.current_view(queue)
    assert set(queue.current.disputed) == {colour, pattern} and view.values[pattern] is None
    studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={pattern: stripes}, annotator="ana",
                      item_id=item_id)  # ana comes round to ben's pattern while rita looks at the item
    ruled = studio.review_save(queue, "rita", dict(view.values, **{colour: red, pattern: plain}), view.shown)
    assert ruled.result == "saved" and ruled.labels == {colour: red} and ruled.ended == {pattern: stripes}
    states = studio.store.item_state(item_id)
    assert states[colour].adjudicated and states[colour].label == red
    assert (states[pattern].label, states[pattern].annotator, states[pattern].adjudicated) == (stripes, "ana", False)
    message = views.save_message(ruled, names)
    assert message.startswith(f"Ruling #{ruled.save_id} by `rita` on item `{item_id}`: Colour = `{red}`")
    assert f"Pattern's disagreement ended meanwhile (its annotators' labels no longer differ; it stands at " \
           f"`{stripes}`): your pick there was not stored." in message
    assert not studio.store.open_disagreements() and queue.current is None
    def both_in_dispute_then_ana_comes_round_on_pattern():
        ben = {colour: red, pattern: dots}
        for annotator, labels in (("ana", {colour: blue, pattern: stripes}), ("ben", ben)):
            studio.store.save(image=HM / row["image"], text=row["prod_name"], labels=labels, annotator=annotator,
                              item_id=item_id)
        opened = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
        assert set(opened.current.disputed) == {colour, pattern}
        on_screen = studio.current_view(opened)
        studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={pattern: dots}, annotator="ana",
                          item_id=item_id)
        return opened, on_screen

    queue, view = both_in_dispute_then_ana_comes_round_on_pattern()
    alone = studio.review_save(queue, "rita", dict(view.values, **{colour: blue}), view.shown)  # no pick there
    assert alone.result == "saved" and not alone.ended and "ended meanwhile" not in views.save_message(alone, names)
    # a skip likewise: of the tasks still in dispute only (it met a conflict over the ended one)
    queue, view = both_in_dispute_then_ana_comes_round_on_pattern()
    skipped = studio.review_skip(queue, "rita", view.shown)
    assert skipped.result == "saved" and list(skipped.statuses) == [colour]
    assert studio.store.item_state(item_id)[pattern].status != "skipped"


def test_a_bulk_accepts_preview_counts_what_it_then_stores(studio):
    colour = "colour_group_name"
    queue = studio.review_catalogue("hm-articles", "val", 8)
    studio.review_save(queue, "ana", {colour: queue.current.predictions[colour].label})
    preview, taking = studio.bulk_preview(queue, "ana", task=colour, min_conf=0)
    assert (preview.selected, taking, preview.decided) == (8, 7, 1)
    differ = sum(item.catalogue[colour] != item.predictions[colour].label for item in queue.items[1:])
    assert differ  # (the small test model's colours differ from the catalogue's on some items)
    assert views.bulk_preview_message(preview, taking, studio.display_names("hm-articles")) == (
        "Bulk accept (Colour) at a confidence of at least 0 would auto-accept the model's labels of **7 items** now "
        "(8 of the queue clear the "
        f"bar), 1 already decided, left as they are. {views.plural(differ, 'label')} of these differ from their "
        "item's catalogue label: training keeps the catalogue's there. Undo takes it back whole.")
    assert studio.store.audit(source="auto")[1] == 0  # nothing stored by a preview
    assert studio.bulk_accept(queue, "ana", task=colour, min_conf=0).stored == taking
    assert studio.bulk_preview(queue, "ana", task=colour, min_conf=0)[1] == 0
    with pytest.raises(StudioError, match=r"'nope' is not under review in this queue: Product type \(product_type"):
        studio.bulk_preview(queue, "ana", task="nope")
    assert studio.bulk_preview(queue, "ana", task="Colour", min_conf=0)[0].tasks == [colour]  # the name people read


def test_a_conflict_with_a_bulk_accept_says_it_was_one(studio):
    """QA, session 35: gus's save over fred's bulk accept read "accepted by `fred`", as if fred had chosen it."""
    colour = "colour_group_name"
    queue = studio.review_catalogue("hm-articles", "val", 3)
    item, shown = queue.current, studio.current_view(queue).shown
    predicted = item.predictions[colour].label
    studio.store.save_many([{"item_id": item.item_id, "image": Path(item.image_path), "text": item.text,
                             "labels": {colour: predicted},
                             "predictions": {colour: {"label": predicted, "confidence": 0.5}}}], "fred:bulk",
                           annotator="fred")
    other = next(c for c in studio.task_classes("hm-articles")[colour] if c != predicted)
    refused = studio.review_save(queue, "gus", {colour: other}, shown)
    assert refused.result == "conflict" and refused.conflicts[0].source == "auto"
    assert (f"`{predicted}`, accepted by `fred`'s bulk accept (the model's label, no person's)"
            in views.save_message(refused))


def test_an_annotators_whole_item_resave_does_not_stop_a_ruling_on_the_dispute_as_shown(studio):
    """QA, session 35: ana saved her whole item again (coming round on Pattern, the same Colour): rita's ruling
    on Colour met a conflict over nothing new, and was never told her Pattern pick was not stored."""
    colour, pattern = "colour_group_name", "graphical_appearance_name"
    row = hm_rows("test", 1)[0]
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    dots, stripes = studio.task_classes("hm-articles")[pattern][:2]
    item_id, names = row["article_id"], studio.display_names("hm-articles")

    def label(annotator: str, labels: dict) -> None:
        studio.store.save(image=HM / row["image"], text=row["prod_name"], labels=labels, annotator=annotator,
                          item_id=item_id)

    for decide in ("rule", "skip"):
        label("ana", {colour: red, pattern: dots})
        label("ben", {colour: blue, pattern: stripes})
        queue = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
        view = studio.current_view(queue)
        label("ana", {colour: red, pattern: stripes})  # her whole item again: Pattern as ben's, Colour as before
        if decide == "rule":
            done = studio.review_save(queue, "rita", dict(view.values, **{colour: blue, pattern: dots}), view.shown)
            assert done.result == "saved" and done.labels == {colour: blue} and done.ended == {pattern: stripes}
            assert "your pick there was not stored" in views.save_message(done, names)
            studio.review_undo(queue, "rita")  # the dispute open again, for the skip
        else:
            done = studio.review_skip(queue, "rita", view.shown)
            assert done.result == "saved" and list(done.statuses) == [colour]
            assert views.save_message(done, names).endswith(
                f"Pattern's disagreement ended meanwhile (its annotators' labels no longer differ; it stands at "
                f"`{stripes}`): it is not skipped.")
        assert studio.store.item_state(item_id)[pattern].label == stripes


def test_a_label_saved_meanwhile_on_an_undisputed_task_is_not_ruled_over(studio):
    """QA, session 35: cy labelled Section while rita looked at the item's Colour dispute; rita's Accept sent
    the model's Section still on her screen, which read as her change: a conflict, and Overwrite stored the
    model's guess as a ruling over cy's label."""
    colour, section = "colour_group_name", "index_group_name"
    row = hm_rows("test", 1)[0]
    red, blue = studio.task_classes("hm-articles")[colour][:2]
    for annotator, label in (("ana", red), ("ben", blue)):
        studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={colour: label}, annotator=annotator,
                          item_id=row["article_id"])
    queue = studio.review_disagreements("hm-articles", None, 10, annotator="rita")
    view = studio.current_view(queue)
    guess = view.values[section]
    other = next(c for c in studio.task_classes("hm-articles")[section] if c != guess)
    studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={section: other}, annotator="cy",
                      item_id=row["article_id"])
    ruled = studio.review_save(queue, "rita", dict(view.values, **{colour: blue}), view.shown)
    assert ruled.result == "saved" and ruled.labels == {colour: blue}
    assert studio.store.item_state(row["article_id"])[section].label == other


def test_a_refused_ruling_shows_the_dispute_as_it_stands_and_an_undo_says_what_it_reopened(studio):
    """QA, session 35: after "choose a label" the keys still offered ana's label of before (the message named
    her new one); undoing a ruling on an item outside the queue did not say the dispute was open again, and
    undoing a reviewer's skip said her "ruling" was withdrawn."""
    colour = "colour_group_name"
    rows = hm_rows("test", 2)
    red, blue, green = studio.task_classes("hm-articles")[colour][:3]
    names = studio.display_names("hm-articles")
    for row in rows:
        for annotator, label in (("ana", red), ("ben", blue)):
            studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={colour: label},
                              annotator=annotator, item_id=row["article_id"])
    queue = studio.review_disagreements("hm-articles", colour, 10, annotator="rita")
    first = queue.current.item_id
    row = next(r for r in rows if r["article_id"] == first)
    studio.store.save(image=HM / row["image"], text=row["prod_name"], labels={colour: green}, annotator="ana",
                      item_id=first)
    refused = studio.review_save(queue, "rita", {colour: None})
    assert refused.result == "unchosen" and refused.unchosen[colour]["ana"] == green
    assert queue.current.disputed[colour]["ana"] == green  # what the keys and the header offer now
    assert [label for label, _, _ in queue.current.choices(colour)][:2] == [green, blue]
    ruled = studio.review_save(queue, "rita", {colour: blue})
    assert ruled.result == "saved"
    skipped = studio.review_skip(queue, "rita")
    assert skipped.result == "saved"
    undone = studio.review_undo(queue, "rita")  # the skip: no ruling withdrawn
    assert not undone.ruling and not undone.reopened and "ruling is withdrawn" not in views.undo_message(undone, names)
    elsewhere = studio.review_undo(None, "rita")  # the ruling, from no queue
    assert elsewhere.ruling
    assert elsewhere.reopened == {colour: {"ana": green, "ben": blue}}
    assert "Your ruling is withdrawn: the disagreement is open again on Colour" in views.undo_message(elsewhere, names)
