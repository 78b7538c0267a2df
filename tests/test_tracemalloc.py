import mmap

from utils.run.tracemalloc import TorchTracemalloc, b2mb

BLOCK = 300 * 2**20


def touched_block():
    """300 MB of fresh pages, each written once. An anonymous mapping, not malloc: a malloc'd block could reuse heap
    that earlier tests in this process freed, without a new page."""
    block = mmap.mmap(-1, BLOCK)
    for offset in range(0, BLOCK, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_peak_counts_memory_freed_before_the_end():
    with TorchTracemalloc() as memory:
        touched_block().close()
    assert memory.cpu_peaked >= 250
    assert memory.cpu_used < memory.cpu_peaked
    lines = memory.report()
    assert any(line.startswith("CPU total peak memory (max)") for line in lines)
    assert b2mb(2**21) == 2
