"""How busy the machine was while something was timed, and how much CPU it used itself.

Wall time alone cannot be compared across runs of a study: on a machine shared with
other work a run can take several times longer without being any more costly (a run
under two busy background processes on two cores gets about half the CPU). So every
timing is stored beside

- the process's CPU time (``time.process_time``: user + system time of every thread of
  this process, which covers torch's intra-op thread pool, but not other processes such
  as Ray workers), and
- the machine's 1-minute load average (``os.getloadavg``: runnable and waiting threads,
  this process's own included) at the start and the end, and its mean and maximum over
  samples taken every ``interval_s`` meanwhile (a long run's start and end say little
  about its middle), with the CPUs this process may use to read it against.

:class:`BackgroundLoad` makes such load on purpose, for benchmarks that compare a
quiet and a loaded machine from one command.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field


def load_average() -> float:
    """The 1-minute load average; NaN where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class LoadSampler:
    """Context manager: the load average at entry, every ``interval_s`` meanwhile, and at exit."""

    interval_s: float = 10.0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> "LoadSampler":
        self.samples.append(load_average())
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(load_average())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(load_average())

    def record(self) -> dict:
        """``load_start``, ``load_end``, ``load_mean``, ``load_max`` (1-minute load
        averages) and ``cpus``; NaN where the OS reports no load average."""
        finite = [s for s in self.samples if math.isfinite(s)]
        return {"load_start": self.samples[0], "load_end": self.samples[-1],
                "load_mean": sum(finite) / len(finite) if finite else math.nan,
                "load_max": max(finite) if finite else math.nan, "cpus": usable_cpus()}


class BackgroundLoad:
    """Context manager: ``k`` processes spinning on the CPU while it is open, stopped at exit.

    Separate Python interpreters running a busy loop, as another user's jobs would: no
    GIL shared with this process, and nothing of its state (threads, torch) copied.
    """

    SPIN = "while True: pass"

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"background load must be 0 or more processes, got {k}")
        self.k = k
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "BackgroundLoad":
        self.processes = [subprocess.Popen([sys.executable, "-c", self.SPIN]) for _ in range(self.k)]
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()
        self.processes = []
