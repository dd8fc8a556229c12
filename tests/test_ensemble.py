"""Seed ensembles: one checkpoint holding several runs of one recipe, read as the mean of their
probabilities (`model.Ensemble`, `python -m cma_clip.train --members N` or `--from-members`)."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cma_clip import train
from cma_clip.checkpoint import CheckpointError, load_checkpoint, read_config, save_ensemble, save_members
from cma_clip.lab import member_subsets
from cma_clip.model import CMAClip, Ensemble, create_model
from cma_clip.predict import Predictor
from cma_clip.data import CatalogueError
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT, hm_rows, write_hm_manifest
from test_colour import make_batch, make_model

TINY = ["--catalogue", "hm-articles", "--limit", "48", "--epochs", "2", "--align-epochs", "1", "--batch-size", "16",
        "--width", "64", "--colour", "--words-buckets", "256", "--lexical-buckets", "0", "--quiet"]


@pytest.fixture(scope="module")
def ensemble_checkpoint(tmp_path_factory, cache_dir):
    """Two tiny runs of the shipped H&M recipe (seeds 3 and 4) kept as one ensemble checkpoint."""
    out = tmp_path_factory.mktemp("ensemble") / "hm-pair"
    assert train.main([*TINY, "--members", "2", "--seed", "3", "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    return out


def members_of(folder):
    return [folder.parent / f"{folder.name}-members" / f"seed-{seed}" for seed in (3, 4)]


def test_the_ensemble_is_the_mean_of_its_members():
    members = [make_model(), make_model()]
    with torch.no_grad():  # two different members
        for p in members[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    ensemble = create_model(members[0].cfg.__class__(**{**members[0].cfg.__dict__, "members": 2})).eval()
    assert isinstance(ensemble, Ensemble)
    for target, member in zip(ensemble.members, members):
        target.load_state_dict(member.state_dict())
    batch = make_batch()
    outs = [m(batch, return_attention=True, keep_layers=True) for m in members]
    out = ensemble(batch, return_attention=True, keep_layers=True)
    for task, logits in out.logits.items():
        mean = sum(o.logits[task].softmax(-1) for o in outs) / 2
        torch.testing.assert_close(logits.softmax(-1), mean)
        assert not torch.allclose(outs[0].logits[task].softmax(-1), mean)  # the members do differ
        torch.testing.assert_close(out.modality_weights[task], (outs[0].modality_weights[task]
                                                                + outs[1].modality_weights[task]) / 2)
    torch.testing.assert_close(out.attention.image_cls, (outs[0].attention.image_cls + outs[1].attention.image_cls) / 2)
    assert out.layer_groups == 2 and len(out.layer_attention) == 2 * len(outs[0].layer_attention)
    assert ensemble.modalities == members[0].modalities and ensemble.tasks == members[0].tasks


def test_members_train_on_one_split_and_become_one_checkpoint(ensemble_checkpoint):
    config = read_config(ensemble_checkpoint)
    assert config.model.members == 2 and config.train.members == 2
    assert [m["seed"] for m in config.training["members"]] == [3, 4]
    assert [read_config(m).train.split_seed for m in members_of(ensemble_checkpoint)] == [3, 3]
    for task, spec in config.tasks.items():  # the ensemble's own thresholds and reports, chosen on val
        assert spec.threshold_rule == "clustered-cp-99", task
    report = json.loads((ensemble_checkpoint / "eval_test.json").read_text())
    assert report == config.metrics["test"] and set(report["tasks"]) == set(config.tasks)
    with safe_open(str(ensemble_checkpoint / "model.safetensors"), "pt") as handle:
        dtypes = {k: handle.get_tensor(k).dtype for k in handle.keys()}
        # weight matrices int8 with a float32 scale (per bucket for the words tables, per row for the rest),
        # every other float float16
        matrices = [k for k in dtypes if k.endswith("weight") and len(handle.get_slice(k).get_shape()) == 2]
        assert "members.0.sequence.blocks.0.attn.qkv.weight" in matrices
        assert {dtypes[k] for k in matrices} == {torch.int8} and all(k + ".int8_scale" in dtypes for k in matrices)
        assert {d for k, d in dtypes.items() if d.is_floating_point and not k.endswith(".int8_scale")} == {torch.float16}
        assert handle.get_tensor("members.1.words.proj.weight.int8_scale").shape[0] == 1  # one scale per bucket
        assert any(k.startswith("members.1.") for k in handle.keys())
        # the second member took the first's alignment heads: stored once, loaded into both
        assert not any(k.startswith("members.1.align.") for k in handle.keys())
        same_as = json.loads(handle.metadata()["same_as"])
        assert same_as["members.1.align.text_proj.net.1.weight"] == "members.0.align.text_proj.net.1.weight"
    first, second = members_of(ensemble_checkpoint)
    assert read_config(second).train.align_from == str(first) and read_config(first).train.align_from is None
    ensemble = load_checkpoint(ensemble_checkpoint)[0]
    for name, weight in ensemble.members[1].align.state_dict().items():
        torch.testing.assert_close(weight, ensemble.members[0].align.state_dict()[name])
    member = load_checkpoint(second)[0]
    for name, weight in member.state_dict().items():  # every other weight is its own, as trained
        stored = ensemble.members[1].state_dict()[name]
        if weight.dim() == 2 and name.endswith("weight"):  # int8: within half a step (a slice's largest / 254)
            step = weight.abs().amax(dim=0 if name == "words.proj.weight" else 1, keepdim=True) / 127
            assert ((stored - weight).abs() <= step * 0.5001 + 1e-9).all(), name
            assert not torch.equal(stored, weight.half().float())
        else:
            torch.testing.assert_close(stored, weight.half().float())


def test_a_weights_file_whose_shared_list_names_no_first_member_weight_is_refused(ensemble_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(ensemble_checkpoint, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["members.0.align.logit_scale"]  # what members.1's shared copy would be read from
    save_file(tensors, str(broken / "model.safetensors"),
              metadata={"format": "cma-clip/1", "same_as_first_member": json.dumps(["members.1.align.logit_scale"])})
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(broken)


def test_members_of_one_run_after_another_run_store_their_shared_alignment_once(ensemble_checkpoint,
                                                                              small_checkpoint, tmp_path):
    pair = members_of(ensemble_checkpoint)  # one `--members 2` run: one alignment, not the first member's
    out = save_ensemble(tmp_path / "three", [small_checkpoint, *pair])
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored, same_as = set(handle.keys()), json.loads(handle.metadata()["same_as"])
    assert any(k.startswith("members.1.align.") for k in stored)
    assert not any(k.startswith("members.2.align.") for k in stored)
    assert same_as["members.2.align.image_proj.net.1.weight"] == "members.1.align.image_proj.net.1.weight"
    ensemble = load_checkpoint(out)[0]
    for name, weight in ensemble.members[2].align.state_dict().items():
        torch.testing.assert_close(weight, ensemble.members[1].align.state_dict()[name], rtol=0, atol=0)
    first, second = (ensemble.members[i].align.text_proj.net[1].weight for i in (0, 1))
    assert not torch.equal(first, second)


def test_ensembles_written_before_int8_matrices_still_load(ensemble_checkpoint, tmp_path):
    """Files from before 2026-12-05: float16 matrices, int8 words tables with a flat scale per bucket,
    and the weights shared with the first member listed under "same_as_first_member"."""
    from safetensors.torch import save_file
    old = tmp_path / "old"
    shutil.copytree(ensemble_checkpoint, old)
    state = load_checkpoint(ensemble_checkpoint)[0].state_dict()
    shared = [k for k in state if k.startswith("members.1.align.")]
    tensors = {k: v.half() for k, v in state.items() if k not in shared}
    for key in [k for k in tensors if k.endswith("words.proj.weight")]:
        weight = state[key]
        scale = weight.abs().amax(dim=0) / 127
        tensors[key], tensors[key + ".int8_scale"] = (weight / scale).round().to(torch.int8), scale
    metadata = {"format": "cma-clip/1", "same_as_first_member": json.dumps(shared),
                "int8_per_column": json.dumps([k for k in tensors if k.endswith("words.proj.weight")])}
    save_file(tensors, str(old / "model.safetensors"), metadata=metadata)
    loaded = load_checkpoint(old)[0].state_dict()
    for name, weight in state.items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=float(weight.abs().max()) / 250 + 1e-6)
    torch.testing.assert_close(loaded["members.1.align.logit_scale"], loaded["members.0.align.logit_scale"])


def test_a_loaded_ensemble_predicts_its_members_mean(ensemble_checkpoint, backbone):
    from PIL import Image

    ensemble, config = load_checkpoint(ensemble_checkpoint)
    assert isinstance(ensemble, Ensemble) and next(ensemble.parameters()).dtype == torch.float32
    image = Image.open(EXAMPLE_IMAGE)
    every = max(config.model.tasks.values())  # every class of every task
    predicted = Predictor(ensemble, config, backbone).predict(image, EXAMPLE_TEXT, top_k=every)
    members = [Predictor(*load_checkpoint(folder), backbone).predict(image, EXAMPLE_TEXT, top_k=every)
               for folder in members_of(ensemble_checkpoint)]
    for task, result in predicted.tasks.items():
        of = [dict(zip(m.tasks[task].labels, m.tasks[task].probabilities)) for m in members]
        mean = [(of[0][label] + of[1][label]) / 2 for label in result.labels]
        np.testing.assert_allclose(result.probabilities, mean, atol=2e-3)  # the weights were stored as float16
        assert abs(sum(result.modality_weights.values()) - 1) < 1e-5
        relevance = predicted.relevance[task]  # a rollout per member, averaged
        assert np.isfinite(relevance.words).all() and abs(relevance.words.sum() - 1) < 1e-4
        assert np.isfinite(relevance.image).all() and abs(relevance.image.sum() - 1) < 1e-4
        assert 0 <= relevance.image_share <= 1


def test_identical_members_explain_as_one(ensemble_checkpoint, backbone):
    """Each member's rollout on its own gradients, averaged: two copies of a model show what one
    shows (a rollout over both members' layers as one stack, or on the mean's 1/2-scaled
    gradients, would not)."""
    from PIL import Image

    from cma_clip.relevance import explain

    member, config = load_checkpoint(members_of(ensemble_checkpoint)[0])
    explanations = []
    for count in (1, 2):
        ensemble = Ensemble(replace(config.model, members=count)).eval()
        for copy in ensemble.members:
            copy.load_state_dict(member.state_dict())
        explanations.append(explain(ensemble, backbone, [Image.open(EXAMPLE_IMAGE)], [EXAMPLE_TEXT],
                                    config.catalogue.max_text_tokens))
    one, two = explanations
    for name in ("image", "text", "rollout_patches", "image_share"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), atol=1e-5, err_msg=name)
    assert one.text.max() > 0 and one.image.max() > 0


def test_runs_that_differ_beyond_their_inputs_are_refused(ensemble_checkpoint, small_checkpoint, cache_dir, tmp_path):
    narrow = tmp_path / "narrow"  # the shipped recipe at another width
    args = [*TINY, "--cache-dir", str(cache_dir), "--out", str(narrow)]
    args[args.index("--width") + 1] = "32"
    assert train.main(args) == 0
    with pytest.raises(CheckpointError, match="model settings"):
        save_ensemble(tmp_path / "mixed", [members_of(ensemble_checkpoint)[0], narrow])
    with pytest.raises(CheckpointError, match="at least two"):
        save_ensemble(tmp_path / "alone", [small_checkpoint])


def test_members_may_differ_only_in_their_inputs():
    cfg = make_model().cfg
    with pytest.raises(ValueError, match="depth"):
        replace(cfg, members=2, member_settings=[{}, {"depth": 1}])
    with pytest.raises(ValueError, match="for 2 members"):
        replace(cfg, members=2, member_settings=[{}])
    ensemble = Ensemble(replace(cfg, members=2, member_settings=[{"words_buckets": 64}, {"colour": True}])).eval()
    assert [m.cfg.words_buckets for m in ensemble.members] == [64, 0] and ensemble.members[1].cfg.colour
    assert [m.modalities for m in ensemble.members] == [("text", "image", "words"), ("text", "image", "colour")]
    assert ensemble.modalities == ("text", "image", "colour", "words")
    batch = make_batch()
    outs = [member(batch, return_attention=True) for member in ensemble.members]
    out = ensemble(batch, return_attention=True)
    for task, weights in out.modality_weights.items():  # each member's weights in the ensemble's columns
        words_only, colour_only = (o.modality_weights[task] for o in outs)
        torch.testing.assert_close(weights[:, :2], (words_only[:, :2] + colour_only[:, :2]) / 2)
        torch.testing.assert_close(weights[:, 2], colour_only[:, 2] / 2)
        torch.testing.assert_close(weights[:, 3], words_only[:, 2] / 2)
    patches = (outs[0].attention.cls_to_patches() + outs[1].attention.cls_to_patches()) / 2
    torch.testing.assert_close(out.attention.cls_to_patches(), patches)  # sequences of other lengths, averaged


def test_runs_of_other_inputs_join_and_predict_their_mean(ensemble_checkpoint, small_checkpoint, backbone, tmp_path):
    """A plain run (text and image tokens, the hashed lexical channel) and a colour + words run as one
    ensemble: each member keeps its own settings, the probabilities are their mean, the modality weights
    cover every modality either reads (a member gives 0 to one it lacks), and the relevance reads each
    member's rollout at its own [CLS] positions."""
    from PIL import Image

    plain, words_run = small_checkpoint, members_of(ensemble_checkpoint)[0]
    out = save_ensemble(tmp_path / "mixed", [plain, words_run])
    ensemble, config = load_checkpoint(out)
    assert config.model.colour  # the ensemble reads the colour descriptor: one member does
    assert [m.modalities for m in ensemble.members] == [("text", "image"), ("text", "image", "colour", "words")]
    assert ensemble.modalities == ("text", "image", "colour", "words")
    assert [m.cfg.lexical_buckets for m in ensemble.members] == [read_config(plain).model.lexical_buckets, 0]
    image = Image.open(EXAMPLE_IMAGE)
    every = max(config.model.tasks.values())
    predicted = Predictor(ensemble, config, backbone).predict(image, EXAMPLE_TEXT, top_k=every)
    members = [Predictor(*load_checkpoint(folder), backbone).predict(image, EXAMPLE_TEXT, top_k=every)
               for folder in (plain, words_run)]
    for task, result in predicted.tasks.items():
        of = [dict(zip(m.tasks[task].labels, m.tasks[task].probabilities)) for m in members]
        np.testing.assert_allclose(result.probabilities, [(of[0][c] + of[1][c]) / 2 for c in result.labels], atol=2e-3)
        weights = [m.tasks[task].modality_weights for m in members]
        for modality, weight in result.modality_weights.items():
            assert abs(weight - (weights[0].get(modality, 0) + weights[1][modality]) / 2) < 2e-3, (task, modality)
        assert result.modality_weights["words"] > 0 and abs(sum(result.modality_weights.values()) - 1) < 1e-5
        relevance = predicted.relevance[task]
        assert np.isfinite(relevance.words).all() and abs(relevance.words.sum() - 1) < 1e-4
        assert np.isfinite(relevance.image).all() and abs(relevance.image.sum() - 1) < 1e-4
        assert 0 <= relevance.image_share <= 1


def test_an_ensemble_comes_apart_into_the_runs_it_joined(ensemble_checkpoint, small_checkpoint, tmp_path):
    """`save_members` gives back each member as its run (settings, seed, history, weights as stored), one
    folder per recipe, so joining them again writes the same checkpoint; one run is refused."""
    runs = [small_checkpoint, *members_of(ensemble_checkpoint)]
    joined = save_ensemble(tmp_path / "mixed", runs)
    assert member_subsets.main(["--unjoin", str(joined), str(tmp_path / "runs")]) == 0
    parts = sorted((tmp_path / "runs").glob("recipe-*/seed-*"))
    plain_seed = read_config(small_checkpoint).train.seed
    assert [p.relative_to(tmp_path / "runs").as_posix() for p in parts] == [
        f"recipe-0/seed-{plain_seed}", "recipe-1/seed-3", "recipe-1/seed-4"]
    for part, run in zip(parts, runs):
        config, original = read_config(part), read_config(run)
        assert config.model == original.model and config.train.seed == original.train.seed
        assert config.training["history"] == original.training["history"]
        assert member_subsets.training_seconds(part) == member_subsets.training_seconds(run)
    again = save_ensemble(tmp_path / "again", parts)
    (model, config), (expected, expected_config) = load_checkpoint(again), load_checkpoint(joined)
    assert config.model == expected_config.model
    without_folder = [[{k: v for k, v in m.items() if k != "folder"} for m in c.training["members"]]
                      for c in (config, expected_config)]
    assert without_folder[0] == without_folder[1]  # a run's folder name is the one thing not kept
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="not an ensemble"):
        save_members(small_checkpoint, tmp_path / "one")
    with pytest.raises(CheckpointError, match="exists"):
        save_members(joined, tmp_path / "runs")


def test_finished_runs_join_from_the_command_line(ensemble_checkpoint, cache_dir, tmp_path):
    out = tmp_path / "joined"
    members = [str(m) for m in members_of(ensemble_checkpoint)]
    assert train.main([*TINY, "--from-members", *members, "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    assert read_config(out).metrics["test"] == read_config(ensemble_checkpoint).metrics["test"]


def test_resume_keeps_the_members_already_trained(ensemble_checkpoint, cache_dir, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(members_of(ensemble_checkpoint)[0], tmp_path / "resumed-members" / "seed-3")
    before = (tmp_path / "resumed-members" / "seed-3" / "model.safetensors").stat().st_mtime_ns
    assert train.main([*TINY, "--members", "2", "--seed", "3", "--resume", "--cache-dir", str(cache_dir),
                       "--out", str(out)]) == 0
    assert (tmp_path / "resumed-members" / "seed-3" / "model.safetensors").stat().st_mtime_ns == before
    assert read_config(out).model.members == 2 and isinstance(load_checkpoint(out)[0].members[0], CMAClip)


def test_without_a_split_column_the_members_share_one_split(cache_dir, tmp_path):
    """A manifest without a split column is split by a seed: --members splits every member by the
    first seed; runs that were split by their own seeds are refused, not joined."""
    manifest = write_hm_manifest(tmp_path, hm_rows("train", 60),
                                 columns=["image", "prod_name", "detail_desc", "colour_group_name"])
    tiny = ["--manifest", str(manifest), "--text-columns", "prod_name", "detail_desc", "--tasks", "colour_group_name",
            "--epochs", "1", "--align-epochs", "1", "--batch-size", "16", "--width", "32", "--quiet",
            "--cache-dir", str(cache_dir)]
    assert train.main([*tiny, "--members", "2", "--seed", "5", "--out", str(tmp_path / "pair")]) == 0
    assert read_config(tmp_path / "pair").metrics["val"]["tasks"]["colour_group_name"]["n"] > 0
    assert [read_config(tmp_path / "pair-members" / f"seed-{s}").train.splits_seed for s in (5, 6)] == [5, 5]
    for seed in (5, 6):  # two runs on their own splits
        assert train.main([*tiny, "--seed", str(seed), "--out", str(tmp_path / f"alone-{seed}")]) == 0
    with pytest.raises(CatalogueError, match="split the catalogue differently"):
        train.combine(tmp_path / "mixed", [tmp_path / "alone-5", tmp_path / "alone-6"], cache_dir=str(cache_dir))


def test_tuned_layers_given_to_training_stay_frozen_and_travel_with_the_checkpoint(backbone, cache_dir, tmp_path):
    """--backbone-weights (e.g. lab.tower_finetune's tuned image tail): every member and the ensemble
    keep the same file, loading applies it (and caches its features apart), runs on other tuned
    layers cannot join, and it does not go with --finetune-backbone."""
    from safetensors.torch import save_file

    from cma_clip.checkpoint import TrainConfig, load_backbone

    head = backbone.state_dict()["cnn._conv_head.weight"]
    weights = {}
    for name, scale in (("a", 1.1), ("b", 0.9)):
        weights[name] = tmp_path / f"{name}.safetensors"
        save_file({"cnn._conv_head.weight": (head * scale).half()}, str(weights[name]))
    out = tmp_path / "tuned-pair"
    assert train.main([*TINY, "--members", "2", "--seed", "3", "--backbone-weights", str(weights["a"]),
                       "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    for folder in [out, *members_of(out)]:
        assert (folder / "backbone.safetensors").read_bytes() == weights["a"].read_bytes()
    loaded = load_backbone(out, read_config(out), "cpu")
    torch.testing.assert_close(loaded.state_dict()["cnn._conv_head.weight"], (head * 1.1).half().float())
    torch.testing.assert_close(loaded.state_dict()["cnn._bn1.weight"], backbone.state_dict()["cnn._bn1.weight"])
    assert loaded.cache_key() != backbone.cache_key()
    other = tmp_path / "other"
    assert train.main([*TINY, "--backbone-weights", str(weights["b"]), "--cache-dir", str(cache_dir),
                       "--out", str(other)]) == 0
    with pytest.raises(CheckpointError, match="backbone weights"):
        save_ensemble(tmp_path / "mixed", [members_of(out)[0], other])
    with pytest.raises(CatalogueError, match="backbone-weights"):
        TrainConfig(catalogue="hm-articles", backbone_weights=str(weights["a"]), finetune_backbone=True)
