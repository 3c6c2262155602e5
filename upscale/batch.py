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

import dataclasses
import functools
import glob
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from PIL import Image, UnidentifiedImageError

from .imageio import KEEP_KIND, READ_EXTENSIONS, format_by_magic

STDIO = Path("-")


@dataclass
class Job:
    source: Path  # STDIO for stdin
    dest: Path  # STDIO for stdout
    from_folder: bool = False  # found by walking a folder (skip-existing is then the default)
    make_folder: bool = False  # dest goes into an output folder: create dest's folder when it is missing
    conflict: str | None = None  # decided at planning: this input fails with this message (shared output)
    skip: str | None = None  # decided at planning: this input is skipped for this reason


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)  # skipped while walking folders
    empty_folders: list[Path] = field(default_factory=list)  # folder inputs with no image in them


@dataclass
class Outcome:
    job: Job
    status: str  # ok | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    remedy: str | None = None  # the setting that would let a failed input through (the error's `remedy`)

    def record(self) -> dict:
        output = None if self.job.skip else str(self.job.dest)
        return {"input": str(self.job.source), "output": output, "status": self.status,
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
        return path.suffix.lower() in READ_EXTENSIONS
    return format_by_magic(head) is not None  # starts like an image: an image, however broken


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def read_list(source: str, stdin_text: Callable[[], str]) -> list[str]:
    """Paths from a list file (or stdin with `-`), one per line; blank lines and `#` comments ignored."""
    text = stdin_text() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dest_name(src: Path, scale: int, suffix: str | None, ext: str | None) -> str:
    # lossless PNG by default, but a GIF stays a GIF and a TIFF a TIFF (its pages); --format picks another
    ext = ext or KEEP_KIND.get(src.suffix.lower(), ".png")
    return f"{src.stem}{suffix if suffix is not None else f'_x{scale}'}{ext}"


def plan_jobs(inputs: Iterable[str], output: str | None, scale: int, *, suffix: str | None = None,
              ext: str | None = None, recursive: bool = False) -> Plan:
    """Every (source, destination) pair, in input order. `ext` None writes PNG (lossless), but GIF and
    TIFF inputs as their own kind (`imageio.KEEP_KIND`).

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
            before = len(entries)
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
            if len(entries) == before:
                plan.empty_folders.append(path)
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
    # results from an earlier run (photo_x4.png beside photo.png): skipped, and said so
    dests: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if job.dest != STDIO:
            dests.setdefault(_key(job.dest), i)
    for i, job in enumerate(jobs):
        owner = dests.get(_key(job.source), i)
        if i in found and owner != i:
            job.skip = f"looks like the result of {jobs[owner].source} (its output name)"
    _mark_shared_outputs([job for job in jobs if job.skip is None])
    plan.jobs = jobs
    return plan


def _mark_shared_outputs(jobs: list[Job]) -> None:
    """Inputs whose outputs would land on one file (a.png and a.jpg -> a_x4.png) all fail, each naming the
    others: skipping or replacing one would lose a result. Names are compared case-insensitively, as the
    output folder may be on a case-insensitive file system (a.PNG and a.png). The same input given twice is
    done once."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.dest != STDIO:
            groups.setdefault(_key(job.dest).casefold(), []).append(job)
    for group in groups.values():
        sources: dict[str, Job] = {}
        for job in group:
            first = sources.setdefault(_key(job.source) if job.source != STDIO else "-", job)
            if first is not job:
                job.skip = f"the same input as {first.source}, given again"
        distinct = list(sources.values())
        if len(distinct) < 2:
            continue
        for job in distinct:
            others = ", ".join(str(o.source) for o in distinct if o is not job)
            job.conflict = (f"{job.source}: its output {job.dest} is also the output of {others}; "
                            "rename one, or give them different --suffix or -o")


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


class Stages(Protocol):
    """What one job does, in three steps that `run_jobs` overlaps across jobs."""

    def read(self, job: Job) -> Any:
        """Load the input (runs in the reader thread, one job ahead)."""

    def compute(self, job: Job, data: Any) -> tuple[Any, dict]:
        """The result and extra fields for the job's record (runs in the calling thread)."""

    def write(self, job: Job, result: Any) -> None:
        """Store the result (runs in the writer thread, while the next job computes)."""

    def nbytes(self, result: Any) -> int:
        """Memory the result holds while it waits to be written."""


# A result bigger than this is written before the next job starts, so that two outputs of huge images are
# never held at once (a 12000 x 8000 RGB result is 288 MB; the tiled engine bounds everything else).
WRITE_BEHIND_BYTES = 256 * 2**20


def verdict(job: Job, *, overwrite: bool, skip_existing: bool | None) -> Outcome | None:
    """The outcome of a job that is decided before its input is read (planned conflict or skip, an output that
    exists), or None when it has to run. `run_jobs` asks just before each job; a cluster's driver asks while
    dispatching (`cluster.py`), so that both decide alike."""
    if job.conflict:
        return Outcome(job, "failed", job.conflict)
    if job.skip:
        return Outcome(job, "skipped", job.skip)
    if job.dest != STDIO and job.source != STDIO and job.dest.exists() and _key(job.dest) == _key(job.source):
        return Outcome(job, "failed", f"{job.dest}: refusing to write over the input image")
    if job.dest != STDIO and job.dest.exists() and not overwrite:
        skip = skip_existing if skip_existing is not None else job.from_folder
        if skip:
            return Outcome(job, "skipped", "output exists")
        return Outcome(job, "failed", f"{job.dest}: already exists (use --overwrite to replace it)")
    return None


@dataclass
class _Pending:
    job: Job
    start: float
    extra: dict = field(default_factory=dict)
    write: Future | None = None  # the result's write, in flight
    outcome: Outcome | None = None  # decided (skip or failure) before any write


def run_jobs(jobs: list[Job], stages: Stages, *, overwrite: bool, skip_existing: bool | None,
             on_outcome: Callable[[Outcome], None], errors: tuple[type[Exception], ...],
             overlap: bool = True) -> list[Outcome]:
    """Process each job, never stopping at a failed one; outcomes are reported in job order.

    With `overlap` (the default) the jobs form a pipeline: the next input is read in a background thread
    while the current one computes, and each result is written (encoded, fsynced, renamed) in another thread
    while the next one computes, so that a folder keeps the device busy. Only one result waits for its
    write at a time, and none bigger than `WRITE_BEHIND_BYTES`. Without `overlap` each job is read,
    computed and written before the next starts (`upscale bench` times both).

    A destination that is the input itself fails ("refusing to write over the input image"), whatever the
    options. Another existing destination is skipped (folder inputs, or `skip_existing`), failed (a named
    file without `--overwrite`), or replaced (`overwrite`); a write still in flight to the same destination
    is waited for before that check. KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI's handler)
    stops computing, lets the writes already under way finish (each is atomic: a complete file or none),
    reports them, and propagates with the outcomes so far in the exception's `outcomes`.
    """
    outcomes: list[Outcome] = []
    pending: deque[_Pending] = deque()
    reads: dict[int, Future] = {}
    reader = ThreadPoolExecutor(1, thread_name_prefix="upscale-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="upscale-write")

    def write(job: Job, result: Any) -> float:
        stages.write(job, result)
        return time.perf_counter()  # when it was done, for the job's seconds

    def report(block: bool, until: int = 0) -> None:
        """Report the finished entries at the front; with `block`, wait until at most `until` remain."""
        while pending and (pending[0].write is None or pending[0].write.done() or (block and len(pending) > until)):
            entry = pending[0]
            outcome = entry.outcome
            if outcome is None:
                try:
                    written = entry.write.result()
                    outcome = Outcome(entry.job, "ok", None, written - entry.start, entry.extra)
                except errors as e:
                    outcome = Outcome(entry.job, "failed", str(e), time.perf_counter() - entry.start,
                                      remedy=getattr(e, "remedy", None))
            pending.popleft()
            outcomes.append(outcome)
            on_outcome(outcome)

    def writing_to(dest: Path) -> bool:
        return dest != STDIO and any(p.write is not None and p.job.dest != STDIO and _key(p.job.dest) == _key(dest)
                                     for p in pending)

    def read_ahead(after: int) -> None:
        """Start reading the next job that will need its input (not one whose output already exists)."""
        for j in range(after + 1, len(jobs)):
            nxt = jobs[j]
            if nxt.conflict or nxt.skip:
                continue
            if nxt.dest == STDIO or overwrite or not nxt.dest.exists():
                if j not in reads:
                    reads[j] = reader.submit(stages.read, nxt)
                return

    try:
        for i, job in enumerate(jobs):
            if writing_to(job.dest):  # the same destination as an earlier job: its write decides "exists"
                report(block=True)
            start = time.perf_counter()
            ahead = reads.pop(i, None)
            decided = verdict(job, overwrite=overwrite, skip_existing=skip_existing)
            if decided is not None:
                pending.append(_Pending(job, start, outcome=decided))
                report(block=False)
                continue
            if overlap:
                read_ahead(i)
            try:
                data = ahead.result() if ahead is not None else stages.read(job)
                result, extra = stages.compute(job, data)
                del data
            except errors as e:
                failed = Outcome(job, "failed", str(e), time.perf_counter() - start, remedy=getattr(e, "remedy", None))
                pending.append(_Pending(job, start, outcome=failed))
                report(block=False)
                continue
            big = stages.nbytes(result) > WRITE_BEHIND_BYTES
            pending.append(_Pending(job, start, extra, writer.submit(write, job, result)))
            del result
            # at most one result waits for its write while the next job computes; none in sequential mode
            report(block=True, until=1 if overlap and not big else 0)
        report(block=True)
    except KeyboardInterrupt as e:
        for future in reads.values():
            future.cancel()
        try:  # the writes under way finish (atomically) and count as done
            report(block=True)
        except KeyboardInterrupt:
            pass
        e.outcomes = outcomes  # type: ignore[attr-defined]
        raise
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True)
    return outcomes


@dataclass
class UpscaleStages:
    """The steps of `upscale INPUT...` for one job: decode, upscale, encode and write atomically.

    Shared by the command line and `upscale bench`'s folder timing, so that the bench times what users run.
    """

    upscaler: Any  # engine.Upscaler
    fmt: str | None = None  # output format name (PNG, JPEG, ...); None: from the destination's extension
    quality: int = 95
    overwrite: bool = False
    allow_large: bool = False
    protect: tuple = ()  # paths never written over (the inputs)
    provenance: dict = field(default_factory=dict)  # recorded in each output beside what the image ran with
    on_frame: Callable[[Job, int, int], None] | None = None  # (job, frames done, frames) on files of several

    def read(self, job: Job):
        from .imageio import read_image

        if job.source == STDIO:
            return read_image(sys.stdin.buffer.read(), allow_large=self.allow_large, name="<stdin>")
        return read_image(job.source, allow_large=self.allow_large)

    def compute(self, job: Job, image) -> tuple[Any, dict]:
        from .api import upscale_image_with_stats
        from .imageio import MULTI_FRAME_FORMATS, output_bits

        warnings = []
        out_fmt = self._format(job)
        if image.frames > 1 and out_fmt not in MULTI_FRAME_FORMATS:  # computed for nothing, and never silently
            what = "pages" if image.source_format == "TIFF" else "frames"
            warnings.append(f"{out_fmt} holds one image: upscaled the first of {image.frames} {what} (write gif, "
                            "png, webp or tif to keep them all)")
            image = dataclasses.replace(image, pages=[])
        if image.frames > 1:
            self._check_frames_fit(job, image)
        on_frame = None if self.on_frame is None else functools.partial(self.on_frame, job)
        # one image without alpha is quantised to the depth it is written with as its rows are finished: the
        # float output is never held whole (a 12 MP photo at x2: 576 MB)
        bits = output_bits(image, out_fmt) if out_fmt and image.frames == 1 and image.alpha is None else None
        result, stats = upscale_image_with_stats(self.upscaler, image, on_frame, bits)  # what it actually ran with
        used = {"protocol": stats.protocol, "tile": stats.tile, "precision": stats.precision,
                "tiles_per_forward": stats.tiles_per_forward, "fp32_fallbacks": stats.fp32_fallbacks,
                "frames": result.frames}
        warnings += stats.notes
        if warnings:
            used["warnings"] = warnings
        provenance = {**self.provenance, "protocol": stats.protocol, "tile": stats.tile or "whole image",
                      "precision": stats.precision}
        return (result, provenance), used

    def _check_frames_fit(self, job: Job, image) -> None:
        """Every upscaled frame is held until the file is written: refuse, in one line, a file whose frames
        would need more than half the memory free now, rather than be killed for it halfway through a batch."""
        from .imageio import ImageError
        from .memory import available_ram

        scale = self.upscaler.scale
        need = sum(f.rgb.shape[0] * f.rgb.shape[1] * (16 if f.alpha is not None else 12) for f in image.all_frames)
        need *= scale * scale
        free = available_ram()
        if need > free // 2:
            name = "<stdin>" if job.source == STDIO else str(job.source)
            raise ImageError(f"{name}: its {image.frames} frames at x{scale} need {need / 2**30:.1f} GB held at once, "
                             f"more than half the memory free here ({free / 2**30:.1f} GB); split the file, or write a "
                             "format that holds one image to upscale the first frame alone")

    def _format(self, job: Job) -> str | None:
        from .imageio import format_for

        # stdout takes PNG unless told; a file's format comes from --format or its name (never a silent PNG)
        return self.fmt or (format_for(job.dest) if job.dest != STDIO else "PNG")

    def write(self, job: Job, result) -> None:
        from .imageio import save_image

        image, provenance = result
        prepare_folder(job)
        save_image(image, "-" if job.dest == STDIO else job.dest, self._format(job), quality=self.quality,
                   overwrite=self.overwrite, protect=self.protect, provenance=provenance)

    def nbytes(self, result) -> int:
        return sum(a.nbytes for frame in result[0].all_frames for a in (frame.rgb, frame.alpha) if a is not None)
