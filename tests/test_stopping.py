"""Stop signals in the trainer's process: at once before training, recorded during it; workers ignore them."""

import os
import signal
import subprocess
import sys

import pytest

from utils.launch import exit_status
from utils.run.stopping import STOP_SIGNALS, OutputThatMayClose, StopRequests, Stopped


@pytest.fixture
def stops():
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    streams = sys.stdout, sys.stderr
    yield StopRequests().install()
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    sys.stdout, sys.stderr = streams


def test_before_training_a_signal_stops_at_once(stops):
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # let the handler run
    assert stopped.value.exit_code == 143 and not isinstance(stopped.value, Exception)


def test_during_training_signals_are_recorded_once(stops):
    stops.defer()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing on a second signal does not change the first
    assert stops.requested and stops.exit_code == 130


def test_a_closed_terminal_is_a_stop_like_sigterm(stops):
    stops.defer()
    os.kill(os.getpid(), signal.SIGHUP)
    assert stops.requested and stops.exit_code == 129


def test_under_nohup_sighup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        StopRequests().install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_output_whose_reader_is_gone_is_dropped_instead_of_raising():
    read, write = os.pipe()
    os.close(read)  # the launcher that read it was killed
    stream = OutputThatMayClose(open(write, "w", buffering=1))
    stream.write("Saved training state\n")  # EPIPE (SIGPIPE is ignored by Python)
    stream.write("Interrupted at step 3\n")
    stream.flush()
    assert stream.writable()


def test_a_signal_between_the_last_check_and_defer_is_not_lost(stops):
    stops.signum = signal.SIGTERM
    with pytest.raises(Stopped):
        stops.defer()


@pytest.mark.e2e
def test_dataloader_workers_survive_a_signal_to_the_whole_group():
    code = """
import os, signal, time, torch
from utils.run.stopping import ignore_stop_signals
class Slow(torch.utils.data.Dataset):
    def __len__(self): return 4
    def __getitem__(self, i):
        time.sleep(0.3); return i
loader = torch.utils.data.DataLoader(Slow(), num_workers=2, worker_init_fn=ignore_stop_signals)
signal.signal(signal.SIGTERM, lambda *_: print("main got SIGTERM", flush=True))
batches = iter(loader)
first = next(batches)
os.killpg(os.getpgrp(), signal.SIGTERM)
print("batches", [int(first)] + [int(b) for b in batches], flush=True)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            start_new_session=True, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "main got SIGTERM" in result.stdout and "batches [0, 1, 2, 3]" in result.stdout


def test_exit_status_of_a_killed_child_is_128_plus_the_signal():
    assert exit_status(2) == 2 and exit_status(-15) == 143 and exit_status(-2) == 130 and exit_status(0) == 0


@pytest.mark.e2e
def test_a_worker_busy_past_its_grace_is_killed_and_every_worker_ends():
    code = """
import multiprocessing, time, torch
from utils.run.data import stop_workers
from utils.run.stopping import ignore_stop_signals
class Busy(torch.utils.data.Dataset):  # item 0 at once, then a photo that takes a minute to decode
    def __len__(self): return 8
    def __getitem__(self, i):
        if i: time.sleep(60)
        return i
loader = torch.utils.data.DataLoader(Busy(), num_workers=2, persistent_workers=True, worker_init_fn=ignore_stop_signals)
batches = iter(loader)
next(batches)
time.sleep(0.5)  # both workers are in the middle of an item now
started = time.monotonic()
stop_workers(loader)
print("ended in", round(time.monotonic() - started, 1), "s;", len(multiprocessing.active_children()), "left", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr[-2000:]
    seconds = float(result.stdout.split()[2])
    assert seconds < 30 and result.stdout.strip().endswith("0 left"), result.stdout  # 10 s a worker at most


def test_several_processes_without_the_gpus_for_them_are_refused_unless_on_the_cpu(monkeypatch):
    import argparse

    import torch

    from utils.launch import missing_gpus_problem

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    asked = argparse.Namespace(num_processes=2, cpu=False)
    assert "--num_processes 2 needs 2 GPUs; this machine has 0. On a CPU add --cpu" in missing_gpus_problem(asked)
    assert missing_gpus_problem(argparse.Namespace(num_processes=2, cpu=True)) is None
    assert missing_gpus_problem(argparse.Namespace(num_processes=1, cpu=False)) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # train_dreambooth.sh's way to several CPU processes
    assert missing_gpus_problem(asked) is None
