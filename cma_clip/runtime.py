"""Devices, mixed precision and seeds: one place for how the package runs on CPU or GPU."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import random
import re
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import CMAClipError


class DeviceError(CMAClipError, ValueError):
    """A device asked for (an argument or CMA_CLIP_DEVICE) that this machine cannot run on."""


class SettingError(CMAClipError, ValueError):
    """An environment variable whose value cannot be used."""


def server_port(default: int = 7860) -> int:
    """The port to serve on: $GRADIO_SERVER_PORT, else $PORT (a Space's, a container's), else `default`.
    A value that is no port (a word, a fraction, 0, above 65535) is a SettingError naming its variable:
    a fraction was cut short unsaid and a port above 65535 was a traceback from the socket."""
    for name in ("GRADIO_SERVER_PORT", "PORT"):
        raw = os.environ.get(name, "").strip()
        if raw:
            if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= 65535:
                raise SettingError(f"{name}={raw!r}: give a port, a whole number from 1 to 65535")
            return int(raw)
    return default


def env_number(name: str, default: float) -> float:
    """The positive number environment variable `name` holds, else `default` when it is unset or
    empty; anything else is a SettingError naming the variable (`float()`'s ValueError named none)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):  # "inf" read as "give a number above 0" (QA operator, session 37)
        raise SettingError(f"{name}={raw!r}: give a number above 0" + ("" if math.isfinite(value) else
                                                                        ", not infinity or NaN"))
    return value


SUPPORTED_DEVICES = ("cpu", "cuda", "mps")


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The device asked for, checked; without one, CMA_CLIP_DEVICE, else the GPU when there is one,
    else the CPU. A device this machine lacks says so here, not as torch's driver error mid-run."""
    named = "" if spec else "CMA_CLIP_DEVICE: "  # a device set in the environment says where it came from
    spec = spec or os.environ.get("CMA_CLIP_DEVICE", "").strip().lower()  # " CPU " is cpu
    if not spec:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{named}device {str(spec)!r} is not one torch knows: give cpu, cuda or cuda:N") from None
    if device.type not in SUPPORTED_DEVICES:  # meta, xpu, ...: torch names them, the app cannot predict on them
        raise DeviceError(f"{named}device {device}: CMA-CLIP runs on {', '.join(SUPPORTED_DEVICES)}, not {device.type}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count() > 0:
        raise DeviceError(f"{named}device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available and not available():
        raise DeviceError(f"{named}device {device}: torch finds no {device.type.upper()} device on this machine; "
                          "use cpu (or unset CMA_CLIP_DEVICE)")
    return device


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX).
    CMA_CLIP_FP32=1 turns it off everywhere."""
    if os.environ.get("CMA_CLIP_FP32"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
KEPT_FREE_BYTES = 1 << 30  # free memory at the heap's top kept for reuse before any goes back to the kernel
# (mallopt option, environment variable, value): no mmap of its own for any block, freed memory kept,
# one arena for every thread
KEPT_MEMORY = ((M_MMAP_MAX, "MALLOC_MMAP_MAX_", 0), (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", KEPT_FREE_BYTES),
               (M_ARENA_MAX, "MALLOC_ARENA_MAX", 1))


@functools.cache
def keep_freed_memory() -> bool:
    """Keep the memory the process frees for its next allocations. By default glibc serves every
    block over 32 MiB with its own mmap and unmaps it when freed, so a CPU forward of a batch of
    32 faults all its activations back in on every call: measured on 2 cores, 1.54 s a batch of
    which 1.13 s of system time; with freed memory kept, 0.94 s and no system time, for 250 to
    400 MB more peak memory (docs/PERFORMANCE.md). A thread other than the main one allocates
    from an arena of its own, made of 64 MiB mappings that fault alike (a model run on a second
    thread: 0.38 to 0.52 s of system time a batch; none with one arena), so every thread shares
    the main heap: call this before starting the threads that will run models. PyTorch's CPU
    tuning guide gets the same from jemalloc or tcmalloc, which must be preloaded; glibc's
    `mallopt` works in a running process. Once per process, on glibc only (a no-op elsewhere);
    CMA_CLIP_KEEP_MEMORY=0 opts out. Returns whether it is on."""
    if os.environ.get("CMA_CLIP_KEEP_MEMORY") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(option, value) for option, _, value in KEPT_MEMORY)


def kept_memory_env() -> dict[str, str]:
    """`keep_freed_memory`'s settings as glibc's environment variables, for a process started
    with them (the Ray actors), where they hold from its first allocation instead of from the
    call: a Ray actor's model thread faulted a thirtieth as often with them (docs/PERFORMANCE.md).
    Other C libraries ignore them; empty when CMA_CLIP_KEEP_MEMORY=0 opts out."""
    if os.environ.get("CMA_CLIP_KEEP_MEMORY") == "0":
        return {}
    return {name: str(value) for _, name, value in KEPT_MEMORY}


def loader_workers(device: torch.device) -> int:
    """DataLoader worker processes for decoding images beside the model: none on a CPU, where
    the model uses every core (the images are decoded by `decode_threads` low-priority threads
    of its process, `features.image_batches`: a worker process beside the model cost 20 to 30%
    of the throughput on 2 cores, docs/PERFORMANCE.md); on a GPU the decoding is the
    bottleneck, so up to 8 (leaving a core for the main process)."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def decode_threads() -> int:
    """Threads decoding a batch of images in the model's process (PIL releases the GIL): the cores."""
    return max(1, os.cpu_count() or 1)


def lower_thread_priority() -> None:
    """Run the calling thread at the lowest priority (nice 19, this thread only: Linux's nice is
    per thread), for threads decoding images beside a model on a CPU: they decode the next batch
    in the moments the model leaves a core idle, and at full speed once the model waits for them,
    without taking cores from the model's threads (which a worker process beside the model did:
    20 to 30% of its throughput on 2 cores)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: an ordinary thread
        pass


SMALL_BATCH = 4  # on a CPU, batches below this size run in full precision (see autocast)


def autocast(device: torch.device, batch_size: int | None = None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where the hardware has it, full precision elsewhere.

    Given a `batch_size` below SMALL_BATCH, a CPU runs in full precision too: autocast casts
    every weight to bf16 on each call, which then costs more than the smaller matrix products
    save (the CMA-CLIP fusion at batch 1: 1.8 ms under autocast, 1.1 ms without)."""
    small = batch_size is not None and batch_size < SMALL_BATCH and device.type == "cpu"
    if bf16_supported(device) and not small:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exit_on_stop_signals() -> None:
    """End a command on SIGTERM (`kill`, torchrun stopping its workers, systemd, Kubernetes) and on
    Ctrl-C through its `finally` and `except BaseException` blocks, quietly, with the shell's code
    (143, 130): a feature cache build then removes its unfinished folder (Python's default stops
    at once on SIGTERM, leaving it full size, and prints a KeyboardInterrupt traceback on Ctrl-C)."""
    if threading.current_thread() is threading.main_thread():
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda signum, frame: sys.exit(128 + signum))


def output_file_problem(flag: str, path: str, example: str) -> str | None:
    """Why a command's output file `path` (given as `flag`) cannot be written, said before the work that
    fills it: a folder by its name (`example`: a file name to suggest in it), or a file where a folder
    above it should be (said after a whole evaluation or a catalogue's predictions, as "Is a directory"
    or "File exists")."""
    out = Path(path)
    if out.is_dir():
        return f"{flag} {path} is a folder: give a file, e.g. {out / example}"
    above = next(folder for folder in out.absolute().parents if folder.exists())
    return f"{flag} {path}: {above} is a file, not a folder" if above.is_file() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
