import time

import torch

from utils.run.timing import StageTimer


def test_stages_add_up_and_are_reported_in_order():
    timer = StageTimer(torch.device("cpu"))
    with timer("vae"):
        time.sleep(0.02)
    with timer("data"):
        time.sleep(0.01)
    with timer("vae"):
        time.sleep(0.02)
    assert timer.seconds["vae"] >= 0.04 and timer.seconds["data"] >= 0.01
    lines = timer.summary(steps=2)
    assert lines[0].startswith("Time:") and "steps/s" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["data", "vae"]
