"""Writing: `save_image` to a file (atomically, never over an input or, unless asked, an existing file) or to
stdout/a stream."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from ..files import TemporaryFileError, write_atomic
from .encode import encode_image
from .image import WRITE_CHOICES, ImageError, _one_line, format_for


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _os_problem(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or _one_line(e)


def save_image(image: Any, dest: str | os.PathLike | BinaryIO, fmt: str | None = None, *, quality: int = 95,
               overwrite: bool = False, protect: tuple[str | os.PathLike, ...] | list = (),
               provenance: Mapping[str, Any] | None = None) -> Path | None:
    """Encode `image` (see :func:`encode_image`) and write it to `dest` atomically; returns the path written.

    `dest` may be "-" (stdout) or a binary stream (`fmt` then defaults to PNG). Never writes over a path in
    `protect` (the inputs, even with `overwrite`), nor over an existing file unless `overwrite`.
    """
    if isinstance(dest, str) and dest == "-" or hasattr(dest, "write"):
        stream = sys.stdout.buffer if isinstance(dest, str) else dest
        label = "<stdout>" if isinstance(dest, str) else str(getattr(dest, "name", "<stream>"))
        fmt_name = format_for(None, fmt) if fmt else "PNG"
        if fmt_name is None:
            raise ImageError(f"{label}: unknown output format {fmt!r}; use one of {WRITE_CHOICES}")
        data = encode_image(image, fmt_name, quality=quality, provenance=provenance, name=label)
        try:
            _write_all(stream, data)
        except OSError as e:
            raise ImageError(f"{label}: cannot write ({_os_problem(e)})") from None
        return None

    dest = Path(dest)
    fmt_name = format_for(dest, fmt)
    if fmt_name is None:
        what = f"format {fmt!r}" if fmt else f"extension {dest.suffix or '(none)'!r}"
        raise ImageError(f"{dest}: unknown output {what}; use one of {WRITE_CHOICES}")
    for p in protect:
        if _same_file(Path(p), dest):
            raise ImageError(f"{dest}: refusing to write over the input image")
    if dest.is_dir():
        raise ImageError(f"{dest}: is a folder")
    if dest.exists() and not overwrite:
        raise ImageError(f"{dest}: already exists (use --overwrite to replace it)")
    folder = dest.parent
    if not folder.is_dir():
        raise ImageError(f"{dest}: output folder {folder} does not exist")
    data = encode_image(image, fmt_name, quality=quality, provenance=provenance, name=str(dest))
    try:
        write_atomic(dest, data, overwrite)
    except FileExistsError:
        raise ImageError(f"{dest}: already exists (use --overwrite to replace it)") from None
    except TemporaryFileError as e:
        raise ImageError(f"{dest}: cannot write in {folder} ({_os_problem(e)})") from None
    except OSError as e:
        raise ImageError(f"{dest}: cannot write ({_os_problem(e)})") from None
    return dest


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte or raise. A pipe whose reader has gone (`| head -c 100`) can take part of a write and
    report the short count instead of failing; ignoring it would end in exit 0 with the image cut short."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if not written:
            raise OSError(errno.EPIPE, "Broken pipe")
        view = view[written:]
    stream.flush()
