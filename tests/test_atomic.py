"""utils/atomic.py: a file or folder appears whole under its name, or not at all, and no partial is left."""

import pytest

from utils.atomic import atomic_file, atomic_folder, remove_partials


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


def test_a_folder_replaces_the_old_one_whole_and_a_failed_one_leaves_it(tmp_path):
    final = tmp_path / "checkpoint-4"
    with atomic_folder(final) as partial:
        (partial / "optimizer.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(final) as partial:
        (partial / "optimizer.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # a stop in the middle
    assert (final / "optimizer.bin").read_bytes() == b"old" and list(tmp_path.iterdir()) == [final]
    with atomic_folder(final) as partial:
        (partial / "scheduler.bin").write_bytes(b"new")
    assert [p.name for p in final.iterdir()] == ["scheduler.bin"]


def test_a_shared_partial_folder_is_made_and_published_by_its_owner_only(tmp_path):
    final = tmp_path / "checkpoint-2"
    with atomic_folder(final, shared=True, owner=True) as mine:
        with atomic_folder(final, shared=True, owner=False) as theirs:  # another process of the run
            assert theirs == mine
            (theirs / "random_states_1.pkl").write_bytes(b"rng")
        assert not final.exists()  # only the owner publishes
    assert (final / "random_states_1.pkl").read_bytes() == b"rng"


def test_partials_a_killed_writer_left_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".class_00003.jpg.4242.partial").write_bytes(b"half")
    (tmp_path / ".checkpoint-4.partial").mkdir()  # a shared folder: another writer's business
    (tmp_path / "class_00001.jpg").write_bytes(b"image")
    (tmp_path / ".notes.partial").write_text("the user's")
    assert remove_partials(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-4.partial", ".notes.partial", "class_00001.jpg"]
