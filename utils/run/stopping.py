"""Stopping a run on SIGTERM, SIGINT or SIGHUP, however the signal is delivered.

Schedulers and terminals stop a job by signalling every process of it (Slurm, systemd, a terminal's Ctrl-C, a
process group kill, a closed terminal or SSH session: SIGHUP), only its first process (Kubernetes, spot-instance
agents) or only the launcher. Whichever way it comes:
- before training starts the run ends at once (nothing is half-written: every file is written under a temporary
  name and renamed);
- during training the signal is only recorded; the loop saves a checkpoint at the step it is at, on every
  process, and ends with 128 + the signal number (143, 130, 129);
- DataLoader workers ignore these signals (torch's own handler would kill them first, and the main process would
  die of "DataLoader worker killed by signal" without saving); the main process ends them (utils/run/data.py);
- a trainer started by a launcher (accelerate launch, torchrun, utils.launch) is sent SIGTERM by the kernel when
  the launcher dies, so a signal sent to the launcher alone still ends in a checkpoint rather than an orphan;
- the output may have no reader by then (accelerate launch pipes the trainer's stderr through itself; a closed
  terminal): a write that fails is dropped, so the save and the exit go on;
- a run started under nohup keeps ignoring SIGHUP, as nohup asks.
"""

import ctypes
import os
import signal
import sys

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
_PR_SET_PDEATHSIG = 1
_PARENT_AT_START = os.getppid()


class Stopped(BaseException):
    """A stop signal arrived before training started (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` in a library swallows it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = STOP_SIGNALS[signum]


class StopRequests:
    """The signal handler of the trainer's main process: raise Stopped at once, or, once `defer()` was called,
    record the signal for the training loop to act on at its next step."""

    def __init__(self):
        self.signum = None
        self._deferred = False

    def install(self) -> "StopRequests":
        for signum in STOP_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the run is meant to outlive its terminal
            signal.signal(signum, self._handle)
        follow_launcher()
        for name in ("stdout", "stderr"):
            if not isinstance(getattr(sys, name), OutputThatMayClose):
                setattr(sys, name, OutputThatMayClose(getattr(sys, name)))
        return self

    def defer(self) -> None:
        self._deferred = True
        if self.signum is not None:  # arrived between the last check and now
            raise Stopped(self.signum)

    def _handle(self, signum, _frame):
        if self.signum is not None:  # already stopping: a launcher passed on the signal the process got too
            return
        self.signum = signum
        if not self._deferred:
            raise Stopped(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return STOP_SIGNALS[self.signum]


def ignore_stop_signals(_worker_id=None) -> None:
    """DataLoader workers' init function: the main process decides when workers end."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def started_by_launcher() -> bool:
    """accelerate launch's single-process launcher sets ACCELERATE_USE_CPU; torchrun sets TORCHELASTIC_RUN_ID."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ


def follow_launcher() -> None:
    """On Linux, ask the kernel for SIGTERM when the launcher that started this process dies.

    Only under a launcher: a trainer started from a shell with nohup must outlive that shell."""
    if not (sys.platform.startswith("linux") and started_by_launcher()):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _PARENT_AT_START:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


class OutputThatMayClose:
    """A standard stream whose reader may be gone (a launcher that was killed, a closed terminal): once a write or
    flush fails, the rest goes to os.devnull instead of raising in the middle of a checkpoint or the exit."""

    def __init__(self, stream):
        self._stream = stream

    def _lost(self):
        self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:  # EPIPE: no reader; EIO: the terminal is gone
            self._lost()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._lost()

    def __getattr__(self, name):
        return getattr(self._stream, name)
