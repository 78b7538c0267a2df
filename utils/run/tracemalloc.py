"""Memory report: accelerator and CPU memory before training, at its end, and at its peak.

Peaks come from counters, not from a polling loop: the accelerator's own peak statistics, and on Linux the
kernel's peak RSS (VmHWM), which writing 5 to /proc/self/clear_refs resets. Elsewhere a thread samples RSS every
50 ms with a sleep between samples.
"""

import gc
import threading
from pathlib import Path

import psutil
import torch

MB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def b2mb(num_bytes) -> int:
    return int(num_bytes // MB)


def _accelerator():
    for name in ("cuda", "xpu", "mps"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            return name, backend
    return None, None


def _accelerator_bytes(backend, peak=False) -> int:
    if backend is None:
        return 0
    if peak and hasattr(backend, "max_memory_allocated"):
        return backend.max_memory_allocated()
    if hasattr(backend, "memory_allocated"):
        return backend.memory_allocated()
    return backend.current_allocated_memory()  # mps has no peak counter


def _linux_peak_rss():
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._stop_event = threading.Event()
        self._process = psutil.Process()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop_event.wait(0.05)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


class TorchTracemalloc:
    """`with TorchTracemalloc() as t:` then t.begin/used/peaked (accelerator) and t.cpu_* (CPU), in MB."""

    def __enter__(self):
        gc.collect()
        self.device_name, self._backend = _accelerator()
        if self._backend is not None:
            self._backend.empty_cache()
            if hasattr(self._backend, "reset_peak_memory_stats"):
                self._backend.reset_peak_memory_stats()
        self.begin = _accelerator_bytes(self._backend)
        self._process = psutil.Process()
        self.cpu_begin = self._process.memory_info().rss
        self._sampler = None
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self._sampler = _RssSampler()
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        gc.collect()
        self.end = _accelerator_bytes(self._backend)
        self.peak = max(_accelerator_bytes(self._backend, peak=True), self.end)
        self.used = b2mb(self.end - self.begin)
        self.peaked = b2mb(self.peak - self.begin)
        self.cpu_end = self._process.memory_info().rss
        if self._sampler is not None:
            self._sampler.stop()
            self.cpu_peak = self._sampler.peak
        else:
            self.cpu_peak = max(_linux_peak_rss() or 0, self.cpu_end)
        self.cpu_used = b2mb(self.cpu_end - self.cpu_begin)
        self.cpu_peaked = b2mb(self.cpu_peak - self.cpu_begin)
        return False

    def report(self) -> list[str]:
        """The guide's lines; the accelerator's only where there is one."""
        device = self.device_name
        lines = [] if device is None else [
            f"{device} memory before training: {b2mb(self.begin)} MB",
            f"{device} memory consumed at the end (end-begin): {self.used} MB",
            f"{device} peak memory consumed (max-begin): {self.peaked} MB",
            f"{device} total peak memory (max): {b2mb(self.peak)} MB",
        ]
        return lines + [
            f"CPU memory before training: {b2mb(self.cpu_begin)} MB",
            f"CPU memory consumed at the end (end-begin): {self.cpu_used} MB",
            f"CPU peak memory consumed (max-begin): {self.cpu_peaked} MB",
            f"CPU total peak memory (max): {b2mb(self.cpu_peak)} MB",
        ]
