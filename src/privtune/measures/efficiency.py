"""Efficiency figures of a training run: time, throughput, peak memory, parameters, FLOPs.

Peak memory is the GPU's ``max_memory_allocated`` on CUDA. On the CPU the process-wide
``ru_maxrss`` never goes down, so it cannot tell one run of a study from the next; a
background thread samples the resident set size instead (every 50 ms) for the span of
one run, after handing memory that earlier runs freed back to the OS (glibc keeps it
otherwise, and a run would be charged for its predecessor's peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time

import psutil
import torch


def _release_freed_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Context manager measuring the peak memory while it is open."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.kind = "cuda" if device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def training_flops(total_params: int, trainable_params: int, tokens: int) -> float:
    """Estimated training FLOPs (Kaplan et al., 2020, "6N" rule, split by pass).

    Per token: 2N for the forward pass, 2N to back-propagate activations through every
    layer, and 2 per *trainable* parameter for weight gradients. Full fine-tuning gives
    the familiar 6N; LoRA roughly 4N. Attention's quadratic term is ignored (short
    sequences). Per-sample gradient work of DP-SGD is not counted.
    """
    return float(tokens) * (4.0 * total_params + 2.0 * trainable_params)


class Stopwatch:
    """Wall time that waits for queued GPU work before reading the clock, and the
    process's CPU time over the same span (every thread of this process)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.cpu_seconds += time.process_time() - self._cpu_start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
