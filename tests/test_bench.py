"""python -m cma_clip.bench --quick: runs end to end and writes every figure (no timing assertions)."""
import json
import numbers
import os

from cma_clip.lab import bench


def test_quick_bench_writes_every_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMA_CLIP_CACHE", str(tmp_path / "cache"))  # the review queue's features and predictions
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out-json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["figures"]) == {"latency_bundled", "latency_open_clip", "app_predict", "startup", "concurrency",
                                   "review", "feature_cache", "training", "batch_prediction"}
    expected = {
        "latency_bundled": {"p50_s", "p95_s", "explained_p50_s", "backbone_p50_s", "forward_p50_s", "fusion_ratio"},
        "latency_open_clip": {"p50_s", "p95_s", "backbone_p50_s", "forward_p50_s", "fusion_ratio"},
        "app_predict": {"p50_s", "p95_s", "calls", "predictor_p50_s", "ratio", "client_p50_s", "client_ratio"},
        "startup": {"ready_s", "first_s", "warm_p50_s", "ratio"},
        "concurrency": {"sequential_per_s", "concurrent_per_s", "ratio", "mean_batch"},
        "review": {"items", "open_s", "resort_p50_s", "resort_max_s", "move_p50_s", "live_s"},
        "feature_cache": {"build_items_per_s", "backbone_items_per_s", "ratio", "added_items", "more_alone_s",
                          "more_beside_s", "reuse_speedup"},
        "training": {"epoch_seconds", "items_per_s"},
        "batch_prediction": {"items_per_s", "backbone_items_per_s", "ratio", "ray_items_per_s",
                             "ray_steady_items_per_s", "backbone_around_ray_items_per_s", "ray_ratio", "ray_ratios",
                             # on a CPU: the best ratio its cores allow, from each part's CPU time
                             "bound_ratio", "backbone_cpu_s", "decoding_cpu_s", "model_cpu_s", "cores_available"},
    }
    for section, keys in expected.items():
        assert keys <= set(doc["figures"][section]), section
        for key, value in doc["figures"][section].items():
            for number in value if isinstance(value, list) else [value]:  # a figure, or one per run
                assert isinstance(number, numbers.Number) and number > 0, (section, key, value)
    assert doc["figures"]["batch_prediction"]["bound_ratio"] <= 1  # the backbone alone is the fastest run
    assert set(doc["targets"]) == set(bench.TARGETS)
    assert all(isinstance(t["met"], bool) for t in doc["targets"].values())
    assert {"cpu", "cores", "torch", "bf16_autocast"} <= set(doc["hardware"])
    assert doc["settings"]["warmup"] >= 1
    assert "fusion ratio" in capsys.readouterr().out


def test_sections_measure_only_what_is_asked(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--sections", "cache", "--out-json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["figures"]) == {"feature_cache"}
    assert set(doc["targets"]) == {"cache_vs_backbone"}
    cache = doc["figures"]["feature_cache"]
    assert (cache["decode_workers"], cache["decode_in_threads"]) == (os.cpu_count(), 1)  # on a CPU: a thread a core
    table = capsys.readouterr().out
    assert "feature cache build" in table and "fusion ratio" not in table
    assert "8 + 2 items: built alone / beside the first 8's" in table
    assert doc["command"] == f"python -m cma_clip.bench --quick --sections cache --out-json {out}"


def test_a_smoke_run_leaves_the_reported_figures_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)  # where a full run would write docs/bench.json
    assert bench.main(["--quick", "--sections", "cache"]) == 0
    assert not (tmp_path / "docs").exists()
    assert "no JSON (give --out-json)" in capsys.readouterr().out
