"""Time one layer's rotation every way, factor by factor and in runs of k factors each applied as one
block-diagonal matrix (forward and backward, the activations' gradient included), at SD 1.5's, FLUX.1's and SD3.5
Medium's layer shapes, beside what rotation.run_length picks: the measurements its constants are fitted to.

    python -m benchmarks.rotation_paths            # about a minute on 2 cores
"""

import statistics
import time
from unittest import mock

import torch

from utils.boft import rotation
from utils.run.cpu_allocator import keep_freed_memory

# (columns, rows, block size): SD 1.5 at 256 px, batch 2 (320-wide self-attention over 2048 tokens, 640 over 512,
# 1280 over 128, a cross-attention key over 154 text tokens); FLUX.1 at 512 and 256 px and its text stream; SD3.5
# Medium's image and text streams at 256 px.
SHAPES = [(320, 2048, 40), (640, 512, 80), (1280, 128, 160), (768, 154, 96), (3072, 2176, 32), (3072, 640, 32),
          (3072, 128, 32), (1536, 512, 32), (1536, 282, 32)]


def butterfly_plan(columns: int, block_size: int, n_factors: int):
    """peft's butterfly permutations for this shape, as the fast forward applies them."""
    import peft.tuners.boft.layer as peft_boft

    from utils.boft.peft_seam import rotation_plan

    layer = peft_boft.BOFTLayer.__new__(peft_boft.BOFTLayer)  # block_butterfly_perm reads nothing of the layer
    return rotation_plan(layer, torch.zeros(n_factors, columns // block_size, block_size, block_size), False)


def milliseconds(rows, blocks, plan, length: int, repeats: int = 7) -> float:
    times = []
    with mock.patch.object(rotation, "run_length", lambda *_: length):
        for _ in range(repeats + 2):
            x = rows.clone().requires_grad_()
            start = time.perf_counter()
            y = rotation.rotate_rows(x, rotation.cayley(blocks), plan)
            y.backward(torch.ones_like(y))
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main():
    keep_freed_memory()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, median of 7")
    print("| columns | rows | block size | factors | factor by factor ms | in pairs ms | all in one ms | run_length |")
    print("|---|---|---|---|---|---|---|---|")
    for columns, count, block_size in SHAPES:
        for n_factors in (2, 4):
            if (columns // block_size) % 2 ** (n_factors - 1):
                continue
            plan = butterfly_plan(columns, block_size, n_factors)
            blocks = (torch.randn(n_factors, columns // block_size, block_size, block_size, generator=generator)
                      * 0.01).requires_grad_()
            rows = torch.randn(count, columns, generator=generator)
            each = [f"{milliseconds(rows, blocks, plan, length):.2f}" if n_factors % length == 0 else "-"
                    for length in (1, 2, 4)]
            picked = rotation.run_length(plan, n_factors, block_size, count)
            print(f"| {columns} | {count} | {block_size} | {n_factors} | {' | '.join(each)} | {picked} |", flush=True)


if __name__ == "__main__":
    main()
