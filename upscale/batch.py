"""Batches: turn the command line's inputs into (source, destination) jobs, and run them one by one.

Inputs are files, folders (their images; `recursive` walks sub-folders and mirrors them under the output
folder), glob patterns (expanded here when the shell did not), `-` for image bytes on stdin, and lists of
paths (`--from-list FILE|-`). Inside folders, files that are not images (judged by content, not by name:
`.DS_Store`, `Thumbs.db`, text) are skipped and counted; a file named explicitly that is not an image fails
with a one-line error. Nothing here ever writes over an input.
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


@dataclass
class Job:
    source: Path  # STDIO for stdin
    dest: Path  # STDIO for stdout
    from_folder: bool = False  # found by walking a folder (skip-existing is then the default)


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
    """Whether Pillow recognises the file's content as an image (reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def read_list(source: str, stdin_text: Callable[[], str]) -> list[str]:
    """Paths from a list file (or stdin with `-`), one per line; blank lines and `#` comments ignored."""
    text = stdin_text() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dest_name(src: Path, scale: int, suffix: str | None, ext: str | None) -> str:
    ext = ext or (src.suffix if src.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
                  else ".png")
    return f"{src.stem}{suffix if suffix is not None else f'_x{scale}'}{ext}"


def plan_jobs(inputs: Iterable[str], output: str | None, scale: int, *, suffix: str | None = None,
              ext: str | None = None, recursive: bool = False) -> Plan:
    """Every (source, destination) pair, in input order. `ext` None keeps PNG for PNG and so on.

    Without `output` an image's result goes beside it. With an output folder (one that exists, ends with a
    separator, or is needed because there are several inputs) results go into it, mirroring sub-folders of
    walked folders. `-` as output means stdout.
    """
    plan = Plan()
    out = Path(output) if output and output != "-" else None
    entries: list[tuple[Path, Path | None]] = []  # (file, folder it was found in)
    for text in inputs:
        if text == "-":
            entries.append((STDIO, None))
            continue
        path = Path(text)
        if not path.exists() and _has_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            entries += [(Path(m), None) for m in matches if Path(m).is_file()]
            if not matches:
                entries.append((path, None))  # reported as missing
            continue
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            for f in sorted(p for p in walker if p.is_file()):
                if out is not None and _inside(f, out):
                    continue  # never feed our own outputs back in
                if f.name.startswith(".") and f.suffix == ".part":
                    continue  # a temporary file of an interrupted write
                if looks_like_image(f):
                    entries.append((f, path))
                else:
                    plan.not_images.append(f)
            continue
        entries.append((path, None))

    to_folder = out is not None and (out.is_dir() or str(output).endswith(("/", os.sep)) or len(entries) > 1
                                     or any(folder for _, folder in entries))
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
        plan.jobs.append(Job(src, dest, from_folder=folder is not None))
    return plan


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def run_jobs(jobs: list[Job], process: Callable[[Job], dict], *, overwrite: bool, skip_existing: bool | None,
             on_outcome: Callable[[Outcome], None], errors: tuple[type[Exception], ...]) -> list[Outcome]:
    """Process each job, never stopping at a failed one; `process` returns extra fields for the record.

    An existing destination is skipped (folder inputs, or `skip_existing`), failed (a named file without
    `--overwrite`), or replaced (`overwrite`). KeyboardInterrupt propagates after the current job's
    temporary file is gone (the writer cleans up), with the outcomes so far in the exception's `outcomes`.
    """
    outcomes: list[Outcome] = []
    try:
        for job in jobs:
            start = time.perf_counter()
            if job.dest != STDIO and job.dest.exists() and not overwrite:
                skip = skip_existing if skip_existing is not None else job.from_folder
                if skip:
                    outcome = Outcome(job, "skipped", "output exists")
                else:
                    outcome = Outcome(job, "failed", f"{job.dest}: already exists (use --overwrite to replace it)")
                outcomes.append(outcome)
                on_outcome(outcome)
                continue
            try:
                extra = process(job)
                outcome = Outcome(job, "ok", None, time.perf_counter() - start, extra)
            except errors as e:
                outcome = Outcome(job, "failed", str(e), time.perf_counter() - start)
            outcomes.append(outcome)
            on_outcome(outcome)
    except KeyboardInterrupt as e:
        e.outcomes = outcomes  # type: ignore[attr-defined]
        raise
    return outcomes
