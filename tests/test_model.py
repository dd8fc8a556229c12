import numpy as np
import pytest
import torch

from cma_clip.backbones import EncoderOutput
from cma_clip.model import (FUSIONS, MODALITY_FUSIONS, SEQUENCE_FUSIONS, CMAClip, CMAClipConfig, absent_texts, fixed_weights, multitask_loss,
                            no_decay)

TASKS = {"colour": 5, "pattern": 3}


def make_model(fusion="cma", lexical_buckets=64, **kw):
    torch.manual_seed(0)
    cfg = CMAClipConfig(image_token_dim=20, image_pooled_dim=24, text_token_dim=12, text_pooled_dim=12,
                        num_patches=9, max_text_tokens=8, tasks=TASKS, embed_dim=16, width=32, depth=2,
                        heads=4, fusion=fusion, lexical_buckets=lexical_buckets, **kw)
    return CMAClip(cfg).eval()


def make_batch(b=3, length=6):
    torch.manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 4:] = False  # item 0 has 4 real tokens, 2 padding
    return EncoderOutput(torch.randn(b, 9, 20), torch.randn(b, 24), torch.randn(b, length, 12), mask,
                         torch.randn(b, 12), torch.randint(0, 30000, (b, length)))


def test_shapes_weights_and_attention_maps():
    out = make_model()(make_batch(), return_attention=True)
    assert {t: v.shape for t, v in out.logits.items()} == {"colour": (3, 5), "pattern": (3, 3)}
    for weights in out.modality_weights.values():
        assert weights.shape == (3, 2)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    maps = out.attention
    assert maps.text_to_image.shape == (3, 6, 9)
    assert maps.text_cls.shape == maps.image_cls.shape == (3, 6 + 9 + 2)
    assert maps.cls_to_text().shape == (3, 6) and maps.cls_to_patches().shape == (3, 9)
    torch.testing.assert_close(maps.image_cls.sum(-1), torch.ones(3))
    # nobody attends to padding
    assert maps.image_cls[0, 1 + 4:1 + 6].abs().max() == 0


def test_tasks_get_different_modality_weights():
    model = make_model()
    with torch.no_grad():
        model.modality.queries.normal_(0, 3.0)
    weights = model(make_batch()).modality_weights
    assert not torch.allclose(weights["colour"], weights["pattern"])


def test_padding_does_not_change_the_output():
    model, batch = make_model(), make_batch()
    before = model(batch).logits["colour"][0]
    batch.text_tokens[0, 4:] = 1000.0
    batch.text_ids[0, 4:] = 7
    after = model(batch).logits["colour"][0]
    torch.testing.assert_close(before, after)


def test_lexical_embedding_reads_the_token_ids():
    batch = make_batch()
    with_lexical, without = make_model(), make_model(lexical_buckets=0)
    assert without.sequence.lexical is None
    before, before_plain = with_lexical(batch).logits["colour"][1], without(batch).logits["colour"][1]
    batch.text_ids[1, 2] += 1
    assert not torch.allclose(before, with_lexical(batch).logits["colour"][1])
    torch.testing.assert_close(before_plain, without(batch).logits["colour"][1])


def test_attention_path_matches_fast_path():
    model, batch = make_model(), make_batch()
    fast = model(batch).logits["pattern"]
    slow = model(batch, return_attention=True).logits["pattern"]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_ablations_run(fusion):
    out = make_model(fusion)(make_batch(), return_attention=True)
    assert out.logits["colour"].shape == (3, 5)
    if fusion not in MODALITY_FUSIONS:
        assert torch.all(out.modality_weights["colour"] == torch.tensor(fixed_weights(fusion, ("text", "image"))))
    if fusion not in SEQUENCE_FUSIONS:
        assert out.attention is None
    else:
        assert out.attention is not None


@pytest.mark.parametrize("fusion, ignored", [("text_only", "image"), ("image_only", "text"),
                                             ("text_tokens", "image"), ("image_tokens", "text")])
def test_single_modality_baselines_ignore_the_other_modality(fusion, ignored):
    model = make_model(fusion).eval()
    batch = make_batch()
    before = model(batch).logits["colour"]
    read = ("text_tokens", "text_pooled") if ignored == "image" else ("image_tokens", "image_pooled")
    changed = make_batch()
    for name in read:
        setattr(changed, name, torch.randn_like(getattr(batch, name)))
    assert not torch.allclose(model(changed).logits["colour"], before, atol=1e-3)  # its own side counts
    fields = ("image_tokens", "image_pooled") if ignored == "image" else ("text_tokens", "text_pooled")
    for name in fields:
        setattr(batch, name, torch.randn_like(getattr(batch, name)))
    torch.testing.assert_close(model(batch).logits["colour"], before)


def test_late_fusion_head_sees_both_modalities():
    model = make_model("late_fusion").eval()
    batch = make_batch()
    before = model(batch).logits["colour"]
    for name in ("image_pooled", "text_pooled"):
        changed = make_batch()  # the same batch (seeded) ...
        setattr(changed, name, getattr(batch, name) + torch.randn_like(getattr(batch, name)))  # ... but one input
        assert not torch.allclose(model(changed).logits["colour"], before)


def test_bad_fusion_name_is_refused():
    with pytest.raises(ValueError, match="fusion must be one of"):
        make_model("late")


def test_missing_labels_are_masked_per_task():
    logits = {"colour": torch.randn(4, 5), "pattern": torch.randn(4, 3)}
    targets = {"colour": torch.tensor([1, -1, 3, -2]), "pattern": torch.tensor([-1, -1, -1, -1])}
    expected = torch.nn.functional.cross_entropy(logits["colour"][[0, 2]], torch.tensor([1, 3]))
    torch.testing.assert_close(multitask_loss(logits, targets), expected)
    # changing the logits of unlabelled items changes nothing
    logits["colour"][1] += 100
    logits["pattern"] += 100
    torch.testing.assert_close(multitask_loss(logits, targets), expected)


def test_label_smoothing_spreads_the_target_on_hand_computed_values():
    """Smoothing 0.3 over 3 classes: the label's target 0.8, each other class's 0.1; masked items still count for nothing."""
    logits = {"colour": torch.tensor([[2.0, 0.0, 0.0], [5.0, 1.0, -1.0]])}
    targets = {"colour": torch.tensor([0, -1])}
    log_p = torch.log_softmax(logits["colour"][0], -1)
    expected = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    torch.testing.assert_close(multitask_loss(logits, targets, label_smoothing=0.3), expected)
    torch.testing.assert_close(multitask_loss(logits, targets), -log_p[0])


def test_modality_weights_learn_which_modality_each_task_needs():
    """Task "by_image" is decided by the image alone, "by_text" by the text alone: trained
    without sequence fusion (so each embedding is one modality), the keyless attention
    must lean on the informative modality for each task."""
    torch.manual_seed(0)
    cfg = CMAClipConfig(image_token_dim=20, image_pooled_dim=24, text_token_dim=12, text_pooled_dim=12,
                        num_patches=9, max_text_tokens=8, tasks={"by_image": 2, "by_text": 2}, embed_dim=16,
                        width=32, depth=1, heads=4, fusion="no_sequence_attention")
    model = CMAClip(cfg)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("align.")]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": 0.05},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}], lr=3e-3)
    batch = make_batch(b=256)
    targets = {"by_image": (batch.image_pooled[:, 0] > 0).long(), "by_text": (batch.text_pooled[:, 0] > 0).long()}
    for _ in range(300):
        loss = multitask_loss(model(batch).logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = model.eval()(batch).modality_weights
    assert weights["by_image"][:, 1].mean() > 0.6  # image weight
    assert weights["by_text"][:, 0].mean() > 0.6  # text weight


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_built_parameter_is_used_by_its_fusion(fusion):
    """Each fusion builds only what it uses (so DDP needs no find_unused_parameters): one
    backward pass reaches every trainable parameter, even with a task left unlabelled."""
    model = make_model(fusion).train()
    model.align.requires_grad_(False)  # frozen after alignment, as training does
    targets = {"colour": torch.tensor([0, 1, 2]), "pattern": torch.tensor([-1, -1, -1])}
    multitask_loss(model(make_batch()).logits, targets).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_old_checkpoints_with_unbuilt_parts_still_load(tmp_path):
    """Checkpoints from before the model was built per fusion carry weights of parts their
    fusion never used (a late-fusion run's modality queries, a CMA run's unfused norm)."""
    from safetensors.torch import save_file

    from cma_clip.checkpoint import CatalogueColumns, CheckpointConfig, TaskSpec, load_checkpoint, save_checkpoint

    for fusion, extra in (("late_fusion", {"modality.queries": torch.zeros(2, 32)}),
                          ("cma", {"unfused_norm.weight": torch.ones(32), "unfused_norm.bias": torch.zeros(32)})):
        model = make_model(fusion)
        folder = tmp_path / fusion
        tasks = {task: TaskSpec([f"{task}-{i}" for i in range(n)]) for task, n in TASKS.items()}
        save_checkpoint(folder, model, CheckpointConfig("bundled", CatalogueColumns("c"), tasks, model.cfg))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file({**state, **extra}, str(folder / "model.safetensors"))
        loaded, _ = load_checkpoint(folder)
        batch = make_batch()
        torch.testing.assert_close(loaded(batch).logits["colour"], model(batch).logits["colour"])
        assert loaded.cfg == model.cfg


def test_a_task_without_labels_adds_nothing_to_the_loss():
    logits = {"colour": torch.randn(3, 5), "pattern": torch.randn(3, 3)}
    alone = multitask_loss({"colour": logits["colour"]}, {"colour": torch.tensor([0, 1, 2])})
    both = multitask_loss(logits, {"colour": torch.tensor([0, 1, 2]), "pattern": torch.tensor([-1, -2, -1])})
    torch.testing.assert_close(both, alone)


def test_an_absent_text_puts_all_of_the_weight_on_the_image():
    model, batch = make_model(), make_batch()
    with torch.no_grad():
        model.modality.queries.zero_()  # an even split, as an empty text gets about half of the weight
    plain = model(batch)
    absent = model(batch, text_absent=torch.tensor([True, False, False]))
    for task, weights in absent.modality_weights.items():
        torch.testing.assert_close(weights[0], torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(weights[1:], plain.modality_weights[task][1:])  # the others keep theirs
        torch.testing.assert_close(absent.logits[task][1:], plain.logits[task][1:])
        assert not torch.allclose(absent.logits[task][0], plain.logits[task][0])
    assert absent_texts(["a tee", " "]).tolist() == [False, True] and absent_texts(["a tee"]) is None
    assert absent_texts(["\u200b", "\u3000\xa0", "\u200b\u200d\n", "👕", "\u200btee"]).tolist() == [
        True, True, True, False, False]  # a zero-width space alone reads as no text: the tokenizer drops it


@pytest.mark.parametrize("items", [1, 48, 600, 1100])
def test_alignment_trains_on_any_number_of_training_items(items):
    """At the default 10 epochs of batches of 512, 48 or 600 items make 10 steps: the one-cycle
    schedule's warm-up then ended on its first step, a division by zero."""
    from cma_clip.align import AlignmentHeads, train_alignment

    rng = np.random.default_rng(0)
    heads = AlignmentHeads(12, 8, 4)
    losses = train_alignment(heads, rng.normal(size=(items, 12)).astype(np.float32),
                             rng.normal(size=(items, 8)).astype(np.float32))
    assert len(losses) == 10 and all(np.isfinite(losses))


def test_a_model_kept_for_some_of_its_tasks_predicts_them_as_before():
    """How training leaves auxiliary tasks out of a checkpoint: the kept tasks' logits and modality
    weights are the full model's, and the copy owns its weights (training on does not move them)."""
    model = make_model(colour=False, words_buckets=64)
    batch = make_batch()
    full = model(batch)
    kept = model.only_tasks(["pattern"])
    assert kept.tasks == ["pattern"] and kept.modality.queries.shape[0] == 1 and set(kept.heads) == {"pattern"}
    out = kept(batch)
    torch.testing.assert_close(out.logits["pattern"], full.logits["pattern"])
    torch.testing.assert_close(out.modality_weights["pattern"], full.modality_weights["pattern"])
    with torch.no_grad():
        model.heads["pattern"].net[0].weight.add_(1.0)
    torch.testing.assert_close(kept(batch).logits["pattern"], full.logits["pattern"])
    assert model.only_tasks(model.tasks) is model
