"""Exclusive locks on files: one training process per run name and output folder, one class-image generator per
class folder.

The locks are flock(2) locks, which the kernel drops when their holder dies however it dies (SIGKILL, power loss
of a container), so a lock is never left behind; the file keeps the last holder's pid and host, which names who
holds a live lock and tells a stale one (its holder gone) from a run that ended cleanly (the file emptied).

A flock belongs to the open file description, which a forked child shares: DataLoader workers, which outlive a
main process killed alone by seconds, would keep the run locked. Every child forked while a lock is held closes its
copy at once (os.register_at_fork), so the lock lives exactly as long as the process that took it.

A lock file that must not stay behind (the class folder's: the folder holds the user's images) is removed by its
holder before it unlocks; whoever locked the file meanwhile finds it removed and locks the new one instead.
"""

import logging
import os
import socket
import time
from pathlib import Path

from utils.errors import UserError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected from each other there
    fcntl = None


# The descriptors of the locks this process holds; a forked child closes its copies (see the module's docstring).
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # not flock(LOCK_UN): that would unlock the parent's lock too
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class FileLock:
    """An exclusive flock on `path`, created if needed. `try_acquire` never blocks; `acquire` waits. With
    `remove_on_release` the file is deleted when released (nothing stays in a user's folder)."""

    def __init__(self, path, remove_on_release: bool = False):
        self.path = Path(path)
        self.remove_on_release = remove_on_release
        self._fd = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _record(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _still_the_file(self, fd: int) -> bool:
        """False when the locked file was removed (or replaced) by its last holder after this process opened it."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _lock_current_file(self, blocking: bool) -> int | None:
        """A descriptor of the file at `path`, locked; None when `blocking` is false and a live process holds it. A
        file its holder removed while this process waited is passed over for the one now at `path`."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if self._still_the_file(fd):
                return fd
            os.close(fd)

    def try_acquire(self) -> tuple[bool, str]:
        """(True, previous holder's record) when acquired; (False, the live holder's record) when not."""
        if fcntl is None:
            return True, ""
        fd = self._lock_current_file(blocking=False)
        if fd is None:
            return False, self._record()
        previous = self._record()
        self._hold(fd)
        return True, previous

    def _hold(self, fd: int) -> None:
        """Keep the locked descriptor and write who holds it."""
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def acquire(self, waiting_message: str) -> None:
        """Block until the lock is free, logging `waiting_message` once if it is not free at once."""
        acquired, holder = self.try_acquire()
        if acquired:
            return
        logger.info("%s (held by process %s)", waiting_message, holder or "unknown")
        self._hold(self._lock_current_file(blocking=True))

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove_on_release:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees the file is gone
        else:
            os.ftruncate(self._fd, 0)  # an empty file: the last holder ended cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.release()


def _lock_run_here(layout) -> FileLock:
    lock = FileLock(layout.lock_file)
    acquired, holder = lock.try_acquire()
    if not acquired:
        raise UserError(
            f"the run {layout.run!r} is already training into {layout.output_dir} (process {holder or 'unknown'}, "
            f"lock {layout.lock_file}). Wait for it to finish or stop it, or train under another --wandb_run_name"
        )
    if holder:  # flock is free, so its last holder is gone: it ended without releasing (killed, crashed)
        logger.warning("Taking over the lock of run %r left by process %s, which is no longer running", layout.run, holder)
    return lock


def lock_run(layout, accelerator) -> FileLock:
    """The run's lock, taken by the main process; a UserError on every process when another live process holds
    it (naming that process). A lock left by a dead process is taken over with a warning."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = FileLock(layout.lock_file), None
    if accelerator.is_main_process:
        try:
            lock = _lock_run_here(layout)
        except UserError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:  # every process learns the outcome, so all stop together
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)
    return lock
