"""Stop signals in the trainer's process: at once before training, recorded during it; workers ignore them."""

import os
import signal
import subprocess
import sys

import pytest

from utils.launch import exit_status
from utils.run.stopping import StopRequests, Stopped


@pytest.fixture
def stops():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield StopRequests().install()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


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


def test_a_signal_between_the_last_check_and_defer_is_not_lost(stops):
    stops.signum = signal.SIGTERM
    with pytest.raises(Stopped):
        stops.defer()


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
