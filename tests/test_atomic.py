"""utils/atomic.py: a file appears whole under its name, or not at all, and no partial file is left."""

import pytest

from utils.atomic import atomic_file


def test_a_completed_write_is_renamed_into_place(tmp_path):
    final = tmp_path / "image.jpg"
    with atomic_file(final) as partial:
        partial.write_bytes(b"whole")
        assert not final.exists() and partial.parent == tmp_path and partial.name.startswith(".")
    assert final.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [final]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    final = tmp_path / "latents.safetensors"
    final.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_file(final) as partial:
            partial.write_bytes(b"half")
            raise OSError("No space left on device")
    assert final.read_bytes() == b"old" and list(tmp_path.iterdir()) == [final]
