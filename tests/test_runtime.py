"""Precision, worker and memory choices of cma_clip.runtime."""
import os
import platform
import re
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


def test_a_device_this_machine_lacks_is_named_before_anything_runs(monkeypatch):
    """CMA_CLIP_DEVICE=banana or =cuda on a machine without a GPU raised torch's own errors from
    deep in a load ("Found no NVIDIA driver on your system"): they are a DeviceError saying what to give."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CMA_CLIP_DEVICE", raising=False)
    assert runtime.resolve_device() == CPU and runtime.resolve_device("cpu") == CPU
    for spec, words in (("banana", "not one torch knows: give cpu, cuda or cuda:N"),
                        ("cuda", "torch finds no CUDA device on this machine"), ("cuda:1", "no CUDA device"),
                        ("meta", "CMA-CLIP runs on cpu, cuda, mps, not meta"),  # the app served, predicting nothing
                        ("xpu", "CMA-CLIP runs on cpu, cuda, mps, not xpu")):
        with pytest.raises(runtime.DeviceError, match=words):
            runtime.resolve_device(spec)
        monkeypatch.setenv("CMA_CLIP_DEVICE", spec)
        with pytest.raises(runtime.DeviceError, match=words):
            runtime.resolve_device()
        monkeypatch.delenv("CMA_CLIP_DEVICE")
    assert runtime.resolve_device(torch.device("cpu")) == CPU
    for spec in (" CPU ", "Cpu"):  # as typed in a Space's settings: the case and spaces forgiven, as elsewhere
        monkeypatch.setenv("CMA_CLIP_DEVICE", spec)
        assert runtime.resolve_device() == CPU
    monkeypatch.delenv("CMA_CLIP_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device() == torch.device("cuda") and runtime.resolve_device("cuda:1").index == 1
    with pytest.raises(runtime.DeviceError, match="has 2 GPU"):
        runtime.resolve_device("cuda:2")


def test_the_commands_and_the_app_refuse_a_missing_device_in_one_line(tmp_path):
    env = {**os.environ, "CMA_CLIP_DEVICE": "banana", "CMA_CLIP_STUDIO_DIR": str(tmp_path / "studio")}
    root = Path(__file__).resolve().parents[1]
    for command in (["-m", "cma_clip.predict", "--checkpoint", "checkpoints/hm-articles", "--image",
                     "assets/hm-0214844001.jpg"], ["app.py"]):
        run = subprocess.run([sys.executable, *command], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode in (1, 2) and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip() == ("error: CMA_CLIP_DEVICE: device 'banana' is not one torch knows: give cpu, cuda "
                                      "or cuda:N")  # the variable named (QA operator, session 37)



def test_a_refused_command_says_one_line_after_loading_the_model(tmp_path):
    """A newcomer (session 35): every command printed transformers' "Loading weights: 100%" bar on stderr before
    its one-line refusal."""
    root, missing = Path(__file__).resolve().parents[1], tmp_path / "nope.jpg"
    run = subprocess.run([sys.executable, "-m", "cma_clip.predict", "--checkpoint", "checkpoints/hm-articles",
                          "--image", str(missing), "--text", "x"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == f"error: image not found: {missing}", run.stderr

FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
from cma_clip.backbones import create_backbone
from cma_clip.runtime import keep_freed_memory
create_backbone("bundled", "cpu")  # what turns it on: any backbone built for the CPU
block = 96 << 20  # over glibc's 32 MiB mmap ceiling: by default its own mapping, unmapped when freed
torch.empty(block, dtype=torch.uint8).fill_(1)
faults = []
for _ in range(5):  # the fewest of 5: the first reuse faulted its pages in 2 runs of 4 here, later ones never
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(block, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
print(keep_freed_memory())  # cached: create_backbone's call's result (asked after the measurement)
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


def test_a_number_setting_that_cannot_be_used_names_its_variable(monkeypatch):
    """CMA_CLIP_UPLOAD_MB=1GB, CMA_CLIP_HUB_TIMEOUT=abc or PORT=abc died in float()'s traceback, naming no
    variable; a negative timeout was taken ("did not answer within -5 s") (QA deployer, session 33)."""
    monkeypatch.delenv("CMA_CLIP_X", raising=False)
    assert runtime.env_number("CMA_CLIP_X", 72) == 72.0
    monkeypatch.setenv("CMA_CLIP_X", " 0.5 ")
    assert runtime.env_number("CMA_CLIP_X", 72) == 0.5
    for raw, words in (("1GB", "CMA_CLIP_X='1GB' is not a number"), ("-5", "CMA_CLIP_X='-5': give a number above 0"),
                       ("nan", "give a number above 0, not infinity or NaN"), ("0", "give a number above 0"),
                       ("inf", "CMA_CLIP_X='inf': give a number above 0, not infinity or NaN")):
        monkeypatch.setenv("CMA_CLIP_X", raw)
        with pytest.raises(runtime.SettingError, match=re.escape(words)):
            runtime.env_number("CMA_CLIP_X", 72)


def test_a_port_that_is_no_port_is_named_before_gradio_reads_it(tmp_path, monkeypatch):
    """QA operator, session 37: GRADIO_SERVER_PORT= (empty) or =abc died in Gradio's import-time traceback
    (int('')), a port above 65535 in the socket's, and PORT=7971.9 served on 7971 unsaid."""
    for name in ("GRADIO_SERVER_PORT", "PORT"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.server_port() == 7860
    monkeypatch.setenv("PORT", " 7971 ")
    assert runtime.server_port() == 7971
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7972")  # Gradio's own variable first
    assert runtime.server_port() == 7972
    for raw in ("abc", "7971.9", "99999", "0", "-1", "٣"):
        monkeypatch.setenv("GRADIO_SERVER_PORT", raw)
        with pytest.raises(runtime.SettingError, match=re.escape(f"GRADIO_SERVER_PORT={raw!r}: give a port, a whole "
                                                                 "number from 1 to 65535")):
            runtime.server_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CMA_CLIP_STUDIO_DIR": str(tmp_path / "studio"), "GRADIO_SERVER_PORT": "", "PORT": "70000"}
    run = subprocess.run([sys.executable, "app.py"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip() == ("error: PORT='70000': give a port, a whole number from 1 "
                                                          "to 65535")
