"""The malloc settings for CPU training: applied on glibc, left alone where the user chose their own."""

import platform
import resource

import pytest
import torch

from utils import cpu_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def test_user_settings_in_the_environment_are_respected(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert cpu_allocator.keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert cpu_allocator.keep_freed_memory() is False


@glibc_only
def test_after_the_settings_a_repeated_step_faults_no_pages_in(monkeypatch):
    for name in cpu_allocator.USER_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    assert cpu_allocator.keep_freed_memory() is True

    def step():  # allocations of a few MB, freed at the end, as an activation-sized working set
        tensors = [torch.ones(2**20 + 4096 * i) for i in range(8)]
        return sum(float(t[-1]) for t in tensors)

    for _ in range(8):  # the heap settles into its layout within a few steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    # glibc's defaults fault about 14,000 pages in over these 5 steps
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000
