"""`python -m cma_clip.train --init-from RUN`: a run that starts from another run's weights (e.g. one
trained on another catalogue), wherever a name and shape match; its tasks and texts stay its own."""
import pytest
import torch

from cma_clip import train
from cma_clip.checkpoint import CheckpointError, load_checkpoint
from cma_clip.model import CMAClip, CMAClipConfig

TINY = ["--limit", "48", "--epochs", "1", "--align-epochs", "1", "--batch-size", "16", "--width", "64",
        "--colour", "--words-buckets", "256", "--lexical-buckets", "0", "--max-text-tokens", "96", "--quiet"]


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("init-from") / "fashion"
    assert train.main(["--catalogue", "fashion-product-images", *TINY, "--seed", "5",
                       "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    return out


def test_a_run_on_another_catalogue_starts_from_the_given_runs_weights(fashion_run, cache_dir, tmp_path):
    out = tmp_path / "hm"
    assert train.main(["--catalogue", "hm-articles", *TINY, "--init-from", str(fashion_run),
                       "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    given, run = load_checkpoint(fashion_run)[0], load_checkpoint(out)[0]
    assert set(run.tasks).isdisjoint(given.tasks)
    # the alignment heads are frozen after the start, so the run keeps the given ones exactly
    for name, weight in given.align.state_dict().items():
        torch.testing.assert_close(run.align.state_dict()[name], weight)
    # its words' idf is its own catalogue's train texts', not the given run's
    assert not torch.allclose(run.words.idf, given.words.idf)
    unaligned = tmp_path / "hm-alone"
    assert train.main(["--catalogue", "hm-articles", *TINY, "--cache-dir", str(cache_dir),
                       "--out", str(unaligned)]) == 0
    alone = load_checkpoint(unaligned)[0]
    torch.testing.assert_close(run.words.idf, alone.words.idf)
    assert not torch.allclose(alone.align.text_proj.net[1].weight, given.align.text_proj.net[1].weight)


def test_initialise_copies_every_weight_that_fits_but_the_tasks_and_the_idf():
    def model(tasks: dict[str, int], seed: int) -> CMAClip:
        torch.manual_seed(seed)
        return CMAClip(CMAClipConfig(image_token_dim=8, image_pooled_dim=8, text_token_dim=8, text_pooled_dim=8,
                                     num_patches=4, max_text_tokens=6, tasks=tasks, width=16, heads=2,
                                     colour=True, words_buckets=32, lexical_buckets=0))
    given, run = model({"colour": 4, "kind": 3}, seed=0), model({"pattern": 5, "kind": 3}, seed=1)
    with torch.no_grad():
        given.words.idf.fill_(2.0)
    before = {k: v.clone() for k, v in run.state_dict().items()}
    copied = train.initialise(run, given)
    after = run.state_dict()
    assert "sequence.blocks.0.attn.qkv.weight" in copied and "align.text_proj.net.1.weight" in copied
    assert not any(k.startswith(train.OWN_WEIGHTS) for k in copied)
    for name, weight in after.items():
        if name in copied:
            torch.testing.assert_close(weight, given.state_dict()[name])
        else:  # the heads (even of a task both have), the modality queries, the idf: as they were
            assert name.startswith(train.OWN_WEIGHTS), name
            torch.testing.assert_close(weight, before[name])
    for name in ("sequence.blocks.0.attn.qkv.weight", "sequence.text_in.weight", "colour_in.0.weight"):
        assert not torch.equal(after[name], before[name]), name  # the two seeds differ: the copy did something
    assert set(after) - set(copied) >= {"heads.kind.net.0.weight", "modality.queries", "words.idf"}


def test_init_from_refuses_an_ensemble_another_backbone_or_tower_and_align_from(fashion_run, tmp_path):
    from dataclasses import replace

    from cma_clip.checkpoint import read_config
    from cma_clip.model import create_model

    given = load_checkpoint(fashion_run)[0]
    ensemble = create_model(CMAClipConfig(**{**given.cfg.__dict__, "members": 2}))
    with pytest.raises(CheckpointError, match="one run, not an ensemble"):
        train.initialise(given, ensemble)
    cfg = read_config(fashion_run).train
    assert train.donor("--init-from", str(fashion_run), given, cfg, "cpu") is not None
    with pytest.raises(CheckpointError, match="backbone"):
        train.donor("--init-from", str(fashion_run), given, replace(cfg, backbone="bundled+mobilenet_v2"), "cpu")
    other_tower = CMAClip(replace(given.cfg, image_tower="mobilenet_v2"))
    with pytest.raises(CheckpointError, match="image tower"):
        train.donor("--init-from", str(fashion_run), other_tower, cfg, "cpu")
    with pytest.raises(SystemExit):  # a usage error, not a traceback
        train.parse_config(["--catalogue", "hm-articles", "--init-from", str(fashion_run),
                            "--align-from", str(fashion_run), "--out", str(tmp_path / "both")])
