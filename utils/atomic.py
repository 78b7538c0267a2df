"""Files and folders that appear whole or not at all: written under a hidden partial name beside the final one,
renamed when complete, removed when not. They are published with the permissions the user's umask gives, like any
other tool's files: safetensors writes its files 0600 and tempfile its folders 0700, which a ComfyUI or web UI
running as another user (Docker, a shared server) could not read."""

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

_PARTIAL = re.compile(r"\..+\.\d+\.partial")  # partial_path's name for one process's own partial


def _current_umask() -> int:
    umask = os.umask(0)  # os.umask can only be read by setting it
    os.umask(umask)
    return umask


_UMASK = _current_umask()  # read once, at import, before any thread could race the two calls
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


def partial_path(final: Path, shared: bool = False) -> Path:
    """The hidden partial name beside `final`: this process's own, or (shared) the one all processes of a run write
    into."""
    return final.with_name(f".{final.name}.partial" if shared else f".{final.name}.{os.getpid()}.partial")


def _apply_umask(path: Path) -> None:
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        item.chmod(FOLDER_MODE if item.is_dir() else FILE_MODE)


def _publish(partial: Path, final: Path) -> None:
    """Put the completely written `partial` in place of `final` in one rename (a folder replaces the old one)."""
    _apply_umask(partial)
    if partial.is_dir() and final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def _discard(partial: Path) -> None:
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_file(final: Path):
    """Yield a partial path beside `final` (hidden, this process's own) to write; it becomes `final` in one rename
    when the block ends without error, and is removed otherwise: a stop or a full disk leaves nothing half-written
    under the final name and no partial file behind."""
    partial = partial_path(final)
    try:
        yield partial
        _publish(partial, final)
    finally:
        _discard(partial)


@contextmanager
def atomic_folder(final: Path, shared: bool = False, owner: bool = True):
    """Yield a partial folder beside `final` to write into; it replaces `final` (and any old folder there) in one
    rename when the block ends without error, and is removed otherwise. With `shared`, every process of a run
    writes into the same partial folder and only the `owner` (the main process) makes, publishes or removes it:
    the caller waits for the others inside the block."""
    partial = partial_path(final, shared)
    if owner:
        _discard(partial)  # left by an attempt that was killed
        partial.mkdir(parents=True)
    try:
        yield partial
        if owner:
            _publish(partial, final)
    except BaseException:
        if owner:
            _discard(partial)
        raise


def remove_partials(folder: Path) -> int:
    """Remove the partial files in `folder` that a killed writer left (SIGKILL runs no clean-up); for a caller that
    knows no one else writes there now. Returns how many were removed."""
    partials = [path for path in Path(folder).glob(".*.partial") if _PARTIAL.fullmatch(path.name)]
    for path in partials:
        _discard(path)
    return len(partials)
