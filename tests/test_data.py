"""utils/run/data.py: ending the loader's persistent workers, with torch's private shutdown and without it."""

import multiprocessing

import pytest
import torch

from utils.run.data import stop_workers


def started_loader():
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=1, persistent_workers=True)
    next(iter(loader))
    assert any(child.daemon for child in multiprocessing.active_children())
    return loader


def test_the_workers_end_through_torchs_own_shutdown():
    loader = started_loader()
    stop_workers(loader)
    assert loader._iterator is None and not multiprocessing.active_children()


@pytest.mark.parametrize("renamed", ["_iterator", "_shutdown_workers"])
def test_the_workers_end_on_a_torch_whose_private_names_differ(renamed, monkeypatch):
    loader = started_loader()
    iterator = loader._iterator  # kept, so that torch's own clean-up does not end the workers first
    if renamed == "_iterator":
        monkeypatch.setattr(loader, "_iterator", None)
    else:
        monkeypatch.setattr(type(iterator), "_shutdown_workers", None)
    stop_workers(loader)
    assert not multiprocessing.active_children()
    monkeypatch.undo()
    iterator._shutdown_workers()
