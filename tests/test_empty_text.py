"""The lab script that measures items without text or with a photo that carries nothing: its inputs."""
import numpy as np
import torch
from PIL import Image

from cma_clip.backbones import EncoderOutput
from cma_clip.features import Features
from cma_clip.lab.empty_text import IMAGE_FIELDS, TEXT_FIELDS, constant_features


class OneItemBackbone:
    """Encodes any (image, text) as fixed tensors: 7s for the image side, 3s for the text side."""

    def encode(self, images, texts, max_tokens):
        return EncoderOutput(image_tokens=torch.full((1, 4, 2), 7.0), image_pooled=torch.full((1, 5), 7.0),
                             text_tokens=torch.full((1, 3, 2), 3.0), text_mask=torch.ones(1, 3, dtype=torch.bool),
                             text_pooled=torch.full((1, 5), 3.0), text_ids=torch.full((1, 3), 3),
                             colour=torch.full((1, 6), 7.0))


def features(n: int) -> Features:
    rng = np.random.default_rng(0)
    return Features(image_tokens=rng.random((n, 4, 2), dtype=np.float32).astype(np.float16),
                    image_pooled=rng.random((n, 5), dtype=np.float32).astype(np.float16),
                    text_tokens=rng.random((n, 3, 2), dtype=np.float32).astype(np.float16),
                    text_mask=np.zeros((n, 3), dtype=bool), text_pooled=rng.random((n, 5), dtype=np.float32).astype(
                        np.float16), text_ids=np.zeros((n, 3), dtype=np.int32),
                    colour=rng.random((n, 6), dtype=np.float32).astype(np.float16))


def test_constant_features_replace_one_side_of_every_item_and_keep_the_other():
    original = features(4)
    blank = constant_features(original, OneItemBackbone(), 3, IMAGE_FIELDS, Image.new("RGB", (1, 1)), "")
    for name in ("image_tokens", "image_pooled", "colour"):
        assert getattr(blank, name).shape == getattr(original, name).shape and (getattr(blank, name) == 7).all()
    for name in TEXT_FIELDS:
        assert np.array_equal(getattr(blank, name), getattr(original, name))  # the items' own text kept
    assert blank.mobilenet_tokens is None  # a tower these features lack stays absent
    empty = constant_features(original, OneItemBackbone(), 3, TEXT_FIELDS, Image.new("RGB", (32, 32)), "")
    assert (empty.text_pooled == 3).all() and empty.text_mask.all() and empty.text_ids.dtype == np.int32
    assert np.array_equal(empty.image_tokens, original.image_tokens)
