"""The malloc settings for CPU training: applied on glibc, left alone where the user chose their own."""

import os
import platform
import subprocess
import sys

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
def test_on_glibc_each_setting_is_passed_to_mallopt(monkeypatch):
    """Through a stand-in libc: this process's malloc (the tests after this one) stays as it was."""
    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    for name in cpu_allocator.USER_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda _name: Libc())
    assert cpu_allocator.keep_freed_memory() is True
    assert calls == list(cpu_allocator.SETTINGS.items())


@glibc_only
@pytest.mark.e2e
def test_glibc_accepts_the_settings():
    # In a process of its own. What they save (page faults of a repeated step): benchmarks/page_faults.py.
    env = {k: v for k, v in os.environ.items() if k not in cpu_allocator.USER_SETTINGS + ("GLIBC_TUNABLES",)}
    result = subprocess.run([sys.executable, "-c", "from utils.run import cpu_allocator; "
                             "print(cpu_allocator.keep_freed_memory())"], capture_output=True, text=True, env=env,
                            timeout=120, cwd=os.getcwd())
    assert result.stdout.strip() == "True", result.stderr[-2000:]
