"""A supervisor for tests of a launcher killed alone: it adopts orphans (PR_SET_CHILD_SUBREAPER), so once the
launcher is SIGKILLed the trainer it started is reparented here and its exit status can be read, as a pytest process
cannot do for a grandchild.

    python -m tests.supervise WAIT_FOR_PATH COMMAND...

Starts COMMAND in a session of its own, waits for WAIT_FOR_PATH, SIGKILLs the launcher (COMMAND's process) alone,
then waits for the trainer (the launcher's child) and every other process of the session to end; prints one JSON
line: the trainer's exit status, the seconds it took to end after the kill, whether processes were left after
LEFT_AFTER_S (then killed), and the tail of the output.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import process_stats

PR_SET_CHILD_SUBREAPER = 36
LEFT_AFTER_S = 120


def children_of(pid: int) -> list[int]:
    return [child for child, fields in process_stats() if int(fields[1]) == pid]


def main():
    wait_for, command = Path(sys.argv[1]), sys.argv[2:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not wait_for.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            print(json.dumps({"error": "never reached the path", "output": b"".join(output).decode()[-3000:]}))
            return
        time.sleep(0.05)
    trainer = children_of(launcher.pid)[0]
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed_at, status, left = time.monotonic(), None, False
    while True:  # reap whatever is adopted: the trainer, then its workers if they outlive it
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == trainer:
            status, seconds = os.waitstatus_to_exitcode(code), time.monotonic() - killed_at
        if pid == 0:
            if time.monotonic() - killed_at > LEFT_AFTER_S:
                left = True
                os.killpg(launcher.pid, signal.SIGKILL)
            time.sleep(0.05)
    reader.join(timeout=5)
    print(json.dumps({"trainer_status": status, "seconds": seconds if status is not None else None, "left": left,
                      "output": b"".join(output).decode(errors="replace")[-3000:]}))


if __name__ == "__main__":
    main()
