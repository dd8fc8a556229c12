"""The foreground colour descriptor and the model's colour and words modalities."""
import numpy as np
import pytest
import torch
from PIL import Image

from cma_clip.backbones import EncoderOutput, images_to_tensor
from cma_clip.colour import DESCRIPTOR_DIM, FAMILIES, HISTOGRAM_DIM, colour_descriptor, split
from cma_clip.model import SEQUENCE_FUSIONS, CMAClip, CMAClipConfig, WordsBag

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def product_photo(colour, background=(235, 235, 235), size=(120, 200), box=(30, 50, 90, 150)) -> Image.Image:
    """A portrait photo (letterboxed with white columns) of a coloured block on a plain background."""
    image = Image.new("RGB", size, background)
    image.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), colour), box[:2])
    return image


def describe(images):
    return colour_descriptor(images_to_tensor(images, 224, MEAN, STD), MEAN, STD)


def family_shares(descriptor):
    _, tokens = split(descriptor)
    return {name: float(tokens[0, k, 0]) for k, name in enumerate(FAMILIES)}


@pytest.mark.parametrize("colour, family", [((200, 20, 30), "red"), ((20, 40, 160), "blue"),
                                             ((30, 150, 40), "green"), ((15, 15, 15), "black")])
def test_the_product_colour_wins_over_background_and_padding(colour, family):
    shares = family_shares(describe([product_photo(colour)]))
    assert shares[family] > 0.85, shares  # the rest: the product's edge, blended with the background
    assert shares["white"] < 0.02 and shares["grey"] < 0.15  # neither the grey background nor the padding


def test_the_histogram_is_a_distribution_and_the_families_split_the_foreground():
    descriptor = describe([product_photo((200, 20, 30)), product_photo((20, 40, 160))])
    histogram, tokens = split(descriptor)
    assert descriptor.shape == (2, DESCRIPTOR_DIM) and histogram.shape == (2, HISTOGRAM_DIM)
    torch.testing.assert_close((histogram ** 2).sum(-1), torch.ones(2))  # square-rooted frequencies
    torch.testing.assert_close(tokens[..., 0].sum(-1), torch.ones(2))
    assert not torch.allclose(histogram[0], histogram[1])


def test_a_white_product_on_white_falls_back_to_the_whole_photo():
    shares = family_shares(describe([product_photo((252, 252, 252), background=(255, 255, 255))]))
    assert shares["white"] > 0.9


def test_a_striped_product_shows_both_colours():
    image = product_photo((20, 40, 160))
    for y in range(50, 150, 20):
        image.paste(Image.new("RGB", (60, 10), (245, 245, 60)), (30, y))
    shares = family_shares(describe([image]))
    assert 0.3 < shares["blue"] < 0.7 and 0.3 < shares["yellow"] < 0.7, shares


def make_model(depth=2, **kw):
    torch.manual_seed(0)
    cfg = CMAClipConfig(image_token_dim=20, image_pooled_dim=24, text_token_dim=12, text_pooled_dim=12,
                        num_patches=9, max_text_tokens=8, tasks={"colour": 5, "kind": 3}, embed_dim=16, width=32,
                        depth=depth, heads=4, **kw)
    return CMAClip(cfg).eval()


def make_batch(b=3, length=6):
    torch.manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 4:] = False
    colour = describe([product_photo(c) for c in [(200, 20, 30), (20, 40, 160), (30, 150, 40)][:b]])
    return EncoderOutput(torch.randn(b, 9, 20), torch.randn(b, 24), torch.randn(b, length, 12), mask,
                         torch.randn(b, 12), torch.randint(1000, 30000, (b, length)), colour)


@pytest.mark.parametrize("fusion", ["cma", "no_modality_attention", "no_sequence_attention", "late_fusion",
                                    "text_only", "image_only"])
def test_colour_and_words_are_modalities_of_every_fusion(fusion):
    model = make_model(colour=True, words_buckets=64, fusion=fusion)
    assert model.modalities == ("text", "image", "colour", "words")
    out = model(make_batch(), return_attention=True)
    for weights in out.modality_weights.values():
        assert weights.shape == (3, 4)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    if fusion == "image_only":  # the image side: image and colour
        torch.testing.assert_close(out.modality_weights["colour"][0], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    if out.attention is not None:  # [text CLS, 6 tokens, image CLS, 9 patches, colour CLS, 15 families, words]
        assert out.attention.image_cls.shape == (3, 1 + 6 + 1 + 9 + 1 + len(FAMILIES) + 1)
        assert out.attention.cls_to_patches().shape == (3, 9)
        assert model.cls_positions(6, 9) == [0, 7, 17, 33]


@pytest.mark.parametrize("fusion", SEQUENCE_FUSIONS)
@pytest.mark.parametrize("depth", [1, 2])
def test_inference_computes_only_the_cls_rows_of_the_last_layer_and_agrees(fusion, depth):
    """Without attention maps the last layer computes the [CLS] tokens' rows alone: the same
    logits and modality weights as every row (the maps' path), with colour, words and padding."""
    model, batch = make_model(colour=True, words_buckets=64, fusion=fusion, depth=depth), make_batch()
    fast, full = model(batch), model(batch, return_attention=True)
    assert fast.attention is None and full.attention is not None
    for task in fast.logits:
        torch.testing.assert_close(fast.logits[task], full.logits[task], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.modality_weights[task], full.modality_weights[task], atol=1e-5, rtol=1e-5)
    rows = []
    model.sequence.blocks[-1].register_forward_hook(lambda module, args, output: rows.append(output[0].shape[1]))
    model(batch)
    assert rows == [len(model.cls_positions(6, 9))]  # text, image, colour and words [CLS]


@pytest.mark.parametrize("depth", [1, 2])
def test_training_on_the_cls_rows_alone_gives_the_gradients_of_every_row(depth):
    """Training also computes only the [CLS] rows of the last layer: without dropout, the loss and
    every parameter's gradient are those of the full path (the maps' path keeps every row)."""
    model, batch = make_model(colour=True, words_buckets=64, depth=depth, dropout=0.0), make_batch()
    model.train()
    grads = []
    for maps in (False, True):
        model.zero_grad()
        out = model(batch, return_attention=maps)
        loss = sum(logits.logsumexp(-1).sum() - logits[:, 0].sum() for logits in out.logits.values())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    fast, full = grads
    assert fast.keys() == full.keys() and "sequence.blocks.0.attn.qkv.weight" in fast
    for name in full:
        torch.testing.assert_close(fast[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_colour_modality_reads_the_descriptor():
    model = make_model(colour=True)
    batch = make_batch()
    before = model(batch).logits["colour"]
    batch.colour = batch.colour[[1, 0, 2]]  # items 0 and 1 swap colours, nothing else changes
    after = model(batch).logits["colour"]
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    torch.testing.assert_close(before[2], after[2])
    batch.colour = None
    with pytest.raises(ValueError, match="colour"):
        model(batch)


def test_absent_colour_families_are_not_attended_to():
    model = make_model(colour=True)
    out = model(make_batch(), return_attention=True)
    families = out.attention.image_cls[:, 1 + 6 + 1 + 9 + 1:1 + 6 + 1 + 9 + 1 + len(FAMILIES)]
    red = FAMILIES.index("red")
    assert families[0, red] > 0  # the red item's red family is seen
    assert families[0, FAMILIES.index("blue")] == 0 and families[1, red] == 0


def test_words_idf_comes_from_the_training_texts():
    model = make_model(words_buckets=4096)
    ids = torch.tensor([[101, 500, 600, 102], [101, 500, 700, 102], [101, 800, 102, 0]])
    mask = ids > 0
    model.words.fit_idf(ids, mask)
    grams, real = model.words.grams(ids, mask)
    idf = model.words.idf
    assert idf[grams[0, 0]] == 0 and idf[grams[0, 3]] == 0  # [CLS] and [SEP]: in every text
    assert idf[grams[2, 1]] > idf[grams[0, 1]] > 0  # 800 (one text) is rarer than 500 (two texts)
    assert real.sum() == mask.sum() + (mask[:, :-1] & mask[:, 1:]).sum()


def test_the_words_token_is_the_dense_tfidf_product_read_column_by_column():
    """The words token reads only its grams' columns of the table; it must equal the dense
    proj(normalise(TF-IDF)) it replaced, in value and in gradient, with repeated grams (sublinear
    tf), bucket collisions, padding and a text of [CLS] alone."""
    torch.manual_seed(0)
    bag = WordsBag(64, 16)  # few buckets: grams collide
    ids = torch.randint(0, 30, (5, 12))
    ids[0, 3:6] = ids[0, 2]  # a word repeated
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[2, 6:], mask[4, 1:] = False, False
    bag.fit_idf(ids, mask)

    def dense(ids, mask):
        tf = bag.counts(ids, mask)
        tfidf = torch.where(tf > 0, 1 + torch.log(tf.clamp(min=1)), tf) * bag.idf
        return bag.proj(torch.nn.functional.normalize(tfidf, dim=-1))

    sparse = bag(ids, mask)
    torch.testing.assert_close(sparse, dense(ids, mask))
    sparse.square().sum().backward()
    grad = bag.proj.weight.grad.clone()
    bag.zero_grad()
    dense(ids, mask).square().sum().backward()
    torch.testing.assert_close(grad, bag.proj.weight.grad)
    assert grad[:, bag.grams(ids, mask)[0][0]].abs().sum() > 0


def test_the_words_modality_reads_the_words_not_their_order_alone():
    model = make_model(words_buckets=4096)
    batch = make_batch()
    model.words.fit_idf(batch.text_ids, batch.text_mask)
    before = model(batch).logits["kind"]
    batch.text_ids[1, 2] += 1  # one word changed
    assert not torch.allclose(before[1], model(batch).logits["kind"][1])
    torch.testing.assert_close(before[2], model(batch).logits["kind"][2])


def test_the_modality_chart_draws_every_modality():
    from cma_clip.viz import MODALITY_COLOURS, modality_chart

    chart = np.asarray(modality_chart({"Colour": {"text": 0.1, "image": 0.2, "colour": 0.5, "words": 0.2}}))
    pixels = {tuple(p) for p in chart.reshape(-1, 3)}
    for name, hex_colour in MODALITY_COLOURS.items():
        assert tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)) in pixels, name


def test_modality_dropout_hides_inputs_in_training_only():
    """At rate ~1 every item loses text, colour and words: only the image decides, so changing the
    others changes nothing, and their weights are 0. In evaluation the rate does nothing."""
    model = make_model(colour=True, words_buckets=64, modality_dropout=0.999999, dropout=0.0)
    batch = make_batch()
    model.words.fit_idf(batch.text_ids, batch.text_mask)
    reference = make_model(colour=True, words_buckets=64, dropout=0.0)
    reference.load_state_dict(model.state_dict())
    reference.words.idf.copy_(model.words.idf)
    torch.testing.assert_close(model(batch).logits["kind"], reference(batch).logits["kind"])  # eval: no dropout
    model.train()
    before = model(batch)
    for weights in before.modality_weights.values():
        torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 3))
    changed = EncoderOutput(batch.image_tokens, batch.image_pooled, torch.randn_like(batch.text_tokens),
                            batch.text_mask, torch.randn_like(batch.text_pooled), batch.text_ids.flip(0),
                            batch.colour.flip(0))
    torch.testing.assert_close(model(changed).logits["kind"], before.logits["kind"])
    reference.train()  # without modality dropout the same change moves every item's logits
    assert not torch.allclose(reference(changed).logits["kind"], reference(batch).logits["kind"])
