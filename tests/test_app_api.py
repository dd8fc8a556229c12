"""The launched app through gradio_client: predict, save a correction, read it back, export."""

import pytest
from gradio_client import Client, handle_file

from cma_clip.checkpoint import read_config
from cma_clip.data import read_manifest
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT


@pytest.fixture(scope="module")
def client(running_app):
    url, _ = running_app
    return Client(url, verbose=False)


def test_predict_endpoint(client):
    result = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles", api_name="/predict")
    prediction = result[0]
    assert set(prediction) == {"product_type_name", "graphical_appearance_name", "colour_group_name",
                               "perceived_colour_master_name", "index_group_name", "garment_group_name"}
    for task in prediction.values():
        assert 0 < task["confidence"] <= 1 and abs(sum(task["modality_weights"].values()) - 1) < 1e-3


def test_save_correction_then_read_it_back_and_export(client, running_app):
    _, studio = running_app
    tasks = list(client.predict("hm-articles", api_name="/tasks")["tasks"])
    labels = ["Vest top", "Stripe", "Light Pink", "Pink", "Ladieswear", "Jersey Basic"]
    assert len(tasks) == len(labels)
    padding = [None] * (8 - len(labels))
    status, history = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles", "api-tester",
                                     "0816591001", *labels, *padding, api_name="/save_correction")
    assert status.startswith("Saved correction")
    stored = studio.store.current_labels()["0816591001"]
    assert stored["labels"] == dict(zip(tasks, labels)) and stored["annotator"] == "api-tester"
    exported = client.predict("JSONL", api_name="/export_labels")
    rows = {row["id"]: row for row in read_manifest(exported)}  # other tests may share the app's store
    assert rows["0816591001"]["graphical_appearance_name"] == "Stripe"


def test_errors_come_back_as_messages(client):
    with pytest.raises(Exception, match="Upload a product image"):
        client.predict(None, "text", "hm-articles", api_name="/predict")


def test_probe_endpoint_compares_clean_and_noisy(client, running_app):
    summary, rows, *_ = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles",
                                       "occlusion", 5, "word_mask", 5, 0, api_name="/probe")
    assert set(summary["clean"]) == set(summary["noisy"]) and len(rows["data"]) == len(summary["clean"])
    assert summary["noisy_text"] != EXAMPLE_TEXT and "[UNK]" in summary["noisy_text"]
    names = read_config(running_app[1].checkpoints["hm-articles"]).display_names
    for (task, clean), row in zip(summary["clean"].items(), rows["data"]):  # the JSON keeps the column names,
        assert row[0] == names[task]  # the table shows the task's name
        noisy = summary["noisy"][task]["label"]  # each label with its confidence, "(changed)" after a new one
        assert row[1].startswith(f"{clean['label']} · ") and row[2].startswith(f"{noisy} · ")
        assert row[2].endswith(" (changed)") == (noisy != clean["label"])
    # severity 0 on both inputs is the clean prediction
    same, *_ = client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles",
                              "blur", 0, "typos", 0, 0, api_name="/probe")
    assert same["clean"] == same["noisy"]


def test_probe_rejects_unknown_corruptions(client):
    with pytest.raises(Exception, match="Image corruption: fog is not in the list of choices"):  # names the field
        client.predict(handle_file(str(EXAMPLE_IMAGE)), EXAMPLE_TEXT, "hm-articles", "fog", 3, "typos", 1, 0,
                       api_name="/probe")


def test_a_broken_checkpoint_gives_a_message_not_a_trace(client, running_app, small_checkpoint, tmp_path):
    import shutil

    from gradio_client.exceptions import AppError

    _, studio = running_app
    broken = tmp_path / "broken"
    shutil.copytree(small_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    studio.add_checkpoint("broken", broken)
    try:
        with pytest.raises(AppError, match="Model 'broken' cannot be loaded: .*truncated or corrupt"):
            client.predict("broken", api_name="/tasks")
    finally:
        studio.checkpoints.pop("broken")


def test_a_batch_sweep_stops_when_asked(running_app):
    """A sweep of 500 items is minutes of both cores: a closed tab or a cancelled client job went on to
    the end. The page's Stop (an API client's /stop_sweep, from the same Client) ends it after its batch."""
    import time

    _, studio = running_app
    client = Client(running_app[0], verbose=False)
    job = client.submit("hm-articles", 300, "jpeg", "none", 0, api_name="/sweep_catalogue")
    for _ in range(600):  # until it reports its first batch
        if (status := job.status()).progress_data:
            break
        time.sleep(0.2)
    assert status.progress_data, "the sweep never reported progress"
    other = Client(running_app[0], verbose=False).predict(api_name="/stop_sweep")  # another session's: not this sweep
    assert other == "No batch sweep of this page is running."
    time.sleep(1)
    assert not job.done()
    assert client.predict(api_name="/stop_sweep") == "Stopping the batch sweep after its current batch…"
    plot, csv_file = job.result(timeout=120)  # ended early, with a notice: nothing to show
    assert plot is None and csv_file is None
    assert not list((studio.data_dir / "sweeps").glob("*-300-items-*"))
    # a client's job.cancel() ends the event in Gradio, which cannot stop the thread: the sweep sees it
    cancelled = client.submit("hm-articles", 299, "jpeg", "none", 0, api_name="/sweep_catalogue")
    for _ in range(600):
        if cancelled.status().progress_data:
            break
        time.sleep(0.2)
    assert cancelled.cancel()
    for _ in range(600):  # the sweep leaves the studio's running sweeps once it has stopped
        if not studio._sweeps:
            break
        time.sleep(0.2)
    assert not studio._sweeps and not list((studio.data_dir / "sweeps").glob("*-299-items-*"))


def test_the_public_endpoints_are_the_ones_the_readme_documents(client):
    """Each public endpoint is in the README's API table and each one there is served: the tables'
    load events once added /agreement_rows_1 and /history_rows_1 beside /agreement and /history."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = {name for line in readme.splitlines() if line.startswith("| `/")
                  for name in re.findall(r"`(/\w+)`", line.split("|")[1])}
    served = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert served == documented, (sorted(served - documented), sorted(documented - served))


def _secret_after(barrier, data_dir: str, keys) -> None:
    import types
    from pathlib import Path

    import app
    barrier.wait()
    keys.put(app.browser_secret(types.SimpleNamespace(data_dir=Path(data_dir))))


def test_processes_starting_at_once_on_a_new_folder_share_one_browser_key(tmp_path):
    """QA, session 35: of two processes starting at once, 7 trials in 40 held different keys and 2 an empty one
    (read between the other's create and write): Gradio then drew a key of its own, and the browser's saved
    annotator, model and queue did not read after a restart."""
    import multiprocessing

    import app  # noqa: F401 (imported once, here: the processes forked from this one start at once)
    context = multiprocessing.get_context("fork")
    for trial in range(12):
        folder = tmp_path / str(trial)
        folder.mkdir()
        barrier, keys = context.Barrier(3), context.Queue()
        starts = [context.Process(target=_secret_after, args=(barrier, str(folder), keys)) for _ in range(3)]
        for process in starts:
            process.start()
        held = [keys.get(timeout=60) for _ in starts]
        for process in starts:
            process.join(timeout=60)
        assert held[0] and set(held) == {(folder / "browser_state.key").read_text().strip()}, (trial, held)
        assert [p.name for p in folder.iterdir()] == ["browser_state.key"]  # no temporary file left
