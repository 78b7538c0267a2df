"""`accelerate launch` with clean endings: the same flags, the same launch code, the trainer's exit status.

    python -m utils.launch [accelerate launch flags] train_dreambooth.py [trainer flags]

accelerate's own launcher (1.x) ends every failure of the trainer with exit status 1 and a CalledProcessError
traceback (`--quiet` drops the traceback, not the 1), prints a KeyboardInterrupt traceback on Ctrl-C, and with one
process does not pass on a SIGTERM sent to it alone; with several processes (torchrun) a failure or a signal ends
in a ChildFailedError or SignalException traceback. This front-end runs accelerate's launch with:
- one process: the trainer as a child that receives every SIGTERM/SIGINT/SIGHUP the launcher receives (a
  SIGHUP the launcher ignores, under nohup, is not passed on);
- several processes: torchrun as accelerate starts it (it forwards signals to every process and gives them 30 s
  to save before it kills them), with its failure reports left out when a process ends with a message of its own;
and then exits with the trainer's status (2 for a usage error, 143/130/129 for a stop, 128 + N for a process killed by
signal N), the trainer's message last. train_dreambooth.sh launches through it.
"""

import logging
import os
import signal
import subprocess
import sys

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Statuses with which the trainer ends after printing why (usage error, stopped by SIGINT, SIGTERM or SIGHUP).
EXPLAINED_STATUSES = (2, 129, 130, 143)


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_one_process(args) -> None:
    """accelerate's single-process launch, with signals passed on and the trainer's exit status kept."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    command, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(command, env=env)

    def forward(signum, _frame):  # when the whole group was signalled the trainer gets it twice: harmless
        process.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored, here as in the trainer
            signal.signal(signum, forward)
    raise SystemExit(exit_status(process.wait()))


def quiet_torchrun_reports() -> None:
    """torchrun logs each failed process and its own shutdown; the processes have said what happened."""
    import torch.distributed.run  # noqa: F401  (creates the loggers, each with its own level)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def missing_gpus_problem(args) -> str | None:
    """Several processes asked for on a machine without the GPUs for them and without --cpu: accelerate would
    quietly start one process on the CPU instead."""
    import torch

    wanted = args.num_processes or 1
    on_cpu = args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if wanted < 2 or on_cpu or torch.cuda.device_count() >= wanted:
        return None
    if any(getattr(torch, kind, None) is not None and getattr(torch, kind).is_available() for kind in ("xpu", "npu")):
        return None  # another accelerator: accelerate counts those
    return (f"--num_processes {wanted} needs {wanted} GPUs; this machine has {torch.cuda.device_count()}. On a CPU add "
            f"--cpu (./train_dreambooth.sh: ACCELERATE_ARGS=\"--cpu --num_processes {wanted}\"), or ask for fewer")


def main(argv=None) -> None:
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = accelerate_launch.launch_command_parser().parse_args(argv)
    if problem := missing_gpus_problem(args):
        print(f"utils.launch: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if hasattr(accelerate_launch, "simple_launcher"):
        accelerate_launch.simple_launcher = run_one_process  # the one launcher this module replaces
    else:  # an accelerate this was not written for: its own single-process launcher, with its exit statuses
        print("utils.launch: this accelerate has no simple_launcher; one-process runs exit as accelerate decides",
              file=sys.stderr)
    if not getattr(args, "debug", False):
        quiet_torchrun_reports()
    try:
        accelerate_launch.launch_command(args)
    except ChildFailedError as error:
        statuses = {rank: exit_status(failure.exitcode) for rank, failure in sorted(error.failures.items())}
        status = exit_status(error.get_first_failure()[1].exitcode)  # the others were stopped because of it
        if status not in EXPLAINED_STATUSES:
            print("utils.launch: training process(es) failed: "
                  + ", ".join(f"rank {rank} exit status {code}" for rank, code in statuses.items()), file=sys.stderr)
        raise SystemExit(status) from None
    except SignalException as error:
        raise SystemExit(128 + int(error.sigval)) from None


if __name__ == "__main__":
    main()
