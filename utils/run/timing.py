"""Where training time goes: seconds per stage, summed over the run, printed at the end."""

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

STAGES = ("data", "vae", "text_encoder", "denoiser_forward", "backward", "optimizer", "validation", "saving")


class StageTimer:
    """`with timer("vae"): ...` adds the block's wall time to its stage; accelerator work is synchronized first."""

    def __init__(self, device: torch.device):
        self.seconds = defaultdict(float)
        self._synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
        if device.type == "cpu":
            self._synchronize = None
        self._started = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self.seconds[stage] += time.perf_counter() - start

    def summary(self, steps: int) -> list[str]:
        total = time.perf_counter() - self._started
        lines = [f"Time: {total:.1f} s for {steps} optimizer steps ({steps / total:.3f} steps/s)" if total else "Time: 0 s"]
        for stage in STAGES:
            if stage in self.seconds:
                seconds = self.seconds[stage]
                lines.append(f"  {stage:<16} {seconds:9.2f} s  {100 * seconds / total:5.1f} %")
        return lines
