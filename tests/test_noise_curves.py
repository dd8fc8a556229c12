"""Each corruption alone, scored with the checkpoint's clean thresholds (cma_clip/lab/noise_curves.py)."""
import numpy as np
import pytest

from cma_clip.checkpoint import load_backbone, load_checkpoint
from cma_clip.data import Catalogue
from cma_clip.features import extract_features
from cma_clip.lab import noise_curves
from cma_clip.noise import IMAGE_CORRUPTIONS, TEXT_CORRUPTIONS


@pytest.fixture(scope="module", params=["small_checkpoint", "colour_checkpoint"])
def sample(request, cache_dir):
    checkpoint = request.getfixturevalue(request.param)
    model, config = load_checkpoint(checkpoint, "cpu")
    backbone = load_backbone(checkpoint, config, "cpu")
    catalogue = Catalogue.open(config.catalogue_on(config.training_manifest())).take(np.arange(6))
    return backbone, catalogue, extract_features(backbone, catalogue, cache_dir, progress=False,
                                                 colour=model.cfg.colour)


@pytest.mark.parametrize("side", ["image", "text"])
def test_severity_0_re_encodes_the_cached_features(sample, side):
    backbone, catalogue, clean = sample
    encode = noise_curves.noisy_images if side == "image" else noise_curves.noisy_texts
    kind = next(iter(IMAGE_CORRUPTIONS if side == "image" else TEXT_CORRUPTIONS))
    again = encode(backbone, catalogue, clean, kind, 0)
    names = ("image_tokens", "image_pooled", "text_tokens", "text_pooled") + ("colour",) * (clean.colour is not None)
    for name in names:
        np.testing.assert_allclose(getattr(again, name).astype(np.float32), getattr(clean, name).astype(np.float32),
                                   atol=2e-2, err_msg=name)
    assert np.array_equal(again.text_ids, clean.text_ids) and np.array_equal(again.text_mask, clean.text_mask)
    noisy = encode(backbone, catalogue, clean, kind, 5)
    changed, kept = (("image_pooled", "text_pooled") if side == "image" else ("text_pooled", "image_pooled"))
    assert not np.allclose(getattr(noisy, changed), getattr(clean, changed), atol=2e-2)  # the corrupted side moves
    assert np.array_equal(getattr(noisy, kept), getattr(clean, kept))  # the other side is the cached one


def test_every_corruption_is_scored_with_the_clean_thresholds(small_checkpoint, cache_dir, tmp_path):
    import json
    import shutil

    checkpoint = tmp_path / "ckpt"  # the small checkpoint, its first task auto-accepting everything
    shutil.copytree(small_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    first = next(iter(config["tasks"]))
    config["tasks"][first]["threshold_90"] = 0.0
    (checkpoint / "config.json").write_text(json.dumps(config))

    curves = noise_curves.corruption_curves(checkpoint, items=8, severities=[5], cache_dir=cache_dir,
                                            log=lambda _: None)
    assert curves["items"] == 8
    assert list(curves["image"]) == list(IMAGE_CORRUPTIONS) and list(curves["text"]) == list(TEXT_CORRUPTIONS)
    for report in [curves["clean"], *(r[5] for side in ("image", "text") for r in curves[side].values())]:
        figures = report["tasks"][first]  # threshold 0 kept under noise: every labelled item is accepted
        assert figures["threshold"] == 0.0 and figures["auto_accepted"] == figures["n"]
        assert figures["auto_accept_precision"] == pytest.approx(figures["accuracy"])
        assert figures["operating_recall"] == pytest.approx(figures["accuracy"])
        assert report["mean"]["lowest_precision_task"] == first
    table = noise_curves.markdown_table(curves, severities=(5,))
    assert len(table.splitlines()) == 3 + len(IMAGE_CORRUPTIONS) + len(TEXT_CORRUPTIONS)  # head, rule, clean, kinds
    clean = curves["clean"]["tasks"][first]  # the lowest precision with its interval and how many it rests on
    low, high = clean["auto_accept_precision_ci"]
    assert f"[{low:.3f}, {high:.3f}] of {clean['auto_accepted']} ({first})" in table.splitlines()[2]
    from cma_clip.viz import corruption_curves_figure

    corruption_curves_figure(curves, "test").savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_the_command_refuses_bad_options_and_a_missing_checkpoint_with_a_message(tmp_path, capsys):
    out = ["--out-json", str(tmp_path / "curves.json")]
    for bad in (["--severities", "9"], ["--items", "0"]):
        with pytest.raises(SystemExit) as exit_:
            noise_curves.main(["--checkpoint", str(tmp_path), *bad, *out])
        assert exit_.value.code == 2
    assert "--items is how many test items to sample" in capsys.readouterr().err
    assert noise_curves.main(["--checkpoint", str(tmp_path / "nowhere"), *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "curves.json").exists()
