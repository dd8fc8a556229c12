"""The labeling workflow as labelers play it, through the app's API (gradio_client): each
numbered point of the review issue as a scenario on a running app with its own store."""
from __future__ import annotations

import json

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from cma_clip.data import Catalogue, CatalogueConfig, read_manifest
from cma_clip.labels import LabelStoreError, content_item_id
from cma_clip.studio import ALL_TASKS, THRESHOLDS, Studio, clean_text, views
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT, serving

MODEL = "hm-articles"
OTHER_IMAGE = EXAMPLE_IMAGE.parent / "hm-0619304001.jpg"
COLOUR = "colour_group_name"
COLOUR_NAME = "Colour"  # what the app's tables show for it (cma_clip/configs/hm-articles.json)
PATTERN = "graphical_appearance_name"  # bulk accepted by one scenario only


@pytest.fixture(scope="module")
def review_app(checkpoint_dir, tmp_path_factory):
    """The app on its own store (the scenarios count rows); yields (url, studio)."""
    with serving(checkpoint_dir, tmp_path_factory.mktemp("review-workflow")) as app_and_studio:
        yield app_and_studio


@pytest.fixture(autouse=True)
def earlier_labelers_left(review_app):
    """Each scenario starts with the earlier scenarios' labelers gone: their claims last 10 minutes,
    and a queue leaves the items others are on to them (a small sample could be all taken)."""
    others_leave(review_app[1], "")


class Labeler:
    """One browser session's worth of API calls; each answer as {output label: value}."""

    def __init__(self, url: str, name: str) -> None:
        self.client, self.name = Client(url, verbose=False), name
        api = self.client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        self.returns = {endpoint: [r["label"] for r in info["returns"]] for endpoint, info in api.items()}

    def __call__(self, endpoint: str, *args) -> dict:
        result = self.client.predict(*args, api_name=endpoint)
        result = result if isinstance(result, tuple) else (result,)
        return dict(zip(self.returns[endpoint], result))

    def load(self, size: int = 4, *, split: str = "train", strategy: str = "least_confidence",
             task: str = ALL_TASKS, low: float = 0, high: float = 1, decided: bool = False) -> dict:
        return self("/review_catalogue", MODEL, split, size, strategy, task, low, high, decided, self.name)

    def accept(self, labels: list, request_id: str = "") -> dict:
        return self("/review_accept", self.name, *labels, request_id)


def slots(answer: dict) -> list:
    """The values of the 8 label controls in an answer (None for hidden ones)."""
    values = []
    for n in range(1, 9):
        update = answer[f"task {n}"]
        values.append(update.get("value") if isinstance(update, dict) and update.get("visible", True) else None)
    return values


def with_label(answer: dict, task: str, label: str) -> list:
    values = slots(answer)
    shown = [answer[f"task {n}"].get("label") for n in range(1, 9)]  # each control is labelled by its task's name
    values[shown.index(CatalogueConfig.load("hm-articles").task_names[task])] = label
    return values


def current_item(answer: dict) -> str:
    """The item id the review progress line names."""
    line = answer["review progress"]
    return line.split("item `", 1)[1].split("`", 1)[0]


def others_leave(studio: Studio, name: str) -> None:
    """Every other labeler of this module's app leaves their item (a bulk accept leaves alone the
    items someone has open, and earlier scenarios' claims last 10 minutes)."""
    for who in set(studio.store.claims(name).values()):
        studio.store.release(who)


def open_item(labeler: Labeler, answer: dict, item: str) -> dict:
    """Step back (Previous) to `item`: how a labeler opens an item their queue steered them past."""
    for _ in range(8):
        if current_item(answer) == item:
            return answer
        answer = labeler("/review_previous", labeler.name)
    raise AssertionError(f"{item} is not before {labeler.name}'s item")


def save_on_predict_tab(labeler: Labeler, item: str, colour: str) -> dict:
    """A Predict-tab save of `item` (the example photo) with `colour`."""
    view = labeler("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, item)
    return labeler("/save_label", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, labeler.name, item,
                   *with_label(view, COLOUR, colour), "")


def classes(studio: Studio, task: str = COLOUR) -> list[str]:
    return studio.task_classes(MODEL)[task]


# ---------------------------------------------------------------------------- 1. identity
def test_a_saved_label_belongs_to_the_item_on_screen(review_app):
    url, studio = review_app
    ana = Labeler(url, "ana")
    shown = ana("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "0816591001")
    assert "0816591001" in shown["item"] and "catalogue id" in shown["item"]
    grey = classes(studio)[7]
    saved = ana("/save_label", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "ana", "0816591001",
                *with_label(shown, COLOUR, grey), "")
    assert saved["save status"].startswith("Saved correction") and "`0816591001`" in saved["save status"]

    # another example clicked: its photo, text and id are on screen at once, its prediction not yet (the
    # controls still show the T-shirt's labels, the browser says so): a save then is refused, not stored
    saves = studio.store.count()
    with pytest.raises(AppError, match="The labels on screen are item 0816591001's"):
        ana("/save_label", handle_file(str(OTHER_IMAGE)), EXAMPLE_TEXT, MODEL, "ana", "0719876001",
            *with_label(shown, COLOUR, grey), "", "0816591001")
    assert studio.store.count() == saves

    # another photo: the UI clears the id (an upload), so the content id applies
    other = ana("/predict", handle_file(str(OTHER_IMAGE)), EXAMPLE_TEXT, MODEL, "")
    content = content_item_id(OTHER_IMAGE, clean_text(EXAMPLE_TEXT))
    assert content in other["item"] and "content id" in other["item"]
    saved = ana("/save_label", handle_file(str(OTHER_IMAGE)), EXAMPLE_TEXT, MODEL, "ana", "", *slots(other), "")
    assert f"`{content}`" in saved["save status"] and "0816591001" not in saved["save status"]

    exported = {row["id"]: row for row in read_manifest(Client(url, verbose=False).predict(
        "CSV", api_name="/export_labels"))}
    assert exported["0816591001"][COLOUR] == grey  # the T-shirt keeps its own correction
    assert exported[content]["product_type_name"] == slots(other)[0]
    # predicting the T-shirt again shows its saved label, the model's beside it
    again = ana("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "0816591001")
    colour = again[f"task {list(studio.task_classes(MODEL)).index(COLOUR) + 1}"]
    assert colour["value"] == grey and "saved: " + grey in colour["info"] and "model: " in colour["info"]


def test_a_decision_made_before_the_screen_caught_up_is_refused_not_saved_on_the_next_item(review_app):
    """The queue and the item shown live on the server and move as soon as an event runs (Next), but
    its answer reaches the screen later: an accept clicked meanwhile carries the labels on screen. It
    names the item on screen, and is refused; it used to save those labels on the next item."""
    url, studio = review_app
    gus = Labeler(url, "gus")
    shown = gus.load(4, split="val")
    on_screen, labels = current_item(shown), slots(shown)
    moved = gus("/review_next", "gus")  # the server has moved on; this answer is not on the screen yet
    assert current_item(moved) != on_screen
    saves = studio.store.count()
    for decide in (lambda: gus("/review_accept", "gus", *labels, "", on_screen),
                   lambda: gus("/review_skip", "gus", "", on_screen)):
        with pytest.raises(AppError, match=f"The item on screen \\({on_screen}\\) is not the queue's current item"):
            decide()
    assert studio.store.count() == saves and current_item(moved) not in studio.store.decided_items()
    stayed = gus("/review_next", "gus", on_screen)  # Next from the screen's item: shows the one it has not seen
    assert current_item(stayed) == current_item(moved) and "had not reached your screen" in stayed["review status"]
    saved = gus("/review_accept", "gus", *slots(moved), "", current_item(moved))  # the item on screen: saved
    assert saved["review status"].startswith("Saved") and f"`{current_item(moved)}`" in saved["review status"]
    assert gus.accept(slots(saved))["review status"].startswith("Saved")  # a client without the field: as before


# ---------------------------------------------------------------------------- 2, 3. state, no silent overwrite
def test_two_annotators_on_one_item_see_the_conflict_and_choose(review_app):
    url, studio = review_app
    ana, ben = Labeler(url, "ana"), Labeler(url, "ben")
    a, b = ana.load(3), ben.load(3)  # the same pending sample: ben's queue steers past ana's item
    item = current_item(a)
    assert current_item(b) != item and "0 reviewed of 3" in a["review progress"]
    b = open_item(ben, b, item)  # ben opens it all the same
    assert "`ana` is on this item too" in b["review progress"]
    mine, theirs = classes(studio)[0], classes(studio)[1]
    saved = ana.accept(with_label(a, COLOUR, mine))
    assert "Saved correction" in saved["review status"] and f"`{item}`" in saved["review status"]

    refused = ben.accept(with_label(b, COLOUR, theirs))
    message = refused["review status"]
    assert "Not saved" in message and f"`{theirs}`" in message and f"`{mine}`" in message and "`ana`" in message
    assert studio.store.item_state(item)[COLOUR].label == mine  # nothing silently replaced
    # ben's table shows the item as it stands now (ana's label), his own choice stays in his controls
    row = next(r for r in refused["item labels"]["data"] if r[0] == COLOUR_NAME)
    assert row[1] == mine and row[3].startswith("ana, human"), row
    assert not any("value" in (refused[f"task {n}"] or {}) for n in range(1, 9))  # ben's controls stay as he set them
    colour_info = refused[f"task {CatalogueConfig.load(MODEL).tasks.index(COLOUR) + 1}"]["info"]
    assert f"saved: {mine} (" in colour_info and ", ana, human" in colour_info  # the line under it, as it stands
    assert "0 reviewed of 3" not in refused["review progress"]  # the item counts as decided now
    kept = ben("/review_keep_theirs", "ben")  # ben keeps ana's colour; his other labels are saved
    assert studio.store.item_state(item)[COLOUR].annotator == "ana"
    # ... as the message says (QA s42: it listed the tasks saved, not the one left to ana)
    assert f"Left as decided since (Keep theirs; yours not saved): {COLOUR_NAME}." in kept["review status"]
    assert {s.annotator for t, s in studio.store.item_state(item).items() if t != COLOUR} == {"ben"}
    assert current_item(kept) != item

    # on ana's next item ben overwrites, knowingly
    second = current_item(saved)
    assert current_item(kept) != second
    shown_to_ben = open_item(ben, kept, second)
    ana.accept(with_label(saved, COLOUR, mine))
    refused = ben.accept(with_label(shown_to_ben, COLOUR, theirs))
    assert "Not saved" in refused["review status"]
    ben("/review_overwrite", "ben")
    state = studio.store.item_state(second)[COLOUR]
    assert (state.label, state.annotator) == (theirs, "ben")
    history = ben("/item_history", second)  # a lead sees the overwrite for what it was
    replaced = [r[7] for r in history[next(iter(history))]["data"] if r[1] == COLOUR_NAME and r[7]]
    anas = max(r["version"] for r in studio.store.item_history(second)
               if (r["task"], r["annotator"], r["kind"]) == (COLOUR, "ana", "label"))
    assert replaced == [f"overwrote ana's {mine} ({anas})"]

    # back on a decided item, each control starts at its saved label
    back = ana("/review_previous", "ana")
    assert current_item(back) == second and with_label(back, COLOUR, theirs) == slots(back)
    assert "2 reviewed of 3" in back["review progress"]
    # a queue loaded again leaves the decided items out
    fresh = ana.load(3)
    assert item not in fresh["review progress"] and second not in fresh["review progress"]


def test_a_retried_save_stores_one_row(review_app):
    url, studio = review_app
    cara = Labeler(url, "cara")
    shown = cara.load(3)
    first = cara.accept(slots(shown), "retry-1")
    retry = cara.accept(slots(shown), "retry-1")  # the answer was lost; the client sends it again
    assert "Saved correction" in first["review status"] and "Already saved" in retry["review status"]
    assert current_item(retry) == current_item(first)  # the queue did not move twice
    rows, total = studio.store.audit(annotator="cara")
    assert {r["save_id"] for r in rows} == {rows[0]["save_id"]} and total == len(studio.task_classes(MODEL))

    # the Predict tab's save, retried from another session (a reload), stores one row too
    item = cara("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "retry-item")
    args = (handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "cara", "retry-item", *slots(item), "retry-2")
    assert "Saved correction" in cara("/save_label", *args)["save status"]
    assert "Already saved" in Labeler(url, "cara")("/save_label", *args)["save status"]
    assert len(studio.store.history(item_id="retry-item")) == 1


def test_a_reload_and_a_server_restart_resume_the_queue(review_app, checkpoint_dir):
    import app

    url, studio = review_app
    dan = Labeler(url, "dan")
    shown = dan.load(4)
    shown = dan.accept(slots(shown))
    shown = dan("/review_skip", "dan", "")
    assert "2 reviewed of 4" in shown["review progress"]

    reloaded = Labeler(url, "dan")("/review_resume", "dan", MODEL)  # a new page: a new session
    assert reloaded["review progress"] == shown["review progress"] and slots(reloaded) == slots(shown)

    restarted = app.serve(Studio(checkpoint_dir, data_dir=studio.data_dir, device="cpu"), host="127.0.0.1",
                          block=False)
    try:
        resumed = Labeler(restarted.url, "dan")("/review_resume", "dan", MODEL)
        assert resumed["review progress"] == shown["review progress"]
        assert "Resumed where you left off" in resumed["review status"]
    finally:
        restarted.close()
    with pytest.raises(AppError, match="No queue kept for nobody"):
        Labeler(url, "nobody")("/review_resume", "nobody", MODEL)


def test_changing_the_order_re_sorts_the_open_queue(review_app):
    """The order and filters apply to the open queue at once (no reload), and a reload keeps them."""
    url, studio = review_app
    eve = Labeler(url, "eve")
    eve.load(8, split="val")
    answer = eve("/review_arrange", "margin", COLOUR, 0, 1, "eve")
    queue = studio.resume_queue(annotator="eve", model=MODEL)
    assert (queue.strategy, queue.tasks, queue.sampled) == ("margin", [COLOUR], 8)
    margins = [item.uncertainty["margin"][COLOUR] for item in queue.items]
    assert margins == sorted(margins, reverse=True) and current_item(answer) == queue.items[0].item_id
    assert "order: margin" in answer["queue notes"]
    before = studio.store.count()  # the slots follow the queue's one task now: a second label is refused
    with pytest.raises(AppError, match=r"the queue reviews 1 task \(colour_group_name\): label slot 2 .'Other"):
        eve("/review_accept", "eve", "Black", "Other accessories", *[None] * 6, "", current_item(answer))
    assert studio.store.count() == before
    with pytest.raises(AppError, match="range is empty"):
        eve("/review_arrange", "margin", COLOUR, 0.9, 0.1, "eve")
    reloaded = Labeler(url, "eve")("/review_resume", "eve", MODEL)
    assert reloaded["review progress"] == answer["review progress"]
    idle = Labeler(url, "fay")("/review_arrange", "entropy", ALL_TASKS, 0, 1, "fay")  # no queue open
    assert idle["review status"] == "The order and filters apply to the queue you load next."


# ---------------------------------------------------------------------------- 4. labels from the schema
def test_a_typo_is_caught_and_a_new_class_needs_confirming(review_app):
    url, studio = review_app
    eve = Labeler(url, "eve")
    shown = eve.load(3)
    item = current_item(shown)
    before = studio.store.count()
    caught = eve.accept(with_label(shown, COLOUR, "Dark Bleu"))
    assert "not a known class" in caught["review status"] and "`Dark Blue`" in caught["review status"]
    assert studio.store.count() == before and caught["review progress"] == {"__type__": "update"}  # stays put
    suggested = eve("/review_use_suggestion")
    assert "Dark Blue" in str(suggested) and studio.store.count() == before
    assert suggested["review status"] == "Suggestion filled in (Colour Dark Blue): check it and accept again."
    # QA phone labeler, session 38: with a second unknown label, which has no class close to it, the line said
    # only "filled in", and the next Accept was refused again, on that label
    values = with_label(shown, COLOUR, "Dark Bleu")
    values[[answer.get("label") for answer in (shown[f"task {n}"] for n in range(1, 9))].index("Pattern")] = "Qqzzyx "
    eve.accept(values)
    suggested = eve("/review_use_suggestion")
    assert suggested["review status"] == ("Suggestion filled in (Colour Dark Blue): check it and accept again; no "
                                          "class is close to Pattern 'Qqzzyx': correct it, or accept again and save "
                                          "it as a new class.")

    new = eve.accept(with_label(shown, COLOUR, "Turquoise glitter"))
    assert "No class is close to it" in new["review status"] and studio.store.count() == before
    with pytest.raises(AppError, match="No class is close to the label you typed"):  # it said "filled in" (QA)
        eve("/review_use_suggestion")
    assert "Use the suggestion" in caught["review status"] and "Use the suggestion" not in new["review status"]
    confirmed = eve("/review_new_class", "eve")
    assert "New class confirmed" in confirmed["review status"]
    assert studio.store.item_state(item)[COLOUR].label == "Turquoise glitter"
    # QA, session 36: a confirmed class was no choice anywhere (each next use typed and confirmed again)
    colour_slot = next(answer for n in range(1, 9) if (answer := confirmed[f"task {n}"]).get("label") == "Colour")
    assert ["Turquoise glitter"] * 2 in colour_slot["choices"]  # the next item's Colour offers it
    listed = eve.client.predict(MODEL, api_name="/tasks")
    assert "Turquoise glitter" in listed["new_classes"][COLOUR] and "Turquoise glitter" not in listed["tasks"][COLOUR]
    # the others listed: catalogue labels this small model lacks, which earlier scenarios accepted on their items
    own = set(Catalogue.open(CatalogueConfig.load(MODEL)).labels(COLOUR))
    assert set(listed["new_classes"][COLOUR]) - {"Turquoise glitter"} <= own - set(listed["tasks"][COLOUR])
    # the Predict tab asks too
    shown = eve("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "typo-item")
    refused = eve("/save_label", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "eve", "typo-item",
                  *with_label(shown, COLOUR, "dark blue"), "")
    assert "`Dark Blue`" in refused["save status"] and not studio.store.item_state("typo-item")
    assert "is the class `Dark Blue` written otherwise" in refused["save status"]  # QA, session 36: "black"
    assert "Save as new class" not in refused["save status"]  # beside "Black" was confirmed as a class
    # beside a real new class, Save as new class confirms it and saves the variant as the class it spells
    # (it stored nothing, again and again: QA, session 36)
    mixed = with_label(shown, COLOUR, "dark blue")
    mixed[with_label(shown, PATTERN, "§").index("§")] = "Tie dye"
    asked = eve("/save_label", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "eve", "variant-item", *mixed, "")
    assert "**Save as new class** if it really is a new class (Colour as `Dark Blue`)" in asked["save status"]
    saved = eve("/save_new_class", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "eve", "variant-item")
    assert "New class confirmed" in saved["save status"]
    state = studio.store.item_state("variant-item")
    assert (state[COLOUR].label, state[PATTERN].label) == ("Dark Blue", "Tie dye")

    # a missing label's word, which the store would drop as no label while the save said it was kept
    before = studio.store.count()
    for word in ("N/A", "none", " NULL "):
        with pytest.raises(AppError, match=f"Colour = {word.strip()}: the catalogues and training read this as no "
                                           "label, so nothing was saved"):
            eve.accept(with_label(confirmed, COLOUR, word))  # on the queue's next item
        with pytest.raises(AppError, match="nothing was saved"):
            eve("/save_label", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "eve", "typo-item",
                *with_label(shown, COLOUR, word), "")
    assert studio.store.count() == before and not studio.store.item_state("typo-item")


def test_a_label_store_error_the_service_lets_through_reaches_the_user_as_its_message(review_app, monkeypatch):
    """The UI showed only StudioError's messages: a LabelStoreError (a store another process held
    locked past the busy timeout) came as a bare "Error" with a traceback in the server's log."""
    url, studio = review_app

    def busy(*args, **kwargs):
        raise LabelStoreError("the label store is busy: another process has held it for over 30 s; nothing could "
                              "be read, try again")

    monkeypatch.setattr(studio.store, "audit", busy)
    with pytest.raises(AppError, match="the label store is busy: another process has held it for over 30 s"):
        Labeler(url, "ivy")("/audit", "any", "", "any", "any", "", 1)


# ---------------------------------------------------------------------------- 5. undo, previous, history
def test_undo_restores_the_previous_label_and_previous_goes_back(review_app):
    url, studio = review_app
    fay, gil = Labeler(url, "fay"), Labeler(url, "gil")
    gil_view, fay_view = gil.load(3), fay.load(3)
    item = current_item(gil_view)
    fay_view = open_item(fay, fay_view, item)
    first, second = classes(studio)[2], classes(studio)[3]
    after = gil.accept(with_label(gil_view, COLOUR, first))
    assert "Not saved" in fay.accept(with_label(fay_view, COLOUR, second))["review status"]
    fay("/review_overwrite", "fay")
    assert studio.store.item_state(item)[COLOUR].label == second

    undone = fay("/review_undo", "fay")
    assert current_item(undone) == item and f"`{second}` → `{first}`" in undone["review status"]
    state = studio.store.item_state(item)[COLOUR]
    assert (state.label, state.annotator) == (first, "gil")  # the previous label, and who set it
    assert with_label(undone, COLOUR, first) == slots(undone)
    with pytest.raises(AppError, match="nothing to undo"):
        fay("/review_undo", "fay")

    back = gil("/review_previous", "gil")
    assert current_item(back) == item and with_label(back, COLOUR, first) == slots(back)
    assert current_item(gil("/review_next", "gil")) == current_item(after)
    history = gil("/item_history", item)
    rows = history[next(iter(history))]["data"]
    assert [(r[2], r[5]) for r in rows if r[1] == COLOUR_NAME] == [("label", "gil"), ("label", "fay"), ("undo", "fay")]


def test_an_undone_answer_comes_back_in_the_controls_to_edit(review_app):
    """Undo takes a first label back (the task is pending again) and the controls start at the label
    undone, not at the model's: the labeler edits their answer instead of entering it again."""
    url, studio = review_app
    una = Labeler(url, "una")
    view = una.load(3, split="test")
    item = current_item(view)
    mine = next(c for c in classes(studio) if c not in slots(view))  # a correction, not the model's label
    una.accept(with_label(view, COLOUR, mine))
    undone = una("/review_undo", "una")
    assert current_item(undone) == item and studio.store.item_state(item)[COLOUR].label is None
    assert slots(undone) == with_label(view, COLOUR, mine)  # the other tasks at the model's labels, as before
    una.accept(slots(undone))
    assert studio.store.item_state(item)[COLOUR].label == mine


def test_an_undo_that_meets_someone_elses_decision_shows_it_and_keep_theirs_moves_on(review_app):
    url, studio = review_app
    lee, mia = Labeler(url, "lee"), Labeler(url, "mia")
    shown = lee.load(3)
    item = current_item(shown)
    moved = lee.accept(slots(shown))
    save_on_predict_tab(mia, item, classes(studio)[4])  # mia decides lee's item after him

    refused = lee("/review_undo", "lee")
    message = refused["review status"]
    assert "Not undone" in message and "`mia`" in message and "`lee`" not in message.split("\n", 1)[1]
    assert current_item(refused) == item != current_item(moved)  # the screen shows the item in question
    assert studio.store.item_state(item)[COLOUR].annotator == "mia"
    kept = lee("/review_keep_theirs", "lee")
    assert "Nothing reverted" in kept["review status"] and COLOUR_NAME in kept["review status"]
    assert {s.annotator for s in studio.store.item_state(item).values()} == {"mia"}
    with pytest.raises(AppError, match="nothing to undo"):  # not stuck on the same conflict
        lee("/review_undo", "lee")


def decided_behind_the_back(url: str, name: str, other: str) -> tuple[Labeler, str]:
    """`name` loads a sample; `other` opens the item on `name`'s screen and accepts it."""
    labeler, second = Labeler(url, name), Labeler(url, other)
    item = current_item(labeler.load(3))
    second.accept(slots(open_item(second, second.load(3), item)))
    return labeler, item


def test_a_stale_skip_is_refused_and_undo_works_with_no_queue_open(review_app):
    url, studio = review_app
    nia, item = decided_behind_the_back(url, "nia", "oto")
    refused = nia("/review_skip", "nia", "")  # nia's screen still shows the item as pending
    assert "Not skipped" in refused["review status"] and "`oto`" in refused["review status"]
    assert {s.status for s in studio.store.item_state(item).values()} <= {"accepted", "corrected"}
    moved = nia("/review_keep_theirs", "nia")
    assert "Kept their decision" in moved["review status"] and current_item(moved) != item

    # the Predict tab's save, undone from a page with no queue open
    save_on_predict_tab(Labeler(url, "nia"), "no-queue-item", classes(studio)[5])
    undone = Labeler(url, "nia")("/review_undo", "nia", "")["review status"]
    assert "Undone on item `no-queue-item`:" in undone and "not in this queue" not in undone
    assert studio.store.item_state("no-queue-item")[COLOUR].status == "pending"


def test_the_predict_tabs_undo_reverts_your_last_save_and_its_controls_follow(review_app):
    """QA phone labeler, session 38: a labeler on the Predict tab had no undo (only the Review queue's)."""
    url, studio = review_app
    qin, rex = Labeler(url, "qin"), Labeler(url, "rex")
    first, second = classes(studio)[2], classes(studio)[3]
    item_inputs = (handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, "qin", "predict-undo")
    save_on_predict_tab(qin, "predict-undo", first)
    undone = qin("/save_undo", None, "", MODEL, "qin", "", "")  # the photo cleared since: no matter (review, s38)
    assert undone["save status"].startswith("Undone on item `predict-undo`: ")
    assert f"{COLOUR_NAME}: `{first}` → (none: pending)" in undone["save status"]
    assert studio.store.item_state("predict-undo")[COLOUR].status == "pending"
    # the controls follow the undo: a save now is no conflict with it
    saved = qin("/save_label", *item_inputs, *with_label(undone, COLOUR, second), "")
    assert saved["save status"].startswith("Saved correction")
    assert studio.store.item_state("predict-undo")[COLOUR].label == second

    save_on_predict_tab(rex, "predict-undo", first)  # rex decides it after qin: qin's undo asks
    refused = qin("/save_undo", *item_inputs, "")
    assert "Not undone" in refused["save status"] and "`rex`" in refused["save status"]
    kept = qin("/save_keep_theirs", *item_inputs)
    assert "Nothing reverted" in kept["save status"]
    assert studio.store.item_state("predict-undo")[COLOUR].annotator == "rex"
    # nothing left to undo, or no name: said in the save's line, in place of "Undone ...", not as an error over
    # every correction control (QA, s38)
    for name, said in (("qin", "nothing to undo"), ("", "Enter your name")):
        refused = qin("/save_undo", *item_inputs[:3], name, "predict-undo", "")
        assert refused["save status"].startswith("⚠️") and said in refused["save status"]


def test_a_key_pressed_before_the_last_answer_came_back_is_refused_in_words_never_answered_as_another(review_app):
    """In a browser the request id comes with each answer: "a" then "u", or "s" then "a", pressed at once send
    the next decision under the id the last one used. It is refused with a message saying to press it again,
    not answered as that decision ("Already saved" for a skip) or in the store's terms."""
    url, studio = review_app
    pax = Labeler(url, "pax")
    view = pax.load(4, split="val")
    pax("/review_skip", "pax", "req-skip")
    with pytest.raises(AppError, match="This save came before the answer to your last skip reached the screen, "
                                       "so it was not run: press it again"):
        pax("/review_accept", "pax", *slots(view), "req-skip")
    saved = pax("/review_accept", "pax", *slots(pax("/review_next", "pax")), "req-save")
    assert saved["review status"].startswith("Saved")
    with pytest.raises(AppError, match="This undo came before the answer to your last save reached the screen"):
        pax("/review_undo", "pax", "req-save")
    assert "Undone" in pax("/review_undo", "pax", "req-undo")["review status"]  # pressed again: a fresh id


def test_a_choice_on_an_undo_conflict_applies_to_that_save_and_a_retried_undo_undoes_once(review_app):
    url, studio = review_app
    rae, sol = Labeler(url, "rae"), Labeler(url, "sol")
    shown = rae.load(3)
    item = current_item(shown)
    rae.accept(slots(shown))
    theirs = classes(studio)[6]
    save_on_predict_tab(sol, item, theirs)
    assert "Not undone" in rae("/review_undo", "rae", "")["review status"]
    save_on_predict_tab(rae, "rae-other", classes(studio)[7])  # rae saves again before she chooses
    with pytest.raises(AppError, match="is not rae's newest decision"):
        rae("/review_keep_theirs", "rae")  # the choice was about her save of `item`, not this one
    assert studio.store.item_state("rae-other")[COLOUR].annotator == "rae"

    first, retry = (rae("/review_undo", "rae", "rae-undo-1") for _ in range(2))  # a lost answer, retried
    assert "Undone on item `rae-other`" in first["review status"] == retry["review status"]
    assert studio.store.item_state("rae-other")[COLOUR].status == "pending"
    assert studio.store.item_state(item)[COLOUR].label == theirs  # the retry undid nothing more

    assert "Not undone" in rae("/review_undo", "rae", "")["review status"]
    forced = rae("/review_overwrite", "rae")["review status"]
    assert f"Dropped {COLOUR_NAME} `{theirs}`, corrected by `sol`" in forced
    assert f"{COLOUR_NAME}: `{theirs}` → (none: pending)" in forced  # what stood went, not rae's older label
    assert studio.store.item_state(item)[COLOUR].status == "pending"


def test_a_reload_resumes_on_your_own_decided_item(review_app):
    url, studio = review_app
    tom = Labeler(url, "tom")
    shown = tom.load(3)
    item = current_item(shown)
    open_item(tom, tom.accept(slots(shown)), item)  # back to look at what he decided
    studio.store.release("tom")  # he closes the page; uma opens the item: it is still his to come back to
    studio.store.claim(item, "uma")
    assert item in studio.store.claims("tom")  # someone else (uma, or a labeler still on it) is on it
    assert current_item(Labeler(url, "tom")("/review_resume", "tom", MODEL)) == item


def test_a_reload_resumes_past_an_item_someone_else_decided(review_app):
    url, _ = review_app
    _, item = decided_behind_the_back(url, "pia", "quin")
    resumed = Labeler(url, "pia")("/review_resume", "pia", MODEL)
    assert current_item(resumed) != item and "1 reviewed of 3" in resumed["review progress"]


# ---------------------------------------------------------------------------- 7. bulk accept
def test_bulk_accept_by_filter_audits_auto_accepts(review_app, monkeypatch):
    url, studio = review_app
    hal = Labeler(url, "hal")
    threshold = 0.12
    monkeypatch.setitem(studio.predictor(MODEL).thresholds, COLOUR, threshold)
    others_leave(studio, "hal")
    hal.load(6)
    done = hal("/bulk_accept", "hal", COLOUR, THRESHOLDS)
    message = done["bulk accept status"]
    assert message.startswith("Bulk accept (Colour) at each task's 90%-precision threshold: ")  # the bar, said
    selected = int(message.split("threshold: ", 1)[1].split(" item", 1)[0])
    rows, total = studio.store.audit(annotator="hal")
    assert total == selected > 0 and f"{selected} auto-accepted now" in message
    assert {(r["task"], r["source"], r["status"]) for r in rows} == {(COLOUR, "auto", "accepted")}
    assert all(r["predicted_confidence"] >= threshold for r in rows)
    again = hal("/bulk_accept", "hal", COLOUR, THRESHOLDS)
    assert "0 auto-accepted now" in again["bulk accept status"] and studio.store.audit(annotator="hal")[1] == total


def test_an_interrupted_bulk_accept_resumes_without_duplicates(review_app, monkeypatch):
    url, studio = review_app
    ivy = Labeler(url, "ivy")
    ivy.load(6)
    real, calls = studio.store.save_many, []

    def crash_on_second_chunk(records, batch_id, **kwargs):
        calls.append(batch_id)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(records, batch_id, **kwargs)

    monkeypatch.setattr(studio, "bulk_chunk", 2)
    monkeypatch.setattr(studio.store, "save_many", crash_on_second_chunk)
    others_leave(studio, "ivy")
    with pytest.raises(AppError, match=r"stopped after 2 of 6 items, each kept \(1 chunks committed\).*Run it again"):
        ivy("/bulk_accept", "ivy", PATTERN, "0")
    assert studio.store.audit(annotator="ivy")[1] == 2
    resumed = ivy("/bulk_accept", "ivy", PATTERN, "0")
    assert "4 auto-accepted now" in resumed["bulk accept status"]
    assert "2 stored by an earlier run of this bulk accept" in resumed["bulk accept status"]  # its own, not others'
    rows, total = studio.store.audit(annotator="ivy")
    assert total == 6 and len({r["item_id"] for r in rows}) == 6  # each item once
    assert {r["source"] for r in rows} == {"auto"}


# ---------------------------------------------------------------------------- 5, 9. audit and agreement
def test_the_long_events_hand_gradio_their_progress_bar(review_app):
    """Gradio gives a progress tracker only to a handler whose signature asks for one: the app's
    error wrapper must show it the handler's own (a 73 s queue load once showed only a timer)."""
    from gradio import helpers

    import app

    handlers = {block.api_name: block.fn for block in app.build(review_app[1]).fns.values()}
    for endpoint in ("review_catalogue", "review_upload", "review_mislabels", "bulk_accept", "sweep_catalogue"):
        _, progress_at, _, _ = helpers.special_args(handlers[endpoint])
        assert progress_at is not None, endpoint


def test_agreement_audit_and_export_provenance(review_app):
    url, studio = review_app
    jo, kim = Labeler(url, "jo"), Labeler(url, "kim")
    a, b = classes(studio)[4], classes(studio)[5]
    for item, (first, second) in {"pair-1": (a, a), "pair-2": (a, b), "pair-3": (b, b)}.items():
        for labeler in (jo, kim):  # both open the item before either saves: each one's label is their own
            labeler("/predict", handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, item)  # shows the versions
        for labeler, label in ((jo, first), (kim, second)):
            labels = [None] * 8
            labels[list(studio.task_classes(MODEL)).index(COLOUR)] = label
            inputs = (handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, MODEL, labeler.name, item)
            status = labeler("/save_label", *inputs, *labels, "")["save status"]
            if labeler is kim and first != second:  # jo's label came after kim opened the item: kim is asked
                assert "Saved correction" not in status and "`jo`" in status
                status = labeler("/save_overwrite", *inputs)["save status"]
            assert "Saved correction" in status
    # a third labeler who saves the item as it is shown (jo's and kim's label) reviews it: no second opinion
    save_on_predict_tab(Labeler(url, "lee"), "pair-1", a)
    table = jo("/agreement")
    row = next(r for r in table[next(iter(table))]["data"] if r[0] == COLOUR_NAME)
    pairs = studio.store.agreement([COLOUR])[COLOUR]
    assert (row[1], row[2], row[3]) == (pairs["items"], views.percent(pairs["raw"]), round(pairs["kappa"], 3))
    assert pairs["items"] >= 3 and {"jo", "kim"} <= set(row[4].split(", "))
    # jo and kim share 3 items (other pairs share fewer, and do not count for kappa):
    # p_o = 2/3, p_e = 2/3 * 1/3 + 1/3 * 2/3 = 4/9, kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert row[3] == 0.4
    # ... and the row says the kappa is over that pair alone, of the pairs sharing an item, and how many
    # labels were reviews of a label shown, left out (QA s42)
    assert row[6] == f"1 of {views.plural(pairs['pairs'], 'annotator pair')}" and pairs["kappa_pairs"] == 1
    assert row[7] == pairs["reviews"] >= 1 and "lee" not in row[4].split(", ")

    audit = jo("/audit", COLOUR, "kim", "corrected", "human", "pair", 1)
    summary, data = audit["audit summary"], audit[next(iter(audit))]["data"]
    assert {r[1] for r in data} <= {"pair-1", "pair-2", "pair-3"} and all(r[6] == "kim" for r in data)
    assert "newest first" in summary
    assert all((r[4], r[5], r[7]) == ("corrected", "label", "human") and r[8].startswith("differs: ") for r in data)

    path = Client(url, verbose=False).predict("JSONL", api_name="/export_labels")
    rows = {r["id"]: r for r in read_manifest(path)}
    assert rows["pair-2"][COLOUR] == b and rows["pair-2"][f"{COLOUR}__annotator"] == "kim"
    assert rows["pair-2"][f"{COLOUR}__source"] == "human" and rows["pair-2"][f"{COLOUR}__checkpoint"] == MODEL
    assert rows["pair-2"][f"{COLOUR}__at"]
    agreement = json.loads(studio.export_agreement(path).read_text())  # beside the export
    assert agreement[COLOUR]["kappa"] == pytest.approx(pairs["kappa"])


# ---------------------------------------------------------------------------- 6. where labels go
def test_the_queue_defaults_to_train_and_says_where_corrections_go(review_app):
    url, _ = review_app
    config = Client(url, verbose=False).config
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert props["review-split"]["value"] == "train"
    assert "feed the next training run" in props["review-split-note"]["value"]
    from cma_clip.studio import SPLIT_NOTES

    assert "never reach training" in SPLIT_NOTES["test"] and "not trained on" in SPLIT_NOTES["val"]


# ---------------------------------------------------------------------------- 8. suspected mislabels
def test_a_resumed_queue_shows_its_own_order_and_task(review_app):
    url, _ = review_app
    uma = Labeler(url, "uma")
    uma.load(3, strategy="margin", task=COLOUR)
    resumed = Labeler(url, "uma")("/review_resume", "uma", MODEL)  # another browser
    order, task = resumed["Order: most uncertain first by"], resumed["Tasks under review"]  # (control updates)
    assert (order["value"], task["value"]) == ("margin", COLOUR)


def test_the_suspected_mislabels_source_asks_for_one_task(review_app):
    """The endpoint is wired to the studio (the ranking itself: tests/test_studio.py, on a small sample)."""
    url, _ = review_app
    with pytest.raises(AppError, match="Choose the task whose catalogue labels to check"):
        Labeler(url, "ana")("/review_mislabels", MODEL, ALL_TASKS, 5, False, "ana")


# ---------------------------------------------------------------------------- disagreements
def test_a_reviewer_settles_what_two_annotators_disagree_on(review_app, capfd):
    """Two annotators label one item's colour differently (another item alike): the Disagreements
    source queues the item with both labels, the reviewer's save settles it (audited as such, no
    vote in the agreement), an undo opens it again, and bulk accept stays out of such a queue."""
    url, studio = review_app
    dee, eli, fay = Labeler(url, "dee"), Labeler(url, "eli"), Labeler(url, "fay")
    first, second = classes(studio)[2], classes(studio)[3]
    save_on_predict_tab(dee, "dispute-1", first)
    save_on_predict_tab(eli, "dispute-1", second)
    save_on_predict_tab(dee, "dispute-2", first)
    save_on_predict_tab(eli, "dispute-2", first)  # agreed: not queued
    before = studio.store.agreement([COLOUR])

    answer = loaded = fay("/review_disagreements", MODEL, COLOUR, 50, "fay")
    queued = [item.item_id for item in studio.resume_queue(None, "fay", MODEL).items]
    assert "dispute-1" in queued and "dispute-2" not in queued
    for _ in queued:
        if current_item(answer) == "dispute-1":
            break
        answer = fay("/review_next", "fay")
    assert f"Annotators disagree on {COLOUR_NAME}: dee {first}, eli {second}" in answer["review progress"]
    order = loaded["Order: most uncertain first by"]
    assert ["oldest disagreement first", "source_order"] in order["choices"] and order["value"] == "source_order"
    capfd.readouterr()
    with pytest.raises(AppError, match="settle each one"):
        fay("/bulk_accept", "fay", ALL_TASKS, THRESHOLDS)
    assert "Traceback" not in capfd.readouterr().err  # a message to the user, not a fault in the server's log

    saved = fay.accept(with_label(answer, COLOUR, second))
    assert "It settles the disagreement" in saved["review status"]  # a ruling, not read as any save (session 32)
    assert "dispute-1" not in studio.store.open_disagreements()
    assert studio.store.item_state("dispute-1")[COLOUR].label == second
    after = studio.store.agreement([COLOUR])[COLOUR]
    assert after == {**before[COLOUR], "open_disagreements": before[COLOUR]["open_disagreements"] - 1}  # no voter
    table = fay("/agreement")
    row = next(r for r in table[next(iter(table))]["data"] if r[0] == COLOUR_NAME)
    assert row[views.AGREEMENT_HEADERS.index("open disagreements")] == after["open_disagreements"]  # how many wait
    audit = fay("/audit", COLOUR, "any", "any", "adjudication", "dispute-1", 1)  # the source filter tells it apart
    assert [(row[6], row[7]) for row in audit[next(iter(audit))]["data"]] == [("fay", "adjudication")]
    human = fay("/audit", COLOUR, "any", "any", "human", "dispute-1", 1)
    assert {row[6] for row in human[next(iter(human))]["data"]} == {"dee", "eli"}
    fay("/review_undo", "fay", "")
    assert "dispute-1" in studio.store.open_disagreements([COLOUR])  # open again
