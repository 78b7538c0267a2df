"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's packages, started
without systemd under a temporary folder and stopped by their pids.

    with SlurmCluster(folder) as cluster:      # raises Unavailable (the tests skip) where Slurm cannot run here
        subprocess.run(["sbatch", ...], env=cluster.env())

What matters (found by running it): the daemons run in the foreground (-D) in sessions of their own; slurmd names
its node by the host name; `sacct` needs slurmdbd (not installed), so the tests read jobs with `scontrol show job`
(kept MinJobAge=600 s after they end) and the jobcomp/filetxt file records each run; the node offers two fake GPUs
(a GPU GRES whose device files are empty files) so that a batch script's GPU request is honoured as written.
`.ci/run` installs the packages (as root); elsewhere the tests that need the cluster skip, saying why.
"""

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
FAKE_GPUS = 2
# The states a job does not leave (squeue's long names).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


class Unavailable(Exception):
    """Slurm cannot be run on this machine; the message says why."""


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class SlurmCluster:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.config = self.folder / "slurm.conf"
        self.processes: list[subprocess.Popen] = []

    # --- set-up ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        missing = [name for name in DAEMONS if not shutil.which(name, path=_sbin_path())]
        if missing:
            raise Unavailable(f"Slurm is not installed ({', '.join(missing)} missing): .ci/run installs it with "
                              "apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            raise Unavailable("a test cluster runs its daemons as root (SlurmUser=root); this user is not root")
        try:
            self._start_munge()
            self._write_config()
            for daemon in ("slurmctld", "slurmd"):
                self._start([shutil.which(daemon, path=_sbin_path()), "-D", "-f", str(self.config)], daemon)
            self._wait_until_idle()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        self._end_leftover_steps()

    def _end_leftover_steps(self):
        """slurmd's job steps (slurmstepd and the jobs under it) outlive slurmd when a test ends before its jobs:
        every process that inherited this cluster's SLURM_CONF is ended."""
        mark = f"SLURM_CONF={self.config}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def env(self, **extra) -> dict:
        """The environment for Slurm's commands (and, exported by sbatch, for the jobs): `extra` on top."""
        env = {**os.environ, **extra}
        return {**env, "SLURM_CONF": str(self.config), "PATH": os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])}

    def _start(self, command, name):
        log = open(self.folder / f"{name}.out", "w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=self.env() if name != "munged" else None))

    def _start_munge(self):
        if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged of the machine's already answers
        munge = pwd.getpwnam("munge")
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        os.chown(MUNGE_SOCKET.parent, munge.pw_uid, munge.pw_gid)
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            os.chown("/etc/munge/munge.key", munge.pw_uid, munge.pw_gid)
        self._start(["runuser", "-u", "munge", "--", shutil.which("munged", path=_sbin_path()), "--foreground",
                     "--force"], "munged")
        deadline = time.monotonic() + 20
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise Unavailable(f"munged did not start: {(self.folder / 'munged.out').read_text()[-1000:]}")
            time.sleep(0.1)

    def _write_config(self):
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                              env={**os.environ, "PATH": _sbin_path()}).stdout.split("\n")[0]
        fields = dict(field.split("=", 1) for field in node.split())
        controller, node_port = free_ports(2)
        self.node_name = fields["NodeName"]
        self.cpus = int(fields["CPUs"])
        devices = [self.folder / f"fake-gpu{i}" for i in range(FAKE_GPUS)]
        for device in devices:  # slurmd counts a GPU by its device file; these stand for /dev/nvidia0, 1
            device.touch()
        (self.folder / "gres.conf").write_text("".join(f"NodeName={self.node_name} Name=gpu File={d}\n"
                                                       for d in devices))
        self.config.write_text("\n".join([
            "ClusterName=tests", f"SlurmctldHost={self.node_name}(127.0.0.1)", "SlurmUser=root",
            f"SlurmctldPort={controller}", f"SlurmdPort={node_port}", "AuthType=auth/munge",
            f"StateSaveLocation={self.folder / 'state'}", f"SlurmdSpoolDir={self.folder / 'spool'}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}", f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}", f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.folder / 'jobcomp.txt'}", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "GresTypes=gpu",
            "SchedulerParameters=sched_interval=1", "MinJobAge=600",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={fields['RealMemory']} "
            f"Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _wait_until_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise Unavailable(f"{process.args[0]} ended at start: {self.logs()}")
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env())
            if state.stdout.strip() == "idle":
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"the node never became idle ({state.stdout.strip()!r}): {self.logs()}")
            time.sleep(0.2)

    # --- reading what happened ---------------------------------------------------------------------------------------
    def logs(self) -> str:
        files = sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("jobcomp.txt"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in files)

    def unfinished_jobs(self) -> list[str] | None:
        """Every job (or array task) not in a final state, as "id STATE"; None when squeue fails (slurmctld busy),
        which says nothing. All states are read: squeue's default lists only pending, running and completing jobs,
        not a task caught between its requeue and its next start (REQUEUED, REQUEUE_HOLD, SPECIAL_EXIT, ...)."""
        result = subprocess.run(["squeue", "-h", "--states=all", "--format=%i %T"], capture_output=True, text=True,
                                env=self.env())
        if result.returncode != 0:
            return None
        return [line for line in result.stdout.splitlines() if line.split()[-1] not in FINAL_STATES]

    def wait_until_all_ended(self, timeout=600):
        """Until every job submitted has ended for good."""
        deadline = time.monotonic() + timeout
        while (unfinished := self.unfinished_jobs()) != []:
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not finished after {timeout} s: {unfinished}\n{self.logs()}")
            time.sleep(0.5)
