import numpy as np

from utils.run.tracemalloc import TorchTracemalloc, b2mb


def test_peak_counts_memory_freed_before_the_end():
    with TorchTracemalloc() as memory:
        block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del block
    assert memory.cpu_peaked >= 250
    assert memory.cpu_used < memory.cpu_peaked
    lines = memory.report()
    assert any(line.startswith("CPU total peak memory (max)") for line in lines)
    assert b2mb(2**21) == 2
