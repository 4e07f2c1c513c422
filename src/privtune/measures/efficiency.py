"""Efficiency figures of a training run: time, throughput, peak memory, parameters (FLOPs: ``flops.py``).

Peak memory is what a run's training *added*: the most memory it held above what the
process held when the run began (the model it trains is already built then, as are the
study's data and base model). The process's total would depend on what ran before: an
earlier DP run's noise search, a lazily imported library or a cache stays resident and
was charged to every later run (identical LoRA runs stored 558, 559 and 609 MB by their
place in the study). On CUDA it is ``max_memory_allocated`` above the memory allocated at
the start. On the CPU it is the resident set's peak above its size at the start: the
kernel's own high-water mark (``VmHWM``, reset at the start by writing ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0), so no short peak is missed; where that reset is
refused, a thread samples the resident set every 50 ms instead (``memory_kind`` says
which). Memory that earlier runs freed is handed back to the OS first (glibc keeps it
otherwise, and the run would reuse it unseen).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import threading
import time
from pathlib import Path

import psutil
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
#: probes open in this process: the peak marks (the kernel's, CUDA's) are one per process,
#: so an inner probe hands the mark so far to the outer ones before it resets it
_OPEN: list["PeakMemory"] = []


def _release_freed_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_bytes(field: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE).group(1)) * 1024


def reset_high_water_mark() -> bool:
    """Set the kernel's peak resident set (``VmHWM``) to the current one; False where refused."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:  # not Linux, a kernel before 4.0, or a sandbox that hides /proc
        return False


class PeakMemory:
    """Context manager: ``peak_bytes``, the most memory the work inside it held above
    ``start_bytes``, what the process held when it opened; ``kind`` says what memory
    (``cuda`` allocated, ``rss`` from the kernel's high-water mark, ``rss-sampled``)."""

    def __init__(self, device: torch.device, interval_s: float = 0.05, use_kernel_mark: bool = True):
        self.device = device
        self.interval_s = interval_s
        self.use_kernel_mark = use_kernel_mark
        self.start_bytes = 0
        self.peak_bytes = 0
        self.kind = "cuda" if device.type == "cuda" else "rss"
        self._highest = 0  # absolute: allocated or resident bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _current(self) -> int:
        if self.kind == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._highest = max(self._highest, self._current())
            self._stop.wait(self.interval_s)

    def _mark(self) -> int:
        """The highest memory since the last reset, by the process's own peak mark."""
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM")

    def _hand_mark_to_open_probes(self) -> None:
        for probe in _OPEN:
            if (probe.kind, probe.device) == (self.kind, self.device):
                probe._highest = max(probe._highest, self._mark())

    def __enter__(self) -> "PeakMemory":
        if self.kind != "cuda":
            _release_freed_memory()
        self._hand_mark_to_open_probes()
        self.start_bytes = self._highest = self._current()
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not (self.use_kernel_mark and reset_high_water_mark()):
            self.kind = "rss-sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            return self
        _OPEN.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "rss-sampled":
            self._stop.set()
            self._thread.join()
            self._highest = max(self._highest, self._current())
        else:
            self._hand_mark_to_open_probes()
            _OPEN.remove(self)
        self.peak_bytes = max(0, self._highest - self.start_bytes)


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
