"""The run lock: one live process per run and folder; a dead holder's lock is taken over; waiting for a lock."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from utils.errors import UserError
from utils.layout import RunLayout
from utils.run.lock import FileLock, lock_run


class OneProcess:
    is_main_process, num_processes = True, 1


def test_a_second_holder_is_refused_with_the_holders_pid_and_nothing_written(tmp_path):
    layout = RunLayout(tmp_path, "dog")
    with lock_run(layout, OneProcess()):
        record = layout.lock_file.read_text()
        assert record.startswith(f"{os.getpid()} on ")
        with pytest.raises(UserError, match=rf"'dog' is already training into .*process {os.getpid()} on"):
            lock_run(layout, OneProcess())
        assert layout.lock_file.read_text() == record  # the refused one wrote nothing
    assert layout.lock_file.read_text() == ""  # released cleanly
    with lock_run(layout, OneProcess()):
        pass


def hold_lock_in_a_process(path, fork_a_child=False) -> subprocess.Popen:
    """A process that takes the lock and sleeps. It prints "no child", or forks a child that prints its own pid: the
    child prints once it runs, after the fork's hooks have closed its copy of the lock (had the parent printed the
    pid, a test could kill the parent before a busy machine ran the child at all, its copy still holding the lock)."""
    return subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
sys.path.insert(0, {str(os.getcwd())!r})
from utils.run.lock import FileLock
FileLock({str(path)!r}).try_acquire()
child = os.fork() if {fork_a_child} else None
if child == 0:
    print(os.getpid(), flush=True)
    time.sleep(600)
    os._exit(0)
if child is None:
    print("no child", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)


@pytest.mark.e2e
def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    layout = RunLayout(tmp_path, "dog")
    holder = hold_lock_in_a_process(layout.lock_file)
    assert holder.stdout.readline().strip() == "no child"
    with pytest.raises(UserError, match=f"process {holder.pid} on"):
        lock_run(layout, OneProcess())
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING), lock_run(layout, OneProcess()):
        assert f"left by process {holder.pid} on" in caplog.text and "no longer running" in caplog.text


def test_different_runs_lock_independently(tmp_path):
    dog, cat = RunLayout(tmp_path, "dog"), RunLayout(tmp_path, "cat")
    with lock_run(dog, OneProcess()), lock_run(cat, OneProcess()):
        assert dog.lock_file.read_text().startswith(f"{os.getpid()} on ")
        assert cat.lock_file.read_text().startswith(f"{os.getpid()} on ")
        with pytest.raises(UserError):
            lock_run(cat, OneProcess())


@pytest.mark.e2e
def test_a_forked_child_does_not_keep_the_lock_of_its_killed_parent(tmp_path, caplog):
    """As with DataLoader workers: the main process is killed alone (the OOM killer) while its child lives on."""
    layout = RunLayout(tmp_path, "dog")
    holder = hold_lock_in_a_process(layout.lock_file, fork_a_child=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"process {holder.pid} on"):
            lock_run(layout, OneProcess())
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child is alive, and holds a copy of every descriptor its parent had but the lock's
        with caplog.at_level(logging.WARNING), lock_run(layout, OneProcess()):
            assert f"left by process {holder.pid} on" in caplog.text
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_removed_on_release_leaves_no_file_and_waiters_lock_the_next_one(tmp_path):
    path = tmp_path / "class" / ".generating.lock"
    first = FileLock(path, remove_on_release=True)
    first.acquire("waiting")
    second_holds, second_may_go, seen = threading.Event(), threading.Event(), []

    def second_generator():
        with FileLock(path, remove_on_release=True) as second:
            second.acquire("waiting")  # opened the file the first holds, which it then removes
            seen.append(path.exists())
            second_holds.set()
            second_may_go.wait(60)

    waiter = threading.Thread(target=second_generator)
    waiter.start()
    time.sleep(0.3)  # the second is blocked on the first's file by now (or soon: either way it must end up holding)
    first.release()
    assert second_holds.wait(60)
    third = FileLock(path, remove_on_release=True)
    assert third.try_acquire()[0] is False  # the second holds the file that now stands at the path
    second_may_go.set()
    waiter.join()
    assert seen == [True] and not path.exists()
    assert third.try_acquire()[0] is True
    third.release()
    assert not path.exists()


def test_acquire_waits_for_the_holder(tmp_path, caplog):
    first = FileLock(tmp_path / "class" / ".generating.lock")
    assert first.try_acquire() == (True, "")
    threading.Timer(0.5, first.release).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO), FileLock(tmp_path / "class" / ".generating.lock") as second:
        second.acquire("Waiting for another run")
    assert time.monotonic() - started >= 0.4 and "Waiting for another run (held by process" in caplog.text
