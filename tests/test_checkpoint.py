import json
import shutil
from dataclasses import replace

import pytest
import torch

from cma_clip.checkpoint import (CatalogueColumns, CheckpointConfig, CheckpointError, TaskSpec, load_checkpoint,
                                 save_checkpoint)
from cma_clip.model import CMAClip
from test_model import make_batch, make_model



def meta(model) -> CheckpointConfig:
    tasks = {task: TaskSpec([f"{task}-{i}" for i in range(n)]) for task, n in model.cfg.tasks.items()}
    return CheckpointConfig(backbone="bundled", catalogue=CatalogueColumns("test"), tasks=tasks, model=model.cfg)


def test_round_trip_gives_identical_outputs(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "ck", model, meta(model))
    loaded, config = load_checkpoint(tmp_path / "ck")
    batch = make_batch()
    for task, logits in model(batch).logits.items():
        assert torch.equal(logits, loaded(batch).logits[task])
    assert config.model.fusion == "cma"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_corrupt_weights_give_a_clear_error(tmp_path, damage):
    model = make_model()
    save_checkpoint(tmp_path, model, meta(model))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        weights.write_bytes(b"\xff" * 64 + data[64:])
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="corrupt|missing"):
        load_checkpoint(tmp_path)


def test_config_that_does_not_match_the_weights(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, model, meta(model))
    other = make_model(mlp_ratio=4.0)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "keep.safetensors")
    save_checkpoint(tmp_path, other, meta(other))  # new config.json ...
    shutil.move(tmp_path / "keep.safetensors", tmp_path / "model.safetensors")  # ... old weights
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path)


def test_broken_config_json(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, model, meta(model))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a CMA-CLIP config"):
        load_checkpoint(tmp_path)


def edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def first_task(config: dict) -> dict:
    return next(iter(config["tasks"].values()))


@pytest.mark.parametrize("edit,message", [
    (lambda c: first_task(c)["classes"].pop(), "task 'colour' names 4 classes for the model's 5 outputs"),
    (lambda c: first_task(c).update(threshold_90=-0.5),
     "task 'colour': threshold_90 must be a confidence in .0, 1. or null, not -0.5"),
    (lambda c: first_task(c).update(threshold_90=1.5), "not 1.5"),
    (lambda c: first_task(c).update(threshold_90=float("nan")), "not nan"),  # written back as invalid JSON
    (lambda c: first_task(c).update(threshold_90="abc"), "not 'abc'"),
    (lambda c: first_task(c)["classes"].__setitem__(1, first_task(c)["classes"][0]), "classes repeat names"),
    (lambda c: first_task(c).update(classes=None), "classes must be a non-empty list of names, not None"),
    (lambda c: c.update(tasks={}), "no tasks"),
    (lambda c: c["catalogue"].update(max_text_tokens=0), "max_text_tokens must be at least 1, not 0"),
], ids=["a-class-cut", "threshold-below-0", "threshold-above-1", "threshold-nan", "threshold-text",
        "repeated-class", "no-classes", "no-tasks", "no-tokens"])
def test_a_hand_edited_config_that_would_give_wrong_figures_is_refused(tmp_path, edit, message):
    """Each of these loaded: evaluate then reported wrong figures (a class list one short scored
    the last class as none, a threshold below 0 auto-accepted every item) or met a traceback."""
    model = make_model()
    save_checkpoint(tmp_path, model, meta(model))
    edit_config(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(make_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


@pytest.mark.parametrize("finetuned", [None, "finetune_backbone", "backbone_weights"])
def test_hub_download_fetches_the_backbone_only_of_a_finetuned_checkpoint(small_checkpoint, tmp_path, monkeypatch,
                                                                          finetuned):
    import huggingface_hub

    from cma_clip import hub

    repo = tmp_path / "repo"
    shutil.copytree(small_checkpoint, repo)
    config = json.loads((repo / "config.json").read_text())
    if finetuned:  # trained with the backbone, or from tuned layers given to training
        config["train"][finetuned] = True if finetuned == "finetune_backbone" else "tuned-layers.safetensors"
    (repo / "config.json").write_text(json.dumps(config))
    asked = []

    def fake_download(repo_id, name, revision=None, etag_timeout=None):
        asked.append(name)
        return str(repo / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.download_checkpoint("team/cma-clip") == repo
    assert asked == ["config.json", "model.safetensors"] + (["backbone.safetensors"] if finetuned else [])


def test_tasks_have_display_names_and_old_configs_get_readable_ones(tmp_path):
    from cma_clip.checkpoint import TaskSpec, read_config, readable_name

    tasks = {"graphical_appearance_name": 1, "perceived_colour_master_name": 1}
    model = CMAClip(replace(make_model().cfg, tasks=tasks))
    config = meta(model)
    config.tasks = {"graphical_appearance_name": TaskSpec(["Stripe"], display_name="Pattern"),
                    "perceived_colour_master_name": TaskSpec(["Blue"])}  # written before display names
    save_checkpoint(tmp_path / "ck", model, config)
    assert read_config(tmp_path / "ck").display_names == {"graphical_appearance_name": "Pattern",
                                                          "perceived_colour_master_name": "Perceived colour"}
    assert [readable_name(c) for c in ("articleType", "baseColour", "index_group_name")] == \
        ["Article type", "Base colour", "Index group"]


@pytest.mark.parametrize("name", ["hm-articles", "fashion-product-images"])
def test_shipped_checkpoints_name_every_task_for_people(name):
    from cma_clip.checkpoint import read_config
    from cma_clip.data import CatalogueConfig, REPO_ROOT

    config = read_config(REPO_ROOT / "checkpoints" / name)
    names = config.display_names
    assert set(names) == set(config.tasks) and not any("_" in n for n in names.values())
    assert CatalogueConfig.load(name).task_names == names  # the catalogue config names them for training runs


@pytest.mark.parametrize("name", ["hm-articles", "fashion-product-images"])
def test_shipped_checkpoints_fit_in_25_mb_and_load_offline(name):
    """Issue 14's limit on a shipped checkpoint's weights (a second image tower's counted), and they load
    without the network, the tower's included."""
    from cma_clip.checkpoint import load_backbone
    from cma_clip.data import REPO_ROOT

    folder = REPO_ROOT / "checkpoints" / name
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) <= 25_000_000
    model, config = load_checkpoint(folder)
    assert config.model.members >= 2 and set(model.tasks) == set(config.tasks)
    towers = {m.cfg.image_tower for m in model.members}
    if "mobilenet_v2" in towers:
        assert load_backbone(folder, config, "cpu").mobilenet_loaded
