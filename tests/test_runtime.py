"""Precision and worker choices of cma_clip.runtime."""
import torch

from cma_clip import runtime

CPU = torch.device("cpu")


def test_small_cpu_batches_run_in_full_precision(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with runtime.autocast(CPU, batch_size=1):
        assert layer(x).dtype == torch.float32
    with runtime.autocast(CPU, batch_size=runtime.SMALL_BATCH):
        assert layer(x).dtype == torch.bfloat16
    with runtime.autocast(CPU):
        assert layer(x).dtype == torch.bfloat16


def test_no_bf16_means_full_precision_at_any_batch(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    with runtime.autocast(CPU, batch_size=64):
        assert torch.nn.Linear(8, 8)(torch.randn(2, 8)).dtype == torch.float32


def test_decode_workers_per_device(monkeypatch):
    assert runtime.loader_workers(CPU) == 0  # decoded between batches, by threads of the model's process
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 16)
    assert runtime.decode_threads() == 16
    assert runtime.loader_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.loader_workers(torch.device("cuda")) == 1


def test_fp32_switch_turns_bf16_off_on_a_gpu_too(monkeypatch):
    from cma_clip.runtime import bf16_supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert bf16_supported(torch.device("cuda"))
    monkeypatch.setenv("CMA_CLIP_FP32", "1")
    assert not bf16_supported(torch.device("cuda"))
