"""File-system helpers shared by every layer that writes: the cache folder and atomic replacement.

A file we write appears complete or not at all: it is written to a hidden temporary beside its target and
renamed onto it, so an interrupted run never leaves a half-written weights file or kernel library behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Where downloaded weights and built kernels are kept: $UPSCALE_CACHE_DIR, else the XDG cache."""
    if os.environ.get("UPSCALE_CACHE_DIR"):
        return Path(os.environ["UPSCALE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "upscale"


def new_file_mode() -> int:
    """The permissions a new file gets under the process umask (mkstemp's are a private 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds; removed otherwise.

    The renamed file gets the permissions of the file it replaces, else the usual ones for a new file (umask).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mode = target.stat().st_mode & 0o7777 if target.is_file() else new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
