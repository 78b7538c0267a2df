"""The malloc settings for CPU training: applied on glibc, left alone where the user chose their own."""

import platform

import pytest

from utils.run import cpu_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def test_user_settings_in_the_environment_are_respected(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert cpu_allocator.keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert cpu_allocator.keep_freed_memory() is False


@glibc_only
def test_on_glibc_the_settings_are_applied(monkeypatch):
    # What they save (page faults of a repeated step) is measured by benchmarks/page_faults.py.
    for name in cpu_allocator.USER_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    assert cpu_allocator.keep_freed_memory() is True
