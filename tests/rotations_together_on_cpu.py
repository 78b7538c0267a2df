"""Run a script with every model's rotations computed together before each forward, as on a GPU:
`python tests/rotations_together_on_cpu.py train_dreambooth.py FLAGS...`.

utils/boft/peft_seam.py computes them together only on devices where each operation is a kernel launch
(ROTATE_TOGETHER_DEVICES); this helper adds the CPU, so that a CPU test trains through the code path a GPU run takes."""

import atexit
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for utils/

from utils.boft import peft_seam  # noqa: E402


def count_computations() -> None:
    """Print, at exit, how many forwards had their rotations computed together (so a test sees the path taken)."""
    compute, calls = peft_seam.ForwardRotations._compute, []

    def counted(self):
        calls.append(1)
        return compute(self)

    peft_seam.ForwardRotations._compute = counted
    atexit.register(lambda: print(f"rotations computed together: {len(calls)}", file=sys.stderr))


if __name__ == "__main__":
    peft_seam.ROTATE_TOGETHER_DEVICES = ("cpu", *peft_seam.ROTATE_TOGETHER_DEVICES)
    count_computations()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
