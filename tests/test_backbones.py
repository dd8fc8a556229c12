import time

import pytest
import torch
from PIL import Image

from cma_clip.backbones import BackboneError, create_backbone
from conftest import HM


def real_items(n=2):
    paths = sorted((HM / "images").glob("*/*.jpg"))[:n]
    return [Image.open(p) for p in paths], ["Striped cotton shirt", "Black jersey dress with a long skirt"][:n]


def test_bundled_backbone_outputs(backbone):
    images, texts = real_items()
    out = backbone.encode(images, texts, max_tokens=16)
    assert out.image_tokens.shape == (2, 49, 320) and out.image_pooled.shape == (2, 1280)
    # the batch is trimmed to its longest text (9 tokens), not padded to max_tokens
    assert out.text_tokens.shape == (2, 9, 384) and out.text_pooled.shape == (2, 384)
    assert out.text_mask.dtype == torch.bool and out.text_mask.sum(1).tolist() == [5, 9]
    tokens = backbone.token_strings(texts[0], 16)
    assert tokens[0] == "[CLS]" and "striped" in tokens and len(tokens) == 5


def test_open_clip_token_extraction_with_random_weights():
    backbone = create_backbone("open_clip:ViT-B-32", "cpu")
    images, texts = real_items()
    with torch.no_grad():
        out = backbone.encode(images, texts, max_tokens=20)
        model = backbone.model
        pixels = backbone.preprocess(images)
        full = backbone.tokenize(texts, 77)
        text_tokens, text_pooled = backbone.encode_text(full)
        patches, image_pooled = backbone.encode_image(pixels)
        model.visual.output_tokens = False  # open_clip's own pooled path
        expected_text, expected_image = model.encode_text(full.ids), model.encode_image(pixels)
        model.visual.output_tokens = True
    assert out.image_tokens.shape == (2, 49, 512) and out.image_pooled.shape == (2, 512)
    assert out.text_tokens.shape == (2, 9, 512) and out.text_pooled.shape == (2, 512)  # trimmed to the longest
    # per-token outputs (full precision) agree with open_clip's own pooled embeddings
    torch.testing.assert_close(text_pooled, expected_text)
    torch.testing.assert_close(image_pooled, expected_image)
    assert text_tokens.shape == (2, 77, 512) and patches.shape == (2, 49, 512)
    tokens = backbone.token_strings(texts[0], 20)
    assert tokens[1:4] == ["striped", "cotton", "shirt"]
    # a text longer than max_tokens keeps its end-of-text token, which the pooled embedding reads
    long = backbone.tokenize(["striped cotton shirt with long sleeves " * 10], 16)
    assert long.mask.all() and long.ids[0, -1] == backbone.tokenizer.eot_token_id


@pytest.mark.parametrize("name", ["bundled", "open_clip:ViT-B-32"])
def test_trimming_the_padding_changes_no_output(name, backbone, monkeypatch):
    monkeypatch.setenv("CMA_CLIP_FP32", "1")  # no bf16 autocast: compare in full precision
    encoder = backbone if name == "bundled" else create_backbone(name, "cpu")
    images, texts = real_items()
    with torch.no_grad():
        trimmed = encoder.encode(images, texts, max_tokens=32)
        padded = encoder.tokenize(texts, 32)
        tokens, pooled = encoder.encode_text(padded)  # full precision, padded to 32
    length = trimmed.text_mask.shape[1]
    assert length < 32 and padded.mask[:, length:].sum() == 0
    real = trimmed.text_mask
    torch.testing.assert_close(trimmed.text_pooled, pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trimmed.text_tokens[real], tokens[:, :length][real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trimmed.text_ids, padded.ids[:, :length])


@pytest.mark.parametrize("offline_flag", ["1", "0"])
def test_open_clip_pretrained_offline_fails_fast_and_clearly(monkeypatch, offline_flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    started = time.time()
    with pytest.raises(BackboneError, match="unreachable|could not build"):
        create_backbone("open_clip:ViT-B-32:openai", "cpu")
    assert time.time() - started < 15


def test_unknown_backbone_name():
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("resnet-9000")


def test_open_clip_models_without_the_clip_layout_are_refused_clearly():
    with pytest.raises(BackboneError, match="does not have the original CLIP layout"):
        create_backbone("open_clip:RN50", "cpu")  # a ResNet image tower: no patch tokens


def test_batch_pixels_are_the_letterboxed_images_and_to_rgb_copies():
    import io

    import numpy as np

    from cma_clip.backbones import letterbox, letterbox_pixels, to_rgb

    photos, _ = real_items(3)
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 300, 3), dtype=np.uint8))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: turn it upright
    base.save(rotated, "JPEG", exif=exif)
    images = [*photos, base, base.convert("RGBA"), base.convert("P"), base.convert("L"), Image.open(rotated)]
    batch = letterbox_pixels(images, 224)
    for image, pixels in zip(images, batch):
        assert np.array_equal(pixels, np.asarray(letterbox(image, 224)))
    assert batch[-1].shape == (224, 224, 3) and np.all(batch[-1][:, :70] == 255)  # upright: padded left and right
    rgb = to_rgb(base)
    assert rgb is not base and np.array_equal(np.asarray(rgb), np.asarray(base))


def test_finetuned_weights_may_be_some_of_the_backbones_and_nothing_else(tmp_path):
    from safetensors.torch import save_file

    from cma_clip.checkpoint import load_backbone_weights

    backbone = create_backbone("bundled", "cpu")
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    key = backbone.cache_key()
    tuned = {"cnn._conv_head.weight": pretrained["cnn._conv_head.weight"] * 1.5}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    load_backbone_weights(tmp_path / "tuned.safetensors", backbone)
    state = backbone.state_dict()
    assert torch.equal(state["cnn._conv_head.weight"], tuned["cnn._conv_head.weight"])
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if k != "cnn._conv_head.weight")
    assert backbone.cache_key() != key  # their features are cached apart
    save_file({"cnn._blocks.99.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="not this backbone's"):
        load_backbone_weights(tmp_path / "other.safetensors", backbone)
