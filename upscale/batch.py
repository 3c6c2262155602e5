"""Batches: turn the command line's inputs into (source, destination) jobs, and run them one by one.

Inputs are files, folders (their images; `recursive` walks sub-folders and mirrors them under the output
folder), glob patterns (expanded here when the shell did not), `-` for image bytes on stdin, and lists of
paths (`--from-list FILE|-`). Inside folders, files that are not images (judged by content, not by name:
`.DS_Store`, `Thumbs.db`, text, even a text file named `.png`) are skipped and counted; a file named explicitly
that is not an image fails with a one-line error. A *broken* image inside a folder (truncated, empty with an
image extension, unreadable) is not skipped: it is an input that fails with a one-line error naming it, and the
batch goes on.

Results that go into an output folder (`-o DIR`) have that folder, and the mirrored sub-folders, created when
they are first written to (`Job.make_folder`; see :func:`prepare_folder`); nothing is created for a dry run.
Walking a folder never picks up our own results: files inside the output folder when it lies within the
walked folder, and files that are the destination of another input of the same run (`photo_x4.png` beside
`photo.png` after a first run), are left out. Nothing here ever writes over an input.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image, UnidentifiedImageError

STDIO = Path("-")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
# Leading bytes of the formats we read: a file that starts like an image is an image, however broken (BMP's
# two-letter "BM" is left out: a text file may start with it).
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF87a", b"GIF89a")


@dataclass
class Job:
    source: Path  # STDIO for stdin
    dest: Path  # STDIO for stdout
    from_folder: bool = False  # found by walking a folder (skip-existing is then the default)
    make_folder: bool = False  # dest goes into an output folder: create dest's folder when it is missing


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)  # skipped while walking folders


@dataclass
class Outcome:
    job: Job
    status: str  # ok | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"input": str(self.job.source), "output": str(self.job.dest), "status": self.status,
                "error": self.error, **self.extra, "seconds": round(self.seconds, 3)}


def looks_like_image(path: Path) -> bool:
    """Whether the file is an image by its content: Pillow recognises its header, or it starts like one.

    Only the header is read. A file Pillow cannot identify (text, `.DS_Store`, `Thumbs.db`) is not an image.
    A broken image still counts as one, so that reading it fails with a message naming it instead of being
    silently skipped: a truncated file (Pillow fails inside the header, or the file starts with an image
    format's magic bytes), one above the decompression-bomb limit (`--allow-large` reads it), one that
    cannot be opened (permission denied), and an empty file whose name has an image extension.
    """
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True
    except UnidentifiedImageError:
        pass
    except OSError:
        return True  # truncated inside the header, or unreadable: an input that will fail with its reason
    except ValueError:
        pass
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return True
    if not head:
        return path.suffix.lower() in IMAGE_EXTENSIONS
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def read_list(source: str, stdin_text: Callable[[], str]) -> list[str]:
    """Paths from a list file (or stdin with `-`), one per line; blank lines and `#` comments ignored."""
    text = stdin_text() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dest_name(src: Path, scale: int, suffix: str | None, ext: str | None) -> str:
    ext = ext or ".png"  # lossless by default whatever the input was; --format picks another
    return f"{src.stem}{suffix if suffix is not None else f'_x{scale}'}{ext}"


def plan_jobs(inputs: Iterable[str], output: str | None, scale: int, *, suffix: str | None = None,
              ext: str | None = None, recursive: bool = False) -> Plan:
    """Every (source, destination) pair, in input order. `ext` None writes PNG (lossless), whatever the input.

    Without `output` an image's result goes beside it. With an output folder (one that exists, ends with a
    separator, or is needed because there are several inputs) results go into it, mirroring sub-folders of
    walked folders. `-` as output means stdout.
    """
    plan = Plan()
    out = Path(output) if output and output != "-" else None
    entries: list[tuple[Path, Path | None]] = []  # (file, folder it was found in)
    found: set[int] = set()  # indices of entries found by walking a folder or expanding a glob
    for text in inputs:
        if text == "-":
            entries.append((STDIO, None))
            continue
        path = Path(text)
        if not path.exists() and _has_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            for m in matches:
                if Path(m).is_file():
                    found.add(len(entries))
                    entries.append((Path(m), None))
            if not matches:
                entries.append((path, None))  # reported as missing
            continue
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            # the output folder inside the walked one holds our results: never feed them back in
            skip_out = out is not None and _inside(out, path) and not _inside(path, out)
            for f in sorted(p for p in walker if p.is_file()):
                if skip_out and _inside(f, out):
                    continue
                if f.name.startswith(".") and f.suffix == ".part":
                    continue  # a temporary file of an interrupted write
                if looks_like_image(f):
                    found.add(len(entries))
                    entries.append((f, path))
                else:
                    plan.not_images.append(f)
            continue
        entries.append((path, None))

    to_folder = out is not None and (out.is_dir() or str(output).endswith(("/", os.sep)) or len(entries) > 1
                                     or any(folder for _, folder in entries))
    jobs: list[Job] = []
    for src, folder in entries:
        if output == "-":
            dest = STDIO
        elif src == STDIO:
            dest = out if out is not None and not to_folder else (out or Path(".")) / f"stdin_x{scale}{ext or '.png'}"
        elif out is None:
            dest = src.with_name(_dest_name(src, scale, suffix, ext))
        elif to_folder:
            rel = src.relative_to(folder).parent if folder is not None else Path()
            dest = out / rel / _dest_name(src, scale, suffix, ext)
        else:
            dest = out
        jobs.append(Job(src, dest, from_folder=folder is not None,
                        make_folder=to_folder and dest != STDIO))
    # a file found by walking or globbing that another input's result will be written to is one of our
    # results from an earlier run (photo_x4.png beside photo.png): not an input
    dests: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.dest != STDIO:
            dests.setdefault(_key(job.dest), i)
    plan.jobs = [job for i, job in enumerate(jobs)
                 if not (i in found and dests.get(_key(job.source), i) != i)]
    return plan


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def prepare_folder(job: Job) -> None:
    """Create the output folder (and mirrored sub-folders) a job's result goes into, when it is missing.

    Raises OSError with a one-line message naming the destination when the folder cannot be made (a file in
    the way, no permission).
    """
    if not job.make_folder or job.dest == STDIO:
        return
    folder = job.dest.parent
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way"
        else:
            reason = e.strerror or type(e).__name__
        raise OSError(f"{job.dest}: cannot create the output folder {folder} ({reason})") from None


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def run_jobs(jobs: list[Job], process: Callable[[Job], dict], *, overwrite: bool, skip_existing: bool | None,
             on_outcome: Callable[[Outcome], None], errors: tuple[type[Exception], ...]) -> list[Outcome]:
    """Process each job, never stopping at a failed one; `process` returns extra fields for the record.

    A destination that is the input itself fails ("refusing to write over the input image"), whatever the
    options. Another existing destination is skipped (folder inputs, or `skip_existing`), failed (a named
    file without `--overwrite`), or replaced (`overwrite`). KeyboardInterrupt propagates after the current
    job's temporary file is gone (the writer cleans up), with the outcomes so far in the exception's
    `outcomes`. The job under way when it came counts as done (and is reported) if its destination appeared
    or was replaced meanwhile: writes are atomic, so such a file is complete.
    """
    outcomes: list[Outcome] = []
    current: tuple[Job, tuple | None, float] | None = None  # the job in process(): (job, dest before, start)
    try:
        for job in jobs:
            start = time.perf_counter()
            if job.dest != STDIO and job.source != STDIO and job.dest.exists() and _key(job.dest) == _key(job.source):
                outcome = Outcome(job, "failed", f"{job.dest}: refusing to write over the input image")
                outcomes.append(outcome)
                on_outcome(outcome)
                continue
            if job.dest != STDIO and job.dest.exists() and not overwrite:
                skip = skip_existing if skip_existing is not None else job.from_folder
                if skip:
                    outcome = Outcome(job, "skipped", "output exists")
                else:
                    outcome = Outcome(job, "failed", f"{job.dest}: already exists (use --overwrite to replace it)")
                outcomes.append(outcome)
                on_outcome(outcome)
                continue
            current = (job, _identity(job.dest), start)
            try:
                extra = process(job)
                outcome = Outcome(job, "ok", None, time.perf_counter() - start, extra)
            except errors as e:
                outcome = Outcome(job, "failed", str(e), time.perf_counter() - start)
            outcomes.append(outcome)
            current = None
            on_outcome(outcome)
    except KeyboardInterrupt as e:
        if current is not None and not (outcomes and outcomes[-1].job is current[0]):
            job, before, start = current
            after = _identity(job.dest)
            if after is not None and after != before:  # finished writing just before the interrupt
                outcome = Outcome(job, "ok", None, time.perf_counter() - start)
                outcomes.append(outcome)
                try:
                    on_outcome(outcome)
                except KeyboardInterrupt:
                    pass
        e.outcomes = outcomes  # type: ignore[attr-defined]
        raise
    return outcomes


def _identity(path: Path) -> tuple | None:
    """Which file is at `path` (device, inode, mtime, size), or None when there is none (or it is stdout)."""
    if path == STDIO:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size
