"""Precision, worker and memory choices of cma_clip.runtime."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
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


REUSED_BLOCK_FAULTS = """
def reused_block_faults():
    \"\"\"Page faults of a 96 MiB block allocated again after it was freed: the fewest of 5 (the
    first reuse faulted its pages in 2 runs of 4 here, later ones never). 96 MiB is over glibc's
    32 MiB mmap ceiling and its 64 MiB arena heaps: by default its own mapping, unmapped when freed.\"\"\"
    import resource, torch
    block = 96 << 20
    torch.empty(block, dtype=torch.uint8).fill_(1)
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(block, dtype=torch.uint8).fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults)
"""
FAULTS_OF_A_REUSED_BLOCK = REUSED_BLOCK_FAULTS + """
from cma_clip.backbones import create_backbone
from cma_clip.runtime import keep_freed_memory
create_backbone("bundled", "cpu")  # what turns it on: any backbone built for the CPU
print(reused_block_faults())
print(keep_freed_memory())  # cached: create_backbone's call's result (asked after the measurement)
"""
# A process whose threads allocated before `keep_freed_memory` ran (a Ray worker's, say): one of
# them then runs the model.
FAULTS_ON_AN_EARLY_THREAD = REUSED_BLOCK_FAULTS + """
from concurrent.futures import ThreadPoolExecutor
import torch
from cma_clip.runtime import keep_freed_memory
early = ThreadPoolExecutor(1)
early.submit(lambda: torch.ones(1 << 16)).result()  # its first allocation: an arena of its own, unless one is all
print(keep_freed_memory())
print(early.submit(reused_block_faults).result())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op")
@pytest.mark.parametrize("opt_out", [False, True])
def test_freed_memory_is_reused_not_faulted_back_in(opt_out):
    """A 96 MiB block freed and allocated again after a CPU backbone is built: kept, it costs no
    page faults; glibc's default (the opt-out) unmaps it and faults all 24,576 of its pages back in,
    every time."""
    env = {**os.environ, "CMA_CLIP_KEEP_MEMORY": "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout.split()
    faults, on = int(out[0]), out[1] == "True"
    assert on is not opt_out
    if opt_out:
        assert faults > 20_000, faults
    else:
        assert faults < 1_000, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the environment variables are glibc's")
@pytest.mark.parametrize("started_with_them", [False, True])
def test_a_process_started_with_the_kept_memory_env_keeps_its_early_threads_memory(started_with_them):
    """`keep_freed_memory` in a process whose threads already allocated is too late for them: the
    thread's own arena maps and unmaps the block (24,576 faults each time); started with
    `kept_memory_env` (as the Ray actors are), every thread shares the main heap and keeps it."""
    from cma_clip.runtime import kept_memory_env

    env = {**os.environ, **(kept_memory_env() if started_with_them else {})}
    out = subprocess.run([sys.executable, "-c", FAULTS_ON_AN_EARLY_THREAD], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout.split()
    on, faults = out[0] == "True", int(out[1])
    assert on
    if started_with_them:
        assert faults < 1_000, faults
    else:
        assert faults > 20_000, faults
