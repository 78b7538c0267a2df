"""Page faults of a repeated step with glibc's malloc defaults and with utils/run/cpu_allocator.py's settings.

    python -m benchmarks.page_faults

Each setting runs in a fresh process: a step allocates an activation-sized working set (eight tensors of about
4 MB) and frees it; after the heap has settled, five steps are counted. With glibc's defaults each step faults its
blocks in again (about 14,000 pages over the five steps); with the settings, almost none (the trainer's claim).
"""

import resource
import subprocess
import sys

WARM_UP_STEPS, COUNTED_STEPS = 8, 5


def step():
    import torch

    tensors = [torch.ones(2**20 + 4096 * i) for i in range(8)]
    return sum(float(t[-1]) for t in tensors)


def faults(keep_freed: bool) -> int:
    from utils.run.cpu_allocator import keep_freed_memory

    if keep_freed and not keep_freed_memory():
        raise SystemExit("malloc is not glibc's, or MALLOC_*_ / GLIBC_TUNABLES are set: nothing to measure")
    for _ in range(WARM_UP_STEPS):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(COUNTED_STEPS):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def main():
    if len(sys.argv) == 2:
        return print(faults(sys.argv[1] == "keep"))
    print(f"| malloc | page faults over {COUNTED_STEPS} steps |\n|---|---|")
    for setting, label in (("default", "glibc defaults"), ("keep", "utils/run/cpu_allocator.py")):
        result = subprocess.run([sys.executable, "-m", "benchmarks.page_faults", setting], capture_output=True,
                                text=True, check=True)
        print(f"| {label} | {result.stdout.strip()} |")


if __name__ == "__main__":
    main()
