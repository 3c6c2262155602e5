"""File-system helpers shared by every layer that writes: the cache folder and atomic replacement.

A file we write appears complete or not at all: it is written to a hidden temporary beside its target and
renamed onto it, so an interrupted run never leaves a half-written image, weights file or kernel library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
import threading
import time
import zlib
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




# Temporary files of atomic writes: `.NAME.upscale-HOST-PID-XXXXXXXX.part` beside NAME, HOST a short hash of
# the machine's name. A run killed with SIGKILL leaves its temporary behind; the next run writing into that
# folder removes those whose writer is gone: on this machine, a PID that no longer runs and a file older than
# this run; from another machine sharing the folder, a file a day old. Names written by earlier versions
# (`.NAME.XXXXXXXX.part`) go once a day old too. Nothing else is touched.
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")[:6]


_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:upscale-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-)?[a-z0-9_]{8}\.part")


_RUN_STARTED = time.time()


_STALE_ELSEWHERE_S = 24 * 3600


_cleaned_folders: set[str] = set()


_cleaning_lock = threading.Lock()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or cannot tell: leave its file alone
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries of our own killed writes in `folder` (see above); returns what was removed.
    Done once per folder per process, before the first write there."""
    key = os.path.realpath(folder)
    with _cleaning_lock:
        if key in _cleaned_folders:
            return []
        _cleaned_folders.add(key)
    removed = []
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _TEMP_NAME.fullmatch(entry.name)
                if m is None or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    age = _RUN_STARTED - entry.stat(follow_symlinks=False).st_mtime
                    if m["pid"] is not None and m["host"] == _HOST:
                        stale = age > 0 and int(m["pid"]) != os.getpid() and not _pid_running(int(m["pid"]))
                    else:
                        stale = age > _STALE_ELSEWHERE_S
                    if stale:
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                except OSError:
                    continue
    return removed


class TemporaryFileError(OSError):
    """The temporary file beside a destination could not be made (no permission, no space, no folder)."""


def write_atomic(dest: Path, data: bytes, overwrite: bool) -> None:
    """Write `data` to `dest` through a temporary beside it, fsynced, then moved into place: `dest` is whole or
    absent, whatever happens. Without `overwrite` an existing `dest` is never replaced (FileExistsError, even
    when it appears meanwhile). Removes the stale temporaries of killed runs in that folder first.
    Raises TemporaryFileError when no temporary can be made there, else OSError; the temporary is removed."""
    folder = dest.parent
    remove_stale_temporaries(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.upscale-{_HOST}-{os.getpid()}-", suffix=".part",
                                   dir=folder)
    except OSError as e:
        raise TemporaryFileError(e.errno, e.strerror, str(folder)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _link_no_clobber(tmp, dest)
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _link_no_clobber(tmp: str, dest: Path) -> None:
    """Move `tmp` to `dest` unless `dest` exists (a hard link fails on an existing name: no race)."""
    try:
        os.link(tmp, dest)
        return
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):
        pass  # file systems without hard links
    if dest.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(dest))
    os.replace(tmp, dest)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
