"""Files that appear whole or not at all: written under a partial name, renamed when complete."""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(final: Path):
    """Yield a partial path beside `final` (hidden, this process's own) to write; it becomes `final` in one rename
    when the block ends without error, and is removed otherwise: a stop or a full disk leaves nothing half-written
    under the final name and no partial file behind."""
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
